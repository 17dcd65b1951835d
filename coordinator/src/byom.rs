//! Bring your own model (issue #16): `[model]` in the coordinator config names TorchScript
//! files for the student and the teacher; without them the built-in CNNs are used.
//!
//! Both files are read and checked against the dataset at start-up ([`ModelFiles::load`]), so
//! a module exported for another dataset (wrong class count, wrong input size) stops the
//! coordinator before it pretrains, publishes or touches the broker, with the numbers in the
//! error. The student's module is then published to the fleet with every round (see
//! `server/publish.rs`); the teacher's never leaves the data centre.

use crate::CoordinatorError;
use coevo_models::{Arch, DataShape, ScriptModule};
use coevo_protocol::ModuleRef;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `[model]`: which networks the fleet trains.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelFiles {
    /// TorchScript file of the student (`scripts/export-model.py`); cameras receive it over
    /// MQTT. `None`: the built-in student CNN.
    pub student: Option<PathBuf>,
    /// TorchScript file of the teacher (coevolve mode only). `None`: the built-in teacher CNN.
    pub teacher: Option<PathBuf>,
}

/// The two architectures in use.
#[derive(Clone, Debug)]
pub struct Archs {
    pub student: Arch,
    pub teacher: Arch,
}

impl Default for Archs {
    fn default() -> Self {
        Archs {
            student: Arch::student(),
            teacher: Arch::teacher(),
        }
    }
}

impl ModelFiles {
    /// Reads the configured modules and checks each fits `shape` (input `[N, C, H, W]`,
    /// output `[N, classes]`).
    pub fn load(&self, shape: &DataShape) -> Result<Archs, CoordinatorError> {
        let one = |role: &str, path: &Option<PathBuf>, default: Arch| match path {
            None => Ok::<Arch, CoordinatorError>(default),
            Some(p) => {
                let bad = |e: coevo_models::ModelError| {
                    CoordinatorError::Config(format!("[model] {role} = {:?}: {e}", p.display()))
                };
                let m = ScriptModule::read(p).map_err(bad)?;
                let info = m.check(shape).map_err(bad)?;
                tracing::info!(role, file = %p.display(), digest = %m.digest().short(), params = info.params, trainable = info.trainable, "TorchScript module loaded");
                Ok(Arch::Script(m))
            }
        };
        Ok(Archs {
            student: one("student", &self.student, Arch::student())?,
            teacher: one("teacher", &self.teacher, Arch::teacher())?,
        })
    }
}

/// The manifest's reference to a module cut into `chunk_size`-byte chunks.
pub fn module_ref(m: &ScriptModule, chunk_size: usize) -> ModuleRef {
    ModuleRef {
        digest: m.digest(),
        size: m.bytes().len() as u64,
        chunks: coevo_protocol::chunk::chunk_count(m.bytes().len(), chunk_size),
    }
}
