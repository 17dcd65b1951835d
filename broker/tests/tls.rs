//! The broker's `[tls]` listener against real rumqttc clients on 127.0.0.1: config handling,
//! typed errors for bad certificate files, and the properties of the TLS front end (plain MQTT
//! refused, a silent socket neither blocks other clients nor lingers).
//! Synchronisation is by waiting on MQTT events or socket reads (with timeouts), never sleeping.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coevo_broker::{
    free_local_addr, start, BrokerConfig, BrokerError, BrokerHandle, Credentials, TlsConfig,
};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, Transport,
};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

/// A CA and a broker certificate for 127.0.0.1 signed by it, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    tls: TlsConfig,
}

fn pki(dir: &Path) -> Pki {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let key = rcgen::KeyPair::generate().expect("broker key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
    let cert = leaf
        .signed_by(&key, &rcgen::Issuer::new(ca, &ca_key))
        .expect("broker cert");
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        tls: TlsConfig {
            cert: write("broker.pem", cert.pem()),
            key: write("broker.key", key.serialize_pem()),
        },
    }
}

fn tls_broker(
    dir: &Path,
    clients: &[(&str, &str)],
    connection_timeout_ms: u16,
) -> (BrokerHandle, Pki) {
    let pki = pki(dir);
    let creds_path = dir.join("creds.toml");
    let mut creds = Credentials::default();
    for (id, pw) in clients {
        creds.set_password(id, pw).expect("hash");
    }
    creds.save(&creds_path).expect("save");
    let handle = start(BrokerConfig {
        listen: free_local_addr().expect("free port"),
        credentials: Some(creds_path),
        tls: Some(pki.tls.clone()),
        connection_timeout_ms,
        ..BrokerConfig::default()
    })
    .expect("TLS broker starts");
    assert!(handle.tls_enabled && handle.auth_enabled);
    (handle, pki)
}

/// A rumqttc client for `handle`; over TLS trusting `ca` when given, else plain TCP.
fn client(
    handle: &BrokerHandle,
    id: &str,
    pw: &str,
    ca: Option<&Path>,
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, handle.addr.ip().to_string(), handle.addr.port());
    opts.set_credentials(id, pw);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).expect("read CA");
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.expect("PEM")).expect("CA");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        opts.set_transport(Transport::tls_with_config(config.into()));
    }
    AsyncClient::new(opts, 16)
}

/// Polls until the broker accepted (`Ok`) or the connection failed (`Err`).
async fn connect_outcome(eventloop: &mut EventLoop) -> Result<(), ConnectionError> {
    let fut = async {
        loop {
            if let Event::Incoming(Packet::ConnAck(ack)) = eventloop.poll().await? {
                return match ack.code {
                    rumqttc::ConnectReturnCode::Success => Ok(()),
                    code => Err(ConnectionError::ConnectionRefused(code)),
                };
            }
        }
    };
    timeout(WAIT, fut)
        .await
        .expect("connect outcome within timeout")
}

#[test]
fn tls_table_parses_and_resolves_relative_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "[tls]\ncert = \"tls/broker.pem\"\nkey = \"/abs/broker.key\"\n",
    )
    .expect("write");
    let config = BrokerConfig::from_toml_file(&path).expect("parse");
    assert_eq!(
        config.tls,
        Some(TlsConfig {
            cert: dir.path().join("tls/broker.pem"),
            key: "/abs/broker.key".into(),
        })
    );
    let text = config.to_toml_string().expect("serialise");
    assert_eq!(BrokerConfig::from_toml_str(&text).expect("reparse"), config);
    assert!(matches!(
        BrokerConfig::from_toml_str("[tls]\ncert = \"a.pem\"\nkey = \"a.key\"\nca = \"x\"\n"),
        Err(BrokerError::Config(_))
    ));
}

#[test]
fn bad_certificate_files_are_typed_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = pki(dir.path()).tls;
    let other = tempfile::tempdir().expect("tempdir");
    let other = pki(other.path()).tls;
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let cases = [
        (
            TlsConfig {
                cert: dir.path().join("absent.pem"),
                ..good.clone()
            },
            "absent.pem",
        ),
        (
            TlsConfig {
                key: dir.path().join("absent.key"),
                ..good.clone()
            },
            "absent.key",
        ),
        (
            TlsConfig {
                cert: garbage.clone(),
                ..good.clone()
            },
            "garbage.pem",
        ),
        (
            TlsConfig {
                key: garbage,
                ..good.clone()
            },
            "garbage.pem",
        ),
        // A certificate with someone else's key: caught at start-up, not at the first handshake.
        (
            TlsConfig {
                key: other.key,
                ..good
            },
            "broker.key",
        ),
    ];
    for (tls, name) in cases {
        let config = BrokerConfig {
            listen: free_local_addr().expect("free port"),
            tls: Some(tls),
            ..BrokerConfig::default()
        };
        match start(config) {
            Err(BrokerError::Tls(msg)) => assert!(msg.contains(name), "{name}: {msg}"),
            other => panic!("{name}: expected BrokerError::Tls, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_round_trips_and_plain_mqtt_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (handle, pki) = tls_broker(dir.path(), &[("coordinator", "pw")], 5_000);

    let (cam, mut eventloop) = client(&handle, "coordinator", "pw", Some(&pki.ca));
    connect_outcome(&mut eventloop)
        .await
        .expect("TLS client connects");
    cam.subscribe("coevo/v1/t/model/x/0", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let payload: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
    // The coordinator role may read and write the whole root.
    let received = timeout(WAIT, async {
        loop {
            match eventloop.poll().await.expect("event loop") {
                Event::Incoming(Packet::SubAck(_)) => cam
                    .publish(
                        "coevo/v1/t/model/x/0",
                        QoS::AtLeastOnce,
                        false,
                        payload.clone(),
                    )
                    .await
                    .expect("publish"),
                Event::Incoming(Packet::Publish(p)) => return p,
                _ => {}
            }
        }
    })
    .await
    .expect("round trip through the TLS front end");
    assert_eq!(&received.payload[..], &payload[..]);

    // The same valid login in plain MQTT: the front end finds no TLS ClientHello and hangs up.
    let (_c, mut plain) = client(&handle, "coordinator", "pw", None);
    let err = connect_outcome(&mut plain)
        .await
        .expect_err("plain MQTT refused");
    assert!(!matches!(err, ConnectionError::NetworkTimeout), "{err:?}");
    assert!(handle.is_running());
}

/// rumqttd's own TLS listener handshakes inline in its accept loop without a timeout, so one
/// silent socket blocked every later client; the front end must not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_socket_neither_blocks_others_nor_lingers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let connection_timeout = Duration::from_millis(1_000);
    let (handle, pki) = tls_broker(dir.path(), &[("cam-001", "pw")], 1_000);

    let mut silent = std::net::TcpStream::connect(handle.addr).expect("tcp connect");
    let opened = Instant::now();
    let (_c, mut eventloop) = client(&handle, "cam-001", "pw", Some(&pki.ca));
    connect_outcome(&mut eventloop)
        .await
        .expect("a TLS client connects while a silent socket is open");
    assert!(
        opened.elapsed() < connection_timeout,
        "connected only after the silent socket was dropped ({:?})",
        opened.elapsed()
    );

    // The silent socket is closed by the broker once connection_timeout_ms has passed.
    let closed = tokio::task::spawn_blocking(move || {
        silent.set_read_timeout(Some(WAIT)).expect("read timeout");
        let mut buf = [0u8; 16];
        let r = silent.read(&mut buf);
        (r.map_err(|e| e.kind()), opened.elapsed())
    })
    .await
    .expect("reader");
    assert!(
        matches!(closed.0, Ok(0)),
        "expected EOF, got {:?}",
        closed.0
    );
    assert!(
        closed.1 >= connection_timeout && closed.1 < connection_timeout * 5,
        "closed after {:?}",
        closed.1
    );
}

/// The ACLs hold behind TLS too: a camera's wildcard SUBSCRIBE closes its TLS connection,
/// and its own receipt topic is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_apply_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (handle, pki) = tls_broker(dir.path(), &[("cam-001", "pw")], 5_000);
    let (cam, mut eventloop) = client(&handle, "cam-001", "pw", Some(&pki.ca));
    connect_outcome(&mut eventloop).await.expect("connects");
    cam.subscribe("coevo/v1/city/receipt/cam-001", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut subacks = 0;
    let closed = timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subacks += 1;
                    cam.subscribe("coevo/v1/#", QoS::AtLeastOnce)
                        .await
                        .expect("subscribe");
                }
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the broker closes the TLS connection");
    assert!(
        !matches!(closed, ConnectionError::NetworkTimeout),
        "{closed:?}"
    );
    assert_eq!(subacks, 1, "the allowed filter was acknowledged");
    assert_eq!(handle.stats().acl_refused_subscribe, 1);
}
