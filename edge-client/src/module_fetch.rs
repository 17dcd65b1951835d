//! The student's TorchScript module on a camera (issue #16): named by digest in the signed
//! manifest, fetched over MQTT like the model, cached by digest.
//!
//! A camera never needs a file copied by hand when the fleet's student changes: the manifest
//! names the new module's digest and the agent fetches it (the same retained, chunked
//! transport as the weights, [`crate::agent::Agent::fetch_blob`]). Modules are kept in memory
//! and, with a `state_dir`, in `state_dir/modules/<digest>.pt`, so a restart does not fetch
//! again. Every copy — fetched, cached on disk, or configured in `[model] student` — is
//! checked against the manifest's digest before it is loaded; a cached file that no longer
//! matches is deleted, counted as [`crate::IgnoreReason::ModuleDigestMismatch`] and fetched
//! again.

use crate::EdgeError;
use coevo_models::ScriptModule;
use coevo_protocol::{digest, Digest, ModuleRef};
use std::path::{Path, PathBuf};

/// Directory under `state_dir` holding cached modules.
pub const MODULE_DIR: &str = "modules";

/// What [`ModuleCache::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    /// A verified module with the wanted digest.
    Hit(ScriptModule),
    /// Not held: fetch it.
    Miss,
    /// A cached file whose bytes do not match its digest (tampered or corrupt); deleted.
    Tampered(String),
}

/// Modules by digest: the one in use in memory, others on disk.
#[derive(Debug, Default)]
pub struct ModuleCache {
    dir: Option<PathBuf>,
    /// Modules held in memory: the configured one and the last one used.
    held: Vec<ScriptModule>,
}

impl ModuleCache {
    /// A cache in `state_dir/modules` (memory only without a `state_dir`), seeded with the
    /// module configured in `[model] student` if any.
    pub fn new(state_dir: Option<&Path>, configured: Option<ScriptModule>) -> Self {
        ModuleCache {
            dir: state_dir.map(|d| d.join(MODULE_DIR)),
            held: configured.into_iter().collect(),
        }
    }

    fn path(&self, d: &Digest) -> Option<PathBuf> {
        self.dir.as_ref().map(|dir| dir.join(format!("{d}.pt")))
    }

    /// The module `r` names, if held and intact.
    pub fn lookup(&mut self, r: &ModuleRef) -> Lookup {
        if let Some(m) = self.held.iter().find(|m| m.digest() == r.digest) {
            return Lookup::Hit(m.clone());
        }
        let Some(path) = self.path(&r.digest) else {
            return Lookup::Miss;
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(_) => return Lookup::Miss,
        };
        if bytes.len() as u64 != r.size || digest(&bytes) != r.digest {
            let _ = std::fs::remove_file(&path);
            return Lookup::Tampered(format!(
                "cached module {} ({} bytes) does not match its digest; deleted, fetching again",
                path.display(),
                bytes.len()
            ));
        }
        match ScriptModule::from_bytes(bytes) {
            Ok(m) => {
                self.hold(m.clone());
                Lookup::Hit(m)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Lookup::Tampered(format!("cached module {}: {e}", path.display()))
            }
        }
    }

    /// Keeps a module whose digest was verified, in memory and on disk (atomically: a crash
    /// leaves no half-written file under the digest's name).
    pub fn insert(&mut self, m: ScriptModule) -> Result<(), EdgeError> {
        if let Some(path) = self.path(&m.digest()) {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| EdgeError::State(format!("{}: {e}", dir.display())))?;
            }
            let tmp = path.with_extension("pt.tmp");
            std::fs::write(&tmp, m.bytes())
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| EdgeError::State(format!("{}: {e}", path.display())))?;
        }
        self.hold(m);
        Ok(())
    }

    fn hold(&mut self, m: ScriptModule) {
        if self.held.iter().any(|h| h.digest() == m.digest()) {
            return;
        }
        // The configured module (first) and the latest one: a fleet changes students rarely.
        if self.held.len() >= 2 {
            self.held.pop();
        }
        self.held.push(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Option<ScriptModule> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/student.pt");
        ScriptModule::read(&p).ok()
    }

    #[test]
    fn cache_round_trip_and_tampered_file_refused() {
        let Some(m) = fixture() else {
            panic!("examples/models/student.pt missing");
        };
        let dir = tempfile::tempdir().unwrap();
        let r = ModuleRef {
            digest: m.digest(),
            size: m.bytes().len() as u64,
            chunks: 1,
        };
        let mut cache = ModuleCache::new(Some(dir.path()), None);
        assert!(matches!(cache.lookup(&r), Lookup::Miss));
        cache.insert(m.clone()).unwrap();
        assert!(matches!(cache.lookup(&r), Lookup::Hit(h) if h == m));
        // A new process finds it on disk.
        let mut fresh = ModuleCache::new(Some(dir.path()), None);
        assert!(matches!(fresh.lookup(&r), Lookup::Hit(_)));
        // Flip one byte of the cached file: refused, deleted.
        let path = dir
            .path()
            .join(MODULE_DIR)
            .join(format!("{}.pt", m.digest()));
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        let mut fresh = ModuleCache::new(Some(dir.path()), None);
        assert!(matches!(fresh.lookup(&r), Lookup::Tampered(_)));
        assert!(!path.exists());
        assert!(matches!(fresh.lookup(&r), Lookup::Miss));
    }
}
