//! Bulk provisioning: `coevo fleet import devices.csv` and `coevo fleet add ID...`.
//!
//! One pass for any number of cameras: parse and check every id first (line numbers in every
//! error, nothing written when one is wrong), then per camera a key pair (or the public key
//! the device made itself), a generated device secret (stored as the fast salted HMAC, see
//! [`coevo_broker::credentials`]) and its password file, and finally the registry and the
//! credential file, each written **once** (atomically: temp file + rename) and, on request,
//! the Mosquitto export. Adding N cameras costs O(N), where N runs of `fleet add` rewrote
//! both files N times (O(N²): ~8 hours for 10,000, issue #13).
//!
//! Input (`devices.csv`): one id per line, or a CSV whose header names an `id` column and
//! optionally a `public_key` column (hex Ed25519, for devices that generated their own key).
//! Blank lines and lines starting with `#` are skipped.

use anyhow::{bail, Context, Result};
use coevo_broker::Credentials;
use coevo_ops::FleetRegistry;
use coevo_protocol::PublicKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::provision::{write_key_pair, write_private};

/// One camera to add; `line` is where it came from (1-based), for error messages.
#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    pub id: String,
    pub public_key: Option<PublicKey>,
    pub line: usize,
}

/// Where everything goes.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub registry: PathBuf,
    pub credentials: PathBuf,
    /// `ID.pub` here is used if present (a device-made key); otherwise `ID.pk8` + `ID.pub`
    /// are generated here.
    pub keys_dir: PathBuf,
    /// `ID` here receives the device's generated broker secret (0600).
    pub passwords_dir: PathBuf,
    /// Also write the Mosquitto files for the whole fleet.
    pub mosquitto: Option<MosquittoTarget>,
}

/// `coevo fleet export-mosquitto` settings for an import.
#[derive(Clone, Debug)]
pub struct MosquittoTarget {
    pub dir: PathBuf,
    pub fleet: String,
    pub coordinator: String,
    pub listen: std::net::SocketAddr,
    pub user: Option<String>,
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub added: usize,
    /// Key pairs generated into `keys_dir`.
    pub keys_generated: usize,
    /// Public keys taken from the input or from an existing `keys_dir/ID.pub`.
    pub keys_given: usize,
    /// Clients in the registry afterwards.
    pub registered: usize,
}

/// Parses a device list (see the module doc). Errors name the line.
pub fn parse_devices(text: &str) -> Result<Vec<Device>> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .peekable();
    // A header is a first line with a column named `id`.
    let (id_col, key_col) = match lines.peek() {
        Some((_, first)) => {
            let cols = fields(first);
            match cols.iter().position(|c| c.eq_ignore_ascii_case("id")) {
                Some(id) => {
                    let key = cols
                        .iter()
                        .position(|c| c.eq_ignore_ascii_case("public_key"));
                    lines.next();
                    (id, key)
                }
                None if cols.len() > 1 => {
                    let (n, _) = lines.peek().copied().unwrap_or((1, ""));
                    bail!("line {n}: a CSV needs a header line naming an `id` column (and optionally `public_key`)");
                }
                None => (0, None),
            }
        }
        None => (0, None),
    };
    let mut devices = Vec::new();
    for (n, line) in lines {
        let cols = fields(line);
        let Some(id) = cols.get(id_col).filter(|s| !s.is_empty()) else {
            bail!("line {n}: no id");
        };
        coevo_protocol::topic::validate_id(id).with_context(|| format!("line {n}"))?;
        let public_key = match key_col.and_then(|k| cols.get(k)).filter(|s| !s.is_empty()) {
            Some(hex) => Some(
                hex.parse::<PublicKey>()
                    .with_context(|| format!("line {n}: public key of {id}"))?,
            ),
            None => None,
        };
        devices.push(Device {
            id: (*id).to_owned(),
            public_key,
            line: n,
        });
    }
    check_duplicates(&devices)?;
    Ok(devices)
}

fn fields(l: &str) -> Vec<&str> {
    l.split(',').map(str::trim).collect()
}

/// Devices from command-line ids (`fleet add ID...`); `line` is the argument's position.
pub fn devices_from_ids(ids: &[String]) -> Result<Vec<Device>> {
    let devices = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            coevo_protocol::topic::validate_id(id)
                .with_context(|| format!("argument {}", i + 1))?;
            Ok(Device {
                id: id.clone(),
                public_key: None,
                line: i + 1,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    check_duplicates(&devices)?;
    Ok(devices)
}

fn check_duplicates(devices: &[Device]) -> Result<()> {
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(devices.len());
    for d in devices {
        if let Some(first) = seen.insert(&d.id, d.line) {
            bail!(
                "line {}: duplicate id {} (first on line {first})",
                d.line,
                d.id
            );
        }
    }
    Ok(())
}

fn load_or_default<T: Default>(path: &Path, load: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if path.exists() {
        load(path)
    } else {
        Ok(T::default())
    }
}

/// One device made ready off the main thread: its public key, and its new secret's hashes
/// (the secret itself is already in its 0600 file).
struct Prepared {
    id: String,
    key: PublicKey,
    /// The key pair was generated here (not given or found in `keys_dir`).
    generated: bool,
    hashes: coevo_broker::DeviceHashes,
}

fn prepare(d: &Device, o: &ImportOptions) -> Result<Prepared> {
    let (key, generated) = match &d.public_key {
        Some(k) => (*k, false),
        None => {
            let pk8 = o.keys_dir.join(format!("{}.pk8", d.id));
            let public = pk8.with_extension("pub");
            if public.exists() {
                let k = crate::provision::read_public(&public.to_string_lossy())
                    .with_context(|| format!("line {}", d.line))?;
                (k, false)
            } else {
                (write_key_pair(&pk8)?.public_key(), true)
            }
        }
    };
    let secret = coevo_broker::generate_password();
    let hashes = coevo_broker::DeviceHashes::new(&d.id, &secret)
        .with_context(|| format!("line {}", d.line))?;
    write_private(&o.passwords_dir.join(&d.id), secret.as_bytes())?;
    Ok(Prepared {
        id: d.id.clone(),
        key,
        generated,
        hashes,
    })
}

/// Adds `devices` to the registry and credential file (see the module doc). Refuses, before
/// writing anything, ids that are already registered.
pub fn import(devices: &[Device], o: &ImportOptions) -> Result<ImportSummary> {
    let mut registry = load_or_default(&o.registry, |p| Ok(FleetRegistry::load(p)?))?;
    let mut creds = load_or_default(&o.credentials, |p| Ok(Credentials::load(p)?))?;
    let taken: Vec<String> = devices
        .iter()
        .filter(|d| registry.clients.contains_key(&d.id) || creds.clients.contains_key(&d.id))
        .take(5)
        .map(|d| format!("line {}: {}", d.line, d.id))
        .collect();
    if !taken.is_empty() {
        bail!(
            "already registered (remove them first with `coevo fleet remove`): {}",
            taken.join(", ")
        );
    }
    std::fs::create_dir_all(&o.keys_dir)
        .with_context(|| format!("creating {}", o.keys_dir.display()))?;
    std::fs::create_dir_all(&o.passwords_dir)
        .with_context(|| format!("creating {}", o.passwords_dir.display()))?;
    let mut summary = ImportSummary::default();
    // Keys, secrets and their hashes per device on every core (bcrypt, Ed25519 key generation
    // and the files dominate); registry and credential file are then filled in input order.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let chunk = devices.len().div_ceil(threads).max(1);
    let prepared: Vec<Result<Vec<Prepared>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|d| prepare(d, o)).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a provisioning thread panicked")))
            })
            .collect()
    });
    for part in prepared {
        for p in part? {
            if p.generated {
                summary.keys_generated += 1;
            } else {
                summary.keys_given += 1;
            }
            registry.add(&p.id, &p.key)?;
            creds.insert_device(p.hashes);
            summary.added += 1;
        }
    }
    creds.save(&o.credentials)?;
    registry.save(&o.registry)?;
    summary.registered = registry.len();
    if let Some(m) = &o.mosquitto {
        crate::mosquitto::export(
            &crate::mosquitto::Export {
                fleet: &m.fleet,
                coordinator_id: &m.coordinator,
                registry: &registry,
                credentials: &creds,
                listen_host: &m.listen.ip().to_string(),
                listen_port: m.listen.port(),
                user: m.user.as_deref(),
            },
            &m.dir,
        )?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> ImportOptions {
        ImportOptions {
            registry: dir.join("fleet.toml"),
            credentials: dir.join("credentials.toml"),
            keys_dir: dir.join("keys"),
            passwords_dir: dir.join("passwords"),
            mosquitto: None,
        }
    }

    #[test]
    fn plain_lists_and_csv_with_header_parse() {
        let d = parse_devices("# city\ncam-1\n\n cam-2 \n").unwrap();
        assert_eq!(
            d.iter()
                .map(|d| (d.id.as_str(), d.line))
                .collect::<Vec<_>>(),
            [("cam-1", 2), ("cam-2", 4)]
        );
        let pk = coevo_protocol::SigningKey::generate().unwrap().public_key();
        let csv = format!("site,id,public_key\nnorth,cam-1,{pk}\nsouth,cam-2,\n");
        let d = parse_devices(&csv).unwrap();
        assert_eq!(d[0].public_key, Some(pk));
        assert_eq!(d[1].public_key, None);
        assert_eq!(d[1].line, 3);
    }

    #[test]
    fn bad_input_is_refused_with_its_line() {
        let e = parse_devices("cam-1\ncam-2\ncam-1\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 3: duplicate id cam-1 (first on line 1)"
        );
        let e = parse_devices("cam-1\ncam/2\n").unwrap_err();
        assert!(format!("{e:#}").starts_with("line 2"), "{e:#}");
        let e = parse_devices("a,b\n1,2\n").unwrap_err();
        assert!(e.to_string().contains("`id` column"), "{e}");
        let e = parse_devices("id,public_key\ncam-1,zz\n").unwrap_err();
        assert!(
            format!("{e:#}").starts_with("line 2: public key of cam-1"),
            "{e:#}"
        );
        let e = devices_from_ids(&["a".into(), "b".into(), "a".into()]).unwrap_err();
        assert!(e.to_string().contains("duplicate id a"), "{e}");
    }

    #[test]
    fn import_writes_everything_once_and_refuses_registered_ids() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let ids: Vec<String> = (0..1000).map(|i| format!("cam-{i:04}")).collect();
        let devices = devices_from_ids(&ids).unwrap();
        let t = std::time::Instant::now();
        let s = import(&devices, &o).unwrap();
        let took = t.elapsed();
        assert_eq!(s.added, 1000);
        assert_eq!(s.keys_generated, 1000);
        assert_eq!(s.registered, 1000);
        // 1,000 cameras in well under the 30 s the 5-minutes-for-10,000 goal allows.
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
        let reg = FleetRegistry::load(&o.registry).unwrap();
        let creds = Credentials::load(&o.credentials).unwrap();
        assert_eq!(reg.len(), 1000);
        let pw = std::fs::read_to_string(o.passwords_dir.join("cam-0042")).unwrap();
        assert!(creds.check("cam-0042", "cam-0042", &pw));
        assert!(
            creds.clients["cam-0042"].starts_with(coevo_broker::credentials::DEVICE_SECRET_SCHEME)
        );
        let key = crate::provision::read_key(&o.keys_dir.join("cam-0042.pk8")).unwrap();
        assert_eq!(reg.key("cam-0042"), Some(key.public_key()));

        // Already registered: refused, and nothing changes.
        let before = std::fs::read(&o.registry).unwrap();
        let again = devices_from_ids(&["new-1".into(), "cam-0007".into()]).unwrap();
        let e = import(&again, &o).unwrap_err();
        assert!(e.to_string().contains("line 2: cam-0007"), "{e}");
        assert_eq!(std::fs::read(&o.registry).unwrap(), before);
        assert!(!o.passwords_dir.join("new-1").exists());

        // A device-made key (its .pub in keys_dir) is used, not replaced.
        let own = coevo_protocol::SigningKey::generate().unwrap().public_key();
        std::fs::write(o.keys_dir.join("own-1.pub"), format!("{own}\n")).unwrap();
        let s = import(&devices_from_ids(&["own-1".into()]).unwrap(), &o).unwrap();
        assert_eq!((s.keys_given, s.keys_generated, s.registered), (1, 0, 1001));
        assert_eq!(
            FleetRegistry::load(&o.registry).unwrap().key("own-1"),
            Some(own)
        );
    }
}
