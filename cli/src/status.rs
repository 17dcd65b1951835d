//! `coevo status OUT`: the live state of a running coordinator for an operator's terminal,
//! read from the `OUT/status.json` the coordinator rewrites every second
//! ([`coevo_ops::status`]). A file rather than the broker: it reads the same behind
//! the embedded broker and Mosquitto, needs no credentials, and says "dead" by going stale.

use coevo_ops::status::{read_status, status_path, LiveStatus};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What `status.json` cannot tell an operator, as a typed error with what to do.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no {}: no coordinator has run with `out` here (or it runs with [metrics] status_interval_ms = 0)", path.display())]
    Missing { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("{} was last written {age_s} s ago by a coordinator that said it was {state} (round {round}, {phase}): it is not running any more (killed or crashed); start it again: it resumes from its last completed round", path.display())]
    Stale {
        path: PathBuf,
        age_s: u64,
        state: String,
        round: u64,
        phase: String,
    },
}

/// `coevo status --json`: the file's fields plus what a script would otherwise compute.
#[derive(Debug, Serialize)]
pub struct StatusView {
    #[serde(flatten)]
    pub status: LiveStatus,
    /// Until the deadline (0 once passed; `null` outside collection).
    pub time_left_ms: Option<u64>,
    /// How old the snapshot is.
    pub age_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads the status under `dir` (a coordinator's `out`, or the file itself), refusing a stale
/// one: an active coordinator that has not rewritten it for `stale_after` (default: 5 s or 3
/// intervals, whichever is longer).
pub fn read_live(dir: &Path, stale_after: Option<Duration>) -> Result<StatusView, StatusError> {
    let path = if dir.is_dir() {
        status_path(dir)
    } else {
        dir.to_path_buf()
    };
    if !path.exists() {
        return Err(StatusError::Missing { path });
    }
    let status = read_status(&path).map_err(|e| StatusError::Unreadable {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let now = now_ms();
    let limit = stale_after
        .map(|d| d.as_millis() as u64)
        .unwrap_or_else(|| (3 * status.interval_ms).max(5000));
    if status.is_stale(now, limit) {
        return Err(StatusError::Stale {
            path,
            age_s: now.saturating_sub(status.updated_unix_ms) / 1000,
            state: status.state.clone(),
            round: status.round,
            phase: status.phase.clone(),
        });
    }
    Ok(StatusView {
        time_left_ms: status.time_left_ms(now),
        age_ms: now.saturating_sub(status.updated_unix_ms),
        status,
    })
}

/// Where the coordinator is, e.g. `city round 3/5 · collect · 42 s left`.
pub fn headline(v: &StatusView) -> String {
    let s = &v.status;
    let mut line = format!("{} round {}/{} · {}", s.fleet, s.round, s.rounds, s.phase);
    if let Some(ms) = v.time_left_ms {
        line.push_str(&format!(" · {} s left", ms.div_ceil(1000)));
    }
    if !s.is_active() {
        line.push_str(&format!(" · coordinator {}", s.state));
        if let Some(e) = &s.error {
            line.push_str(&format!(": {e}"));
        }
    }
    line
}

/// The round's counts, e.g. `connected 9/10 · uploaded 7 · accepted 6 (quorum 6) · rejected 1`
/// (without `accepted` next to a bar that shows it).
pub fn counts(v: &StatusView, with_accepted: bool) -> String {
    let s = &v.status;
    let quorum = if with_accepted {
        format!("accepted {} (quorum {})", s.accepted, s.quorum)
    } else {
        format!("quorum {}", s.quorum)
    };
    format!(
        "connected {}/{} · uploaded {} · {quorum} · rejected {}",
        s.connected, s.registered, s.uploaded, s.rejected
    )
}

/// Everything on one line (snapshots and logs).
pub fn summary(v: &StatusView) -> String {
    format!("{} · {}", headline(v), counts(v, true))
}

/// What the last closed round did, e.g. `round 2 completed: 10/10 accepted, student 0.812`.
pub fn closed_line(s: &LiveStatus) -> Option<String> {
    let r = s.last_round.as_ref()?;
    let acc = |a: Option<f64>| a.map(|a| format!("{a:.3}")).unwrap_or_else(|| "-".into());
    Some(format!(
        "round {} {}: {}/{} accepted, student {}, teacher {}, {:.1} s",
        r.round,
        r.outcome,
        r.accepted,
        r.registered,
        acc(r.student_accuracy),
        acc(r.teacher_accuracy),
        r.duration_ms as f64 / 1000.0
    ))
}

/// `coevo status`: one snapshot (`once`), or refreshing until the round in progress (or the
/// next one, between rounds) closes or the coordinator stops. `json`: JSON (one document with
/// `once`, else one line per refresh).
pub fn run(
    dir: &Path,
    once: bool,
    json: bool,
    stale_after: Option<Duration>,
) -> anyhow::Result<()> {
    match follow(dir, once, json, stale_after) {
        // The reader went away (`coevo status --json | head -1`): done, not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// Writes a line to stdout, reporting a closed pipe as an error instead of panicking.
fn say(line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

fn follow(dir: &Path, once: bool, json: bool, stale_after: Option<Duration>) -> anyhow::Result<()> {
    let first = read_live(dir, stale_after)?;
    if once || !first.status.is_active() {
        if json {
            say(&serde_json::to_string_pretty(&first)?)?;
        } else {
            say(&summary(&first))?;
            if let Some(l) = closed_line(&first.status) {
                say(&format!("last: {l}"))?;
            }
        }
        return Ok(());
    }
    // The round to follow: the one running, or the next one when between rounds.
    let between = matches!(first.status.phase.as_str(), "idle" | "starting");
    let target = first.status.round + u64::from(between);
    let closed = |v: &StatusView| {
        !v.status.is_active()
            || v.status.round > target
            || v.status
                .last_round
                .as_ref()
                .is_some_and(|r| r.round >= target)
    };
    let bar = ProgressBar::with_draw_target(
        Some(first.status.registered as u64),
        if json || !std::io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    bar.set_style(
        // Three short lines rather than one long one: an 80-column terminal must not wrap it.
        ProgressStyle::with_template("{prefix}\n{bar:30.green/white} {pos}/{len} accepted\n{msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut view = first;
    let mut printed = String::new();
    loop {
        if json {
            say(&serde_json::to_string(&view)?)?;
        } else {
            bar.set_length(view.status.registered as u64);
            bar.set_position(view.status.accepted as u64);
            let line = summary(&view);
            // Not a terminal (a log, a pipe): a line per change, no bar.
            if bar.is_hidden() && line != printed {
                say(&line)?;
            }
            bar.set_prefix(headline(&view));
            bar.set_message(counts(&view, false));
            printed = line;
        }
        if closed(&view) {
            break;
        }
        std::thread::sleep(Duration::from_millis(if json { 1000 } else { 500 }));
        view = read_live(dir, stale_after)?;
    }
    bar.finish_and_clear();
    if !json {
        match closed_line(&view.status) {
            Some(l) => say(&l)?,
            None => say(&summary(&view))?,
        }
    }
    Ok(())
}
