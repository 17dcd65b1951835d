//! The live state of the coordinator for an operator's terminal: `OUT/status.json`, rewritten
//! (atomically: a temporary file renamed over it) every `[metrics] status_interval_ms` while
//! the coordinator runs, and once more when it stops. `coevo status OUT` reads it.
//!
//! A file, not an MQTT topic or the broker's counters, so it works the same behind the
//! embedded broker and Mosquitto and needs no credentials: whoever may read the coordinator's
//! output directory may see its state. `updated_unix_ms` tells a live coordinator from one
//! that died without saying so (the file then stops changing).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file name under the coordinator's `out` directory.
pub const STATUS_FILE: &str = "status.json";

/// The coordinator's life cycle, as `state` in the file.
pub mod state {
    /// Loading its checkpoint, pretraining the teacher, connecting to the broker.
    pub const STARTING: &str = "starting";
    /// Running rounds.
    pub const RUNNING: &str = "running";
    /// Every configured round is done; the coordinator exited normally.
    pub const FINISHED: &str = "finished";
    /// Shut down (e.g. Ctrl-C) before the last round; it resumes from its checkpoint.
    pub const STOPPED: &str = "stopped";
    /// Stopped by an error (`error` says which).
    pub const FAILED: &str = "failed";
}

/// One snapshot of `status.json`. Field names are a stable interface (scripts read
/// `coevo status --json`); new fields come with `#[serde(default)]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LiveStatus {
    pub fleet: String,
    /// Process id of the coordinator that wrote this.
    pub pid: u32,
    /// `starting`, `running`, `finished`, `stopped` or `failed` (see [`state`]).
    pub state: String,
    /// The round being run, or the last one run once the coordinator is done (0: none yet).
    pub round: u64,
    /// Rounds configured: the coordinator stops after this one.
    pub rounds: u64,
    /// Stage of the round: `starting`, `distill`, `publish`, `collect`, `aggregate`, `fuse`,
    /// `evaluate`, or `idle` between rounds and after the last.
    pub phase: String,
    /// Clients in the registry this round.
    pub registered: usize,
    /// Registered clients whose retained status on the broker says online (their last will
    /// turns it offline). Updated while the coordinator reads MQTT, i.e. while collecting.
    pub connected: usize,
    /// Registered clients that completed an upload this round (accepted or not).
    pub uploaded: usize,
    /// Deltas accepted this round.
    pub accepted: usize,
    /// Messages rejected this round (as `rejected[].count` in the round's report).
    pub rejected: u64,
    /// Accepted deltas needed to aggregate at the deadline.
    pub quorum: u32,
    /// When the round's manifest was published (Unix ms; 0 before that).
    pub round_started_unix_ms: u64,
    /// The round's deadline as signed in its manifest (after any extension); `None` outside
    /// the collect phase.
    pub deadline_unix_ms: Option<u64>,
    /// The last round that closed, in brief.
    pub last_round: Option<ClosedRound>,
    /// When this snapshot was taken (Unix ms).
    pub updated_unix_ms: u64,
    /// How often the coordinator rewrites the file, so a reader knows when it is stale.
    pub interval_ms: u64,
    /// Why the coordinator stopped, when `state` is `failed`.
    pub error: Option<String>,
}

/// A round that closed, as in its report.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClosedRound {
    pub round: u64,
    /// The report's `outcome`: `completed`, `skipped`, `rolled_back`, …
    pub outcome: String,
    pub accepted: usize,
    pub registered: usize,
    pub student_accuracy: Option<f64>,
    pub teacher_accuracy: Option<f64>,
    pub duration_ms: u64,
}

impl LiveStatus {
    /// Whether the coordinator is still at work (not finished, stopped or failed).
    pub fn is_active(&self) -> bool {
        self.state == state::STARTING || self.state == state::RUNNING
    }

    /// Milliseconds until the deadline at `now_ms` (0 once passed; `None` without one).
    pub fn time_left_ms(&self, now_ms: u64) -> Option<u64> {
        self.deadline_unix_ms.map(|d| d.saturating_sub(now_ms))
    }

    /// True when an active coordinator has not rewritten the file for `max_age_ms`: it died
    /// (or hangs) without saying so.
    pub fn is_stale(&self, now_ms: u64, max_age_ms: u64) -> bool {
        self.is_active() && now_ms.saturating_sub(self.updated_unix_ms) > max_age_ms
    }
}

/// `out/status.json`.
pub fn status_path(out: &Path) -> PathBuf {
    out.join(STATUS_FILE)
}

/// Writes `status` atomically (temporary file, then rename). Not fsync'd: it is rewritten
/// every second and worthless after a crash, and a disk flush a second would cost a busy
/// coordinator more than the file is worth.
pub fn write_status(out: &Path, status: &LiveStatus) -> std::io::Result<()> {
    let path = status_path(out);
    let tmp = out.join(format!(".{STATUS_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    std::fs::create_dir_all(out)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// Reads `out/status.json` (or the file itself when `path` is one).
pub fn read_status(path: &Path) -> Result<LiveStatus, crate::OpsError> {
    let file = if path.is_dir() {
        status_path(path)
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&file)
        .map_err(|e| crate::OpsError::Io(format!("{}: {e}", file.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| crate::OpsError::Io(format!("{}: {e}", file.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tells_stale_from_done() {
        let dir = tempfile::tempdir().unwrap();
        let s = LiveStatus {
            fleet: "city".into(),
            state: state::RUNNING.into(),
            round: 3,
            deadline_unix_ms: Some(10_000),
            updated_unix_ms: 1_000,
            ..LiveStatus::default()
        };
        write_status(dir.path(), &s).unwrap();
        assert_eq!(read_status(dir.path()).unwrap(), s);
        assert_eq!(s.time_left_ms(4_000), Some(6_000));
        assert_eq!(s.time_left_ms(20_000), Some(0));
        assert!(!s.is_stale(3_000, 5_000));
        assert!(s.is_stale(7_000, 5_000));
        // A finished coordinator's file never goes stale: it is its last word.
        let done = LiveStatus {
            state: state::FINISHED.into(),
            ..s
        };
        assert!(!done.is_stale(1_000_000, 5_000));
        let e = read_status(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
