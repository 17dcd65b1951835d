//! The coevo embedded MQTT broker: [rumqttd] 0.20 with our configuration, per-client argon2id
//! authentication and limits.
//!
//! The broker is deliberately dumb (DESIGN.md §6–7): it authenticates clients and moves bytes.
//! Integrity comes from signatures in the protocol crate and the coordinator is the source of
//! truth, because rumqttd keeps nothing on disk and may drop QoS 1 messages for a subscriber
//! that falls too far behind (see [`BrokerConfig::max_segment_size`]).
//!
//! # Layout
//!
//! - [`config`]: [`BrokerConfig`], the TOML-loadable listen address and limits
//!   (`broker/broker.sample.toml` documents every field for operators).
//! - [`credentials`]: [`Credentials`], the per-client argon2id hash file, plus
//!   [`hash_password`] and [`generate_password`] for provisioning.
//! - `auth` (private): the rumqttd auth handler; runs argon2 off the broker's event loop on a
//!   bounded worker pool and caches successful checks.
//! - `tls` (private): with `[tls]` configured, our own rustls front end on `listen` that pipes
//!   to rumqttd on a loopback port (rumqttd's own TLS listener can be stalled by one idle
//!   socket; the module doc says why).
//! - this file: [`start`] / [`BrokerHandle`] (run rumqttd on its own thread and wait until it
//!   accepts TCP connections), [`free_local_addr`], and [`BrokerError`].
//!
//! rumqttd has no shutdown API: a started broker lives until the process exits.

pub mod config;
pub mod credentials;

mod auth;
mod tls;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{BrokerConfig, TlsConfig};
pub use credentials::{generate_password, hash_password, Credentials};

/// Everything that can go wrong configuring or starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// File-system error (e.g. writing the credential file).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The broker config could not be read, parsed or is out of range.
    #[error("broker config: {0}")]
    Config(String),
    /// The credential file is missing or malformed, or a password could not be hashed.
    #[error("broker credentials: {0}")]
    Credentials(String),
    /// rumqttd did not come up (port in use, thread died, timed out).
    #[error("broker start: {0}")]
    Start(String),
    /// The `[tls]` certificate or key is missing, malformed, or the two don't belong together.
    #[error("broker TLS: {0}")]
    Tls(String),
}

/// How long [`start`] waits for the listener to accept connections. rumqttd binds within
/// milliseconds; the margin is for loaded CI machines.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between readiness probes while waiting for the listener.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// rumqttd's per-connection cap on QoS 0 messages read from a log in one go.
const MAX_OUTGOING_PACKET_COUNT: u64 = 200;

/// A running embedded broker. rumqttd has no shutdown API, so it runs on its own OS thread for
/// the life of the process; dropping the handle does not stop it.
#[derive(Debug)]
pub struct BrokerHandle {
    /// The address the broker listens on (the resolved one when the config asked for port 0).
    pub addr: SocketAddr,
    /// Whether client authentication is enforced.
    pub auth_enabled: bool,
    /// Whether `addr` speaks TLS (`[tls]` configured) rather than plain MQTT.
    pub tls_enabled: bool,
    thread: JoinHandle<()>,
    /// The TLS front end, when `[tls]` is configured.
    tls_thread: Option<JoinHandle<()>>,
}

impl BrokerHandle {
    /// False once rumqttd's listener (or the TLS front end) has died (their threads only return
    /// when serving failed); the process should then exit or restart the broker.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished() && self.tls_thread.as_ref().is_none_or(|t| !t.is_finished())
    }
}

/// Starts rumqttd (MQTT 3.1.1 "v4" server) on its own thread and returns once `config.listen`
/// accepts TCP connections.
///
/// If `config.credentials` is set the file is loaded first (a missing or malformed file is an
/// error: never fall back to an open broker) and every CONNECT is checked with
/// [`Credentials::check`]; otherwise anyone may connect and a warning is logged.
///
/// With `config.tls`, `listen` speaks only TLS: the certificate and key are loaded and checked
/// first, rumqttd listens on a free 127.0.0.1 port, and a TLS front end on `listen` pipes each
/// connection to it (see the `tls` module for why rumqttd's own TLS listener isn't used).
///
/// Errors: invalid config, credentials or TLS files, a listen address that cannot be bound
/// (e.g. port in use), or a broker thread that dies or never starts listening.
pub fn start(config: BrokerConfig) -> Result<BrokerHandle, BrokerError> {
    config.validate()?;
    let acceptor = config.tls.as_ref().map(tls::acceptor).transpose()?;

    let verifier = match &config.credentials {
        Some(path) => {
            let creds = Credentials::load(path)?;
            if creds.clients.is_empty() {
                tracing::warn!(path = %path.display(), "credential file lists no clients: every connection will be refused");
            }
            Some(auth::Verifier::start(creds).map_err(|e| {
                BrokerError::Start(format!("cannot spawn auth worker threads: {e}"))
            })?)
        }
        None => None,
    };

    // rumqttd reports a failed bind only in its own log and then its thread ends, and it cannot
    // tell us which port it got for port 0. So bind here first: this resolves port 0 and turns
    // "address in use" into a typed error. (The port could be taken between this check and
    // rumqttd's bind; the thread-death check below catches that case.) With TLS the public
    // listener is ours and stays bound; rumqttd gets a loopback port nobody outside can reach.
    let public = TcpListener::bind(config.listen)
        .map_err(|e| BrokerError::Start(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = public.local_addr()?;
    let (rumqttd_addr, front) = match acceptor {
        None => {
            drop(public);
            (addr, None)
        }
        Some(acceptor) => (free_local_addr()?, Some((public, acceptor))),
    };

    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: config.connection_timeout_ms,
        max_payload_size: config.max_payload_bytes,
        max_inflight_count: config.max_inflight,
        auth: None,
        external_auth: None,
        // Without dynamic filters rumqttd *disconnects* a client that publishes to a topic no
        // one has subscribed to yet (e.g. the retained round manifest before any edge client
        // connected). With them, such a publish gets its own log (and retained publishes are
        // kept for later subscribers).
        dynamic_filters: true,
    };
    let auth_enabled = verifier.is_some();
    if let Some(verifier) = verifier {
        connections.set_auth_handler(move |client_id, username, password| {
            verifier.authenticate(client_id, username, password)
        });
    }

    let server = rumqttd::ServerSettings {
        name: "coevo-v4".to_owned(),
        listen: rumqttd_addr,
        tls: None,
        // rumqttd sleeps this long after every accept; 0 keeps reconnect storms fast (the
        // connection timeout and auth queue bound the cost of each accepted socket).
        next_connection_delay_ms: 0,
        connections,
    };
    let rumqttd_config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: config.max_connections,
            max_outgoing_packet_count: MAX_OUTGOING_PACKET_COUNT,
            max_segment_size: config.max_segment_size,
            max_segment_count: config.max_segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Default::default()
    };

    let thread = std::thread::Builder::new()
        .name("coevo-broker".to_owned())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(rumqttd_config);
            // Only returns once every server thread has ended (e.g. its bind failed).
            match broker.start() {
                Ok(()) => tracing::error!("embedded MQTT broker stopped"),
                Err(e) => tracing::error!(error = %e, "embedded MQTT broker failed"),
            }
        })
        .map_err(|e| BrokerError::Start(format!("cannot spawn broker thread: {e}")))?;

    wait_until_listening(rumqttd_addr, &thread)?;
    let tls_enabled = front.is_some();
    let tls_thread = match front {
        Some((listener, acceptor)) => Some(tls::spawn_front(
            listener,
            acceptor,
            rumqttd_addr,
            Duration::from_millis(u64::from(config.connection_timeout_ms)),
            config.max_connections,
        )?),
        None => None,
    };

    if auth_enabled {
        tracing::info!(
            %addr,
            max_payload_bytes = config.max_payload_bytes,
            max_connections = config.max_connections,
            max_inflight = config.max_inflight,
            connection_timeout_ms = config.connection_timeout_ms,
            max_segment_size = config.max_segment_size,
            max_segment_count = config.max_segment_count,
            auth = true,
            tls = tls_enabled,
            "embedded MQTT broker listening",
        );
    } else {
        tracing::warn!(
            %addr,
            max_payload_bytes = config.max_payload_bytes,
            max_connections = config.max_connections,
            max_inflight = config.max_inflight,
            connection_timeout_ms = config.connection_timeout_ms,
            max_segment_size = config.max_segment_size,
            max_segment_count = config.max_segment_count,
            auth = false,
            tls = tls_enabled,
            "embedded MQTT broker listening WITHOUT authentication: anyone who can reach it may connect",
        );
    }

    Ok(BrokerHandle {
        addr,
        auth_enabled,
        tls_enabled,
        thread,
        tls_thread,
    })
}

/// Polls `addr` with TCP connects until it accepts, the broker thread dies, or the timeout.
///
/// The probe connection never sends CONNECT, so rumqttd logs one "Error while handling MQTT
/// connect packet" line for it; that is expected.
fn wait_until_listening(addr: SocketAddr, thread: &JoinHandle<()>) -> Result<(), BrokerError> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if thread.is_finished() {
            return Err(BrokerError::Start(format!(
                "broker thread exited before listening on {addr} (port taken? see the log)"
            )));
        }
        if TcpStream::connect_timeout(&addr, PROBE_INTERVAL * 5).is_ok() {
            // A bind failure in rumqttd is immediate; if someone else grabbed the port in the
            // window after our probe bind, the thread is gone by now.
            if thread.is_finished() {
                continue;
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BrokerError::Start(format!(
                "broker did not accept connections on {addr} within {STARTUP_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(PROBE_INTERVAL);
    }
}

/// Picks a free TCP port on 127.0.0.1 (bind :0, read, drop) for tests and the demo. Another
/// process may take it before it is used; [`start`] reports that as a typed error.
pub fn free_local_addr() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    listener.local_addr()
}
