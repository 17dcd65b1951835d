//! Broker configuration: what an operator puts in `broker.toml`.
//!
//! Every field has a default, so an empty file (or no file) yields a working loopback broker.
//! Unknown fields are rejected: a misspelt limit silently falling back to its default is worse
//! than a startup error.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::acl::AclConfig;
use crate::BrokerError;

/// Largest model chunk the protocol publishes, in bytes (see the protocol crate's chunking).
/// Kept here only to explain the payload default.
const MODEL_CHUNK_BYTES: usize = 256 * 1024;

/// Limits and listen address of the embedded MQTT broker.
///
/// Loaded from TOML (see `broker/broker.sample.toml`); every field may be omitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// TCP address the MQTT 3.1.1 listener binds to. Default `127.0.0.1:1883` (loopback only:
    /// exposing a broker must be a deliberate choice). Port 0 means "pick a free port".
    pub listen: SocketAddr,
    /// Largest MQTT packet accepted from a client, in bytes (rumqttd checks the whole packet,
    /// topic and header included). Default 1 MiB + 64 KiB: model chunks are at most 256 KiB
    /// and signed deltas are bounded by the protocol, so this leaves ample headroom while
    /// stopping a client from making the broker buffer arbitrarily large packets.
    pub max_payload_bytes: usize,
    /// Maximum number of simultaneous client connections (router slots). Default 20 000:
    /// 10,000 cameras plus the coordinator, collectors and reconnecting clients whose old
    /// socket has not timed out yet. Each connection holds three file descriptors in the
    /// broker process; [`crate::start`] raises the open-file limit to match (see
    /// [`crate::raise_fd_limit`]) and warns when it cannot.
    pub max_connections: usize,
    /// Admission control: CONNECTs verified and handed to the router at the same time.
    /// Others wait in line up to `connection_timeout_ms`, then get CONNACK 3 ("server
    /// unavailable") and back off, rather than timing out client-side and coming back while
    /// the broker still works on their old attempt. Default 1024. At least 1.
    pub max_pending_connects: usize,
    /// Maximum number of packets rumqttd reads from one connection in a single batch before
    /// handing them to the router. Default 100. Note: despite the name rumqttd gives it
    /// (`max_inflight_count`), the broker's *outgoing* QoS 1 in-flight window is fixed at 100
    /// inside rumqttd 0.20 and cannot be configured.
    pub max_inflight: usize,
    /// How long a freshly accepted TCP connection may take to send its MQTT CONNECT packet,
    /// in milliseconds, before it is dropped (guards against idle connections exhausting slots).
    /// Default 5000. At most 65 535 (rumqttd stores it in a `u16`).
    pub connection_timeout_ms: u16,
    /// Size of one in-memory commit-log segment per subscription filter, in bytes.
    /// rumqttd keeps every filter's messages in memory in at most `max_segment_count` segments
    /// of this size; a subscriber that falls further behind than
    /// `max_segment_size * max_segment_count` bytes silently loses the oldest messages, even at
    /// QoS 1 (the coordinator, not the broker, is the source of truth). The product is also the
    /// worst-case memory a busy filter holds. Default 16 MiB (x 10 segments = 160 MiB per
    /// filter: several full student models of lag). At least 1024 (rumqttd panics below that).
    pub max_segment_size: usize,
    /// Number of in-memory segments kept per subscription filter. Default 10. At least 1.
    pub max_segment_count: usize,
    /// Credential file (TOML, argon2id hashes; see [`crate::Credentials`]). `None` disables
    /// authentication: anyone who can reach `listen` may connect (a warning is logged).
    /// A relative path in a config *file* is resolved against that file's directory.
    pub credentials: Option<PathBuf>,
    /// `[tls]`: serve MQTT over TLS on `listen` (and nothing in plain text there). `None`
    /// serves plain TCP, fine on loopback; anything reachable from a network should set it,
    /// or passwords and models cross that network in the clear.
    pub tls: Option<TlsConfig>,
    /// `[acl]`: topic ACLs enforced on every client's SUBSCRIBE and PUBLISH (see
    /// [`crate::acl`]); the same rules `coevo fleet export-mosquitto` writes for Mosquitto.
    pub acl: AclConfig,
    /// Run the front end (authentication, ACLs, TLS) in this many child processes instead of
    /// in the broker process; 0 (the default) keeps it in-process. The children share
    /// `listen` (SO_REUSEPORT: the kernel spreads connections over them) and pipe to rumqttd
    /// here. Each client then holds 2 descriptors in one child and 1 here instead of 3 in one
    /// process, so a fleet of N cameras needs about N/K + N descriptors per process rather
    /// than 3N: with a 20,000 hard `RLIMIT_NOFILE` (and no privilege to raise it), 10,000
    /// cameras need `front_processes = 2`. The children also spread the front end over more
    /// cores. `max_connections` and `max_pending_connects` apply per front process. Children
    /// exit when the broker process does. At most 64.
    pub front_processes: usize,
    /// Program run for each front process (`PROGRAM broker --front-process`); default: the
    /// running executable (the `coevo` binary). Set it when embedding the broker in another
    /// program, e.g. a test binary.
    pub front_program: Option<PathBuf>,
    /// `[metrics]`: Prometheus `/metrics` (connections, refusals by reason, ACL denials,
    /// traffic; see [`crate::metrics`]).
    pub metrics: MetricsConfig,
}

/// `[metrics]` in the broker config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics on `http://LISTEN/metrics`, e.g. `"127.0.0.1:9465"`. Unset: no
    /// listener (the default). The endpoint has no authentication: bind it to loopback or a
    /// private scrape network. Port 0 picks a free port ([`crate::BrokerHandle::metrics_addr`]).
    pub listen: Option<SocketAddr>,
}

/// The broker's TLS identity: a PEM certificate chain and its private key, e.g. `broker.pem`
/// and `broker.key` from `coevo keys tls`. Clients verify the chain against the fleet CA
/// (`ca.pem`), so the certificate must name the host or IP address clients dial.
///
/// Clients still authenticate with their password: TLS here protects the link (secrecy of
/// passwords and payloads, no man in the middle), it does not replace per-client credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first. Relative paths resolve like `credentials`.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1) of the leaf certificate.
    pub key: PathBuf,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1883)),
            max_payload_bytes: 4 * MODEL_CHUNK_BYTES + 64 * 1024,
            max_connections: 20_000,
            max_pending_connects: 1024,
            max_inflight: 100,
            connection_timeout_ms: 5_000,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 10,
            credentials: None,
            tls: None,
            acl: AclConfig::default(),
            front_processes: 0,
            front_program: None,
            metrics: MetricsConfig::default(),
        }
    }
}

/// Upper bound on [`BrokerConfig::front_processes`].
const MAX_FRONT_PROCESSES: usize = 64;

/// Smallest segment rumqttd accepts; below it the router thread panics.
const MIN_SEGMENT_SIZE: usize = 1024;

impl BrokerConfig {
    /// Reads and validates a TOML config file. Relative `credentials` and `[tls]` paths are
    /// resolved against the directory of `path`, so a config and its files can move together.
    pub fn from_toml_file(path: &Path) -> Result<Self, BrokerError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            BrokerError::Config(format!("cannot read broker config {}: {e}", path.display()))
        })?;
        let mut config = Self::parse(&text)
            .map_err(|e| BrokerError::Config(format!("{}: {e}", path.display())))?;
        if let Some(dir) = path.parent() {
            let tls = config.tls.as_mut().map(|t| [&mut t.cert, &mut t.key]);
            for p in config
                .credentials
                .iter_mut()
                .chain(tls.into_iter().flatten())
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates a TOML config held in memory (relative paths are kept as given).
    pub fn from_toml_str(s: &str) -> Result<Self, BrokerError> {
        let config = Self::parse(s).map_err(BrokerError::Config)?;
        config.validate()?;
        Ok(config)
    }

    /// Serialises the config as TOML (e.g. to write out the effective configuration).
    pub fn to_toml_string(&self) -> Result<String, BrokerError> {
        toml::to_string(self).map_err(|e| BrokerError::Config(format!("cannot serialise: {e}")))
    }

    fn parse(s: &str) -> Result<Self, String> {
        toml::from_str(s).map_err(|e| format!("invalid broker config: {e}"))
    }

    /// Rejects values rumqttd would panic on (in its router thread, where we could not report
    /// them) or that make the broker useless.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let fail = |msg: String| Err(BrokerError::Config(msg));
        if self.max_payload_bytes == 0 {
            return fail("max_payload_bytes must be at least 1".into());
        }
        if self.max_connections == 0 {
            return fail("max_connections must be at least 1".into());
        }
        if self.max_pending_connects == 0 {
            return fail("max_pending_connects must be at least 1".into());
        }
        if self.max_inflight == 0 {
            return fail("max_inflight must be at least 1".into());
        }
        if self.connection_timeout_ms == 0 {
            return fail("connection_timeout_ms must be at least 1".into());
        }
        if self.max_segment_size < MIN_SEGMENT_SIZE {
            return fail(format!(
                "max_segment_size must be at least {MIN_SEGMENT_SIZE} bytes, got {}",
                self.max_segment_size
            ));
        }
        if self.max_segment_count == 0 {
            return fail("max_segment_count must be at least 1".into());
        }
        if self.front_processes > MAX_FRONT_PROCESSES {
            return fail(format!(
                "front_processes must be at most {MAX_FRONT_PROCESSES}, got {}",
                self.front_processes
            ));
        }
        self.acl.validate()
    }
}
