//! Durable state under the coordinator's output directory. Accepted deltas are written here
//! (fsync'd, atomically renamed) *before* the client gets its receipt, so nothing accepted is
//! lost if the coordinator dies.
//!
//! ```text
//! OUT/state.json                      last completed round + digest of the global model
//! OUT/checkpoints/student-NNNN.safetensors
//! OUT/rounds/NNNN/deltas/CLIENT.bin   accepted delta: the signed header + payload, as received
//! OUT/reports/round-NNNN.json
//! ```

use crate::CoordinatorError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `data` to `path` via a temp file, fsync and rename: readers see the old or the new
/// file, never a torn one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), CoordinatorError> {
    let io = |e: std::io::Error| CoordinatorError::Io(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(data).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// What survives a restart between rounds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// Last round fully completed (0 = none yet).
    pub completed_round: u64,
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
        write_atomic(&self.state_path(), &json)
    }

    /// Persists an accepted delta (the raw signed header and payload as received).
    pub fn save_delta(
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
        write_atomic(
            &self.delta_dir(round).join(format!("{client}.bin")),
            &record,
        )
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
