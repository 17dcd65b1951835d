//! Provisioning: the files a fleet needs, as `coevo keys` and `coevo fleet` write them.
//!
//! ```text
//! DIR/keys/coordinator.pk8   coordinator signing key (PKCS#8)   DIR/keys/coordinator.pub (hex)
//! DIR/keys/CLIENT.pk8        one per client                     DIR/keys/CLIENT.pub
//! DIR/fleet.toml             registry: client id → public key
//! DIR/credentials.toml       broker secrets (salted HMAC-SHA256 of generated secrets)
//! DIR/passwords/CLIENT       the plaintext secrets, for the devices (0600)
//! ```
//!
//! Every secret here is generated (≈ 143 bits), so it is stored in the fast device-secret
//! scheme ([`Credentials::set_device_secret`]): provisioning 10,000 clients takes seconds and
//! a connect storm costs the broker microseconds per client, not an argon2 run each.

use anyhow::{Context, Result};
use coevo_broker::Credentials;
use coevo_ops::FleetRegistry;
use coevo_protocol::{PublicKey, SigningKey};
use std::path::{Path, PathBuf};

/// Writes a new key pair: `path` (PKCS#8, mode 0600) and `path` with extension `pub` (hex).
pub fn write_key_pair(path: &Path) -> Result<SigningKey> {
    let key = SigningKey::generate()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_private(path, key.pkcs8())?;
    std::fs::write(
        path.with_extension("pub"),
        format!("{}\n", key.public_key()),
    )
    .with_context(|| format!("writing {}", path.with_extension("pub").display()))?;
    Ok(key)
}

/// Writes `data` to `path`, created with mode 0600 on Unix (keys, secrets).
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

/// Reads a PKCS#8 private key file.
pub fn read_key(path: &Path) -> Result<SigningKey> {
    let bytes = std::fs::read(path).with_context(|| format!("reading key {}", path.display()))?;
    SigningKey::from_pkcs8(&bytes).with_context(|| format!("key {}", path.display()))
}

/// Reads a public key: hex text, or the `.pub` file written beside a private key.
pub fn read_public(path_or_hex: &str) -> Result<PublicKey> {
    let p = Path::new(path_or_hex);
    let hex_key = {
        let t = path_or_hex.trim();
        t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit())
    };
    // Anything but 64 hex digits is a path: a missing file is said so, not reported as a hex
    // parse error of its name.
    let text = if hex_key && !p.is_file() {
        path_or_hex.to_string()
    } else {
        std::fs::read_to_string(p).with_context(|| format!("reading public key {}", p.display()))?
    };
    text.trim()
        .parse()
        .with_context(|| format!("public key {path_or_hex:?}"))
}

/// Everything a provisioned fleet consists of.
pub struct Fleet {
    pub dir: PathBuf,
    pub coordinator_id: String,
    pub coordinator_key: SigningKey,
    pub coordinator_password: String,
    /// (client id, signing key, broker password)
    pub clients: Vec<(String, SigningKey, String)>,
    pub registry_path: PathBuf,
    pub credentials_path: PathBuf,
}

/// Creates keys, registry and credentials for a coordinator and `ids` in `dir`.
pub fn provision(dir: &Path, coordinator_id: &str, ids: &[String]) -> Result<Fleet> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let coordinator_key = write_key_pair(&dir.join("keys").join(format!("{coordinator_id}.pk8")))?;
    let mut registry = FleetRegistry::default();
    let mut creds = Credentials::default();
    let coordinator_password = coevo_broker::generate_password();
    creds.set_device_secret(coordinator_id, &coordinator_password)?;
    let pw_dir = dir.join("passwords");
    std::fs::create_dir_all(&pw_dir)?;
    write_private(
        &pw_dir.join(coordinator_id),
        coordinator_password.as_bytes(),
    )?;
    let mut clients = Vec::new();
    for id in ids {
        let key = write_key_pair(&dir.join("keys").join(format!("{id}.pk8")))?;
        registry.add(id, &key.public_key())?;
        let pw = coevo_broker::generate_password();
        creds.set_device_secret(id, &pw)?;
        write_private(&pw_dir.join(id), pw.as_bytes())?;
        clients.push((id.clone(), key, pw));
    }
    let registry_path = dir.join("fleet.toml");
    registry.save(&registry_path)?;
    let credentials_path = dir.join("credentials.toml");
    creds.save(&credentials_path)?;
    Ok(Fleet {
        dir: dir.to_path_buf(),
        coordinator_id: coordinator_id.to_string(),
        coordinator_key,
        coordinator_password,
        clients,
        registry_path,
        credentials_path,
    })
}
