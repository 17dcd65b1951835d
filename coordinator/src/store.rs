//! Durable state under the coordinator's output directory. Accepted deltas are written here
//! (fsync'd, atomically renamed) *before* the client gets its receipt, so nothing accepted is
//! lost if the coordinator dies.
//!
//! ```text
//! OUT/state.json                      last completed round + digest of the global model
//! OUT/checkpoints/student-NNNN.safetensors
//! OUT/rounds/NNNN/deltas/CLIENT.bin   accepted delta: the signed header + payload, as received
//! OUT/rounds/NNNN/journal.jsonl       one line per accepted delta (client, round, digest, file),
//!                                     fsync'd before the receipt: what was promised to clients
//! OUT/reports/round-NNNN.json
//! ```

use crate::CoordinatorError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;

/// The durable writes ([`coevo_ops::fs`]: the fleet registry and the HTML report use them too).
pub use coevo_ops::fs::{sync_dir, write_atomic, write_synced};

/// What survives a restart between rounds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// Last round fully completed (0 = none yet).
    pub completed_round: u64,
}

/// One accepted delta, as promised to its client by a receipt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub client: String,
    pub round: u64,
    /// Hex digest of the accepted payload (what the receipt names).
    pub digest: String,
    /// The delta file, relative to the round's directory.
    pub file: String,
}

/// Paths of one output directory.
#[derive(Clone, Debug)]
pub struct Store {
    pub root: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    pub fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }

    pub fn checkpoint_path(&self, round: u64) -> PathBuf {
        self.root
            .join("checkpoints")
            .join(format!("student-{round:04}.safetensors"))
    }

    /// The student published as round `round`'s base (after distillation, in coevolve mode).
    pub fn base_path(&self, round: u64) -> PathBuf {
        self.root
            .join("checkpoints")
            .join(format!("base-{round:04}.safetensors"))
    }

    pub fn teacher_path(&self, round: u64) -> PathBuf {
        self.root
            .join("checkpoints")
            .join(format!("teacher-{round:04}.safetensors"))
    }

    pub fn report_path(&self, round: u64) -> PathBuf {
        self.root
            .join("reports")
            .join(format!("round-{round:04}.json"))
    }

    pub fn delta_dir(&self, round: u64) -> PathBuf {
        self.root
            .join("rounds")
            .join(format!("{round:04}"))
            .join("deltas")
    }

    /// `rounds/NNNN/journal.jsonl`.
    pub fn journal_path(&self, round: u64) -> PathBuf {
        self.root
            .join("rounds")
            .join(format!("{round:04}"))
            .join("journal.jsonl")
    }

    /// Appends `entry` to its round's journal and fsyncs it: once this returns, a restarted
    /// coordinator knows the delta was acknowledged, even if its file is later lost.
    pub fn append_journal(&self, entry: &JournalEntry) -> Result<(), CoordinatorError> {
        self.append_journal_batch(entry.round, std::slice::from_ref(entry))
    }

    /// Appends `entries` (all of `round`) to the round's journal in one write and one fsync:
    /// the journal half of a group commit.
    pub fn append_journal_batch(
        &self,
        round: u64,
        entries: &[JournalEntry],
    ) -> Result<(), CoordinatorError> {
        let path = self.journal_path(round);
        let io = |e: std::io::Error| CoordinatorError::Io(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut lines = Vec::with_capacity(entries.len() * 128);
        for entry in entries {
            serde_json::to_writer(&mut lines, entry)
                .map_err(|e| CoordinatorError::Io(format!("journal: {e}")))?;
            lines.push(b'\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        f.write_all(&lines).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// The journal of `round` (empty when there is none). A torn last line (a crash mid-append,
    /// before its receipt could have gone out) is skipped.
    pub fn load_journal(&self, round: u64) -> Result<Vec<JournalEntry>, CoordinatorError> {
        let path = self.journal_path(round);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(CoordinatorError::Io(format!("{}: {e}", path.display()))),
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<JournalEntry>(l).ok())
            .filter(|e| e.round == round)
            .collect())
    }

    /// The state to resume from. A fresh output directory gets a `state.json` at once, so
    /// from then on a missing one always means damage: an output directory that holds rounds,
    /// reports or checkpoints but no `state.json` is refused rather than silently restarted at
    /// round 1 (which would overwrite its history).
    pub fn load_or_init_state(&self) -> Result<State, CoordinatorError> {
        if self.state_path().exists() {
            return self.load_state();
        }
        let nonempty =
            |d: &str| std::fs::read_dir(self.root.join(d)).is_ok_and(|mut e| e.next().is_some());
        let found: Vec<&str> = ["rounds", "reports", "checkpoints"]
            .into_iter()
            .filter(|d| nonempty(d))
            .collect();
        if !found.is_empty() {
            return Err(CoordinatorError::Config(format!(
                "{} holds {} but no state.json, so the last completed round is unknown. \
                 To resume, restore {} (e.g. from a backup, or write {{\"completed_round\": N}} \
                 with N the last round that has a report); to start fresh, point `out` at a new \
                 or empty directory",
                self.root.display(),
                found.join(", "),
                self.state_path().display()
            )));
        }
        let state = State::default();
        self.save_state(&state)?;
        Ok(state)
    }

    pub fn load_state(&self) -> Result<State, CoordinatorError> {
        match std::fs::read(self.state_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| CoordinatorError::Io(format!("state.json: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(CoordinatorError::Io(format!("state.json: {e}"))),
        }
    }

    pub fn save_state(&self, state: &State) -> Result<(), CoordinatorError> {
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| CoordinatorError::Io(format!("state.json: {e}")))?;
        Ok(write_atomic(&self.state_path(), &json)?)
    }

    /// The file (relative to the round's directory) [`Store::save_delta`] writes for `client`.
    pub fn delta_file(client: &str) -> String {
        format!("deltas/{client}.bin")
    }

    /// Persists an accepted delta (the raw signed header and payload as received).
    pub fn save_delta(
        &self,
        round: u64,
        client: &str,
        header: &coevo_protocol::Signed,
        payload: &[u8],
    ) -> Result<(), CoordinatorError> {
        self.write_delta(round, client, header, payload)?;
        Ok(sync_dir(&self.delta_dir(round))?)
    }

    /// [`Store::save_delta`] without the directory sync, which a group commit does once for
    /// the whole batch ([`sync_dir`] on [`Store::delta_dir`]).
    pub fn write_delta(
        &self,
        round: u64,
        client: &str,
        header: &coevo_protocol::Signed,
        payload: &[u8],
    ) -> Result<(), CoordinatorError> {
        let record = coevo_protocol::envelope::encode(
            coevo_protocol::Kind::DeltaChunk,
            &coevo_protocol::DeltaChunk {
                client: client.to_string(),
                round,
                index: 0,
                total: 1,
                header: Some(header.clone()),
                data: payload.to_vec(),
            },
        );
        Ok(write_synced(
            &self.delta_dir(round).join(format!("{client}.bin")),
            &record,
        )?)
    }

    /// Reads back the accepted deltas of a round (after a restart).
    pub fn load_deltas(
        &self,
        round: u64,
        limit: usize,
    ) -> Result<Vec<coevo_protocol::DeltaChunk>, CoordinatorError> {
        let dir = self.delta_dir(round);
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(CoordinatorError::Io(format!("{}: {e}", dir.display()))),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("bin") {
                continue;
            }
            let bytes = std::fs::read(&path)
                .map_err(|e| CoordinatorError::Io(format!("{}: {e}", path.display())))?;
            let rec =
                coevo_protocol::envelope::decode(&bytes, coevo_protocol::Kind::DeltaChunk, limit)
                    .map_err(|e| CoordinatorError::Io(format!("{}: {e}", path.display())))?;
            out.push(rec);
        }
        out.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_dir_with_history_but_no_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("out"));
        // Fresh: state.json is written at once.
        assert_eq!(store.load_or_init_state().unwrap().completed_round, 0);
        assert!(store.state_path().exists());
        store.save_state(&State { completed_round: 4 }).unwrap();
        write_atomic(&store.report_path(4), b"{}").unwrap();
        assert_eq!(store.load_or_init_state().unwrap().completed_round, 4);
        std::fs::remove_file(store.state_path()).unwrap();
        let e = store.load_or_init_state().unwrap_err().to_string();
        assert!(e.contains("no state.json"), "{e}");
        assert!(
            e.contains("To resume, restore") && e.contains("start fresh"),
            "{e}"
        );
        assert!(!store.state_path().exists(), "nothing was overwritten");
    }

    #[test]
    fn journal_survives_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let e = JournalEntry {
            client: "cam-1".into(),
            round: 2,
            digest: "ab".into(),
            file: Store::delta_file("cam-1"),
        };
        store.append_journal(&e).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(store.journal_path(2))
            .unwrap();
        f.write_all(b"{\"client\":\"cam-2\",\"rou").unwrap();
        assert_eq!(store.load_journal(2).unwrap(), vec![e]);
        assert!(store.load_journal(3).unwrap().is_empty());
    }
}
