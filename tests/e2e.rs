//! End to end: the real embedded broker, the coordinator and 3 edge agents over MQTT on
//! 127.0.0.1, libtorch training, Ed25519-signed deltas, 2 FedAvg rounds on small synthetic data.
//! A fourth registered identity plays the attacker in round 2: a delta signed with a key the
//! registry doesn't know, a replay of a real round-1 delta, a truncated delta, and a delta for a
//! client id that isn't registered. Each must be rejected with its reason while the round
//! still completes with the honest clients.

use coevo::provision::provision;
use coevo_broker::BrokerConfig;
use coevo_coordinator::config::{BelowQuorum, BrokerEndpoint, CoordinatorConfig, RoundPolicy};
use coevo_coordinator::{Coordinator, RoundEvent};
use coevo_edge::{Agent, AgentOptions};
use coevo_models::data::synthetic;
use coevo_models::partition::{partition, PartitionSpec};
use coevo_models::{DataShape, WeightCodec as ModelCodec, Weights};
use coevo_mqtt::{Incoming, Session, Settings};
use coevo_protocol::envelope::{self, Kind};
use coevo_protocol::{digest, DeltaChunk, DeltaHeader, LocalMetrics, Signed, SigningKey, Topic};
use std::time::Duration;

const FLEET: &str = "e2e";

async fn wait_connected(s: &mut Session) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(Incoming::Connected { .. }) = s.recv().await {
                return;
            }
        }
    })
    .await
    .expect("observer connects to the broker");
}

fn chunk_message(client: &str, round: u64, header: Signed, payload: Vec<u8>) -> (String, Vec<u8>) {
    let c = DeltaChunk {
        client: client.into(),
        round,
        index: 0,
        total: 1,
        header: Some(header),
        data: payload,
    };
    (
        Topic::DeltaChunk {
            client: client.into(),
            round,
            index: 0,
        }
        .path(FLEET),
        envelope::encode(Kind::DeltaChunk, &c),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rounds_with_attacks_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let honest: Vec<String> = (0..3).map(|i| format!("cam-{i}")).collect();
    let mut ids = honest.clone();
    ids.push("mallory".into());
    let fleet = provision(dir.path(), "coordinator", &ids).unwrap();

    // mallory holds a coordinator-role account (a compromised collector): the broker's topic
    // ACLs let it read and write anywhere under the root, so only the coordinator's own checks
    // stand between it and the model. (A mere camera cannot even try: broker/tests/acl.rs.)
    let broker = coevo_broker::start(BrokerConfig {
        listen: coevo_broker::free_local_addr().unwrap(),
        credentials: Some(fleet.credentials_path.clone()),
        acl: coevo_broker::AclConfig {
            coordinators: vec!["coordinator".into(), "mallory".into()],
            ..Default::default()
        },
        ..BrokerConfig::default()
    })
    .unwrap();
    let addr = broker.addr;

    // The attacker's own connection: it watches cam-0's round-1 upload to replay it later.
    let (_, mallory_key, mallory_pw) = fleet.clients[3].clone();
    let mut settings = Settings::new(addr.ip().to_string(), addr.port(), "mallory");
    settings.password = Some(mallory_pw);
    let replay_filter = format!("coevo/v1/{FLEET}/delta/cam-0/1/+");
    let mut mallory = Session::start(&settings, vec![replay_filter]);
    wait_connected(&mut mallory).await;

    let shape = DataShape {
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };
    let data = synthetic(900, 300, shape, 7);
    let parts = partition(
        &data.train.labels_vec(),
        None,
        &PartitionSpec::Iid { clients: 3 },
        3,
    )
    .unwrap();

    let coordinator_public = fleet.coordinator_key.public_key();
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut agents = Vec::new();
    for (i, (_, idx)) in parts.iter().enumerate() {
        let (id, key, pw) = fleet.clients[i].clone();
        let mut o = AgentOptions::new(FLEET, &id, "coordinator", coordinator_public);
        o.broker_host = addr.ip().to_string();
        o.broker_port = addr.port();
        o.password = Some(pw);
        o.retry_wait = Duration::from_secs(3);
        o.max_rounds = Some(2);
        let agent = Agent::new(o, key, data.train.subset(idx)).unwrap();
        let mut rx = stop_rx.clone();
        agents.push(tokio::spawn(agent.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        })));
    }

    let out = dir.path().join("out");
    let cfg = CoordinatorConfig {
        fleet: FLEET.into(),
        registry: fleet.registry_path.clone(),
        out: out.clone(),
        rounds: 2,
        broker: BrokerEndpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            password: Some(fleet.coordinator_password.clone()),
            connect_timeout_s: 20,
            ..Default::default()
        },
        // mallory never sends a valid delta, so every round runs to its deadline: the attacks
        // land while the round is open, deterministically.
        round: RoundPolicy {
            quorum: 3,
            timeout_s: 8,
            below_quorum: BelowQuorum::Skip,
            max_extensions: 0,
        },
        mode: coevo_coordinator::coevolve::Mode::Fedavg,
        // Small uploads: mallory's forged deltas below fit in one chunk.
        transfer: coevo_coordinator::config::TransferConfig {
            uplink_codec: coevo_protocol::UplinkCodec::Int8,
            ..Default::default()
        },
        ..CoordinatorConfig::default()
    };
    let coordinator = Coordinator::new(cfg, fleet.coordinator_key.clone(), data.test).unwrap();
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let coord = tokio::spawn(coordinator.with_events(tx).run(std::future::pending()));

    let mut captured: Vec<(String, Vec<u8>)> = Vec::new();
    let mut round1_model: Option<Weights> = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(120), events.recv())
        .await
        .expect("coordinator makes progress")
    {
        // Collect what mallory saw of cam-0's round-1 upload.
        while let Some(inc) = mallory.try_recv() {
            if let Incoming::Publish(p) = inc {
                captured.push((p.topic.clone(), p.payload.to_vec()));
            }
        }
        match ev {
            RoundEvent::Finished(r) if r.round == 1 => {
                let path = out.join("checkpoints/student-0001.safetensors");
                let bytes = std::fs::read(path).unwrap();
                round1_model = Some(Weights::decode(&bytes, ModelCodec::F32, 1 << 24).unwrap());
            }
            RoundEvent::Started { round: 2, .. } => {
                assert!(!captured.is_empty(), "observed cam-0's round-1 delta");
                let layout = round1_model.as_ref().unwrap();
                let payload = coevo_protocol::UplinkCodec::Int8
                    .encode(&layout.zeros_like().to_named())
                    .unwrap();
                let downlink = coevo_coordinator::config::TransferConfig::default().downlink_codec;
                let base = digest(&layout.encode_model(downlink).unwrap());
                let header = |len: u64, key: &SigningKey, id: &str| {
                    let h = DeltaHeader {
                        fleet: FLEET.into(),
                        round: 2,
                        client: id.into(),
                        base_digest: base,
                        samples: 100,
                        metrics: LocalMetrics::default(),
                        codec: coevo_protocol::UplinkCodec::Int8,
                        payload_digest: digest(&payload),
                        payload_len: len,
                        chunks: 1,
                    };
                    Signed::sign(Kind::DeltaHeader, &h, id, key)
                };
                let stranger = SigningKey::generate().unwrap();
                let mut attacks = vec![
                    // 1. signed with a key the registry doesn't know
                    chunk_message(
                        "mallory",
                        2,
                        header(payload.len() as u64, &stranger, "mallory"),
                        payload.clone(),
                    ),
                    // 2. truncated: the signed header promises more bytes than arrive
                    chunk_message(
                        "mallory",
                        2,
                        header(payload.len() as u64, &mallory_key, "mallory"),
                        payload[..payload.len() / 2].to_vec(),
                    ),
                    // 3. a client id that is not in the registry
                    chunk_message(
                        "intruder",
                        2,
                        header(payload.len() as u64, &stranger, "intruder"),
                        payload.clone(),
                    ),
                ];
                // 4. cam-0's real round-1 delta, replayed verbatim into round 2
                attacks.extend(captured.iter().cloned());
                // 5. a message far over the chunk size, yet under the broker's payload limit:
                //    the coordinator must read it and reject it, not lose its connection
                //    (a persistent session would be handed the same message again and again).
                attacks.push((
                    Topic::DeltaChunk {
                        client: "mallory".into(),
                        round: 2,
                        index: 0,
                    }
                    .path(FLEET),
                    vec![0x5a; 1_000_000],
                ));
                for (topic, bytes) in attacks {
                    mallory.publish(topic, bytes, false).await.unwrap();
                }
            }
            _ => {}
        }
    }
    let reports = coord.await.unwrap().unwrap();
    // Each agent ends by itself once it holds its round-2 receipt (max_rounds = 2).
    for a in agents {
        let summary = tokio::time::timeout(Duration::from_secs(30), a)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            summary.accepted_rounds,
            vec![1, 2],
            "every honest delta accepted"
        );
    }

    assert_eq!(reports.len(), 2);
    for r in &reports {
        assert!(out
            .join(format!("reports/round-{:04}.json", r.round))
            .is_file());
        assert_eq!(r.outcome, "completed");
        assert_eq!(
            r.accepted, 3,
            "round {} accepted the 3 honest deltas",
            r.round
        );
        let mut clients: Vec<&str> = r.clients.iter().map(|c| c.client.as_str()).collect();
        clients.sort();
        assert_eq!(clients, vec!["cam-0", "cam-1", "cam-2"]);
        assert!(r.bytes_up > 0 && r.bytes_down > 0);
        assert!(r.teacher.test_accuracy.is_none());
    }
    let (a1, a2) = (
        reports[0].student.test_accuracy.unwrap(),
        reports[1].student.test_accuracy.unwrap(),
    );
    let chance = 1.0 / shape.classes as f64;
    assert!(a1 > chance + 0.2, "round 1 learned something: {a1}");
    assert!(
        a2 >= a1 - 0.02 && a2 > chance + 0.3,
        "accuracy rose: {a1} -> {a2}"
    );

    assert!(reports[0].rejected.is_empty(), "{:?}", reports[0].rejected);
    let rejected = &reports[1].rejected;
    let has = |client: &str, code: &str| {
        rejected
            .iter()
            .any(|x| x.client == client && x.reason.starts_with(code))
    };
    assert!(has("mallory", "bad-signature"), "{rejected:?}");
    assert!(has("mallory", "length-mismatch"), "{rejected:?}");
    assert!(has("intruder", "unknown-client"), "{rejected:?}");
    assert!(has("mallory", "malformed"), "{rejected:?}");
    // cam-0's round-1 delta replayed into round 2 is indistinguishable from an honest late
    // retry: it gets its round-1 receipt again (it is in round 1's journal), and cam-0 is not
    // blamed.
    assert!(
        !rejected.iter().any(|x| x.client == "cam-0"),
        "{rejected:?}"
    );
    assert!(reports[1].resent >= 1, "replay answered with its receipt");
    assert_eq!(rejected.len(), 4, "{rejected:?}");
}
