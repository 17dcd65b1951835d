//! coevo's MQTT session: one rumqttc connection whose event loop is polled continuously on its
//! own task, so callers can `publish().await` freely (publishing from the polling task would
//! deadlock), with reconnect backoff and re-subscription after every CONNACK (a restarted
//! rumqttd remembers no subscriptions).
//!
//! Sized for fleets (issue #13): a connection attempt may take [`Settings::connect_timeout`]
//! (30 s, not rumqttc's 5 s: during a 10,000-client storm a CONNACK can take seconds, and a
//! client that gives up early only comes back as a second CONNECT the broker must also
//! serve); waits between attempts are exponential, capped and *fully jittered* (uniform in
//! [0, backoff]), so a fleet that lost its broker at the same instant does not come back at
//! the same instant; and a broker that answers CONNACK 3 ("server unavailable", the embedded
//! broker's admission control) is backed off from like a network failure, never hammered.
//!
//! Shared by the edge client and the coordinator so both survive broker restarts the same way.
//!
//! # Layout
//! - [`Settings`]: where and how to connect.
//! - [`ClientTls`]: the CA a TLS connection verifies the broker against.
//! - [`Session`]: the client handle plus the stream of [`Incoming`] events.

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

pub use rumqttc::Publish;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT client: {0}")]
    Client(#[from] rumqttc::ClientError),
    #[error("MQTT session closed")]
    Closed,
    /// The CA certificate for TLS is missing, unreadable or not a usable certificate.
    #[error("MQTT TLS: {0}")]
    Tls(String),
    /// The broker turned our CONNECT down: wrong password, unknown or revoked client id, or
    /// a client id that differs from the user name. Retrying with the same credentials cannot
    /// help, so owners stop after a few of these in a row instead of looping silently.
    #[error("broker refused our credentials: {0}")]
    AuthRefused(String),
}

/// Whether a failed connection attempt is the broker refusing our credentials.
///
/// Mosquitto answers a bad login with CONNACK 4 (bad user name or password) or 5 (not
/// authorized). rumqttd 0.20 sends no CONNACK at all: it closes the socket right after reading
/// the CONNECT, so with credentials configured a close *before* any CONNACK on this attempt is
/// read as a refusal too (a broker that is down refuses the TCP connection instead, which is
/// an I/O error, not this) — except on a cluster (`clustered`): a NATS node answers a bad login
/// with CONNACK 5 but closes before its CONNACK while its JetStream is electing leaders after a
/// node died, which is a reason to try the next node, not to give up on our credentials.
fn auth_refusal(
    e: &rumqttc::ConnectionError,
    acked: bool,
    with_credentials: bool,
    clustered: bool,
) -> Option<MqttError> {
    use rumqttc::{ConnectReturnCode as Code, ConnectionError as E, StateError};
    match e {
        E::ConnectionRefused(Code::BadUserNamePassword) => Some(MqttError::AuthRefused(
            "bad user name or password (CONNACK 4)".into(),
        )),
        E::ConnectionRefused(Code::NotAuthorized) => {
            Some(MqttError::AuthRefused("not authorized (CONNACK 5)".into()))
        }
        E::ConnectionRefused(Code::BadClientId) => Some(MqttError::AuthRefused(
            "client id rejected (CONNACK 2)".into(),
        )),
        E::MqttState(StateError::ConnectionAborted) if !acked && with_credentials && !clustered => {
            Some(MqttError::AuthRefused(
                "the broker closed the connection before its CONNACK: the embedded broker's \
                 answer to a wrong password or an unknown client id (or to plain MQTT on a \
                 TLS-only port)"
                    .into(),
            ))
        }
        _ => None,
    }
}

/// Trust for a TLS connection to the broker: the fleet CA (`ca.pem` from `coevo keys tls`)
/// and nothing else, so a broker certificate from any other CA, public ones included, is
/// refused. Built once from the file so a bad CA is an error when the config is loaded rather
/// than a reconnect loop later ([`Session::start`] cannot fail).
///
/// The broker's certificate must name the host or IP address in [`Settings::host`].
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    /// Where the CA came from, for `Debug` and log lines.
    origin: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CA certificate(s) in the PEM file at `path`.
    pub fn from_ca_file(path: &Path) -> Result<Self, MqttError> {
        let pem = std::fs::read(path).map_err(|e| {
            MqttError::Tls(format!(
                "cannot read CA certificate {}: {e}",
                path.display()
            ))
        })?;
        Self::from_ca_pem(&pem, &path.display().to_string())
    }

    /// Trusts the CA certificate(s) in `pem`; `origin` names them in errors and logs.
    pub fn from_ca_pem(pem: &[u8], origin: &str) -> Result<Self, MqttError> {
        let fail = |reason: String| MqttError::Tls(format!("CA certificate {origin}: {reason}"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| fail(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| fail(format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(fail("no PEM CERTIFICATE block".into()));
        }
        // ring, explicitly: rustls' process-wide default would need exactly one provider
        // compiled in, and we never want aws-lc-rs pulled in by a feature elsewhere.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_root_certificates(roots)
            // Clients authenticate with their broker password, inside the TLS channel.
            .with_no_client_auth();
        Ok(ClientTls {
            config: Arc::new(config),
            origin: origin.to_owned(),
        })
    }
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// Broker credentials; coevo brokers require user name == client id.
    pub password: Option<String>,
    /// Connect over TLS, verifying the broker against this CA (`None`: plain TCP).
    pub tls: Option<ClientTls>,
    pub keep_alive: Duration,
    /// Largest packet either way. rumqttc's 10 KiB default is far below a model chunk.
    pub max_packet_bytes: usize,
    /// `false` asks the broker to keep our subscriptions and queued QoS 1 messages while we
    /// are away (the coordinator's fixed-id persistent session).
    pub clean_session: bool,
    /// Retained message the broker publishes if we vanish (topic, payload).
    pub last_will: Option<(String, Vec<u8>)>,
    /// Longest wait between reconnect attempts (before jitter: each wait is uniform in
    /// [0, current backoff], the backoff doubling from [`MIN_BACKOFF`] up to this).
    pub max_backoff: Duration,
    /// How long one connection attempt (TCP, TLS, CONNECT → CONNACK) may take before it is
    /// abandoned and retried after a backoff; also rumqttc's timeout for network writes.
    /// Default 30 s. Whole seconds (rumqttc's unit); rounded up, at least 1 s.
    pub connect_timeout: Duration,
    /// Acknowledge incoming QoS 1 messages only when the owner calls [`Session::ack`] (the
    /// coordinator acks a delta once it is on disk, so the broker re-delivers it otherwise).
    pub manual_acks: bool,
    /// Payload bytes of received publishes the session may hold for its owner (`None`: no
    /// bound). Past it a publish is *shed*: handed over without its payload as
    /// [`Incoming::Shed`] (so an owner with manual acks still acknowledges it in order) and
    /// counted ([`Session::shed`]). The event loop must keep polling whatever the owner
    /// does (keep-alives, its own publishes), so the bound cannot be a blocking channel;
    /// shedding is only for owners whose senders re-send until answered — the coordinator,
    /// whose edges re-send a delta until they hold its receipt. A publish is never shed while
    /// nothing is held, so one larger than the bound still gets through.
    pub max_incoming_bytes: Option<usize>,
    /// The other nodes of a clustered broker (NATS with JetStream, EMQX, …), as (host, port).
    /// After a failed attempt or a lost connection the session moves to the next node in turn
    /// ([`Settings::host`] first), so a node dying mid-round costs a reconnect, not the round:
    /// the cluster keeps sessions and retained messages on every node.
    pub cluster: Vec<(String, u16)>,
    /// Subscribe at QoS 0 instead of 1. For cameras on a NATS cluster: NATS backs every QoS 1
    /// subscription with a replicated JetStream consumer (10,000 cameras × 3 filters = 30,000
    /// of them), while everything a camera subscribes to — manifest, model chunks, its
    /// receipt — is retained and so re-delivered on every (re)subscription anyway. Never for
    /// the coordinator: its deltas subscription must survive its absence.
    pub qos0_subscriptions: bool,
}

impl Settings {
    pub fn new(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> Self {
        Settings {
            host: host.into(),
            port,
            client_id: client_id.into(),
            password: None,
            tls: None,
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: 2 * 1024 * 1024,
            clean_session: true,
            last_will: None,
            max_backoff: Duration::from_secs(5),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            manual_acks: false,
            max_incoming_bytes: None,
            cluster: Vec::new(),
            qos0_subscriptions: false,
        }
    }

    fn subscribe_qos(&self) -> QoS {
        if self.qos0_subscriptions {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    }

    /// Every broker node, starting with [`Settings::host`].
    pub fn nodes(&self) -> Vec<(String, u16)> {
        let mut all = vec![(self.host.clone(), self.port)];
        all.extend(self.cluster.iter().cloned());
        all
    }

    /// Spreads a fleet over a cluster's `nodes`: the first node tried is chosen by a stable
    /// hash of the client id (so each node gets its share of cameras and a camera keeps its
    /// node across restarts); the others follow in order. Does nothing with no nodes.
    pub fn spread_over(&mut self, nodes: &[(String, u16)]) {
        if nodes.is_empty() {
            return;
        }
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let h = self
            .client_id
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        let first = (h % nodes.len() as u64) as usize;
        let mut order = nodes[first..].to_vec();
        order.extend_from_slice(&nodes[..first]);
        let (host, port) = order.remove(0);
        self.host = host;
        self.port = port;
        self.cluster = order;
    }
}

/// Parses `host:port` (a cluster node in a config file).
pub fn parse_node(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("broker node {s:?}: expected host:port"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("broker node {s:?}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("broker node {s:?}: empty host"));
    }
    Ok((host.to_string(), port))
}

/// Subscribes to `filters` after `delay`, from its own task: the polling task must not await
/// the request channel (it is the one draining it), and a `try_subscribe` from it fails when the
/// channel is full — an owner publishing hard (the coordinator's receipts) would otherwise come
/// back from a reconnect without its subscriptions.
fn resubscribe(client: AsyncClient, filters: Vec<String>, qos: QoS, delay: Duration) {
    tokio::spawn(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        for f in filters {
            if client.subscribe(f, qos).await.is_err() {
                // The session is closed: nothing left to subscribe for.
                return;
            }
        }
    });
}

/// Parses a config's list of cluster nodes (`["host:port", …]`), naming the bad entry.
pub fn parse_nodes(list: &[String]) -> Result<Vec<(String, u16)>, String> {
    list.iter().map(|n| parse_node(n)).collect()
}

/// rumqttc options for one node of `settings`.
fn options(settings: &Settings, host: &str, port: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(&settings.client_id, host, port);
    opts.set_keep_alive(settings.keep_alive)
        .set_max_packet_size(settings.max_packet_bytes, settings.max_packet_bytes)
        .set_clean_session(settings.clean_session)
        .set_manual_acks(settings.manual_acks)
        .set_inflight(100);
    if let Some(pw) = &settings.password {
        opts.set_credentials(&settings.client_id, pw);
    }
    if let Some(tls) = &settings.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::clone(&tls.config)),
        ));
    }
    if let Some((topic, payload)) = &settings.last_will {
        opts.set_last_will(LastWill::new(
            topic,
            payload.clone(),
            QoS::AtLeastOnce,
            true,
        ));
    }
    opts
}

/// Default [`Settings::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// First reconnect backoff (before jitter).
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// The wait before a reconnect: uniform in [0, `backoff`] ("full jitter"). Spreads a fleet's
/// reconnects over the whole window instead of synchronising them on the backoff steps.
pub fn jittered(backoff: Duration) -> Duration {
    use rand::Rng as _;
    let ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

/// The next backoff after a failed attempt: doubled, at most `max`.
pub fn next_backoff(backoff: Duration, max: Duration) -> Duration {
    (backoff * 2).min(max).max(MIN_BACKOFF.min(max))
}

/// Whether a failed attempt is the broker saying it is overloaded (CONNACK 3).
fn broker_busy(e: &rumqttc::ConnectionError) -> bool {
    matches!(
        e,
        rumqttc::ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::ServiceUnavailable)
    )
}

/// What the session hands to its owner.
#[derive(Debug)]
pub enum Incoming {
    /// A (re)connection was acknowledged; subscriptions have been re-sent. Owners republish
    /// what the broker may have lost (e.g. retained state after a broker restart). Without
    /// `session_present` the publishes not yet acknowledged before the drop are gone too
    /// (rumqttc discards them for a new session): republish those as well.
    Connected {
        session_present: bool,
    },
    /// The connection dropped; the session keeps retrying with backoff.
    Disconnected(String),
    /// The broker refused our credentials ([`MqttError::AuthRefused`]); `consecutive` counts
    /// refusals since the last successful CONNACK, so the owner can give up after a few. The
    /// session keeps retrying (at its longest backoff) until the owner closes it.
    AuthRefused {
        error: MqttError,
        consecutive: u32,
    },
    Publish(Publish),
    /// A publish dropped unread, its payload removed, because the owner held
    /// [`Settings::max_incoming_bytes`]. With manual acks the owner acknowledges it like any
    /// other, in arrival order (rumqttd drops a connection that acknowledges out of order).
    Shed(Publish),
}

/// A live MQTT session.
pub struct Session {
    client: AsyncClient,
    /// QoS of our subscriptions ([`Settings::qos0_subscriptions`]).
    sub_qos: QoS,
    filters: Arc<Mutex<Vec<String>>>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    poller: tokio::task::JoinHandle<()>,
    /// QoS 1 publishes sent and not yet acknowledged by the broker.
    unacked: Arc<AtomicI64>,
    /// Payload bytes of publishes received and not yet taken by the owner.
    held: Arc<AtomicUsize>,
    /// Publishes dropped because `held` was at [`Settings::max_incoming_bytes`].
    shed: Arc<AtomicU64>,
}

impl Session {
    /// Starts connecting in the background and returns at once; [`Incoming::Connected`] tells
    /// when the broker answered. `filters` are subscribed (QoS 1, or 0 with
    /// [`Settings::qos0_subscriptions`]) on every connection, on whichever cluster node.
    pub fn start(settings: &Settings, filters: Vec<String>) -> Session {
        let nodes = settings.nodes();
        let opts = options(settings, &nodes[0].0, nodes[0].1);
        let poll_settings = settings.clone();
        let sub_qos = settings.subscribe_qos();
        let mut node = 0usize;
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let mut network = rumqttc::NetworkOptions::new();
        let timeout_s = settings.connect_timeout.as_secs()
            + u64::from(settings.connect_timeout.subsec_nanos() > 0);
        network.set_connection_timeout(timeout_s.max(1));
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let filters = Arc::new(Mutex::new(filters));
        let (tx, incoming) = mpsc::unbounded_channel();
        let poll_client = client.clone();
        let poll_filters = filters.clone();
        let id = settings.client_id.clone();
        let max_backoff = settings.max_backoff;
        let with_credentials = settings.password.is_some();
        let unacked = Arc::new(AtomicI64::new(0));
        let poll_unacked = unacked.clone();
        let held = Arc::new(AtomicUsize::new(0));
        let poll_held = held.clone();
        let shed = Arc::new(AtomicU64::new(0));
        let poll_shed = shed.clone();
        let max_incoming = settings.max_incoming_bytes;
        let poller = tokio::spawn(async move {
            let mut backoff = MIN_BACKOFF.min(max_backoff);
            // Whether the current connection got its CONNACK, and refusals in a row.
            let mut acked = false;
            let mut refusals = 0u32;
            let mut suback_backoff = MIN_BACKOFF.min(max_backoff);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        backoff = MIN_BACKOFF.min(max_backoff);
                        acked = true;
                        refusals = 0;
                        let list = poll_filters.lock().map(|f| f.clone()).unwrap_or_default();
                        // Queued here, before the owner hears of the connection, so they go
                        // out ahead of anything it publishes in reply (the coordinator opens
                        // a round on Connected: its deltas filter must be live first).
                        let mut unsent = Vec::new();
                        for f in list {
                            if poll_client.try_subscribe(f.clone(), sub_qos).is_err() {
                                unsent.push(f);
                            }
                        }
                        if !unsent.is_empty() {
                            tracing::warn!(client = %id, filters = unsent.len(), "request queue full: subscribing from a task");
                            resubscribe(poll_client.clone(), unsent, sub_qos, Duration::ZERO);
                        }
                        if !ack.session_present {
                            // rumqttc drops its unacknowledged publishes when the broker has
                            // no session for us: they will never be acknowledged, so stop
                            // waiting for them (the owner republishes on Connected).
                            let dropped = poll_unacked.swap(0, Ordering::SeqCst);
                            if dropped > 0 && !poll_settings.clean_session {
                                tracing::warn!(client = %id, dropped, "the broker kept no session for us: unacknowledged publishes dropped (republished by the owner)");
                            }
                        }
                        tracing::debug!(client = %id, "connected");
                        if tx
                            .send(Incoming::Connected {
                                session_present: ack.session_present,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let len = p.payload.len();
                        let now = poll_held.load(Ordering::SeqCst);
                        if max_incoming.is_some_and(|max| now > 0 && now.saturating_add(len) > max)
                        {
                            let n = poll_shed.fetch_add(1, Ordering::SeqCst) + 1;
                            if n.is_power_of_two() {
                                tracing::warn!(client = %id, held = now, shed = n, topic = %p.topic, "owner is behind: shedding incoming publishes (their senders re-send)");
                            }
                            let mut p = p;
                            p.payload = Default::default();
                            if tx.send(Incoming::Shed(p)).is_err() {
                                return;
                            }
                            continue;
                        }
                        poll_held.fetch_add(len, Ordering::SeqCst);
                        if tx.send(Incoming::Publish(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        // Never below zero: a publish queued across a new session's reset.
                        let _ =
                            poll_unacked.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                                Some((v - 1).max(0))
                            });
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack)))
                        if ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
                    {
                        // A refused subscription leaves us connected and deaf: a NATS node
                        // refuses while JetStream elects after a node died, a broker refuses
                        // a filter its ACL denies. Subscribe again later (all filters: which
                        // one failed isn't in the SUBACK; granted ones are granted again),
                        // backing off as for reconnects, so a denial costs little.
                        let wait = jittered(suback_backoff);
                        suback_backoff =
                            next_backoff(suback_backoff.max(Duration::from_secs(1)), max_backoff);
                        tracing::warn!(client = %id, retry_in = ?wait, "the broker refused a subscription; subscribing again");
                        let list = poll_filters.lock().map(|f| f.clone()).unwrap_or_default();
                        resubscribe(poll_client.clone(), list, sub_qos, wait);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        suback_backoff = MIN_BACKOFF.min(max_backoff);
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(e) => {
                        if nodes.len() > 1 {
                            // A cluster: the next node holds the same session and retained
                            // state, so try it rather than wait for this one to come back.
                            node = (node + 1) % nodes.len();
                            let (host, port) = &nodes[node];
                            tracing::debug!(client = %id, host = %host, port, "trying the next broker node");
                            eventloop.mqtt_options = options(&poll_settings, host, *port);
                        }
                        if let Some(error) =
                            auth_refusal(&e, acked, with_credentials, nodes.len() > 1)
                        {
                            refusals += 1;
                            tracing::debug!(client = %id, error = %error, refusals, "connection refused");
                            let ev = Incoming::AuthRefused {
                                error,
                                consecutive: refusals,
                            };
                            if tx.send(ev).is_err() {
                                return;
                            }
                            // The longest backoff at once (jittered, so refused clients of a
                            // revoked batch don't return in lockstep): a refusal is not a
                            // network hiccup.
                            tokio::time::sleep(max_backoff / 2 + jittered(max_backoff / 2)).await;
                            continue;
                        }
                        acked = false;
                        let wait = jittered(backoff);
                        let reason = if broker_busy(&e) {
                            format!(
                                "broker busy (CONNACK 3, server unavailable); retrying in {wait:?}"
                            )
                        } else {
                            e.to_string()
                        };
                        tracing::debug!(client = %id, error = %e, "connection lost; retrying in {wait:?}");
                        if tx.send(Incoming::Disconnected(reason)).is_err() {
                            return;
                        }
                        tokio::time::sleep(wait).await;
                        backoff = next_backoff(backoff, max_backoff);
                    }
                }
            }
        });
        Session {
            client,
            sub_qos,
            filters,
            incoming,
            poller,
            unacked,
            held,
            shed,
        }
    }

    /// Publishes dropped so far because the owner held [`Settings::max_incoming_bytes`].
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::SeqCst)
    }

    /// Payload bytes received and not yet taken by the owner.
    pub fn held_bytes(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    fn taken(&self, ev: Option<Incoming>) -> Option<Incoming> {
        if let Some(Incoming::Publish(p)) = &ev {
            self.held.fetch_sub(p.payload.len(), Ordering::SeqCst);
        }
        ev
    }

    /// Adds a filter: subscribed now and after every reconnection.
    pub async fn subscribe(&self, filter: &str) -> Result<(), MqttError> {
        if let Ok(mut f) = self.filters.lock() {
            if !f.iter().any(|x| x == filter) {
                f.push(filter.to_string());
            }
        }
        self.client.subscribe(filter, self.sub_qos).await?;
        Ok(())
    }

    /// Drops a filter.
    pub async fn unsubscribe(&self, filter: &str) -> Result<(), MqttError> {
        if let Ok(mut f) = self.filters.lock() {
            f.retain(|x| x != filter);
        }
        self.client.unsubscribe(filter).await?;
        Ok(())
    }

    /// Publishes at QoS 1.
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), MqttError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await?;
        // Counted from the moment it is queued, so `close` also waits for publishes the event
        // loop has not written yet.
        self.unacked.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Acknowledges a QoS 1 message (only needed with `manual_acks`).
    pub async fn ack(&self, publish: &Publish) -> Result<(), MqttError> {
        self.client.ack(publish).await?;
        Ok(())
    }

    /// Next event; `None` once the session is closed.
    pub async fn recv(&mut self) -> Option<Incoming> {
        let ev = self.incoming.recv().await;
        self.taken(ev)
    }

    /// Next event if one is ready now.
    pub fn try_recv(&mut self) -> Option<Incoming> {
        let ev = self.incoming.try_recv().ok();
        self.taken(ev)
    }

    /// The underlying client, for callers that need a raw operation (e.g. manual acks).
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// Waits (up to 5 s) until the broker has acknowledged every QoS 1 publish, so the last
    /// receipts and reports aren't lost with the connection, then sends DISCONNECT (so no last
    /// will is published) and stops polling.
    pub async fn close(mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.unacked.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.unacked.load(Ordering::SeqCst);
        if left > 0 {
            tracing::warn!(
                unacknowledged = left,
                "closing with publishes the broker has not acknowledged"
            );
        }
        let _ = self.client.disconnect().await;
        // The poller ends when it has sent the DISCONNECT (RequestsDone) or errors out.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.poller).await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("self-signed").pem()
    }

    #[test]
    fn refusals_are_told_from_network_errors() {
        use rumqttc::{ConnectReturnCode as Code, ConnectionError as E, StateError};
        // Mosquitto's CONNACK codes, whatever the state of the connection.
        for code in [Code::BadUserNamePassword, Code::NotAuthorized] {
            let e = auth_refusal(&E::ConnectionRefused(code), false, true, false);
            assert!(matches!(e, Some(MqttError::AuthRefused(_))), "{e:?}");
        }
        // rumqttd closes the socket before any CONNACK: a refusal when we sent credentials.
        let aborted = || E::MqttState(StateError::ConnectionAborted);
        let e = auth_refusal(&aborted(), false, true, false).expect("refusal");
        assert!(e
            .to_string()
            .starts_with("broker refused our credentials: "));
        // The same close after a CONNACK is a dropped connection, and without credentials
        // there is nothing to refuse.
        assert!(auth_refusal(&aborted(), true, true, false).is_none());
        assert!(auth_refusal(&aborted(), false, false, false).is_none());
        // On a cluster the close is a node that isn't ready (NATS mid-election): next node.
        assert!(auth_refusal(&aborted(), false, true, true).is_none());
        assert!(auth_refusal(
            &E::ConnectionRefused(Code::NotAuthorized),
            false,
            true,
            true
        )
        .is_some());
        // A broker that is down refuses the TCP connection: not a refusal of credentials.
        let down = E::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(auth_refusal(&down, false, true, false).is_none());
        assert!(auth_refusal(&E::NetworkTimeout, false, true, false).is_none());
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_jitter_stays_inside_it() {
        let cap = Duration::from_secs(5);
        let mut b = MIN_BACKOFF;
        let mut steps = vec![b];
        for _ in 0..10 {
            b = next_backoff(b, cap);
            steps.push(b);
        }
        assert_eq!(steps[1], Duration::from_millis(200));
        assert_eq!(*steps.last().unwrap(), cap);
        assert!(steps.windows(2).all(|w| w[0] <= w[1]));
        // Full jitter: within [0, backoff], and actually spread (not a constant).
        let waits: Vec<Duration> = (0..200).map(|_| jittered(cap)).collect();
        assert!(waits.iter().all(|w| *w <= cap));
        let min = waits.iter().min().unwrap();
        let max = waits.iter().max().unwrap();
        assert!(*max - *min > Duration::from_secs(2), "{min:?}..{max:?}");
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn busy_broker_is_not_an_auth_refusal() {
        use rumqttc::{ConnectReturnCode as Code, ConnectionError as E};
        let busy = E::ConnectionRefused(Code::ServiceUnavailable);
        assert!(broker_busy(&busy));
        assert!(auth_refusal(&busy, false, true, false).is_none());
        assert!(!broker_busy(&E::ConnectionRefused(
            Code::BadUserNamePassword
        )));
    }

    #[test]
    fn fleet_defaults() {
        let s = Settings::new("h", 1, "c");
        assert!(s.cluster.is_empty());
        assert_eq!(s.connect_timeout, Duration::from_secs(30));
        assert!(s.max_backoff >= MIN_BACKOFF);
    }

    #[test]
    fn a_fleet_spreads_over_the_cluster_and_keeps_every_node_to_fail_over_to() {
        let nodes: Vec<(String, u16)> = (0..3).map(|i| ("n".to_string(), 1883 + i)).collect();
        let mut firsts = [0usize; 3];
        for i in 0..300 {
            let mut s = Settings::new("ignored", 1, format!("cam-{i}"));
            s.spread_over(&nodes);
            let all = s.nodes();
            assert_eq!(all.len(), 3);
            let mut ports: Vec<u16> = all.iter().map(|n| n.1).collect();
            ports.sort_unstable();
            assert_eq!(ports, [1883, 1884, 1885], "every node once");
            firsts[usize::from(s.port - 1883)] += 1;
            // Stable: the same id starts on the same node.
            let mut again = Settings::new("ignored", 1, format!("cam-{i}"));
            again.spread_over(&nodes);
            assert_eq!(again.port, s.port);
        }
        assert!(firsts.iter().all(|&n| n > 60), "uneven spread {firsts:?}");
        assert_eq!(
            parse_node("10.0.0.2:1884").unwrap(),
            ("10.0.0.2".into(), 1884)
        );
        assert_eq!(parse_node("[::1]:1883").unwrap(), ("::1".into(), 1883));
        assert!(parse_node("nohost").is_err());
        assert!(parse_node(":1883").is_err());
        assert!(parse_node("h:99999").is_err());
    }

    #[test]
    fn ca_from_pem_and_file() {
        let pem = ca_pem();
        let tls = ClientTls::from_ca_pem(pem.as_bytes(), "test").expect("valid CA");
        assert!(format!("{tls:?}").contains("test"));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, &pem).expect("write");
        ClientTls::from_ca_file(&path).expect("valid CA file");
    }

    #[test]
    fn bad_ca_is_a_typed_error_naming_the_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("absent.pem");
        match ClientTls::from_ca_file(&missing) {
            Err(MqttError::Tls(m)) => assert!(m.contains("absent.pem"), "{m}"),
            other => panic!("expected MqttError::Tls, got {other:?}"),
        }
        for bad in [
            &b""[..],
            b"not pem at all",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            match ClientTls::from_ca_pem(bad, "bad.pem") {
                Err(MqttError::Tls(m)) => assert!(m.contains("bad.pem"), "{m}"),
                other => panic!("expected MqttError::Tls, got {other:?}"),
            }
        }
    }
}
