//! Per-client broker credentials, stored as salted one-way hashes in one of two schemes.
//!
//! File format (TOML), one entry per MQTT client id:
//!
//! ```toml
//! [clients]
//! "coordinator" = "$argon2id$v=19$m=19456,t=2,p=1$...$..."       # a password a human chose
//! "cam-001" = "$coevo-hmac-sha256$v=1$<salt>$<tag>"              # a generated device secret
//! ```
//!
//! - **argon2id** ([`Credentials::set_password`]) for passwords a human chose: their entropy is
//!   unknown, so a leaked file must make each guess expensive (tens of ms and ~19 MiB).
//! - **device secrets** ([`Credentials::set_device_secret`]) for secrets coevo generated
//!   itself ([`generate_password`]: 24 characters from 62 symbols, ≈ 143 bits from the OS
//!   RNG): stored as HMAC-SHA256 keyed with a per-entry random 128-bit salt. Checking one
//!   costs about a microsecond, so a 10,000-camera connect storm costs the broker nothing,
//!   and this does not weaken the file: a slow hash only helps against guessable passwords,
//!   while guessing a 143-bit random secret takes ~2^142 tries whatever each one costs (at
//!   10^12 HMACs/s, ~10^30 years). The per-entry salt stops precomputation and makes equal
//!   secrets hash differently. [`Credentials::set_device_secret`] refuses secrets shorter
//!   than [`MIN_DEVICE_SECRET_LEN`] characters so a human password cannot end up in the fast
//!   scheme by mistake.
//!
//! Plaintext passwords are never stored: [`Credentials::load`] refuses any entry that is not
//! one of these two schemes, so a password pasted into the file by mistake is caught at
//! startup rather than silently never matching. Files written before device secrets existed
//! (argon2id only) load and verify as before.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::SaltString;
use argon2::{Algorithm, Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use serde::{Deserialize, Serialize};

use crate::BrokerError;

/// Scheme prefix of device-secret entries: `$coevo-hmac-sha256$v=1$<salt>$<tag>`, salt and tag
/// in unpadded standard base64 (16 and 32 bytes).
pub const DEVICE_SECRET_SCHEME: &str = "$coevo-hmac-sha256$v=1$";
/// Shortest secret [`Credentials::set_device_secret`] accepts: 22 alphanumeric characters
/// carry ≥ 128 bits when drawn uniformly (22 × log2 62 ≈ 131). [`generate_password`] makes 24.
pub const MIN_DEVICE_SECRET_LEN: usize = 22;
const DEVICE_SALT_LEN: usize = 16;

/// Client id → salted hash of that client's password (argon2id PHC or device-secret HMAC).
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
    /// The same passwords as bcrypt (`$2a$`), the only hash NATS server accepts in its
    /// `users` list, so `coevo fleet export-nats` can hand the fleet to a NATS cluster without
    /// a plaintext password either. Device secrets use [`NATS_DEVICE_COST`], chosen passwords
    /// [`NATS_PASSWORD_COST`] (see there why).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nats: BTreeMap<String, String>,
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
        self.nats.insert(
            client_id.to_owned(),
            nats_hash(password, NATS_PASSWORD_COST)?,
        );
        Ok(())
    }

    /// Sets (or replaces) a client's *generated* secret (from [`generate_password`]), stored as
    /// a salted HMAC-SHA256 that verifies in about a microsecond (the module doc says why that
    /// is safe for a high-entropy secret and not for a chosen password). Also stores the
    /// Mosquitto hash, like [`Self::set_password`]. Refuses secrets shorter than
    /// [`MIN_DEVICE_SECRET_LEN`]: use [`Self::set_password`] for anything a human picked.
    pub fn set_device_secret(&mut self, client_id: &str, secret: &str) -> Result<(), BrokerError> {
        let hashes = DeviceHashes::new(client_id, secret)?;
        self.insert_device(hashes);
        Ok(())
    }

    /// Stores hashes made by [`DeviceHashes::new`] (which bulk imports compute on all cores).
    pub fn insert_device(&mut self, h: DeviceHashes) {
        self.clients.insert(h.client_id.clone(), h.hmac);
        self.mosquitto.insert(h.client_id.clone(), h.mosquitto);
        self.nats.insert(h.client_id, h.nats);
    }

    /// Removes a client; returns whether it was present.
    pub fn remove(&mut self, client_id: &str) -> bool {
        self.mosquitto.remove(client_id);
        self.nats.remove(client_id);
        self.clients.remove(client_id).is_some()
    }

    /// The MQTT CONNECT check: the client id must equal the user name (so one device's
    /// password cannot be used to impersonate another id), the client must be known, and the
    /// password must verify against its stored hash. Costs one argon2 verification
    /// (tens of milliseconds with default parameters) for a password entry, about a
    /// microsecond for a device secret.
    pub fn check(&self, client_id: &str, username: &str, password: &str) -> bool {
        if client_id != username {
            return false;
        }
        match self.clients.get(client_id) {
            Some(stored) => verify_password(password, stored),
            None => false,
        }
    }

    /// Every entry must be a parseable argon2id PHC string or device-secret hash, and no
    /// client id may be empty.
    fn validate(&self) -> Result<(), String> {
        for (client, hash) in &self.clients {
            if client.is_empty() {
                return Err("empty client id".into());
            }
            if hash.starts_with(DEVICE_SECRET_SCHEME) {
                parse_device_hash(hash)
                    .ok_or_else(|| format!("client {client:?}: malformed device-secret hash"))?;
                continue;
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

/// Every stored form of one device's generated secret (HMAC for the embedded broker, `$7$` for
/// Mosquitto, bcrypt for NATS), computed apart from the credential file so a bulk import can
/// hash many devices in parallel (bcrypt is most of the ~1 ms per device).
#[derive(Clone, Debug)]
pub struct DeviceHashes {
    client_id: String,
    hmac: String,
    mosquitto: String,
    nats: String,
}

impl DeviceHashes {
    /// Refuses an empty id and secrets shorter than [`MIN_DEVICE_SECRET_LEN`] (use
    /// [`Credentials::set_password`] for anything a human picked).
    pub fn new(client_id: &str, secret: &str) -> Result<Self, BrokerError> {
        if client_id.is_empty() {
            return Err(BrokerError::Credentials(
                "client id must not be empty".into(),
            ));
        }
        if secret.chars().count() < MIN_DEVICE_SECRET_LEN {
            return Err(BrokerError::Credentials(format!(
                "client {client_id:?}: a device secret needs at least {MIN_DEVICE_SECRET_LEN} \
                 characters (≥ 128 bits); hash a chosen password with set_password instead"
            )));
        }
        Ok(DeviceHashes {
            client_id: client_id.to_owned(),
            hmac: hash_device_secret(secret)?,
            mosquitto: mosquitto_hash(secret)?,
            nats: nats_hash(secret, NATS_DEVICE_COST)?,
        })
    }
}

/// Hashes a generated device secret: `$coevo-hmac-sha256$v=1$<salt>$<tag>` with a fresh
/// random 128-bit salt as the HMAC key and the secret as the message.
pub fn hash_device_secret(secret: &str) -> Result<String, BrokerError> {
    use base64::Engine as _;
    let mut salt = [0u8; DEVICE_SALT_LEN];
    OsRng
        .try_fill_bytes(&mut salt)
        .map_err(|e| BrokerError::Credentials(format!("random salt: {e}")))?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &salt);
    let tag = ring::hmac::sign(&key, secret.as_bytes());
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    Ok(format!(
        "{DEVICE_SECRET_SCHEME}{}${}",
        b64.encode(salt),
        b64.encode(tag.as_ref())
    ))
}

/// (salt, tag) of a device-secret entry; `None` if malformed.
fn parse_device_hash(stored: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    use base64::Engine as _;
    let rest = stored.strip_prefix(DEVICE_SECRET_SCHEME)?;
    let (salt, tag) = rest.split_once('$')?;
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let salt = b64.decode(salt).ok()?;
    let tag = b64.decode(tag).ok()?;
    (salt.len() == DEVICE_SALT_LEN && tag.len() == 32).then_some((salt, tag))
}

/// Whether a stored entry is a device-secret hash, i.e. verifies in microseconds.
pub(crate) fn is_device_hash(stored: &str) -> bool {
    stored.starts_with(DEVICE_SECRET_SCHEME)
}

/// Verifies `password` against a stored entry of either scheme; a malformed hash never
/// verifies. Device secrets are compared in constant time (`ring::hmac::verify`).
pub(crate) fn verify_password(password: &str, stored: &str) -> bool {
    if is_device_hash(stored) {
        return parse_device_hash(stored).is_some_and(|(salt, tag)| {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &salt);
            ring::hmac::verify(&key, password.as_bytes(), &tag).is_ok()
        });
    }
    match PasswordHash::new(stored) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// Length of generated passwords: 24 alphanumeric characters ≈ 143 bits of entropy, far beyond
/// brute force even against a leaked hash.
pub const GENERATED_PASSWORD_LEN: usize = 24;
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Bits of entropy of a [`generate_password`] secret: each character is uniform over 62
/// symbols (rejection sampling), so 24 × log2(62) ≈ 142.9.
pub fn generated_password_bits() -> f64 {
    GENERATED_PASSWORD_LEN as f64 * (ALPHABET.len() as f64).log2()
}

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

/// bcrypt cost of a chosen password's NATS hash: 2^11 rounds (~0.1 s), bcrypt's usual default,
/// because a leaked config must make each guess of a guessable password expensive.
pub const NATS_PASSWORD_COST: u32 = 11;
/// bcrypt cost of a generated device secret's NATS hash: the minimum, 2^4 rounds (~1 ms). As
/// for the HMAC scheme above, a slow hash adds nothing against a ≥ 128-bit random secret, and
/// NATS verifies the hash on every CONNECT: at cost 11 a 10,000-camera connect storm would
/// cost the cluster ~20 CPU-minutes.
pub const NATS_DEVICE_COST: u32 = 4;

/// Hashes a password as NATS server's `users` list wants it: bcrypt, `$2a$` variant.
pub fn nats_hash(password: &str, cost: u32) -> Result<String, BrokerError> {
    if password.len() > 72 {
        // bcrypt reads only the first 72 bytes: refuse rather than silently truncate.
        return Err(BrokerError::Credentials(
            "a password for NATS (bcrypt) must be at most 72 bytes".into(),
        ));
    }
    bcrypt::hash_with_result(password, cost)
        .map(|h| h.format_for_version(bcrypt::Version::TwoA))
        .map_err(|e| BrokerError::Credentials(format!("bcrypt: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_carry_at_least_128_bits() {
        assert!(
            generated_password_bits() >= 128.0,
            "{}",
            generated_password_bits()
        );
        let pw = generate_password();
        assert_eq!(pw.len(), GENERATED_PASSWORD_LEN);
        assert!(pw.len() >= MIN_DEVICE_SECRET_LEN);
        assert!(pw.bytes().all(|b| ALPHABET.contains(&b)));
    }

    #[test]
    fn device_secret_verifies_and_rejects_wrong_secrets() {
        let secret = generate_password();
        let mut creds = Credentials::default();
        creds.set_device_secret("cam-1", &secret).unwrap();
        let stored = &creds.clients["cam-1"];
        assert!(stored.starts_with(DEVICE_SECRET_SCHEME), "{stored}");
        assert!(creds.check("cam-1", "cam-1", &secret));
        assert!(!creds.check("cam-1", "cam-1", &generate_password()));
        assert!(!creds.check("cam-1", "cam-1", &secret[..23]));
        assert!(!creds.check("cam-1", "cam-1", ""));
        assert!(
            !creds.check("cam-1", "cam-2", &secret),
            "user name must equal the id"
        );
        assert!(creds.mosquitto["cam-1"].starts_with("$7$101$"));
        // The NATS hash is bcrypt at the device cost, and verifies the secret (as NATS does).
        let nats = &creds.nats["cam-1"];
        assert!(nats.starts_with("$2a$04$"), "{nats}");
        assert!(bcrypt::verify(&secret, nats).unwrap());
        assert!(!bcrypt::verify(generate_password(), nats).unwrap());
        // Per-entry salt: the same secret hashes differently each time.
        creds.set_device_secret("cam-2", &secret).unwrap();
        assert_ne!(creds.clients["cam-1"], creds.clients["cam-2"]);
        // Fast: 1,000 checks well under the cost of a single argon2 verification.
        let t = std::time::Instant::now();
        for _ in 0..1000 {
            assert!(creds.check("cam-1", "cam-1", &secret));
        }
        assert!(
            t.elapsed() < std::time::Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn short_device_secrets_are_refused() {
        let mut creds = Credentials::default();
        let e = creds.set_device_secret("cam-1", "hunter2").unwrap_err();
        assert!(e.to_string().contains("at least 22"), "{e}");
        assert!(creds.clients.is_empty());
        assert!(creds.set_device_secret("", &generate_password()).is_err());
    }

    #[test]
    fn old_argon2_files_and_mixed_files_load_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        let mut creds = Credentials::default();
        creds
            .set_password("coordinator", "chosen by a human")
            .unwrap();
        creds.save(&path).unwrap();
        // An argon2-only file, as written before device secrets existed.
        let old = Credentials::load(&path).unwrap();
        assert!(old.check("coordinator", "coordinator", "chosen by a human"));
        assert!(!old.check("coordinator", "coordinator", "chosen by a robot"));
        let secret = generate_password();
        creds.set_device_secret("cam-1", &secret).unwrap();
        creds.save(&path).unwrap();
        let mixed = Credentials::load(&path).unwrap();
        assert_eq!(mixed, creds);
        assert!(mixed.check("cam-1", "cam-1", &secret));
        assert!(mixed.check("coordinator", "coordinator", "chosen by a human"));
    }

    #[test]
    fn malformed_device_hashes_are_refused_at_load_and_never_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        for bad in [
            DEVICE_SECRET_SCHEME.to_string(),
            format!("{DEVICE_SECRET_SCHEME}AAAA$BBBB"),
            format!("{DEVICE_SECRET_SCHEME}not base64!$x"),
        ] {
            std::fs::write(&path, format!("[clients]\n\"cam-1\" = {bad:?}\n")).unwrap();
            let e = Credentials::load(&path).unwrap_err();
            assert!(
                e.to_string().contains("malformed device-secret hash"),
                "{e}"
            );
            assert!(!verify_password("x", &bad));
        }
    }
}
