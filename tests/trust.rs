//! Trust: a round manifest (and model) published by anyone but the pinned coordinator is never
//! trained on; the agent logs and counts it, and still takes part in the real round.

mod common;

use coevo_coordinator::Coordinator;
use coevo_models::data::synthetic;
use coevo_protocol::envelope::{encode, Kind};
use coevo_protocol::*;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_manifest_is_never_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 2);
    // cam-1 turns attacker with a coordinator-role broker account (or a broker without topic
    // ACLs): it may publish the manifest and models, but it has not the coordinator's key.
    // (With a camera's account the broker refuses those publishes: broker/tests/acl.rs.)
    let broker = start_broker_with(
        &fleet,
        coevo_broker::BrokerConfig {
            acl: coevo_broker::AclConfig {
                coordinators: vec!["coordinator".into(), "cam-1".into()],
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let addr = broker.addr;
    let shape = SHAPE;
    let data = synthetic(300, 100, shape, 31);

    // cam-1 turns attacker: it has broker credentials, but not the coordinator's key.
    let (id, _, pw) = fleet.clients[1].clone();
    let mut s = coevo_mqtt::Settings::new(addr.ip().to_string(), addr.port(), id);
    s.password = Some(pw);
    // It listens on round/current so the test knows its forgery is retained before cam-0 starts.
    let mut attacker = coevo_mqtt::Session::start(&s, vec![Topic::RoundCurrent.path(FLEET)]);
    let forger = SigningKey::generate().unwrap();
    let model = b"a model the attacker wants trained".to_vec();
    let manifest = RoundManifest {
        fleet: FLEET.into(),
        round: 7,
        coordinator: "coordinator".into(),
        model: ModelRef {
            digest: digest(&model),
            size: model.len() as u64,
            codec: DownlinkCodec::F32,
            chunks: 1,
            arch: ModelArch {
                name: "student-cnn-v1".into(),
                channels: 1,
                height: 28,
                width: 28,
                classes: 10,
                module: None,
            },
        },
        task: TrainTask {
            epochs: 1,
            batch_size: 32,
            lr: 0.05,
            momentum: 0.9,
            prox_mu: 0.0,
        },
        uplink_codec: UplinkCodec::F32,
        max_delta_bytes: 1 << 24,
        chunk_size: 1 << 18,
        deadline_unix_ms: u64::MAX,
        quorum: 1,
        issued_unix_ms: 0,
    };
    // Signed in the coordinator's name, with the wrong key.
    let forged = Signed::sign(Kind::Manifest, &manifest, "coordinator", &forger);
    let chunk = ModelChunk {
        digest: digest(&model),
        index: 0,
        total: 1,
        data: model,
    };
    attacker
        .publish(
            Topic::ModelChunk {
                digest: chunk.digest,
                index: 0,
            }
            .path(FLEET),
            encode(Kind::ModelChunk, &chunk),
            true,
        )
        .await
        .unwrap();
    attacker
        .publish(
            Topic::RoundCurrent.path(FLEET),
            encode(Kind::Manifest, &forged),
            true,
        )
        .await
        .unwrap();

    let forged_bytes = encode(Kind::Manifest, &forged);
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(m) = attacker.recv().await {
            if let coevo_mqtt::Incoming::Publish(p) = m {
                if p.payload[..] == forged_bytes[..] {
                    return;
                }
            }
        }
    })
    .await
    .expect("the forged manifest is retained on the broker");

    // cam-0 comes up and finds the forged manifest retained.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent = spawn_agent_for(
        &fleet,
        0,
        addr,
        data.train.shallow_clone(),
        &stop_rx,
        Some(1),
    );

    // Then the real coordinator runs one round (cam-1, the attacker, never uploads), once cam-0
    // had time to subscribe and read the forgery (else the real manifest replaces it first).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    cfg.round.timeout_s = 5;
    let reports = Coordinator::new(
        cfg,
        fleet.coordinator_key.clone(),
        data.test.shallow_clone(),
    )
    .unwrap()
    .run(std::future::pending())
    .await
    .unwrap();
    // The agent ends by itself once it holds its receipt (max_rounds = 1).
    let summary = tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(stop_tx);
    assert!(
        summary.ignored_messages >= 1,
        "the forged manifest was seen and ignored"
    );
    assert_eq!(
        summary.accepted_rounds,
        vec![1],
        "trained only on the real round"
    );
    assert!(summary.rejected_rounds.is_empty());
    assert_eq!(reports[0].accepted, 1);
    assert!(reports[0].rejected.is_empty(), "{:?}", reports[0].rejected);
}
