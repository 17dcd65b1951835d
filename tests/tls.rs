//! TLS end to end: certificates from `coevo keys tls`'s library function, the embedded broker
//! serving TLS with password auth on 127.0.0.1, and a real round (coordinator + 2 libtorch
//! agents) over it. Then what TLS must keep out: plain MQTT on the TLS port, a client that
//! trusts a different CA, and a wrong password or someone else's password inside TLS.
//! Every negative check is paired with the same connection succeeding when done right, so a
//! refusal is known to be for the stated reason.

mod common;

use coevo_edge::{Agent, AgentOptions, EdgeError};
use coevo_models::data::synthetic;
use coevo_models::partition::{partition, PartitionSpec};
use coevo_mqtt::{ClientTls, Incoming, MqttError, Session, Settings};
use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// The first thing a session reports: `Ok` for a CONNACK, `Err(reason)` for a failed attempt.
async fn first_outcome(
    addr: SocketAddr,
    id: &str,
    password: &str,
    tls: Option<ClientTls>,
) -> Result<(), String> {
    let mut settings = Settings::new(addr.ip().to_string(), addr.port(), id);
    settings.password = Some(password.to_owned());
    settings.tls = tls;
    let mut session = Session::start(&settings, vec![]);
    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            match session.recv().await {
                Some(Incoming::Connected { .. }) => return Ok(()),
                Some(Incoming::Disconnected(reason)) => return Err(reason),
                Some(Incoming::AuthRefused { error, .. }) => return Err(error.to_string()),
                Some(Incoming::Publish(_) | Incoming::Shed(_)) => {}
                None => return Err("session closed".into()),
            }
        }
    })
    .await
    .expect("connection outcome within the timeout");
    // Dropped, not closed: `close` would wait for a DISCONNECT a refused session never sends.
    drop(session);
    if let Err(reason) = &outcome {
        eprintln!("{id} refused: {reason}");
    }
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_over_tls_with_password_auth() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 2);
    let tls = fleet_tls(&dir.path().join("tls"));
    let broker = start_tls_broker(&fleet, &tls);
    assert!(broker.tls_enabled && broker.auth_enabled);
    let addr = broker.addr;

    let data = synthetic(600, 200, SHAPE, 41);
    let parts = partition(
        &data.train.labels_vec(),
        None,
        &PartitionSpec::Iid { clients: 2 },
        1,
    )
    .unwrap();
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agents: Vec<_> = (0..2)
        .map(|i| {
            let local = data.train.subset(&parts[i].1);
            spawn_tls_agent(&fleet, i, addr, local, &stop_rx, Some(1), &tls.ca_cert)
        })
        .collect();

    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    cfg.broker.ca_cert = Some(tls.ca_cert.clone());
    cfg.round.quorum = 2;
    let (coord, _events) = spawn_coordinator(cfg, &fleet, &data.test);
    let reports = tokio::time::timeout(Duration::from_secs(180), coord)
        .await
        .expect("the round completes in time")
        .unwrap()
        .expect("coordinator");

    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!(r.outcome, "completed");
    assert_eq!(r.accepted, 2, "{:?}", r.rejected);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert!(r.bytes_down > 0 && r.bytes_up > 0);
    let mut merged = assert_merge_consistent(&out, 1);
    merged.sort();
    assert_eq!(merged, ids(2));
    for a in agents {
        let summary = tokio::time::timeout(WAIT, a)
            .await
            .expect("agent ends after its round")
            .unwrap()
            .expect("agent");
        assert_eq!(summary.accepted_rounds, vec![1]);
    }
    eprintln!(
        "TLS round: 2 deltas accepted, {} B down, {} B up, {:.1}s",
        r.bytes_down,
        r.bytes_up,
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mqtt_is_refused_on_the_tls_port() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let tls = fleet_tls(&dir.path().join("tls"));
    let broker = start_tls_broker(&fleet, &tls);
    let (id, _, pw) = fleet.clients[0].clone();

    let err = first_outcome(broker.addr, &id, &pw, None)
        .await
        .expect_err("plain MQTT on the TLS port");
    assert!(!err.contains("timeout"), "refused, not timed out: {err}");
    let ca = ClientTls::from_ca_file(&tls.ca_cert).unwrap();
    first_outcome(broker.addr, &id, &pw, Some(ca))
        .await
        .expect("the same login over TLS connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_trusting_another_ca_refuses_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let tls = fleet_tls(&dir.path().join("tls"));
    // A CA from another run of `coevo keys tls` for the same fleet: same subject name, so only
    // the signature tells it from the one that signed this broker.
    let other = fleet_tls(&dir.path().join("other-tls"));
    let broker = start_tls_broker(&fleet, &tls);
    let (id, _, pw) = fleet.clients[0].clone();

    let wrong = ClientTls::from_ca_file(&other.ca_cert).unwrap();
    let err = first_outcome(broker.addr, &id, &pw, Some(wrong))
        .await
        .expect_err("the broker's certificate is not trusted");
    assert!(err.contains("certificate"), "{err}");

    // The coordinator gives up with that reason rather than a bare timeout.
    let mut cfg = coordinator_config(&fleet, broker.addr, dir.path().join("out"), 1);
    cfg.broker.ca_cert = Some(other.ca_cert.clone());
    cfg.broker.connect_timeout_s = 2;
    let data = synthetic(20, 20, SHAPE, 42);
    let (coord, _events) = spawn_coordinator(cfg, &fleet, &data.test);
    match coord.await.unwrap() {
        Err(coevo_coordinator::CoordinatorError::Broker(m)) => {
            assert!(m.contains("certificate"), "{m}")
        }
        other => panic!("expected a broker error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_borrowed_password_is_refused_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 2);
    let tls = fleet_tls(&dir.path().join("tls"));
    let broker = start_tls_broker(&fleet, &tls);
    let ca = ClientTls::from_ca_file(&tls.ca_cert).unwrap();
    let (id0, _, pw0) = fleet.clients[0].clone();
    let (_, _, pw1) = fleet.clients[1].clone();

    first_outcome(broker.addr, &id0, "not-the-password", Some(ca.clone()))
        .await
        .expect_err("wrong password refused");
    // cam-1's valid password under cam-0's id (the session logs in as user == client id).
    first_outcome(broker.addr, &id0, &pw1, Some(ca.clone()))
        .await
        .expect_err("someone else's password refused");
    first_outcome(broker.addr, &id0, &pw0, Some(ca))
        .await
        .expect("the right password connects");
}

#[test]
fn missing_ca_file_is_a_typed_error_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let (id, key, _) = fleet.clients[0].clone();
    let mut o = AgentOptions::new(
        FLEET,
        &id,
        "coordinator",
        fleet.coordinator_key.public_key(),
    );
    o.ca_cert = Some(dir.path().join("absent-ca.pem"));
    let data = synthetic(10, 10, SHAPE, 43);
    match Agent::new(o, key, data.train) {
        Err(EdgeError::Mqtt(MqttError::Tls(m))) => assert!(m.contains("absent-ca.pem"), "{m}"),
        Err(e) => panic!("expected an MQTT TLS error, got {e:?}"),
        Ok(_) => panic!("expected an MQTT TLS error, got an agent"),
    }
}
