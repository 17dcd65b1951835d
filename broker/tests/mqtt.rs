//! End-to-end tests against a real embedded broker on 127.0.0.1 with rumqttc clients.
//! Synchronisation is by waiting on MQTT events (with timeouts), never by sleeping.

use std::path::PathBuf;
use std::time::Duration;

use coevo_broker::{free_local_addr, start, BrokerConfig, BrokerError, BrokerHandle, Credentials};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);
const CHUNK: usize = 300 * 1024;

/// Starts a broker on a free port whose credential file knows `clients`.
fn broker_with(clients: &[(&str, &str)]) -> (BrokerHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path: PathBuf = dir.path().join("creds.toml");
    let mut creds = Credentials::default();
    for (id, pw) in clients {
        creds.set_password(id, pw).expect("hash");
    }
    creds.save(&path).expect("save");
    let config = BrokerConfig {
        listen: free_local_addr().expect("free port"),
        credentials: Some(path),
        ..BrokerConfig::default()
    };
    let handle = start(config).expect("broker starts");
    assert!(handle.auth_enabled);
    (handle, dir)
}

fn client(handle: &BrokerHandle, id: &str, user: &str, pw: &str) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, handle.addr.ip().to_string(), handle.addr.port());
    opts.set_credentials(user, pw);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
    AsyncClient::new(opts, 16)
}

/// Polls until the broker accepted (`Ok`) or the connection failed (`Err`).
async fn connect_outcome(eventloop: &mut EventLoop) -> Result<(), ConnectionError> {
    let fut = async {
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Packet::ConnAck(ack)) => {
                    return match ack.code {
                        rumqttc::ConnectReturnCode::Success => Ok(()),
                        code => Err(ConnectionError::ConnectionRefused(code)),
                    }
                }
                _ => continue,
            }
        }
    };
    timeout(WAIT, fut)
        .await
        .expect("connect outcome within timeout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorised_client_round_trips_large_qos1_publish() {
    // The coordinator role may both publish and read any topic under the root.
    let (handle, _dir) = broker_with(&[("coordinator", "right-password")]);
    let (client, mut eventloop) = client(&handle, "coordinator", "coordinator", "right-password");
    connect_outcome(&mut eventloop).await.expect("connects");

    let topic = "coevo/v1/test/model/abc/0";
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let payload: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();

    let mut published = false;
    let mut got_puback = false;
    let mut received = None;
    timeout(WAIT, async {
        while received.is_none() || !got_puback {
            match eventloop.poll().await.expect("event loop") {
                Event::Incoming(Packet::SubAck(_)) if !published => {
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload.clone())
                        .await
                        .expect("publish");
                    published = true;
                }
                Event::Incoming(Packet::PubAck(_)) => got_puback = true,
                Event::Incoming(Packet::Publish(p)) => received = Some(p),
                _ => {}
            }
        }
    })
    .await
    .expect("publish round trip within timeout");

    let p = received.expect("received");
    assert_eq!(p.topic, topic);
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_eq!(p.payload.len(), CHUNK);
    assert_eq!(&p.payload[..], &payload[..]);
    assert!(handle.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused() {
    let (handle, _dir) = broker_with(&[("cam-001", "right-password")]);
    let (_client, mut eventloop) = client(&handle, "cam-001", "cam-001", "wrong-password");
    let err = connect_outcome(&mut eventloop).await.expect_err("refused");
    assert!(
        matches!(
            err,
            ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::BadUserNamePassword)
        ),
        "{err:?}"
    );
    assert_eq!(handle.stats().auth_refused, 1);
    // The broker is unaffected and still admits the right password.
    let (_c2, mut el2) = client(&handle, "cam-001", "cam-001", "right-password");
    connect_outcome(&mut el2)
        .await
        .expect("right password still connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_name_must_equal_client_id() {
    let (handle, _dir) = broker_with(&[("cam-001", "pw-one"), ("cam-002", "pw-two")]);
    // cam-002's valid login used under cam-001's client id: impersonation attempt.
    let (_client, mut eventloop) = client(&handle, "cam-001", "cam-002", "pw-two");
    assert!(connect_outcome(&mut eventloop).await.is_err());
    assert_eq!(handle.stats().client_id_mismatch, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_client_and_missing_login_are_refused() {
    let (handle, _dir) = broker_with(&[("cam-001", "pw-one")]);
    let (_client, mut eventloop) = client(&handle, "cam-999", "cam-999", "pw-one");
    assert!(connect_outcome(&mut eventloop).await.is_err());

    let opts = MqttOptions::new("cam-001", handle.addr.ip().to_string(), handle.addr.port());
    let (_c, mut el) = AsyncClient::new(opts, 4);
    assert!(connect_outcome(&mut el).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_means_open_broker() {
    let config = BrokerConfig {
        listen: free_local_addr().expect("free port"),
        ..BrokerConfig::default()
    };
    let handle = start(config).expect("starts");
    assert!(!handle.auth_enabled);
    let opts = MqttOptions::new("anyone", handle.addr.ip().to_string(), handle.addr.port());
    let (_c, mut el) = AsyncClient::new(opts, 4);
    connect_outcome(&mut el)
        .await
        .expect("open broker admits anyone");
}

#[test]
fn port_in_use_is_a_typed_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = BrokerConfig {
        listen: taken.local_addr().expect("addr"),
        ..BrokerConfig::default()
    };
    match start(config) {
        Err(BrokerError::Start(msg)) => assert!(msg.contains("cannot listen"), "{msg}"),
        other => panic!("expected BrokerError::Start, got {other:?}"),
    }
}

#[test]
fn port_zero_resolves_to_a_real_port() {
    let config = BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..BrokerConfig::default()
    };
    let handle = start(config).expect("starts");
    assert_ne!(handle.addr.port(), 0);
    assert!(std::net::TcpStream::connect(handle.addr).is_ok());
}

#[test]
fn missing_credential_file_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = BrokerConfig {
        listen: free_local_addr().expect("free port"),
        credentials: Some(dir.path().join("absent.toml")),
        ..BrokerConfig::default()
    };
    match start(config) {
        Err(BrokerError::Credentials(msg)) => assert!(msg.contains("absent.toml"), "{msg}"),
        other => panic!("expected BrokerError::Credentials, got {other:?}"),
    }
}
