//! The coevo embedded MQTT broker: [rumqttd] 0.20 with our configuration, per-client argon2id
//! authentication, topic ACLs, live revocation and limits.
//!
//! The broker is deliberately simple (DESIGN.md §6–7): it authenticates clients, keeps each
//! camera inside its own topics, and moves bytes. Integrity comes from signatures in the
//! protocol crate and the coordinator is the source of truth, because rumqttd keeps nothing on disk and may drop QoS 1 messages for a subscriber
//! that falls too far behind (see [`BrokerConfig::max_segment_size`]).
//!
//! # Layout
//!
//! - [`config`]: [`BrokerConfig`], the TOML-loadable listen address and limits
//!   (`broker/broker.sample.toml` documents every field for operators).
//! - [`credentials`]: [`Credentials`], the per-client argon2id hash file, plus
//!   [`hash_password`] and [`generate_password`] for provisioning.
//! - [`acl`]: [`AclConfig`] / [`Acl`], the topic rules shared with the Mosquitto export.
//! - [`metrics`]: the Prometheus metrics served on `[metrics] listen` (the front end's counters).
//! - `front` (private): the MQTT-aware front end on `listen` (plain TCP or TLS): checks
//!   CONNECT, PUBLISH and SUBSCRIBE, closes revoked clients, and pipes the rest to rumqttd on
//!   a loopback port that accepts only the front end's secret.
//! - `auth` (private): password checks; device secrets (fast salted HMAC) inline, argon2 off
//!   the event loop on a bounded worker pool with a cache of successful checks; its
//!   credential set can be replaced while running. Overload is answered CONNACK 3.
//! - `tls` (private): loads the `[tls]` identity (rumqttd's own TLS listener can be stalled
//!   by one idle socket; the module doc says why).
//! - this file: [`start`] / [`BrokerHandle`] (run rumqttd on its own thread, the front end,
//!   and the credential-file watcher), [`BrokerStats`], [`free_local_addr`], [`BrokerError`].
//!
//! rumqttd has no shutdown API: a started broker lives until the process exits.

pub mod acl;
pub mod config;
pub mod credentials;
pub mod metrics;

mod auth;
mod front;
mod split;
mod tls;

pub use split::run_front_process;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::{OsRng, RngCore};

pub use acl::{Acl, AclConfig};
pub use config::{BrokerConfig, MetricsConfig, TlsConfig};
pub use credentials::{generate_password, hash_password, Credentials, DeviceHashes};

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
    /// The `[metrics] listen` endpoint could not be started (e.g. its port is taken).
    #[error("broker metrics: {0}")]
    Metrics(#[from] coevo_telemetry::TelemetryError),
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
/// How often the credential file is checked for changes: revocation takes effect within
/// about this long (plus the time to close the connections).
pub const CREDENTIALS_POLL: Duration = Duration::from_secs(1);
/// How often changed counters are logged.
const STATS_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What the broker refused and did, since start. Every refused CONNECT, PUBLISH and SUBSCRIBE
/// is counted here (and logged, rate-limited, with the client id).
///
/// With front processes, the children report theirs to the broker process every second and
/// these are the sums over all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BrokerStats {
    /// PUBLISHes (and last-will topics) outside the client's topics; each closed the
    /// connection (or refused the CONNECT).
    pub acl_refused_publish: u64,
    /// SUBSCRIBEs with a filter outside the client's topics; each closed the connection.
    pub acl_refused_subscribe: u64,
    /// CONNECTs refused for an unknown client, a wrong password or an invalid client id.
    pub auth_refused: u64,
    /// CONNECTs refused because the client id differed from the user name.
    pub client_id_mismatch: u64,
    /// Open connections closed because their client was removed or its password changed.
    pub revoked_disconnects: u64,
    /// Times a changed credential file was loaded.
    pub credential_reloads: u64,
    /// Times a changed credential file could not be loaded (the previous set stays in force).
    pub credential_reload_errors: u64,
    /// CONNECTs admitted and handed to the router.
    pub connections_accepted: u64,
    /// Connections closed for not speaking MQTT 3.1.1 as a client must (no or malformed
    /// CONNECT, a second CONNECT, a packet over `max_payload_bytes`).
    pub protocol_violations: u64,
    /// CONNECTs answered CONNACK 3 ("server unavailable") by admission control: no
    /// verification slot within `connection_timeout_ms`, or the argon2 pool saturated. The
    /// client backs off and retries; on a quiet network with device secrets this stays 0.
    pub connects_busy: u64,
    /// TCP connections closed at once because `max_connections` sockets were open.
    pub connections_over_limit: u64,
    /// `auth_refused` for a client id that is not a valid topic level (CONNACK 2).
    pub auth_invalid_id: u64,
    /// `auth_refused` for a client id not in the credential file (CONNACK 4).
    pub auth_unknown_client: u64,
    /// `auth_refused` for a known client with a wrong password (CONNACK 4).
    pub auth_bad_password: u64,
    /// Client connections open now (past their CONNECT, piped to the router).
    pub connections_open: u64,
    /// PUBLISH packets received from clients that passed the topic ACL.
    pub publishes_in: u64,
    /// MQTT bytes received from admitted clients (after their CONNECT).
    pub bytes_in: u64,
    /// MQTT bytes sent to admitted clients.
    pub bytes_out: u64,
}

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
    /// The front end on `addr` (plain or TLS).
    front_thread: JoinHandle<()>,
    front: Arc<front::Front>,
    connection_capacity: usize,
    /// The `[metrics] listen` endpoint; it serves while this handle lives.
    metrics: Option<coevo_telemetry::MetricsServer>,
}

impl BrokerHandle {
    /// False once rumqttd's router or the front end has died (their threads only return
    /// when serving failed); the process should then exit or restart the broker.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished() && !self.front_thread.is_finished()
    }

    /// rumqttd's own loopback listener behind the front end. It admits only the front end
    /// (per-process secret); exposed so tests and operators can check that.
    pub fn router_addr(&self) -> SocketAddr {
        self.front.backends[0]
    }

    /// All of rumqttd's loopback listeners (one per server thread).
    pub fn router_addrs(&self) -> &[SocketAddr] {
        &self.front.backends
    }

    /// Connections served at once: `max_connections`, or fewer when the open-file limit
    /// cannot be raised far enough (3 descriptors per connection; logged at start).
    pub fn connection_capacity(&self) -> usize {
        self.connection_capacity
    }

    /// The refusal and revocation counters since start.
    pub fn stats(&self) -> BrokerStats {
        self.front.counters.snapshot()
    }

    /// Where Prometheus metrics are served (`http://ADDR/metrics`), when `[metrics] listen`
    /// is set: the bound address, so port 0 tells which port was picked.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .map(coevo_telemetry::MetricsServer::addr)
    }
}

/// Starts rumqttd (MQTT 3.1.1 "v4" server) on its own thread and returns once `config.listen`
/// accepts TCP connections.
///
/// If `config.credentials` is set the file is loaded first (a missing or malformed file is an
/// error: never fall back to an open broker), every CONNECT is checked with
/// [`Credentials::check`], and the file is re-read when it changes (removed clients and changed
/// passwords are disconnected within about [`CREDENTIALS_POLL`]); otherwise anyone may connect
/// and a warning is logged. Either way `config.acl` is enforced on every PUBLISH, SUBSCRIBE and
/// last will (see [`acl`]).
///
/// rumqttd listens on a free 127.0.0.1 port; the front end on `listen` (plain TCP, or only TLS
/// with `config.tls`) checks each connection and pipes it there.
///
/// Errors: invalid config, credentials or TLS files, a listen address that cannot be bound
/// (e.g. port in use), or a broker thread that dies or never starts listening.
pub fn start(config: BrokerConfig) -> Result<BrokerHandle, BrokerError> {
    config.validate()?;
    // Split: the front end runs in child processes; here each client holds only rumqttd's
    // end of its pipe.
    let split = config.front_processes > 0;
    let connection_capacity = fd_capacity(&config, if split { 1 } else { FDS_PER_CONNECTION });
    let acceptor = config.tls.as_ref().map(tls::acceptor).transpose()?;

    // Split: the front processes load and watch the credentials.
    let verifier = if split { None } else { load_verifier(&config)? };

    // rumqttd reports a failed bind only in its own log and then its thread ends. So bind the
    // public listener here: this resolves port 0 and turns "address in use" into a typed
    // error. The listener stays ours (the front end); rumqttd gets a loopback port.
    // Split: the port is only reserved here (bound, not listening, so no client queues on a
    // socket nobody accepts from); the front processes listen on it.
    let public =
        if split {
            Public::Reserved(bind_socket(config.listen, true).map_err(|e| {
                BrokerError::Start(format!("cannot reserve {}: {e}", config.listen))
            })?)
        } else {
            Public::Listening(bind_listener(config.listen, false).map_err(|e| {
                BrokerError::Start(format!("cannot listen on {}: {e}", config.listen))
            })?)
        };
    let addr = public.local_addr()?;
    let rumqttd_addrs = (0..ROUTER_LISTENERS)
        .map(|_| free_local_addr())
        .collect::<Result<Vec<_>, _>>()?;

    // rumqttd admits only CONNECTs carrying this secret, which only the front end sends: its
    // loopback port is no way around authentication or the ACLs.
    let secret = {
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
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
    {
        let secret = secret.clone();
        connections.set_auth_handler(move |_client_id, _username, password: String| {
            std::future::ready(auth::constant_time_eq(
                password.as_bytes(),
                secret.as_bytes(),
            ))
        });
    }

    let servers = rumqttd_addrs.iter().enumerate().map(|(i, addr)| {
        let server = rumqttd::ServerSettings {
            name: format!("coevo-v4-{i}"),
            listen: *addr,
            tls: None,
            // rumqttd sleeps this long after every accept; 0 keeps reconnect storms fast (the
            // front end's admission control bounds the handshakes in flight).
            next_connection_delay_ms: 0,
            connections: connections.clone(),
        };
        (i.to_string(), server)
    });
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
        v4: Some(servers.collect::<HashMap<_, _>>()),
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

    for addr in &rumqttd_addrs {
        wait_until_listening(*addr, &thread)?;
    }
    let auth_enabled = verifier.is_some() || (split && config.credentials.is_some());
    let tls_enabled = acceptor.is_some();
    let front = Arc::new(new_front(&config, verifier.clone(), secret, rumqttd_addrs));
    let front_thread = match public {
        Public::Reserved(reserved) => {
            let children = split::spawn_fronts(&config, addr, &front)?;
            drop(reserved);
            split::supervise(children)?
        }
        Public::Listening(public) => {
            front::spawn(public, acceptor, Arc::clone(&front), connection_capacity)?
        }
    };
    spawn_watcher(&config, verifier, &front)?;
    // With front processes the children's counters are added into `front.counters` as they
    // report them (split.rs), so stats and /metrics cover every process.
    let metrics = config
        .metrics
        .listen
        .map(|listen| metrics::serve(listen, Arc::clone(&front), connection_capacity))
        .transpose()?;

    if auth_enabled {
        tracing::info!(
            %addr,
            max_payload_bytes = config.max_payload_bytes,
            max_connections = config.max_connections,
            connection_capacity,
            max_pending_connects = config.max_pending_connects,
            max_inflight = config.max_inflight,
            connection_timeout_ms = config.connection_timeout_ms,
            max_segment_size = config.max_segment_size,
            max_segment_count = config.max_segment_count,
            auth = true,
            tls = tls_enabled,
            topic_root = config.acl.topic_root,
            coordinators = ?config.acl.coordinators,
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
            "embedded MQTT broker listening WITHOUT authentication: anyone who can reach it may connect (topic ACLs still apply to the client id they claim)",
        );
    }

    Ok(BrokerHandle {
        addr,
        auth_enabled,
        tls_enabled,
        thread,
        front_thread,
        front,
        connection_capacity,
        metrics,
    })
}

/// The front end's shared state for `config`, piping to rumqttd at `backends` with `secret`.
fn new_front(
    config: &BrokerConfig,
    verifier: Option<Arc<auth::Verifier>>,
    secret: String,
    backends: Vec<SocketAddr>,
) -> front::Front {
    front::Front {
        acl: Acl::any_fleet(&config.acl),
        verifier,
        secret,
        backends,
        next_backend: std::sync::atomic::AtomicU64::new(0),
        connect_timeout: Duration::from_millis(u64::from(config.connection_timeout_ms)),
        max_packet: config.max_payload_bytes,
        counters: front::Counters::default(),
        generation: tokio::sync::watch::Sender::new(0),
        log_limit: front::RateLimit::new(config.max_connections.saturating_mul(2)),
        admission: tokio::sync::Semaphore::new(config.max_pending_connects),
    }
}

/// Loads `config.credentials` (if any) into a started password verifier.
fn load_verifier(config: &BrokerConfig) -> Result<Option<Arc<auth::Verifier>>, BrokerError> {
    match &config.credentials {
        Some(path) => {
            let creds = Credentials::load(path)?;
            if creds.clients.is_empty() {
                tracing::warn!(path = %path.display(), "credential file lists no clients: every connection will be refused");
            }
            Ok(Some(auth::Verifier::start(creds).map_err(|e| {
                BrokerError::Start(format!("cannot spawn auth worker threads: {e}"))
            })?))
        }
        None => Ok(None),
    }
}

/// Watches the credential file (if any) and applies changes to `front`.
fn spawn_watcher(
    config: &BrokerConfig,
    verifier: Option<Arc<auth::Verifier>>,
    front: &Arc<front::Front>,
) -> Result<(), BrokerError> {
    let watched = config.credentials.clone().zip(verifier);
    let weak = Arc::downgrade(front);
    std::thread::Builder::new()
        .name("coevo-broker-watch".to_owned())
        .spawn(move || watch(watched, weak))
        .map_err(|e| BrokerError::Start(format!("cannot spawn the credential watcher: {e}")))?;
    Ok(())
}

/// Raises the open-file limit for `config.max_connections` clients holding
/// `fds_per_connection` descriptors each in this process, and returns how many connections
/// fit under the limit in force (warning when that is fewer than `max_connections`).
fn fd_capacity(config: &BrokerConfig, fds_per_connection: u64) -> usize {
    // Each client holds three descriptors in a process running both the front end and rumqttd
    // (its socket, the front end's socket to rumqttd, rumqttd's end of it), two in a front
    // process, one in a rumqttd-only process; Debian's default soft limit of 1,024 stops an
    // all-in-one broker at ~340.
    let wanted = (config.max_connections as u64)
        .saturating_mul(fds_per_connection)
        .saturating_add(FD_HEADROOM);
    // Past the descriptor limit `accept` fails and clients time out in the backlog; capped
    // here, the front end answers them CONNACK 3 instead and they back off.
    match raise_fd_limit(wanted) {
        Ok(limit) if limit < wanted => {
            let capacity = usize::try_from(
                limit.saturating_sub(FD_HEADROOM + OVER_LIMIT_FDS) / fds_per_connection,
            )
            .unwrap_or(usize::MAX)
            .max(1);
            tracing::warn!(
                limit,
                wanted,
                max_connections = config.max_connections,
                capacity,
                "open-file limit below what max_connections needs ({fds_per_connection} per connection): serving at most {capacity} connections; raise the hard limit (`ulimit -Hn`, LimitNOFILE= in a systemd unit) or set front_processes to serve more",
            );
            capacity
        }
        Ok(_) => config.max_connections,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit");
            config.max_connections
        }
    }
    .min(config.max_connections)
}

/// File identity used to notice a change cheaply: (modified, length, inode on Unix).
fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let ino = 0;
    Some((meta.modified().ok()?, meta.len(), ino))
}

/// The watcher thread: every [`CREDENTIALS_POLL`], reload a changed credential file (so
/// `coevo fleet remove` and password changes take effect without a restart; open connections
/// of affected clients are then closed by the front end), and every [`STATS_LOG_INTERVAL`]
/// log the counters if they changed. A file that fails to load keeps the previous set in
/// force (a half-edited file must not lock the whole fleet out, nor open the broker).
/// Ends when the front end is gone.
fn watch(credentials: Option<(PathBuf, Arc<auth::Verifier>)>, front: Weak<front::Front>) {
    let mut stamp = credentials.as_ref().and_then(|(p, _)| file_stamp(p));
    let mut content = credentials
        .as_ref()
        .and_then(|(p, _)| std::fs::read(p).ok());
    let mut logged = BrokerStats::default();
    let mut last_log = Instant::now();
    loop {
        std::thread::sleep(CREDENTIALS_POLL);
        let Some(front) = front.upgrade() else { return };
        if let Some((path, verifier)) = &credentials {
            let now = file_stamp(path);
            if now != stamp {
                stamp = now;
                let text = std::fs::read(path).ok();
                if text.is_some() && text != content {
                    content = text;
                    match Credentials::load(path) {
                        Ok(creds) => {
                            let clients = creds.clients.len();
                            verifier.replace(creds);
                            front
                                .counters
                                .credential_reloads
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            front.generation.send_modify(|g| *g += 1);
                            tracing::info!(path = %path.display(), clients, "credential file reloaded; removed or changed clients are disconnected");
                        }
                        Err(e) => {
                            front
                                .counters
                                .credential_reload_errors
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::error!(error = %e, "cannot reload the credential file; the previous credentials stay in force");
                        }
                    }
                } else if text.is_none() {
                    tracing::warn!(path = %path.display(), "credential file unreadable or gone; the previous credentials stay in force");
                }
            }
        }
        let stats = front.counters.snapshot();
        if stats != logged && last_log.elapsed() >= STATS_LOG_INTERVAL {
            tracing::info!(?stats, "embedded MQTT broker counters");
            logged = stats;
            last_log = Instant::now();
        }
    }
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

/// The public address: listening (front end in this process), or only reserved for the
/// front processes.
enum Public {
    Listening(TcpListener),
    Reserved(socket2::Socket),
}

impl Public {
    fn local_addr(&self) -> Result<SocketAddr, BrokerError> {
        match self {
            Public::Listening(l) => Ok(l.local_addr()?),
            Public::Reserved(s) => s.local_addr()?.as_socket().ok_or_else(|| {
                BrokerError::Start("reserved listen address is not an IP address".into())
            }),
        }
    }
}

/// A TCP socket bound to `addr` (SO_REUSEADDR as std does; with `shared`, SO_REUSEPORT too),
/// not yet listening.
fn bind_socket(addr: SocketAddr, shared: bool) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if shared {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    let _ = shared;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Accept backlog of the public listener. std's `TcpListener::bind` uses 128, which a connect
/// storm overflows at once (measured: ~8,000 dropped handshakes while 2,000 clients connect),
/// and every dropped handshake costs its client a 1, 3 or 7 s SYN retransmit. The kernel caps
/// it at `net.core.somaxconn` (4096 on current Linux).
const LISTEN_BACKLOG: i32 = 8192;

/// Binds `addr` like `TcpListener::bind` (SO_REUSEADDR, as std does on Unix) with a
/// [`LISTEN_BACKLOG`]-deep accept queue.
/// `shared`: SO_REUSEPORT, so front processes can each bind `addr` and the kernel spreads
/// connections over them.
fn bind_listener(addr: SocketAddr, shared: bool) -> std::io::Result<TcpListener> {
    let socket = bind_socket(addr, shared)?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// rumqttd listeners behind the front end. rumqttd serves each listener's accept loop *and*
/// every connection it accepted on one single-threaded runtime, so one listener puts a
/// 10,000-client fleet on one core and behind one 128-deep accept queue; the front end spreads
/// connections round-robin over these (the router itself stays one thread).
const ROUTER_LISTENERS: usize = 4;

/// Descriptors one client connection holds in the broker process (see [`start`]).
const FDS_PER_CONNECTION: u64 = 3;
/// Descriptors for everything else: listeners, credential file, logs, threads' eventfds.
const FD_HEADROOM: u64 = 256;
/// Descriptors kept for answering sockets over the limit (front end's `OVER_LIMIT_ANSWERS`).
const OVER_LIMIT_FDS: u64 = 64;

/// Raises this process's open-file soft limit (RLIMIT_NOFILE) towards `wanted`: up to the
/// hard limit, and past it when the process may (root, CAP_SYS_RESOURCE). Never lowers it.
/// Returns the soft limit now in force. Load generators and the broker call it at start.
#[cfg(unix)]
pub fn raise_fd_limit(wanted: u64) -> std::io::Result<u64> {
    use rlimit::Resource;
    let (soft, hard) = Resource::NOFILE.get()?;
    if soft >= wanted {
        return Ok(soft);
    }
    if hard < wanted && Resource::NOFILE.set(wanted, wanted).is_ok() {
        return Ok(wanted);
    }
    let target = wanted.min(hard);
    Resource::NOFILE.set(target, hard)?;
    Ok(target)
}

/// No descriptor limit to raise off Unix.
#[cfg(not(unix))]
pub fn raise_fd_limit(wanted: u64) -> std::io::Result<u64> {
    Ok(wanted)
}

/// Picks a free TCP port on 127.0.0.1 (bind :0, read, drop) for tests and the demo. Another
/// process may take it before it is used; [`start`] reports that as a typed error.
pub fn free_local_addr() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    listener.local_addr()
}
