//! `coevo keys tls`: a private certificate authority for one fleet and the broker's TLS
//! certificate signed by it.
//!
//! ```text
//! DIR/ca.pem       the fleet CA certificate: every client's `ca_cert` (trust anchor)
//! DIR/ca.key       its private key (0600): keep it offline; it can mint broker certificates
//! DIR/broker.pem   the broker's certificate, for the given host names and IP addresses
//! DIR/broker.key   its private key (0600): the broker's `[tls] key`
//! ```
//!
//! A private CA rather than a public one because the fleet's devices should trust *only* the
//! fleet's broker, and broker addresses are often bare IPs or internal names no public CA
//! certifies. Keys are ECDSA P-256 (rcgen's default; every TLS stack accepts it), generated
//! with ring, like the rest of coevo's cryptography.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Names a broker certificate covers when none are given: local demos and tests.
pub const DEFAULT_HOSTS: [&str; 2] = ["localhost", "127.0.0.1"];
/// Default validity in days (about 27 months, the usual ceiling for server certificates).
pub const DEFAULT_DAYS: u32 = 825;
/// Upper bound on `days`: beyond it a typo (an extra digit) is likelier than intent.
pub const MAX_DAYS: u32 = 36_500;
/// How far back `not_before` is set, so a device whose clock lags a little accepts a
/// certificate minted just now.
const CLOCK_SKEW: time::Duration = time::Duration::hours(1);

/// What `coevo keys tls` makes.
#[derive(Clone, Debug)]
pub struct FleetTlsOptions {
    /// Fleet name; it goes into the certificates' subject names (for people reading them).
    pub fleet: String,
    /// DNS names and IP addresses the broker certificate is valid for: exactly what clients put
    /// in their `host`. Empty means [`DEFAULT_HOSTS`].
    pub hosts: Vec<String>,
    /// Validity of both certificates, in days from now.
    pub days: u32,
    /// Overwrite existing files (otherwise existing files are an error and nothing is written).
    pub force: bool,
}

impl FleetTlsOptions {
    /// Defaults for `fleet`: local hosts, [`DEFAULT_DAYS`], no overwriting.
    pub fn new(fleet: &str) -> Self {
        FleetTlsOptions {
            fleet: fleet.to_owned(),
            hosts: Vec::new(),
            days: DEFAULT_DAYS,
            force: false,
        }
    }
}

/// The four files written by [`write_fleet_tls`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetTlsFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub broker_cert: PathBuf,
    pub broker_key: PathBuf,
}

impl FleetTlsFiles {
    /// The file names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        FleetTlsFiles {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            broker_cert: dir.join("broker.pem"),
            broker_key: dir.join("broker.key"),
        }
    }

    fn all(&self) -> [&Path; 4] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.broker_cert,
            &self.broker_key,
        ]
    }
}

/// Everything that can go wrong making a fleet's TLS files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The fleet name, a host or the validity is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Files from an earlier run are in the way and `force` is off.
    #[error("would overwrite {}; pass --force to replace them", list(.0))]
    Exists(Vec<PathBuf>),
    /// rcgen could not generate a key or sign a certificate.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// Creating the directory or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Generates a fleet CA and a broker certificate signed by it, and writes them into `dir`
/// (created if missing). Nothing is written unless every check passes, and the files appear
/// whole (written beside, then renamed), so an interrupted run leaves no half-written key.
pub fn write_fleet_tls(dir: &Path, opts: &FleetTlsOptions) -> Result<FleetTlsFiles, TlsError> {
    let hosts = validate(opts)?;
    let files = FleetTlsFiles::in_dir(dir);
    if !opts.force {
        let existing: Vec<PathBuf> = files
            .all()
            .into_iter()
            .filter(|p| p.exists())
            .map(Path::to_path_buf)
            .collect();
        if !existing.is_empty() {
            return Err(TlsError::Exists(existing));
        }
    }

    let now = time::OffsetDateTime::now_utc();
    let not_before = now - CLOCK_SKEW;
    let not_after = now + time::Duration::days(i64::from(opts.days));

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name(&format!("coevo {} CA", opts.fleet));
    // May sign end-entity certificates only, not further CAs.
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key)?;

    let broker_key = KeyPair::generate()?;
    let mut broker = CertificateParams::new(hosts)?;
    broker.distinguished_name = name(&format!("coevo {} broker", opts.fleet));
    broker.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // A server certificate only: it can't be reused to impersonate a client elsewhere.
    broker.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    broker.use_authority_key_identifier_extension = true;
    broker.not_before = not_before;
    broker.not_after = not_after;
    let issuer = Issuer::new(ca, &ca_key);
    let broker_cert = broker.signed_by(&broker_key, &issuer)?;

    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let contents = [
        (&files.ca_cert, ca_cert.pem(), false),
        (&files.ca_key, ca_key.serialize_pem(), true),
        (&files.broker_cert, broker_cert.pem(), false),
        (&files.broker_key, broker_key.serialize_pem(), true),
    ];
    let mut staged = Vec::new();
    for (path, text, private) in &contents {
        let tmp = staging_path(path);
        match write_new(&tmp, text.as_bytes(), *private) {
            Ok(()) => staged.push((tmp, *path)),
            Err(e) => {
                for (tmp, _) in &staged {
                    let _ = std::fs::remove_file(tmp);
                }
                return Err(e);
            }
        }
    }
    for (tmp, path) in staged {
        std::fs::rename(&tmp, path).map_err(|source| TlsError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(files)
}

/// Checks the options and returns the de-duplicated host list (defaults if empty).
fn validate(opts: &FleetTlsOptions) -> Result<Vec<String>, TlsError> {
    coevo_protocol::topic::validate_id(&opts.fleet)
        .map_err(|e| TlsError::Invalid(format!("fleet: {e}")))?;
    if !(1..=MAX_DAYS).contains(&opts.days) {
        return Err(TlsError::Invalid(format!(
            "days must be between 1 and {MAX_DAYS}, got {}",
            opts.days
        )));
    }
    let given: Vec<String> = if opts.hosts.is_empty() {
        DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect()
    } else {
        opts.hosts.iter().map(|h| h.trim().to_string()).collect()
    };
    let mut seen = BTreeSet::new();
    let mut hosts = Vec::new();
    for host in given {
        if host.parse::<IpAddr>().is_err() && !is_dns_name(&host) {
            return Err(TlsError::Invalid(format!(
                "host {host:?} is neither an IP address nor a DNS name"
            )));
        }
        if seen.insert(host.to_ascii_lowercase()) {
            hosts.push(host);
        }
    }
    Ok(hosts)
}

/// A host name as TLS clients will match it: dot-separated labels of ASCII letters, digits and
/// hyphens (1–63 characters, no hyphen at either end), at most 253 characters. Checked here
/// because a malformed name would only surface as a failed handshake on every device.
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `ca.key` → `ca.key.tmp` (not `with_extension`, which would give ca.pem and ca.key one name).
fn staging_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "coevo");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Creates `path` afresh (removing a leftover), mode 0600 if `private` (set at creation, so
/// the key is never readable by others, not even briefly), and syncs it to disk.
fn write_new(path: &Path, data: &[u8], private: bool) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked() {
        for ok in ["localhost", "broker.example", "a-b.c1.example.", "x"] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a.example",
            "a..b",
            "a b",
            "bröker",
            "*.example",
            "a_b",
        ] {
            assert!(!is_dns_name(bad), "{bad}");
        }
        let mut o = FleetTlsOptions::new("city");
        o.hosts = vec![
            "127.0.0.1".into(),
            "::1".into(),
            "LOCALHOST".into(),
            "localhost".into(),
        ];
        assert_eq!(validate(&o).unwrap(), vec!["127.0.0.1", "::1", "LOCALHOST"]);
        o.hosts = vec!["http://broker".into()];
        assert!(matches!(validate(&o), Err(TlsError::Invalid(_))));
        o.hosts.clear();
        assert_eq!(validate(&o).unwrap(), DEFAULT_HOSTS);
        o.days = 0;
        assert!(matches!(validate(&o), Err(TlsError::Invalid(_))));
        o.days = 1;
        o.fleet = "a/b".into();
        assert!(matches!(validate(&o), Err(TlsError::Invalid(_))));
    }

    #[test]
    fn writes_four_files_refuses_to_overwrite_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        let files = write_fleet_tls(&out, &FleetTlsOptions::new("city")).unwrap();
        assert_eq!(files, FleetTlsFiles::in_dir(&out));
        let ca = std::fs::read_to_string(&files.ca_cert).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(std::fs::read_to_string(&files.broker_key)
            .unwrap()
            .contains("PRIVATE KEY"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&files.ca_key), 0o600);
            assert_eq!(mode(&files.broker_key), 0o600);
        }
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            4,
            "no temp files left"
        );

        match write_fleet_tls(&out, &FleetTlsOptions::new("city")) {
            Err(TlsError::Exists(paths)) => assert_eq!(paths.len(), 4),
            other => panic!("expected Exists, got {other:?}"),
        }
        assert_eq!(std::fs::read_to_string(&files.ca_cert).unwrap(), ca);

        let mut forced = FleetTlsOptions::new("city");
        forced.force = true;
        write_fleet_tls(&out, &forced).unwrap();
        assert_ne!(std::fs::read_to_string(&files.ca_cert).unwrap(), ca);
    }
}
