//! Per-client broker credentials, stored as argon2id PHC hashes.
//!
//! File format (TOML), one entry per MQTT client id:
//!
//! ```toml
//! [clients]
//! "cam-001" = "$argon2id$v=19$m=19456,t=2,p=1$...$..."
//! ```
//!
//! Plaintext passwords are never stored: [`Credentials::load`] refuses any entry that is not an
//! argon2id hash, so a password pasted into the file by mistake is caught at startup rather
//! than silently never matching.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::SaltString;
use argon2::{Algorithm, Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use serde::{Deserialize, Serialize};

use crate::BrokerError;

/// Client id → argon2id PHC hash of that client's password.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// MQTT client id (which must also be the MQTT user name) → argon2id PHC string.
    #[serde(default)]
    pub clients: BTreeMap<String, String>,
    /// The same passwords hashed the way Mosquitto's `password_file` wants them (`$7$`,
    /// PBKDF2-SHA512), so `coevo fleet export-mosquitto` can hand the fleet to a Mosquitto
    /// broker without ever storing a plaintext password.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mosquitto: BTreeMap<String, String>,
}

impl Credentials {
    /// Loads and validates a credential file. A missing file is an error naming the path: a
    /// broker configured for auth must never fall back to running open.
    pub fn load(path: &Path) -> Result<Self, BrokerError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let what = if e.kind() == std::io::ErrorKind::NotFound {
                "not found".to_string()
            } else {
                e.to_string()
            };
            BrokerError::Credentials(format!("credential file {}: {what}", path.display()))
        })?;
        let creds: Self = toml::from_str(&text).map_err(|e| {
            BrokerError::Credentials(format!("credential file {}: {e}", path.display()))
        })?;
        creds.validate().map_err(|e| {
            BrokerError::Credentials(format!("credential file {}: {e}", path.display()))
        })?;
        Ok(creds)
    }

    /// Writes the file atomically (temp file in the same directory, fsync, rename), so a crash
    /// mid-write never leaves a truncated credential file that would lock every client out.
    /// On Unix the file is created with mode 0600: hashes are not secrets, but there is no
    /// reason to hand them to offline crackers.
    pub fn save(&self, path: &Path) -> Result<(), BrokerError> {
        let text = toml::to_string(self)
            .map_err(|e| BrokerError::Credentials(format!("cannot serialise credentials: {e}")))?;
        let tmp = temp_path(path);
        let result = (|| {
            let mut file = create_private(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            // Best effort: do not leave the half-written temp file behind.
            let _ = std::fs::remove_file(&tmp);
            return Err(BrokerError::Io(std::io::Error::new(
                e.kind(),
                format!("saving credential file {}: {e}", path.display()),
            )));
        }
        Ok(())
    }

    /// Sets (or replaces) a client's password, storing only its argon2id hash.
    pub fn set_password(&mut self, client_id: &str, password: &str) -> Result<(), BrokerError> {
        if client_id.is_empty() {
            return Err(BrokerError::Credentials(
                "client id must not be empty".into(),
            ));
        }
        let hash = hash_password(password)?;
        self.clients.insert(client_id.to_owned(), hash);
        self.mosquitto
            .insert(client_id.to_owned(), mosquitto_hash(password)?);
        Ok(())
    }

    /// Removes a client; returns whether it was present.
    pub fn remove(&mut self, client_id: &str) -> bool {
        self.mosquitto.remove(client_id);
        self.clients.remove(client_id).is_some()
    }

    /// The MQTT CONNECT check: the client id must equal the user name (so one device's
    /// password cannot be used to impersonate another id), the client must be known, and the
    /// password must verify against its stored hash. Costs one argon2 verification
    /// (tens of milliseconds with default parameters) when the id is known.
    pub fn check(&self, client_id: &str, username: &str, password: &str) -> bool {
        if client_id != username {
            return false;
        }
        match self.clients.get(client_id) {
            Some(stored) => verify_password(password, stored),
            None => false,
        }
    }

    /// Every entry must be a parseable argon2id PHC string and no client id may be empty.
    fn validate(&self) -> Result<(), String> {
        for (client, hash) in &self.clients {
            if client.is_empty() {
                return Err("empty client id".into());
            }
            let parsed = PasswordHash::new(hash)
                .map_err(|e| format!("client {client:?}: not a PHC hash string ({e})"))?;
            if parsed.algorithm != Algorithm::Argon2id.ident() {
                return Err(format!(
                    "client {client:?}: hash algorithm is {}, expected argon2id",
                    parsed.algorithm
                ));
            }
        }
        Ok(())
    }
}

/// Hashes a password with argon2id (default parameters, random salt from the OS RNG) and
/// returns the PHC string to store.
pub fn hash_password(password: &str) -> Result<String, BrokerError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| BrokerError::Credentials(format!("cannot hash password: {e}")))
}

/// Verifies `password` against a stored PHC string; a malformed hash never verifies.
pub(crate) fn verify_password(password: &str, stored: &str) -> bool {
    match PasswordHash::new(stored) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// Length of generated passwords: 24 alphanumeric characters ≈ 143 bits of entropy, far beyond
/// brute force even against a leaked hash.
const GENERATED_PASSWORD_LEN: usize = 24;
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Generates a random alphanumeric password (24 characters) from the OS RNG. Alphanumeric so
/// it survives shells, TOML, env vars and URLs without quoting.
pub fn generate_password() -> String {
    let mut out = String::with_capacity(GENERATED_PASSWORD_LEN);
    // Rejection sampling: 62 * 4 = 248, so bytes >= 248 would bias the first 8 symbols.
    let limit = (256 / ALPHABET.len() * ALPHABET.len()) as u8;
    let mut buf = [0u8; 64];
    while out.len() < GENERATED_PASSWORD_LEN {
        OsRng.fill_bytes(&mut buf);
        for &b in &buf {
            if b < limit && out.len() < GENERATED_PASSWORD_LEN {
                out.push(ALPHABET[usize::from(b) % ALPHABET.len()] as char);
            }
        }
    }
    out
}

/// `creds.toml` → `.creds.toml.tmp.<pid>` next to it (same directory, so rename is atomic).
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "credentials".into());
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

#[cfg(unix)]
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::create(path)
}

/// Iterations Mosquitto 2's `mosquitto_passwd` uses for `$7$` hashes.
const MOSQUITTO_ITERATIONS: u32 = 101;

/// Hashes a password in Mosquitto's `$7$` format: `$7$ITER$base64(salt)$base64(PBKDF2-SHA512)`
/// with a 12-byte random salt, as `mosquitto_passwd` writes it.
pub fn mosquitto_hash(password: &str) -> Result<String, BrokerError> {
    use base64::Engine as _;
    let mut salt = [0u8; 12];
    OsRng
        .try_fill_bytes(&mut salt)
        .map_err(|e| BrokerError::Credentials(format!("random salt: {e}")))?;
    let mut out = [0u8; 64];
    let iterations = std::num::NonZeroU32::new(MOSQUITTO_ITERATIONS)
        .ok_or_else(|| BrokerError::Credentials("zero PBKDF2 iterations".into()))?;
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        iterations,
        &salt,
        password.as_bytes(),
        &mut out,
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(format!(
        "$7${MOSQUITTO_ITERATIONS}${}${}",
        b64.encode(salt),
        b64.encode(out)
    ))
}
