//! The fleet registry: which clients exist and the public key each signs with.
//!
//! A TOML file owned by the operator (`coevo fleet add|remove|list`). The coordinator re-reads
//! it at the start of every round, so removing a client takes effect at the next round.

use crate::OpsError;
use coevo_protocol::{topic::validate_id, PublicKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientEntry {
    /// Hex Ed25519 public key the client signs its deltas with.
    pub public_key: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetRegistry {
    #[serde(default)]
    pub clients: BTreeMap<String, ClientEntry>,
}

impl FleetRegistry {
    pub fn load(path: &Path) -> Result<Self, OpsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| OpsError::Config(format!("fleet registry {}: {e}", path.display())))?;
        let reg: FleetRegistry = toml::from_str(&text)
            .map_err(|e| OpsError::Config(format!("fleet registry {}: {e}", path.display())))?;
        for (id, entry) in &reg.clients {
            validate_id(id).map_err(|e| OpsError::Config(e.to_string()))?;
            entry
                .public_key
                .parse::<PublicKey>()
                .map_err(|e| OpsError::Config(format!("fleet registry: client {id}: {e}")))?;
        }
        Ok(reg)
    }

    /// Writes atomically (temp file + rename) so a crash never leaves half a registry.
    pub fn save(&self, path: &Path) -> Result<(), OpsError> {
        let text = toml::to_string_pretty(self)
            .map_err(|e| OpsError::Config(format!("fleet registry: {e}")))?;
        crate::write_atomic(path, text.as_bytes())
    }

    pub fn add(&mut self, id: &str, key: &PublicKey) -> Result<(), OpsError> {
        validate_id(id).map_err(|e| OpsError::Config(e.to_string()))?;
        self.clients.insert(
            id.to_string(),
            ClientEntry {
                public_key: key.to_string(),
            },
        );
        Ok(())
    }

    pub fn remove(&mut self, id: &str) -> bool {
        self.clients.remove(id).is_some()
    }

    /// The key of a registered client.
    pub fn key(&self, id: &str) -> Option<PublicKey> {
        self.clients.get(id).and_then(|e| e.public_key.parse().ok())
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coevo_protocol::SigningKey;

    #[test]
    fn add_save_load_remove() {
        let dir = std::env::temp_dir().join(format!("coevo-reg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fleet.toml");
        let key = SigningKey::generate().unwrap().public_key();
        let mut reg = FleetRegistry::default();
        reg.add("cam-1", &key).unwrap();
        assert!(reg.add("bad/id", &key).is_err());
        reg.save(&path).unwrap();
        let mut back = FleetRegistry::load(&path).unwrap();
        assert_eq!(back.key("cam-1"), Some(key));
        assert!(back.remove("cam-1"));
        assert!(back.key("cam-1").is_none());
        std::fs::write(&path, "[clients.x]\npublic_key = \"zz\"\n").unwrap();
        assert!(FleetRegistry::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
