//! The MQTT-aware front end on the public listener: authentication, topic ACLs and live
//! revocation, in front of rumqttd on a loopback port.
//!
//! rumqttd 0.20 has an auth hook but no ACL hook, and it cannot close a client's connection on
//! request. So every client connection (plain TCP, or TLS terminated here) goes through this
//! module, which reads the client's packets as they stream past:
//!
//! - **CONNECT**: the client id must equal the user name (else CONNACK 2, "identifier
//!   rejected") and the password must verify ([`crate::auth`]; else CONNACK 4); the last will
//!   must be a topic the client may publish to (else CONNACK 5). The CONNECT is then re-encoded
//!   with the client id as user name and a per-process random secret as password, and sent to
//!   rumqttd, whose auth handler accepts nothing but that secret. So rumqttd's loopback port
//!   cannot be used to bypass the ACLs, even by a local process that knows a camera's password.
//! - **PUBLISH / SUBSCRIBE**: the topic (filters) are checked against [`crate::acl`]. MQTT 3.1.1
//!   has no way to refuse one PUBLISH, so a refused PUBLISH or SUBSCRIBE closes the connection:
//!   a well-behaved camera never triggers it, and a hostile one loses its session.
//! - **revocation**: when the credential file is reloaded, every connection whose client was
//!   removed, or whose stored password hash changed, is closed.
//!
//! Cost per connection: two 16 KiB read buffers and one task; packets are streamed, never held
//! whole (only a PUBLISH's topic, a SUBSCRIBE, or a packet of at most [`SMALL_PACKET`] bytes is
//! read into memory before it is forwarded). Every refusal is counted ([`Counters`]) and
//! logged with the client id, at most once per client per [`LOG_INTERVAL`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    ReadHalf,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::acl::Acl;
use crate::auth::{Verdict, Verifier};
use crate::{BrokerError, BrokerStats};

/// Read buffer per direction and connection, so a 256 KiB model chunk moves in a handful of
/// syscalls. Pages an idle connection never fills are never touched: measured, an idle camera
/// costs ~65 KiB of RSS for front end and rumqttd together, and halving this buffer saves only
/// ~4 KiB of that (`measure_connection_cost_and_throughput` in broker/tests/acl.rs).
const PIPE_BUFFER: usize = 16 * 1024;
/// Packets up to this size are read whole and forwarded with one write; larger ones stream.
const SMALL_PACKET: usize = 4 * 1024;
/// At most one log line per client (and reason class) per interval: a flood of refused packets
/// must not become a flood of log lines.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Largest CONNECT read before authentication: id, will, user name and password are small, and
/// an unauthenticated peer must not make us buffer a whole `max_packet`.
const MAX_CONNECT: usize = 64 * 1024;
/// Sockets over `max_connections` answered CONNACK 3 at once (beyond: closed unanswered).
const OVER_LIMIT_ANSWERS: usize = 64;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop doesn't spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// MQTT 3.1.1 CONNACK return codes we send ourselves.
const CONNACK_BAD_PROTOCOL: u8 = 1;
const CONNACK_IDENTIFIER_REJECTED: u8 = 2;
/// "Server unavailable": overloaded, try again later. Sent instead of letting a CONNECT time
/// out, so the client backs off at once and no work is spent on a client that gave up.
const CONNACK_SERVER_UNAVAILABLE: u8 = 3;
const CONNACK_BAD_CREDENTIALS: u8 = 4;
const CONNACK_NOT_AUTHORIZED: u8 = 5;

/// Packet types (upper nibble of the first byte).
const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const SUBSCRIBE: u8 = 8;

/// Refusal counters, shared by every connection task and the credential watcher.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) acl_refused_publish: AtomicU64,
    pub(crate) acl_refused_subscribe: AtomicU64,
    pub(crate) auth_refused: AtomicU64,
    pub(crate) client_id_mismatch: AtomicU64,
    pub(crate) revoked_disconnects: AtomicU64,
    pub(crate) credential_reloads: AtomicU64,
    pub(crate) credential_reload_errors: AtomicU64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) protocol_violations: AtomicU64,
    pub(crate) connects_busy: AtomicU64,
    pub(crate) connections_over_limit: AtomicU64,
    /// Parts of `auth_refused`, by reason.
    pub(crate) auth_invalid_id: AtomicU64,
    pub(crate) auth_unknown_client: AtomicU64,
    pub(crate) auth_bad_password: AtomicU64,
    /// Client connections past their CONNECT, piped to rumqttd right now.
    pub(crate) connections_open: AtomicU64,
    /// PUBLISH packets clients sent that passed the ACL.
    pub(crate) publishes_in: AtomicU64,
    /// MQTT bytes from clients forwarded to rumqttd (after CONNECT).
    pub(crate) bytes_in: AtomicU64,
    /// MQTT bytes from rumqttd forwarded to clients (CONNACK included).
    pub(crate) bytes_out: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// Adds what changed between two reports of a front process (`new - old`, per field;
    /// wrapping, so a gauge such as `connections_open` can go down).
    pub(crate) fn apply_change(&self, old: &BrokerStats, new: &BrokerStats) {
        macro_rules! apply {
            ($($f:ident),*) => {
                $(self.$f.fetch_add(new.$f.wrapping_sub(old.$f), Ordering::Relaxed);)*
            };
        }
        apply!(
            acl_refused_publish,
            acl_refused_subscribe,
            auth_refused,
            client_id_mismatch,
            revoked_disconnects,
            credential_reloads,
            credential_reload_errors,
            connections_accepted,
            protocol_violations,
            connects_busy,
            connections_over_limit,
            auth_invalid_id,
            auth_unknown_client,
            auth_bad_password,
            connections_open,
            publishes_in,
            bytes_in,
            bytes_out
        );
    }

    pub(crate) fn snapshot(&self) -> BrokerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BrokerStats {
            acl_refused_publish: get(&self.acl_refused_publish),
            acl_refused_subscribe: get(&self.acl_refused_subscribe),
            auth_refused: get(&self.auth_refused),
            client_id_mismatch: get(&self.client_id_mismatch),
            revoked_disconnects: get(&self.revoked_disconnects),
            credential_reloads: get(&self.credential_reloads),
            credential_reload_errors: get(&self.credential_reload_errors),
            connections_accepted: get(&self.connections_accepted),
            protocol_violations: get(&self.protocol_violations),
            connects_busy: get(&self.connects_busy),
            connections_over_limit: get(&self.connections_over_limit),
            auth_invalid_id: get(&self.auth_invalid_id),
            auth_unknown_client: get(&self.auth_unknown_client),
            auth_bad_password: get(&self.auth_bad_password),
            connections_open: get(&self.connections_open),
            publishes_in: get(&self.publishes_in),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
        }
    }
}

/// Counts a client connection as open for as long as it lives.
struct OpenConnection<'a>(&'a Counters);

impl<'a> OpenConnection<'a> {
    fn new(c: &'a Counters) -> Self {
        bump(&c.connections_open);
        OpenConnection(c)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// "Log at most once per key per [`LOG_INTERVAL`]". Bounded: when it holds more than
/// `capacity` keys, entries older than the interval are dropped, and if that is not enough
/// the map is cleared (worst case: one extra line per client).
#[derive(Debug)]
pub(crate) struct RateLimit {
    last: Mutex<HashMap<String, Instant>>,
    capacity: usize,
}

impl RateLimit {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            last: Mutex::new(HashMap::new()),
            capacity: capacity.max(16),
        }
    }

    /// True if a line about `key` may be logged now.
    pub(crate) fn allow(&self, key: &str) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return true;
        };
        let now = Instant::now();
        if let Some(t) = last.get(key) {
            if now.duration_since(*t) < LOG_INTERVAL {
                return false;
            }
        }
        if last.len() >= self.capacity {
            last.retain(|_, t| now.duration_since(*t) < LOG_INTERVAL);
            if last.len() >= self.capacity {
                last.clear();
            }
        }
        last.insert(key.to_owned(), now);
        true
    }
}

/// Shared state of the front end.
pub(crate) struct Front {
    pub(crate) acl: Acl,
    /// `None`: authentication disabled (the client id is still the ACL identity).
    pub(crate) verifier: Option<Arc<Verifier>>,
    /// The password rumqttd accepts; only the front end knows it.
    pub(crate) secret: String,
    /// rumqttd's loopback listeners, one per server thread (see `ROUTER_LISTENERS` in
    /// lib.rs); connections are spread over them round-robin.
    pub(crate) backends: Vec<SocketAddr>,
    pub(crate) next_backend: AtomicU64,
    /// Budget for the TLS handshake and, separately, for the CONNECT (and its verification).
    pub(crate) connect_timeout: Duration,
    /// Largest packet accepted from a client (the broker's `max_payload_bytes`).
    pub(crate) max_packet: usize,
    pub(crate) counters: Counters,
    /// Bumped on every credential reload; connections then re-check their credentials.
    pub(crate) generation: watch::Sender<u64>,
    pub(crate) log_limit: RateLimit,
    /// Admission control: CONNECTs being verified and handed to rumqttd at once
    /// (`max_pending_connects`). A CONNECT that cannot get a permit within `connect_timeout`
    /// is answered CONNACK 3, so under overload clients hear "later" quickly instead of
    /// timing out and retrying into a queue of work for clients that already left.
    pub(crate) admission: Semaphore,
}

/// Never prints the secret.
impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("acl", &self.acl)
            .field("auth", &self.verifier.is_some())
            .field("backends", &self.backends)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// Serves `listener` (already bound, so the caller knows the port) on a thread of its own.
/// At most `max_connections` sockets are served at once; further ones are closed at once.
pub(crate) fn spawn(
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    front: Arc<Front>,
    max_connections: usize,
) -> Result<JoinHandle<()>, BrokerError> {
    listener.set_nonblocking(true)?;
    // Built here, not on the thread, so a failure is reported to the caller.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("coevo-broker-front")
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("coevo-broker-front".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, tls, front, max_connections).await,
                    Err(e) => tracing::error!(error = %e, "MQTT listener failed"),
                }
            })
        })
        .map_err(|e| BrokerError::Start(format!("cannot spawn the front-end thread: {e}")))
}

async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    front: Arc<Front>,
    max_connections: usize,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    // Over the limit, a client still gets an answer (CONNACK 3, so it backs off rather than
    // reading a bare close as a refused password), from at most this many sockets at once.
    let answering = Arc::new(Semaphore::new(OVER_LIMIT_ANSWERS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "MQTT listener: accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let (slot, full) = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => (slot, false),
            Err(_) => {
                bump(&front.counters.connections_over_limit);
                if front.log_limit.allow("\0connection-limit") {
                    tracing::warn!(%peer, max_connections, "connection limit reached: answering 'server unavailable'");
                }
                match Arc::clone(&answering).try_acquire_owned() {
                    Ok(slot) => (slot, true),
                    Err(_) => continue,
                }
            }
        };
        let tls = tls.clone();
        let front = Arc::clone(&front);
        tokio::spawn(async move {
            let _slot = slot;
            // MQTT is many small packets: don't let Nagle hold them back.
            let _ = tcp.set_nodelay(true);
            match tls {
                None => connection(&front, tcp, peer, full).await,
                Some(acceptor) => {
                    let timeout = front.connect_timeout;
                    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => connection(&front, stream, peer, full).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "no TLS handshake within {timeout:?}"),
                    }
                }
            }
        });
    }
}

/// Why a connection ended on the client → broker side.
#[derive(Debug)]
enum End {
    /// The client closed or the socket failed: nothing to report.
    Gone,
    /// Not MQTT, or not what the client may send (e.g. a second CONNECT, oversized packet).
    Protocol(String),
    PublishRefused(String),
    SubscribeRefused(String),
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> Self {
        End::Gone
    }
}

/// A parsed MQTT 3.1.1 CONNECT.
#[derive(Debug, PartialEq, Eq)]
struct Connect {
    /// Connect flags without user name / password bits.
    flags: u8,
    keep_alive: u16,
    client_id: String,
    will: Option<(String, Vec<u8>)>,
    username: Option<String>,
    password: Option<Vec<u8>>,
}

/// One client connection from CONNECT to close.
/// `full`: the broker is at its connection limit; the CONNECT is only read to be answered
/// CONNACK 3.
async fn connection<S>(front: &Front, stream: S, peer: SocketAddr, full: bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (rx, mut tx) = tokio::io::split(stream);
    let mut rx = BufReader::with_capacity(PIPE_BUFFER, rx);
    // Subscribed before authenticating, so a reload during the check is not missed.
    let mut generation = front.generation.subscribe();
    let connect =
        match tokio::time::timeout(front.connect_timeout, read_connect(front, &mut rx)).await {
            Ok(Ok(c)) => c,
            Ok(Err(End::Protocol(reason))) => {
                bump(&front.counters.protocol_violations);
                tracing::debug!(%peer, "connection dropped before CONNECT: {reason}");
                if reason.starts_with("protocol level") {
                    refuse(&mut tx, CONNACK_BAD_PROTOCOL).await;
                }
                return;
            }
            Ok(Err(_)) => return,
            Err(_) => {
                bump(&front.counters.protocol_violations);
                tracing::debug!(%peer, "no CONNECT within {:?}", front.connect_timeout);
                return;
            }
        };
    let id = connect.client_id.clone();
    if full {
        bump(&front.counters.connects_busy);
        refuse(&mut tx, CONNACK_SERVER_UNAVAILABLE).await;
        return;
    }
    // Admission: verification and the hand-over to rumqttd run for at most
    // `max_pending_connects` clients at once; the rest wait up to `connect_timeout` in FIFO
    // order, then hear "server unavailable".
    let busy = |front: &Front| {
        bump(&front.counters.connects_busy);
        if front.log_limit.allow("\0busy") {
            tracing::warn!(%peer, client_id = %id, "broker busy: CONNECT answered 'server unavailable' (CONNACK 3); the client retries with backoff");
        }
    };
    let permit = match tokio::time::timeout(front.connect_timeout, front.admission.acquire()).await
    {
        Ok(Ok(permit)) => permit,
        _ => {
            busy(front);
            refuse(&mut tx, CONNACK_SERVER_UNAVAILABLE).await;
            return;
        }
    };
    let hash = match tokio::time::timeout(front.connect_timeout, admit(front, &connect, peer)).await
    {
        Ok(Ok(hash)) => hash,
        Ok(Err(code)) => {
            refuse(&mut tx, code).await;
            return;
        }
        Err(_) => {
            busy(front);
            refuse(&mut tx, CONNACK_SERVER_UNAVAILABLE).await;
            return;
        }
    };
    // The permit is held until rumqttd's CONNACK is back: admission then bounds every
    // handshake in flight anywhere in the broker, rumqttd's accept queue (128 deep per
    // listener) included, and a router that cannot keep up shows up as "busy" answers here
    // rather than as SYN retransmits and silent client time-outs.
    let handover = async {
        let n = front.next_backend.fetch_add(1, Ordering::Relaxed);
        let backend = front.backends[(n as usize) % front.backends.len().max(1)];
        let upstream = TcpStream::connect(backend).await?;
        let _ = upstream.set_nodelay(true);
        let (up_rx, mut up_tx) = upstream.into_split();
        up_tx
            .write_all(&encode_connect(&connect, &front.secret))
            .await?;
        let mut up_rx = BufReader::with_capacity(PIPE_BUFFER, up_rx);
        let mut connack = [0u8; 4];
        up_rx.read_exact(&mut connack).await?;
        Ok::<_, std::io::Error>((up_rx, up_tx, connack))
    };
    let (up_rx, mut up_tx) = match tokio::time::timeout(front.connect_timeout, handover).await {
        Ok(Ok((up_rx, up_tx, connack))) => {
            // Counted before the client can see its CONNACK, so a stats read right after a
            // client connected always includes it.
            bump(&front.counters.connections_accepted);
            if tx.write_all(&connack).await.is_err() {
                return;
            }
            (up_rx, up_tx)
        }
        Ok(Err(e)) => {
            tracing::debug!(client_id = %id, error = %e, "embedded MQTT router closed the hand-over");
            busy(front);
            refuse(&mut tx, CONNACK_SERVER_UNAVAILABLE).await;
            return;
        }
        Err(_) => {
            busy(front);
            refuse(&mut tx, CONNACK_SERVER_UNAVAILABLE).await;
            return;
        }
    };
    drop(permit);
    let _open = OpenConnection::new(&front.counters);
    front.counters.bytes_out.fetch_add(4, Ordering::Relaxed);

    let up = async {
        let end = forward(front, &id, &mut rx, &mut up_tx).await;
        let _ = up_tx.shutdown().await;
        end
    };
    let down = async {
        let mut up_rx = up_rx;
        // `copy_buf`, counting as it goes (a long-lived connection's bytes show while it is
        // open, not when it closes). Flushed after each write, as `copy_buf` flushes whenever
        // rumqttd has nothing more: TLS may hold records back until then.
        loop {
            let n = match up_rx.fill_buf().await {
                Ok([]) | Err(_) => break,
                Ok(chunk) => {
                    if tx.write_all(chunk).await.is_err() || tx.flush().await.is_err() {
                        break;
                    }
                    chunk.len()
                }
            };
            up_rx.consume(n);
            front
                .counters
                .bytes_out
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        // Sends TLS close_notify after everything rumqttd wrote.
        let _ = tx.shutdown().await;
    };
    let revoked = revoked(front, &id, hash.as_deref(), &mut generation);
    tokio::select! {
        end = up => match end {
            End::Gone => {}
            End::Protocol(reason) => {
                bump(&front.counters.protocol_violations);
                if front.log_limit.allow(&id) {
                    tracing::warn!(client_id = %id, %peer, "closing connection: {reason}");
                }
            }
            End::PublishRefused(topic) => {
                bump(&front.counters.acl_refused_publish);
                if front.log_limit.allow(&id) {
                    tracing::warn!(client_id = %id, %peer, topic, "PUBLISH refused by the topic ACL; connection closed");
                }
            }
            End::SubscribeRefused(filter) => {
                bump(&front.counters.acl_refused_subscribe);
                if front.log_limit.allow(&id) {
                    tracing::warn!(client_id = %id, %peer, filter, "SUBSCRIBE refused by the topic ACL; connection closed");
                }
            }
        },
        () = down => {}
        () = revoked => {
            bump(&front.counters.revoked_disconnects);
            tracing::warn!(client_id = %id, %peer, "credentials revoked or changed; connection closed");
        }
    }
}

/// Decides on a CONNECT. `Ok(hash)`: admitted (with the stored hash it was verified against,
/// `None` without authentication); `Err(code)`: the CONNACK code to refuse with.
async fn admit(front: &Front, c: &Connect, peer: SocketAddr) -> Result<Option<String>, u8> {
    let id = c.client_id.as_str();
    let quiet = |what: &str| front.log_limit.allow(&format!("{what}\0{id}"));
    if front.acl.role(id) == crate::acl::Role::Invalid {
        bump(&front.counters.auth_refused);
        bump(&front.counters.auth_invalid_id);
        if quiet("invalid") {
            tracing::warn!(client_id = id, %peer, "MQTT connect refused: client id is not a valid topic level");
        }
        return Err(CONNACK_IDENTIFIER_REJECTED);
    }
    let hash = match &front.verifier {
        None => None,
        Some(verifier) => {
            if c.username.as_deref() != Some(id) {
                bump(&front.counters.client_id_mismatch);
                if quiet("mismatch") {
                    tracing::warn!(client_id = id, username = c.username.as_deref().unwrap_or(""), %peer,
                        "MQTT connect refused: the client id must equal the user name");
                }
                return Err(CONNACK_IDENTIFIER_REJECTED);
            }
            let password = c
                .password
                .as_deref()
                .and_then(|p| std::str::from_utf8(p).ok())
                .unwrap_or("");
            let (verdict, hash) = verifier.authenticate(id, password);
            let ok = match verdict.await {
                Verdict::Accept => true,
                Verdict::Refuse => false,
                Verdict::Busy => {
                    bump(&front.counters.connects_busy);
                    if quiet("busy") {
                        tracing::warn!(client_id = id, %peer, "password check pool saturated: CONNECT answered 'server unavailable' (CONNACK 3)");
                    }
                    return Err(CONNACK_SERVER_UNAVAILABLE);
                }
            };
            // A reload may have replaced this client's hash while the check ran.
            let known = hash.is_some();
            let hash = hash.filter(|h| ok && verifier.is_current(id, h));
            let Some(hash) = hash else {
                bump(&front.counters.auth_refused);
                bump(if known {
                    &front.counters.auth_bad_password
                } else {
                    &front.counters.auth_unknown_client
                });
                if quiet("auth") {
                    tracing::warn!(client_id = id, %peer, "MQTT connect refused: unknown client or wrong password");
                }
                return Err(CONNACK_BAD_CREDENTIALS);
            };
            Some(hash)
        }
    };
    if let Some((topic, _)) = &c.will {
        if !front.acl.may_publish(id, topic) {
            bump(&front.counters.acl_refused_publish);
            if quiet("will") {
                tracing::warn!(client_id = id, %peer, topic, "MQTT connect refused: last-will topic not allowed by the topic ACL");
            }
            return Err(CONNACK_NOT_AUTHORIZED);
        }
    }
    tracing::debug!(client_id = id, %peer, "MQTT connect accepted");
    Ok(hash)
}

/// Resolves when this connection's credentials stop being current (never without auth).
async fn revoked(
    front: &Front,
    id: &str,
    hash: Option<&str>,
    generation: &mut watch::Receiver<u64>,
) {
    let (Some(verifier), Some(hash)) = (&front.verifier, hash) else {
        return std::future::pending().await;
    };
    loop {
        if !verifier.is_current(id, hash) {
            return;
        }
        if generation.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Sends a refusing CONNACK and closes.
async fn refuse<W: AsyncWrite + Unpin>(tx: &mut W, code: u8) {
    let _ = tx.write_all(&[0x20, 0x02, 0x00, code]).await;
    let _ = tx.shutdown().await;
}

/// Reads the fixed header: `None` on a clean end of stream before a packet.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(u8, usize)>, End> {
    let first = match r.read_u8().await {
        Ok(b) => b,
        Err(_) => return Ok(None),
    };
    let mut len = 0usize;
    for i in 0..4 {
        let b = r.read_u8().await?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((first, len)));
        }
    }
    Err(End::Protocol("malformed remaining length".into()))
}

/// Appends the MQTT fixed header for `first` and `len`.
fn put_header(out: &mut Vec<u8>, first: u8, mut len: usize) {
    out.push(first);
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

async fn read_connect<R: AsyncRead + Unpin>(front: &Front, r: &mut R) -> Result<Connect, End> {
    let Some((first, len)) = read_header(r).await? else {
        return Err(End::Gone);
    };
    if first >> 4 != CONNECT {
        return Err(End::Protocol("first packet is not CONNECT".into()));
    }
    if len > MAX_CONNECT.min(front.max_packet) {
        return Err(End::Protocol(format!("CONNECT of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    parse_connect(&body).map_err(End::Protocol)
}

/// Parses a CONNECT body (after the fixed header).
fn parse_connect(body: &[u8]) -> Result<Connect, String> {
    let mut cur = Cursor { buf: body, pos: 0 };
    let name = cur.bytes()?;
    let level = cur.u8()?;
    if name != b"MQTT" || level != 4 {
        return Err(format!(
            "protocol level {level} ({}): only MQTT 3.1.1 is served",
            String::from_utf8_lossy(name)
        ));
    }
    let flags = cur.u8()?;
    if flags & 0x01 != 0 {
        return Err("reserved CONNECT flag set".into());
    }
    let keep_alive = cur.u16()?;
    let client_id = cur.string()?;
    let will = if flags & 0x04 != 0 {
        Some((cur.string()?, cur.bytes()?.to_vec()))
    } else {
        None
    };
    let username = if flags & 0x80 != 0 {
        Some(cur.string()?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(cur.bytes()?.to_vec())
    } else {
        None
    };
    if cur.pos != body.len() {
        return Err("trailing bytes after CONNECT".into());
    }
    Ok(Connect {
        flags: flags & 0x3e,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

/// The CONNECT rumqttd sees: same session, keep-alive and will, user name = client id,
/// password = the front end's secret.
fn encode_connect(c: &Connect, secret: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    let put = |body: &mut Vec<u8>, bytes: &[u8]| {
        // Every field came from a u16-length field or is our 64-char secret.
        let n = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        body.extend_from_slice(&n.to_be_bytes());
        body.extend_from_slice(&bytes[..usize::from(n)]);
    };
    put(&mut body, b"MQTT");
    body.push(4);
    body.push(c.flags | 0xc0);
    body.extend_from_slice(&c.keep_alive.to_be_bytes());
    put(&mut body, c.client_id.as_bytes());
    if let Some((topic, message)) = &c.will {
        put(&mut body, topic.as_bytes());
        put(&mut body, message);
    }
    put(&mut body, c.client_id.as_bytes());
    put(&mut body, secret.as_bytes());
    let mut out = Vec::with_capacity(body.len() + 5);
    put_header(&mut out, CONNECT << 4, body.len());
    out.extend_from_slice(&body);
    out
}

/// Bounds-checked reader over a packet body.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| "truncated packet".to_string())?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    fn string(&mut self) -> Result<String, String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8".to_string())
    }
}

/// The SUBSCRIBE filters of a body (packet id, then (filter, options) pairs).
fn subscribe_filters(body: &[u8]) -> Result<Vec<String>, String> {
    let mut cur = Cursor { buf: body, pos: 0 };
    cur.u16()?;
    let mut filters = Vec::new();
    while cur.pos < body.len() {
        filters.push(cur.string()?);
        cur.u8()?;
    }
    if filters.is_empty() {
        return Err("SUBSCRIBE without a filter".into());
    }
    Ok(filters)
}

/// Forwards client packets to rumqttd until the client goes or a packet is refused.
async fn forward<R, W>(front: &Front, id: &str, rx: &mut BufReader<ReadHalf<R>>, up: &mut W) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Grows to the largest small packet seen; an idle connection holds nothing here.
    let mut buf = Vec::new();
    loop {
        match forward_one(front, id, rx, up, &mut buf).await {
            Ok(true) => {}
            Ok(false) => return End::Gone,
            Err(end) => return end,
        }
    }
}

/// One packet. `Ok(false)`: the client closed cleanly.
async fn forward_one<R, W>(
    front: &Front,
    id: &str,
    rx: &mut R,
    up: &mut W,
    buf: &mut Vec<u8>,
) -> Result<bool, End>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some((first, len)) = read_header(rx).await? else {
        return Ok(false);
    };
    if len > front.max_packet {
        return Err(End::Protocol(format!(
            "packet of {len} bytes exceeds the {} byte limit",
            front.max_packet
        )));
    }
    buf.clear();
    put_header(buf, first, len);
    let header_len = buf.len();
    // Counted as it is read: a refused packet's bytes were received too.
    front
        .counters
        .bytes_in
        .fetch_add((header_len + len) as u64, Ordering::Relaxed);
    match first >> 4 {
        CONNECT => return Err(End::Protocol("second CONNECT".into())),
        PUBLISH => {
            let mut n = [0u8; 2];
            rx.read_exact(&mut n).await?;
            let topic_len = usize::from(u16::from_be_bytes(n));
            if topic_len + 2 > len {
                return Err(End::Protocol("PUBLISH topic longer than the packet".into()));
            }
            buf.extend_from_slice(&n);
            let start = buf.len();
            buf.resize(start + topic_len, 0);
            rx.read_exact(&mut buf[start..]).await?;
            let Ok(topic) = std::str::from_utf8(&buf[start..]) else {
                return Err(End::Protocol("PUBLISH topic is not UTF-8".into()));
            };
            if !front.acl.may_publish(id, topic) {
                return Err(End::PublishRefused(topic.to_owned()));
            }
            bump(&front.counters.publishes_in);
            let rest = len - 2 - topic_len;
            if rest <= SMALL_PACKET {
                read_append(rx, buf, rest).await?;
                up.write_all(buf).await?;
            } else {
                up.write_all(buf).await?;
                copy_exact(rx, up, rest).await?;
            }
        }
        SUBSCRIBE => {
            read_append(rx, buf, len).await?;
            let filters = subscribe_filters(&buf[header_len..]).map_err(End::Protocol)?;
            if let Some(bad) = filters.iter().find(|f| !front.acl.may_subscribe(id, f)) {
                return Err(End::SubscribeRefused(bad.clone()));
            }
            up.write_all(buf).await?;
        }
        _ if len <= SMALL_PACKET => {
            read_append(rx, buf, len).await?;
            up.write_all(buf).await?;
        }
        _ => {
            up.write_all(buf).await?;
            copy_exact(rx, up, len).await?;
        }
    }
    Ok(true)
}

async fn read_append<R: AsyncRead + Unpin>(
    rx: &mut R,
    buf: &mut Vec<u8>,
    n: usize,
) -> std::io::Result<()> {
    let start = buf.len();
    buf.resize(start + n, 0);
    rx.read_exact(&mut buf[start..]).await.map(|_| ())
}

/// Streams exactly `n` bytes from `rx` to `up` through `rx`'s own buffer.
async fn copy_exact<R, W>(rx: &mut R, up: &mut W, n: usize) -> Result<(), End>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut remaining = n;
    while remaining > 0 {
        let chunk = rx.fill_buf().await?;
        if chunk.is_empty() {
            return Err(End::Gone);
        }
        let take = chunk.len().min(remaining);
        up.write_all(&chunk[..take]).await?;
        rx.consume(take);
        remaining -= take;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(will: Option<(&str, &[u8])>, user: Option<&str>, pw: Option<&[u8]>) -> Connect {
        Connect {
            flags: 0x02
                | if will.is_some() {
                    0x04 | 0x08 | 0x20
                } else {
                    0
                },
            keep_alive: 30,
            client_id: "cam-1".into(),
            will: will.map(|(t, m)| (t.to_owned(), m.to_vec())),
            username: user.map(str::to_owned),
            password: pw.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn connect_round_trips_with_injected_secret() {
        let c = connect(
            Some(("coevo/v1/f/status/cam-1", b"offline")),
            Some("cam-1"),
            Some(b"pw"),
        );
        let wire = encode_connect(&c, "secret");
        assert_eq!(wire[0], 0x10);
        let parsed = parse_connect(&wire[2..]).unwrap();
        assert_eq!(parsed.client_id, "cam-1");
        assert_eq!(parsed.username.as_deref(), Some("cam-1"));
        assert_eq!(parsed.password.as_deref(), Some(&b"secret"[..]));
        assert_eq!(parsed.will, c.will);
        assert_eq!(parsed.flags, c.flags);
        assert_eq!(parsed.keep_alive, 30);
    }

    #[test]
    fn malformed_connects_are_errors_not_panics() {
        let good = encode_connect(&connect(None, None, None), "s");
        for cut in 0..good.len() - 2 {
            assert!(parse_connect(&good[2..2 + cut]).is_err(), "cut {cut}");
        }
        let mut v3 = good[2..].to_vec();
        v3[6] = 3;
        assert!(parse_connect(&v3)
            .unwrap_err()
            .starts_with("protocol level"));
        let mut reserved = good[2..].to_vec();
        reserved[7] |= 1;
        assert!(parse_connect(&reserved).is_err());
    }

    #[test]
    fn remaining_length_encoding_matches_the_spec() {
        for (len, want) in [
            (0usize, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xff, 0x7f]),
            (2_097_152, vec![0x80, 0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_header(&mut out, 0x30, len);
            assert_eq!(out[1..], want[..], "{len}");
        }
    }

    #[test]
    fn subscribe_filters_parse() {
        let body = [0, 1, 0, 3, b'a', b'/', b'b', 1, 0, 1, b'#', 0];
        assert_eq!(subscribe_filters(&body).unwrap(), ["a/b", "#"]);
        assert!(subscribe_filters(&body[..5]).is_err());
        assert!(subscribe_filters(&[0, 1]).is_err());
    }

    /// The packet body after the fixed header (type byte and remaining length) of a small
    /// packet rumqttc encoded.
    fn body(wire: &[u8]) -> &[u8] {
        assert!(wire[1] < 0x80, "test packets are under 128 bytes");
        &wire[2..]
    }

    /// Interop: what rumqttc (our clients' library) sends is what we parse.
    #[test]
    fn parses_connect_and_subscribe_as_rumqttc_writes_them() {
        use rumqttc::mqttbytes::v4::{Connect as RConnect, LastWill, Subscribe};
        use rumqttc::QoS;
        let mut c = RConnect::new("cam-7");
        c.set_login("cam-7", "pw");
        c.keep_alive = 17;
        c.last_will = Some(LastWill::new(
            "coevo/v1/f/status/cam-7",
            b"offline".to_vec(),
            QoS::AtLeastOnce,
            true,
        ));
        let mut buf = bytes::BytesMut::new();
        c.write(&mut buf).unwrap();
        let p = parse_connect(body(&buf)).unwrap();
        assert_eq!(p.client_id, "cam-7");
        assert_eq!(p.username.as_deref(), Some("cam-7"));
        assert_eq!(p.password.as_deref(), Some(&b"pw"[..]));
        assert_eq!(p.keep_alive, 17);
        assert_eq!(
            p.will,
            Some(("coevo/v1/f/status/cam-7".into(), b"offline".to_vec()))
        );

        let mut s = Subscribe::new("coevo/v1/f/round/current", QoS::AtLeastOnce);
        s.add("coevo/v1/f/model/+/+".into(), QoS::AtMostOnce);
        let mut buf = bytes::BytesMut::new();
        s.write(&mut buf).unwrap();
        assert_eq!(
            subscribe_filters(body(&buf)).unwrap(),
            ["coevo/v1/f/round/current", "coevo/v1/f/model/+/+"]
        );
    }

    proptest::proptest! {
        /// Whatever an unauthenticated peer sends, the parsers answer with an error, never a
        /// panic.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse_connect(&body);
            let _ = subscribe_filters(&body);
        }

        /// Any client id, user name and password survive re-encoding with the injected secret
        /// (the user name becomes the client id).
        #[test]
        fn connect_reencoding_round_trips(
            id in "[A-Za-z0-9_-]{1,64}",
            pw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            keep_alive in proptest::prelude::any::<u16>(),
        ) {
            let mut c = connect(None, Some(&id), Some(&pw));
            c.client_id = id.clone();
            c.keep_alive = keep_alive;
            let wire = encode_connect(&c, "secret");
            let mut len = 0usize;
            let mut i = 1;
            loop {
                len |= usize::from(wire[i] & 0x7f) << (7 * (i - 1));
                if wire[i] & 0x80 == 0 {
                    break;
                }
                i += 1;
            }
            proptest::prop_assert_eq!(wire.len(), i + 1 + len);
            let p = parse_connect(&wire[i + 1..]).unwrap();
            proptest::prop_assert_eq!(&p.client_id, &id);
            proptest::prop_assert_eq!(p.username.as_deref(), Some(id.as_str()));
            proptest::prop_assert_eq!(p.password.as_deref(), Some(&b"secret"[..]));
            proptest::prop_assert_eq!(p.keep_alive, keep_alive);
        }
    }

    #[test]
    fn rate_limit_allows_one_line_per_key_and_stays_bounded() {
        let r = RateLimit::new(16);
        assert!(r.allow("cam-1"));
        assert!(!r.allow("cam-1"));
        assert!(r.allow("cam-2"));
        for i in 0..100 {
            r.allow(&format!("x{i}"));
        }
        assert!(r.last.lock().unwrap().len() <= 16);
    }
}
