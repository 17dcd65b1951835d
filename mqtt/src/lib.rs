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
/// an I/O error, not this).
fn auth_refusal(
    e: &rumqttc::ConnectionError,
    acked: bool,
    with_credentials: bool,
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
        E::MqttState(StateError::ConnectionAborted) if !acked && with_credentials => {
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
        }
    }
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
    /// what the broker may have lost (e.g. retained state after a broker restart).
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
    /// when the broker answered. `filters` are subscribed (QoS 1) on every connection.
    pub fn start(settings: &Settings, filters: Vec<String>) -> Session {
        let mut opts = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
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
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        backoff = MIN_BACKOFF.min(max_backoff);
                        acked = true;
                        refusals = 0;
                        let list = poll_filters.lock().map(|f| f.clone()).unwrap_or_default();
                        for f in list {
                            // try_: awaiting here, on the polling task, could deadlock.
                            if let Err(e) = poll_client.try_subscribe(f, QoS::AtLeastOnce) {
                                tracing::warn!(client = %id, error = %e, "re-subscribe failed");
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
                        poll_unacked.fetch_sub(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(e) => {
                        if let Some(error) = auth_refusal(&e, acked, with_credentials) {
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
        self.client.subscribe(filter, QoS::AtLeastOnce).await?;
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
            let e = auth_refusal(&E::ConnectionRefused(code), false, true);
            assert!(matches!(e, Some(MqttError::AuthRefused(_))), "{e:?}");
        }
        // rumqttd closes the socket before any CONNACK: a refusal when we sent credentials.
        let aborted = || E::MqttState(StateError::ConnectionAborted);
        let e = auth_refusal(&aborted(), false, true).expect("refusal");
        assert!(e
            .to_string()
            .starts_with("broker refused our credentials: "));
        // The same close after a CONNACK is a dropped connection, and without credentials
        // there is nothing to refuse.
        assert!(auth_refusal(&aborted(), true, true).is_none());
        assert!(auth_refusal(&aborted(), false, false).is_none());
        // A broker that is down refuses the TCP connection: not a refusal of credentials.
        let down = E::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(auth_refusal(&down, false, true).is_none());
        assert!(auth_refusal(&E::NetworkTimeout, false, true).is_none());
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
        assert!(auth_refusal(&busy, false, true).is_none());
        assert!(!broker_busy(&E::ConnectionRefused(
            Code::BadUserNamePassword
        )));
    }

    #[test]
    fn fleet_defaults() {
        let s = Settings::new("h", 1, "c");
        assert_eq!(s.connect_timeout, Duration::from_secs(30));
        assert!(s.max_backoff >= MIN_BACKOFF);
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
