//! What an edge must not forget, and the rule that keeps it from acting on stale state.
//!
//! A retained `round/current` outlives the round it announces: a broker hands the last one to
//! every new subscription, so an edge that restarts, or a camera switched on late, is handed
//! whatever manifest was retained last — possibly an old one replayed by someone else (it is
//! still validly signed). Following it would mean training on a model nobody publishes any
//! more and waiting forever for a receipt. So an edge acts on a manifest only if
//!
//! - its round is above the last round this edge completed (kept in `state_dir/last_round`,
//!   so the rule survives a restart), and
//! - its deadline, plus a grace period for clock skew, has not passed.
//!
//! The same deadline bounds how long an edge keeps trying to fetch a model it cannot verify:
//! past it, the round is given up and the edge waits for the next manifest.
//!
//! Every message an edge ignores is counted by [`IgnoreReason`]; [`Ignored`] also keeps the
//! log to one line per reason per round, so a flood costs counters, not log volume.

use crate::EdgeError;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File in `state_dir` holding the last round this edge completed (decimal text).
pub const LAST_ROUND_FILE: &str = "last_round";

/// Longest `last_round` file we read: a u64 in decimal plus a newline.
const MAX_LAST_ROUND_BYTES: u64 = 32;

/// Why a validly signed manifest is not acted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// The round is not above the last one this edge completed (a replay, or the round it
    /// just finished, handed over again after a reconnect).
    NotNewer { round: u64, last_completed: u64 },
    /// The round's deadline plus the grace period has passed.
    Expired {
        round: u64,
        deadline_unix_ms: u64,
        now_unix_ms: u64,
    },
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::NotNewer {
                round,
                last_completed,
            } => write!(
                f,
                "round {round} is not above round {last_completed}, the last this edge completed"
            ),
            Stale::Expired {
                round,
                deadline_unix_ms,
                now_unix_ms,
            } => write!(
                f,
                "round {round}'s deadline passed {} s ago",
                now_unix_ms.saturating_sub(*deadline_unix_ms) / 1000
            ),
        }
    }
}

/// The freshness rule (pure, so it is tested without a clock or a broker): may an edge whose
/// last completed round is `last_completed` act on a manifest for `round` with deadline
/// `deadline_unix_ms`, at `now_unix_ms`, allowing `grace_ms` of clock skew?
pub fn check_fresh(
    round: u64,
    deadline_unix_ms: u64,
    now_unix_ms: u64,
    last_completed: u64,
    grace_ms: u64,
) -> Result<(), Stale> {
    if round <= last_completed {
        return Err(Stale::NotNewer {
            round,
            last_completed,
        });
    }
    if now_unix_ms > deadline_unix_ms.saturating_add(grace_ms) {
        return Err(Stale::Expired {
            round,
            deadline_unix_ms,
            now_unix_ms,
        });
    }
    Ok(())
}

/// Milliseconds since the Unix epoch by the local clock (0 if it is set before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The last round this edge completed, persisted in `state_dir` when there is one.
#[derive(Debug)]
pub struct LastRound {
    path: Option<PathBuf>,
    value: u64,
}

impl LastRound {
    /// Reads `dir/last_round` (0 when there is no `dir` or no file yet). A file that cannot
    /// be parsed is logged and read as 0: the deadline rule still keeps the edge off replayed
    /// manifests, and refusing to start would take a camera out of the fleet for a bad file.
    pub fn load(dir: Option<&Path>) -> Result<Self, EdgeError> {
        let Some(dir) = dir else {
            return Ok(LastRound {
                path: None,
                value: 0,
            });
        };
        let path = dir.join(LAST_ROUND_FILE);
        let value = match std::fs::File::open(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(EdgeError::State(format!("{}: {e}", path.display()))),
            Ok(f) => {
                let mut text = String::new();
                use std::io::Read;
                f.take(MAX_LAST_ROUND_BYTES)
                    .read_to_string(&mut text)
                    .map_err(|e| EdgeError::State(format!("{}: {e}", path.display())))?;
                match text.trim().parse::<u64>() {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "unreadable last completed round; starting from 0");
                        0
                    }
                }
            }
        };
        Ok(LastRound {
            path: Some(path),
            value,
        })
    }

    /// The last round completed (0: none).
    pub fn get(&self) -> u64 {
        self.value
    }

    /// Records `round` as completed (never moves backwards) and persists it atomically: a
    /// crash leaves either the old or the new number on disk, never a torn one.
    pub fn complete(&mut self, round: u64) -> Result<(), EdgeError> {
        if round <= self.value {
            return Ok(());
        }
        self.value = round;
        match &self.path {
            Some(path) => write_atomic(path, format!("{round}\n").as_bytes()),
            None => Ok(()),
        }
    }
}

/// File in `state_dir` holding the round whose delta produced the saved error-feedback
/// residual (decimal text), so the residual's age survives a restart.
pub const RESIDUAL_ROUND_FILE: &str = "residual_round";

/// Default of [`crate::AgentOptions::max_residual_age_rounds`].
pub const DEFAULT_MAX_RESIDUAL_AGE_ROUNDS: u64 = 2;

/// Whether an error-feedback residual computed in round `computed_in` is too old to be added
/// to the delta of `round`; `Some(age)` when it must be dropped.
///
/// # Why drop, and why not rescale
///
/// The residual is the part of an earlier delta the uplink codec left out, i.e. a direction
/// computed against the model of round `computed_in`. In steady state it is one round old
/// (age 1), which is the setting error feedback is analysed in (EF-SGD, EF21): what is sent
/// plus what is carried sums to the true updates along one trajectory. A camera that was
/// offline missed the aggregations in between; its residual then points from a model nobody
/// holds any more, and adding it pushes the fresh delta towards that stale direction —
/// worst for `top-k`, whose residual holds most of an update's mass.
///
/// It is dropped rather than decayed because a decay factor has no principled value for a
/// fleet's data (it would be one more knob to tune per deployment) and a decayed residual
/// still points the stale way; a zero residual is exactly the state error feedback starts
/// from, so dropping is always safe. The cost is bounded: one client's compression error of
/// one round, which the fleet never received anyway while the camera was offline.
///
/// The default, 2, tolerates one missed round (a lost receipt or a fetch that missed its
/// deadline on a congested uplink are routine for cameras): one extra aggregation moves the
/// model about as much as the round the residual already spans. An unknown `computed_in`
/// (`None`: a residual without its round, from an older version) or one not below `round`
/// (the fleet was restarted) is treated as too old and reported as age `u64::MAX`.
pub fn stale_residual_age(round: u64, computed_in: Option<u64>, max_age: u64) -> Option<u64> {
    match computed_in {
        None => Some(u64::MAX),
        // From a later round than this one: the fleet was restarted on a new trajectory.
        Some(r) if r >= round => Some(u64::MAX),
        Some(r) => {
            let age = round.saturating_sub(r);
            (age > max_age).then_some(age)
        }
    }
}

/// Reads the round in `dir/residual_round` (`None`: no file, or not a number, which is
/// treated as "age unknown" and so drops the residual: never fatal for a camera).
pub fn load_residual_round(dir: &Path) -> Option<u64> {
    let path = dir.join(RESIDUAL_ROUND_FILE);
    let f = std::fs::File::open(&path).ok()?;
    let mut text = String::new();
    use std::io::Read;
    f.take(MAX_LAST_ROUND_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    match text.trim().parse() {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "unreadable residual round");
            None
        }
    }
}

/// Records, atomically, that the residual saved in `dir` was computed in `round`. Written
/// after the residual itself: a crash in between leaves an older round on disk, which can
/// only make the residual look older (dropped sooner), never fresher than it is.
pub fn save_residual_round(dir: &Path, round: u64) -> Result<(), EdgeError> {
    write_atomic(
        &dir.join(RESIDUAL_ROUND_FILE),
        format!("{round}\n").as_bytes(),
    )
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it, renames it over `path` and
/// fsyncs the folder, creating the folder if needed.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EdgeError> {
    let fail = |e: std::io::Error| EdgeError::State(format!("{}: {e}", path.display()));
    let dir = path
        .parent()
        .ok_or_else(|| EdgeError::State(format!("{}: no parent folder", path.display())))?;
    std::fs::create_dir_all(dir).map_err(fail)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
    }
    std::fs::rename(&tmp, path).map_err(fail)?;
    // The rename is durable only once the folder is; not every platform can open one.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Why an incoming message was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IgnoreReason {
    /// A manifest that does not decode or whose signature, fleet or size does not verify.
    UnverifiedManifest,
    /// A validly signed manifest for a round this edge already completed.
    OldManifest,
    /// A validly signed manifest whose deadline has passed.
    ExpiredManifest,
    /// A model chunk that does not decode, or does not fit the manifest (index, count, size).
    MalformedModelChunk,
    /// A whole model whose bytes do not match the manifest's signed digest.
    ModelDigestMismatch,
    /// A receipt that does not decode or verify.
    UnverifiedReceipt,
    /// A TorchScript module (fetched, or found in the cache) whose bytes do not match the
    /// digest the signed manifest names: refused, fetched again (issue #16).
    ModuleDigestMismatch,
}

impl IgnoreReason {
    /// Stable kebab-case name, for logs and summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoreReason::UnverifiedManifest => "unverified-manifest",
            IgnoreReason::OldManifest => "old-manifest",
            IgnoreReason::ExpiredManifest => "expired-manifest",
            IgnoreReason::MalformedModelChunk => "malformed-model-chunk",
            IgnoreReason::ModelDigestMismatch => "model-digest-mismatch",
            IgnoreReason::UnverifiedReceipt => "unverified-receipt",
            IgnoreReason::ModuleDigestMismatch => "module-digest-mismatch",
        }
    }
}

impl std::fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts of ignored messages by reason, and which reasons were already logged this round.
#[derive(Clone, Debug, Default)]
pub struct Ignored {
    counts: BTreeMap<IgnoreReason, u64>,
    round: u64,
    logged: BTreeSet<IgnoreReason>,
}

impl Ignored {
    /// Counts one message ignored for `reason` while the edge works on `round`; true when
    /// this is the first such message of that round, i.e. when it should be logged.
    pub fn record(&mut self, reason: IgnoreReason, round: u64) -> bool {
        *self.counts.entry(reason).or_default() += 1;
        if round != self.round {
            self.round = round;
            self.logged.clear();
        }
        self.logged.insert(reason)
    }

    /// Messages ignored for `reason` so far.
    pub fn count(&self, reason: IgnoreReason) -> u64 {
        self.counts.get(&reason).copied().unwrap_or(0)
    }

    /// Messages ignored for any reason.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Every reason seen, with its count.
    pub fn counts(&self) -> &BTreeMap<IgnoreReason, u64> {
        &self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: u64 = 30_000;

    #[test]
    fn fresh_manifest_is_accepted() {
        assert_eq!(check_fresh(5, 10_000, 9_000, 4, GRACE), Ok(()));
        // Within the grace period after the deadline (a camera's clock may run fast).
        assert_eq!(check_fresh(5, 10_000, 10_000 + GRACE, 4, GRACE), Ok(()));
    }

    #[test]
    fn round_not_above_last_completed_is_stale() {
        for round in [1, 3, 4] {
            assert_eq!(
                check_fresh(round, u64::MAX, 0, 4, GRACE),
                Err(Stale::NotNewer {
                    round,
                    last_completed: 4
                })
            );
        }
    }

    #[test]
    fn passed_deadline_is_stale() {
        let r = check_fresh(5, 10_000, 10_001 + GRACE, 4, GRACE);
        assert_eq!(
            r,
            Err(Stale::Expired {
                round: 5,
                deadline_unix_ms: 10_000,
                now_unix_ms: 10_001 + GRACE
            })
        );
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("deadline passed 30 s ago"));
        // No overflow at the edge of the range.
        assert_eq!(check_fresh(5, u64::MAX, u64::MAX, 4, GRACE), Ok(()));
    }

    #[test]
    fn last_round_persists_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut last = LastRound::load(Some(&state)).unwrap();
        assert_eq!(last.get(), 0);
        last.complete(3).unwrap();
        last.complete(2).unwrap();
        assert_eq!(last.get(), 3);
        let again = LastRound::load(Some(&state)).unwrap();
        assert_eq!(again.get(), 3, "read back after a restart");
        assert_eq!(
            std::fs::read_to_string(state.join(LAST_ROUND_FILE)).unwrap(),
            "3\n"
        );
        assert!(!state.join("last_round.tmp").exists(), "temp file renamed");
    }

    #[test]
    fn unreadable_last_round_reads_as_zero_and_no_dir_is_memory_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LAST_ROUND_FILE), "garbage").unwrap();
        assert_eq!(LastRound::load(Some(dir.path())).unwrap().get(), 0);
        std::fs::write(dir.path().join(LAST_ROUND_FILE), "9".repeat(1000)).unwrap();
        assert_eq!(LastRound::load(Some(dir.path())).unwrap().get(), 0);
        let mut mem = LastRound::load(None).unwrap();
        mem.complete(7).unwrap();
        assert_eq!(mem.get(), 7);
    }

    #[test]
    fn residual_older_than_the_limit_is_dropped() {
        // Steady state: last round's residual, and one missed round, are kept.
        assert_eq!(stale_residual_age(5, Some(4), 2), None);
        assert_eq!(stale_residual_age(5, Some(3), 2), None);
        // Offline for rounds 2 and 3, back in round 4: age 3.
        assert_eq!(stale_residual_age(4, Some(1), 2), Some(3));
        assert_eq!(stale_residual_age(4, Some(1), 1), Some(3));
        assert_eq!(stale_residual_age(4, Some(1), 3), None);
        // Unknown age, or a residual from a later round (the fleet restarted), is too old.
        assert_eq!(stale_residual_age(4, None, 100), Some(u64::MAX));
        assert_eq!(stale_residual_age(1, Some(9), 2), Some(u64::MAX));
        assert_eq!(stale_residual_age(4, Some(4), 2), Some(u64::MAX));
    }

    #[test]
    fn residual_round_persists_and_garbage_reads_as_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert_eq!(load_residual_round(&state), None);
        save_residual_round(&state, 7).unwrap();
        assert_eq!(load_residual_round(&state), Some(7));
        std::fs::write(state.join(RESIDUAL_ROUND_FILE), "seven").unwrap();
        assert_eq!(load_residual_round(&state), None);
    }

    #[test]
    fn ignored_counts_every_message_and_logs_once_per_reason_per_round() {
        let mut ig = Ignored::default();
        assert!(ig.record(IgnoreReason::MalformedModelChunk, 1));
        for _ in 0..99 {
            assert!(!ig.record(IgnoreReason::MalformedModelChunk, 1));
        }
        assert!(ig.record(IgnoreReason::OldManifest, 1), "another reason");
        assert!(
            ig.record(IgnoreReason::MalformedModelChunk, 2),
            "next round"
        );
        assert_eq!(ig.count(IgnoreReason::MalformedModelChunk), 101);
        assert_eq!(ig.count(IgnoreReason::ExpiredManifest), 0);
        assert_eq!(ig.total(), 102);
        assert_eq!(IgnoreReason::OldManifest.to_string(), "old-manifest");
    }
}
