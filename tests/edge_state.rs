//! Edges never act on stale or unverifiable state (issue 11, Must 4), over real MQTT: the
//! embedded broker, real edge agents training with libtorch, and either the real coordinator or
//! a scripted one that signs with the fleet's real coordinator key (so a test can put exactly
//! the retained state a hostile camera or a replay would leave, whatever the broker's ACLs).
//! Also the newcomer errors of Must 9 through the real `coevo edge` binary.

mod common;

use coevo_coordinator::Coordinator;
use coevo_edge::{EdgeError, IgnoreReason};
use coevo_models::data::synthetic;
use coevo_models::{Dataset, Student, Weights};
use coevo_mqtt::{Incoming, MqttError, Session, Settings};
use coevo_protocol::chunk::split;
use coevo_protocol::envelope::{self, Kind};
use coevo_protocol::{
    digest, DeltaChunk, DeltaHeader, DownlinkCodec, ModelArch, ModelChunk, ModelRef, PublicKey,
    Receipt, ReceiptOutcome, RoundManifest, Signed, SigningKey, Status, StatusState, Topic,
    TrainTask, UplinkCodec,
};
use common::*;
use rumqttc::QoS;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Model chunk size of the scripted rounds: small, so the model travels in several chunks.
const CHUNK: usize = 16 * 1024;

fn now_ms() -> u64 {
    coevo_edge::state::now_unix_ms()
}

/// The student for [`SHAPE`], encoded and cut into retained chunk messages.
struct Model {
    r: ModelRef,
    wire: Vec<(String, Vec<u8>)>,
}

fn model() -> Model {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net = Student::new(&vs.root(), &SHAPE);
    let bytes = Weights::from_var_store(&vs)
        .encode_model(DownlinkCodec::F32)
        .expect("encodes");
    let d = digest(&bytes);
    let parts = split(&bytes, CHUNK);
    let wire = parts
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let c = ModelChunk {
                digest: d,
                index: i as u32,
                total: parts.len() as u32,
                data: data.to_vec(),
            };
            let t = Topic::ModelChunk {
                digest: d,
                index: i as u32,
            };
            (t.path(FLEET), envelope::encode(Kind::ModelChunk, &c))
        })
        .collect();
    Model {
        r: ModelRef {
            digest: d,
            size: bytes.len() as u64,
            codec: DownlinkCodec::F32,
            chunks: parts.len() as u32,
            arch: ModelArch {
                name: coevo_coordinator::server::STUDENT_ARCH.into(),
                channels: SHAPE.channels as u32,
                height: SHAPE.height as u32,
                width: SHAPE.width as u32,
                classes: SHAPE.classes as u32,
                module: None,
            },
        },
        wire,
    }
}

/// What the scripted coordinator saw.
#[derive(Default)]
struct Seen {
    /// (client, round) of every delta chunk 0 received.
    deltas: Vec<(String, u64)>,
    /// Clients whose retained status said online.
    online: BTreeSet<String>,
}

/// A coordinator played by the test: logged in as `coordinator`, signing with the fleet's
/// coordinator key, answering every verified upload with an `Accepted` receipt.
struct Script {
    client: rumqttc::AsyncClient,
    key: SigningKey,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Script {
    async fn start(fleet: &coevo::provision::Fleet, addr: std::net::SocketAddr) -> Script {
        let mut s = Settings::new(addr.ip().to_string(), addr.port(), "coordinator");
        s.password = Some(fleet.coordinator_password.clone());
        let mut session = Session::start(
            &s,
            vec![
                Topic::all_deltas_filter(FLEET),
                Topic::all_status_filter(FLEET),
            ],
        );
        tokio::time::timeout(Duration::from_secs(30), async {
            while !matches!(session.recv().await, Some(Incoming::Connected { .. })) {}
        })
        .await
        .expect("scripted coordinator connects");
        let client = session.client().clone();
        let keys: HashMap<String, PublicKey> = fleet
            .clients
            .iter()
            .map(|(id, k, _)| (id.clone(), k.public_key()))
            .collect();
        let key = fleet.coordinator_key.clone();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = tokio::spawn(answer(session, key.clone(), keys, seen.clone()));
        Script {
            client,
            key,
            seen,
            task,
        }
    }

    fn manifest(&self, round: u64, m: &Model, deadline_unix_ms: u64) -> Vec<u8> {
        let manifest = RoundManifest {
            fleet: FLEET.into(),
            round,
            coordinator: "coordinator".into(),
            model: m.r.clone(),
            task: TrainTask {
                epochs: 1,
                batch_size: 32,
                lr: 0.05,
                momentum: 0.0,
                prox_mu: 0.0,
            },
            uplink_codec: UplinkCodec::F32,
            max_delta_bytes: 64 << 20,
            chunk_size: CHUNK as u32,
            deadline_unix_ms,
            quorum: 1,
            issued_unix_ms: now_ms(),
        };
        let signed = Signed::sign(Kind::Manifest, &manifest, "coordinator", &self.key);
        envelope::encode(Kind::Manifest, &signed)
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .expect("publish");
    }

    /// Publishes the model's retained chunks, then the manifest.
    async fn round(&self, manifest: Vec<u8>, m: &Model) {
        for (t, bytes) in &m.wire {
            self.publish(t, bytes.clone()).await;
        }
        self.publish(&Topic::RoundCurrent.path(FLEET), manifest)
            .await;
    }

    fn rounds_uploaded(&self) -> Vec<u64> {
        self.seen
            .lock()
            .unwrap()
            .deltas
            .iter()
            .map(|d| d.1)
            .collect()
    }

    async fn wait_online(&self, client: &str) {
        let seen = self.seen.clone();
        wait_until(
            &format!("{client} online"),
            Duration::from_secs(30),
            move || seen.lock().unwrap().online.contains(client),
        )
        .await;
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The scripted coordinator's receive loop: records statuses and uploads, and answers each
/// upload's signed header with a signed `Accepted` receipt.
async fn answer(
    mut session: Session,
    key: SigningKey,
    keys: HashMap<String, PublicKey>,
    seen: Arc<Mutex<Seen>>,
) {
    while let Some(ev) = session.recv().await {
        let Incoming::Publish(p) = ev else { continue };
        match Topic::parse(FLEET, &p.topic) {
            Ok(Topic::Status { client }) => {
                if let Ok(s) = envelope::decode::<Status>(&p.payload, Kind::Status, 4096) {
                    let mut seen = seen.lock().unwrap();
                    if s.state == StatusState::Online {
                        seen.online.insert(client);
                    } else {
                        seen.online.remove(&client);
                    }
                }
            }
            Ok(Topic::DeltaChunk { client, round, .. }) => {
                let Ok(c) = envelope::decode::<DeltaChunk>(&p.payload, Kind::DeltaChunk, 8 << 20)
                else {
                    continue;
                };
                let Some(header) = c.header else { continue };
                let Some(pk) = keys.get(&client) else {
                    continue;
                };
                let Ok(h) =
                    header.verify_from::<DeltaHeader>(Kind::DeltaHeader, &client, pk, 64 * 1024)
                else {
                    continue;
                };
                seen.lock().unwrap().deltas.push((client.clone(), round));
                let receipt = Receipt {
                    fleet: FLEET.into(),
                    round: h.round,
                    client: client.clone(),
                    payload_digest: h.payload_digest,
                    outcome: ReceiptOutcome::Accepted,
                };
                let signed = Signed::sign(Kind::Receipt, &receipt, "coordinator", &key);
                let _ = session
                    .publish(
                        Topic::Receipt { client }.path(FLEET),
                        envelope::encode(Kind::Receipt, &signed),
                        false,
                    )
                    .await;
            }
            _ => {}
        }
    }
}

fn local_data(seed: u64) -> Dataset {
    synthetic(256, 16, SHAPE, seed).train
}

/// The agent's summary once it has ended by itself (its `max_rounds` reached).
async fn finished(
    agent: tokio::task::JoinHandle<Result<coevo_edge::AgentSummary, EdgeError>>,
    limit: Duration,
) -> coevo_edge::AgentSummary {
    tokio::time::timeout(limit, agent)
        .await
        .expect("the agent finishes its rounds in time")
        .expect("agent task")
        .expect("agent ends without error")
}

/// A camera publishes retained garbage on model chunk 0 (does not decode) and a forged,
/// well-formed chunk 1 (wrong chunk count) right after the coordinator: the edge ignores both,
/// counts them, keeps asking with backoff, and completes the round once the coordinator's
/// chunks are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_garbage_on_a_model_chunk_is_refetched_until_the_real_chunk_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let broker = start_broker(&fleet);
    let script = Script::start(&fleet, broker.addr).await;
    let m = model();
    assert!(m.wire.len() >= 3, "the model travels in several chunks");
    script
        .round(script.manifest(1, &m, now_ms() + 600_000), &m)
        .await;
    // The hostile retained copies, as a camera without ACLs could leave them.
    script.publish(&m.wire[0].0, b"garbage".to_vec()).await;
    let forged = ModelChunk {
        digest: m.r.digest,
        index: 1,
        total: 1,
        data: vec![0; 7],
    };
    script
        .publish(&m.wire[1].0, envelope::encode(Kind::ModelChunk, &forged))
        .await;

    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent = spawn_agent_custom(&fleet, 0, broker.addr, local_data(1), &stop_rx, |o| {
        o.max_rounds = Some(1);
    });
    script.wait_online("cam-0").await;
    // Let the edge meet the garbage (a few of its backoff retries) before repairing it; the
    // counters asserted below prove it did.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        script.rounds_uploaded().is_empty(),
        "no upload without a verified model"
    );
    // The coordinator republishes its chunks (as it does on a reconnect or an extension).
    for (t, bytes) in &m.wire[..2] {
        script.publish(t, bytes.clone()).await;
    }
    let summary = finished(agent, Duration::from_secs(120)).await;
    assert_eq!(summary.accepted_rounds, vec![1]);
    assert!(summary.given_up_rounds.is_empty());
    let malformed = summary.ignored[&IgnoreReason::MalformedModelChunk];
    assert!(
        malformed >= 2,
        "the garbage and the forged chunk were both seen and ignored: {:?}",
        summary.ignored
    );
    assert_eq!(script.rounds_uploaded(), vec![1]);
    eprintln!("garbage chunks: {:?}", summary.ignored);
}

/// Retained garbage that nobody repairs: the edge gives up on the round at its deadline plus
/// grace (no stall, no upload) and takes part in the next round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrepaired_model_is_given_up_at_the_deadline_and_the_next_round_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let broker = start_broker(&fleet);
    let script = Script::start(&fleet, broker.addr).await;
    let m = model();
    script
        .round(script.manifest(1, &m, now_ms() + 2_000), &m)
        .await;
    script.publish(&m.wire[0].0, b"garbage".to_vec()).await;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t0 = Instant::now();
    let agent = spawn_agent_custom(&fleet, 0, broker.addr, local_data(8), &stop_rx, |o| {
        o.max_rounds = Some(1);
        o.deadline_grace = Duration::from_secs(1);
    });
    script.wait_online("cam-0").await;
    // Past round 1's deadline + grace (3 s from its publication), with a margin.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        script.rounds_uploaded().is_empty(),
        "nothing without a model"
    );
    // Round 2 comes with a new model (so the garbage on the old chunk 0 plays no part).
    let m2 = {
        tch::manual_seed(9);
        model()
    };
    assert_ne!(m2.r.digest, m.r.digest);
    script
        .round(script.manifest(2, &m2, now_ms() + 600_000), &m2)
        .await;
    let summary = finished(agent, Duration::from_secs(120)).await;
    assert_eq!(summary.given_up_rounds, vec![1]);
    assert_eq!(summary.accepted_rounds, vec![2]);
    assert!(summary.ignored[&IgnoreReason::MalformedModelChunk] >= 1);
    assert_eq!(script.rounds_uploaded(), vec![2]);
    eprintln!(
        "gave up round 1 and completed round 2 in {:?}; ignored {:?}",
        t0.elapsed(),
        summary.ignored
    );
}

/// An edge that completed round 1 restarts while round 1's manifest (validly signed, deadline
/// not yet passed) is still retained, as a replay would leave it: with its `state_dir` it
/// ignores round 1, uploads nothing for it, and takes part in round 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_old_manifest_is_ignored_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let broker = start_broker(&fleet);
    let script = Script::start(&fleet, broker.addr).await;
    let m = model();
    let round1 = script.manifest(1, &m, now_ms() + 600_000);
    script.round(round1.clone(), &m).await;
    let state = dir.path().join("state/cam-0");
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let run = |stop_rx: &tokio::sync::watch::Receiver<bool>| {
        let state = state.clone();
        spawn_agent_custom(&fleet, 0, broker.addr, local_data(2), stop_rx, move |o| {
            o.max_rounds = Some(1);
            o.state_dir = Some(state);
        })
    };
    let first = finished(run(&stop_rx), Duration::from_secs(120)).await;
    assert_eq!(first.accepted_rounds, vec![1]);
    assert_eq!(
        std::fs::read_to_string(state.join(coevo_edge::state::LAST_ROUND_FILE)).unwrap(),
        "1\n"
    );
    script.seen.lock().unwrap().online.clear();

    // The replay: the very same signed bytes, retained again.
    script
        .publish(&Topic::RoundCurrent.path(FLEET), round1)
        .await;
    let second = run(&stop_rx);
    script.wait_online("cam-0").await;
    // Time to (wrongly) fetch, train and upload round 1 again, which it must not do.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        script.rounds_uploaded(),
        vec![1],
        "no second upload for round 1"
    );
    let m2 = model();
    script
        .round(script.manifest(2, &m2, now_ms() + 600_000), &m2)
        .await;
    let second = finished(second, Duration::from_secs(120)).await;
    assert_eq!(second.accepted_rounds, vec![2]);
    assert!(
        second.ignored.get(&IgnoreReason::OldManifest).copied() >= Some(1),
        "{:?}",
        second.ignored
    );
    assert_eq!(script.rounds_uploaded(), vec![1, 2]);
}

/// A validly signed manifest whose deadline passed long ago (an old round left retained) is
/// ignored; the next live round is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_past_its_deadline_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let broker = start_broker(&fleet);
    let script = Script::start(&fleet, broker.addr).await;
    let m = model();
    script
        .round(script.manifest(7, &m, now_ms() - 600_000), &m)
        .await;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent = spawn_agent_custom(&fleet, 0, broker.addr, local_data(3), &stop_rx, |o| {
        o.max_rounds = Some(1);
        o.deadline_grace = Duration::from_secs(30);
    });
    script.wait_online("cam-0").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(script.rounds_uploaded().is_empty(), "nothing for round 7");
    script
        .round(script.manifest(8, &m, now_ms() + 600_000), &m)
        .await;
    let summary = finished(agent, Duration::from_secs(120)).await;
    assert_eq!(summary.accepted_rounds, vec![8]);
    assert!(
        summary.ignored.get(&IgnoreReason::ExpiredManifest).copied() >= Some(1),
        "{:?}",
        summary.ignored
    );
    assert_eq!(script.rounds_uploaded(), vec![8]);
}

/// The real coordinator extends a round below quorum: the extension is re-signed with the new
/// deadline and republished, so an edge that starts after the first deadline (plus its grace)
/// has passed still joins the round instead of dropping it as expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_round_is_re_signed_and_joined_after_the_first_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 2);
    let broker = start_broker(&fleet);
    let data = synthetic(256, 64, SHAPE, 4);
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, broker.addr, out.clone(), 1);
    cfg.round.timeout_s = 3;
    cfg.round.below_quorum = coevo_coordinator::config::BelowQuorum::Extend;
    cfg.round.max_extensions = 40;
    let coordinator = Coordinator::new(
        cfg,
        fleet.coordinator_key.clone(),
        data.test.shallow_clone(),
    )
    .expect("valid config");
    let coord = tokio::spawn(coordinator.run(std::future::pending()));

    // Watch round/current as cam-1 (a camera may read it).
    let (id1, _, pw1) = fleet.clients[1].clone();
    let mut s = Settings::new(broker.addr.ip().to_string(), broker.addr.port(), &id1);
    s.password = Some(pw1);
    let mut watch = Session::start(&s, vec![Topic::RoundCurrent.path(FLEET)]);
    let pk = fleet.coordinator_key.public_key();
    let mut deadlines: Vec<u64> = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while deadlines.len() < 2 {
            if let Some(Incoming::Publish(p)) = watch.recv().await {
                let signed: Signed =
                    envelope::decode(&p.payload, Kind::Manifest, 64 * 1024).expect("decodes");
                let m: RoundManifest = signed
                    .verify_from(Kind::Manifest, "coordinator", &pk, 64 * 1024)
                    .expect("every manifest is signed by the coordinator");
                assert_eq!(m.round, 1);
                if deadlines.last() != Some(&m.deadline_unix_ms) {
                    deadlines.push(m.deadline_unix_ms);
                }
            }
        }
    })
    .await
    .expect("the extension republishes the manifest");
    assert!(
        deadlines[1] >= deadlines[0] + 3000,
        "the extension moved the signed deadline: {deadlines:?}"
    );
    let grace = Duration::from_secs(2);
    let late = deadlines[0] + grace.as_millis() as u64 + 200;
    tokio::time::sleep(Duration::from_millis(late.saturating_sub(now_ms()))).await;

    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent = spawn_agent_custom(&fleet, 0, broker.addr, data.train, &stop_rx, |o| {
        o.max_rounds = Some(1);
        o.deadline_grace = grace;
    });
    let summary = finished(agent, Duration::from_secs(120)).await;
    assert_eq!(summary.accepted_rounds, vec![1]);
    let reports = tokio::time::timeout(Duration::from_secs(60), coord)
        .await
        .expect("coordinator finishes")
        .unwrap()
        .unwrap();
    assert_eq!(reports[0].outcome, "completed");
    assert_eq!(reports[0].accepted, 1);
}

/// A wrong password: the edge says the broker refused its credentials and stops after
/// `max_auth_refusals`; the coordinator says the same at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_stops_edge_and_coordinator_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let broker = start_broker(&fleet);
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t0 = Instant::now();
    let agent = spawn_agent_custom(&fleet, 0, broker.addr, local_data(5), &stop_rx, |o| {
        o.password = Some("not-the-password".into());
        o.max_auth_refusals = 2;
    });
    let result = tokio::time::timeout(Duration::from_secs(60), agent)
        .await
        .expect("the edge stops by itself")
        .unwrap();
    match result {
        Err(EdgeError::Mqtt(MqttError::AuthRefused(m))) => {
            let text = EdgeError::Mqtt(MqttError::AuthRefused(m)).to_string();
            assert!(text.contains("broker refused our credentials"), "{text}");
        }
        other => panic!("expected an auth refusal, got {other:?}"),
    }
    eprintln!("edge stopped after 2 refusals in {:?}", t0.elapsed());

    let data = synthetic(20, 20, SHAPE, 6);
    let mut cfg = coordinator_config(&fleet, broker.addr, dir.path().join("out"), 1);
    cfg.broker.password = Some("not-the-password".into());
    let t0 = Instant::now();
    let (coord, _events) = spawn_coordinator(cfg, &fleet, &data.test);
    match tokio::time::timeout(Duration::from_secs(30), coord)
        .await
        .expect("the coordinator stops by itself")
        .unwrap()
    {
        Err(e @ coevo_coordinator::CoordinatorError::Mqtt(MqttError::AuthRefused(_))) => {
            assert!(
                e.to_string().contains("broker refused our credentials"),
                "{e}"
            )
        }
        other => panic!("expected an auth refusal, got {other:?}"),
    }
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "said at once, not after the connect timeout"
    );
}

/// Runs `coevo edge --config edge.toml` in `dir` and returns (success, stderr + stdout).
fn coevo_edge(dir: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(["edge", "--config", "edge.toml"])
        .current_dir(dir)
        .env("RUST_LOG", "info,rumqttc=warn")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run coevo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    (out.status.success(), text)
}

/// The errors a newcomer meets first, through the real binary: a missing key file and a
/// missing dataset are named as missing (not "Odd number of digits"), and a wrong password is
/// named as such and ends the process.
#[test]
fn edge_cli_names_missing_files_and_refused_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fleet = fleet(&dir.join("fleet"), 1);
    let broker = start_broker(&fleet);
    common::write_idx(&dir.join("data"), &synthetic(64, 16, SHAPE, 7));
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(dir.join("keys/cam-0.pk8"), fleet.clients[0].1.pkcs8()).unwrap();
    std::fs::write(
        dir.join("keys/coordinator.pub"),
        format!("{}\n", fleet.coordinator_key.public_key()),
    )
    .unwrap();
    let config = |coordinator_key: &str, data: &str, password: &str| {
        std::fs::write(
            dir.join("edge.toml"),
            format!(
                "fleet = \"{FLEET}\"\nclient_id = \"cam-0\"\nkey = \"keys/cam-0.pk8\"\n\
                 coordinator_key = \"{coordinator_key}\"\nmax_rounds = 1\nmax_auth_refusals = 2\n\
                 [broker]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"{password}\"\n\
                 [data]\npath = \"{data}\"\npartition = \"iid:1\"\npart = \"0\"\n",
                broker.addr.port()
            ),
        )
        .unwrap()
    };

    config("keys/missing.pub", "data", "x");
    let (ok, text) = coevo_edge(dir);
    assert!(!ok);
    assert!(
        text.contains("missing.pub") && text.contains("No such file"),
        "{text}"
    );
    assert!(!text.contains("Odd number of digits"), "{text}");

    config("keys/coordinator.pub", "no-such-dataset", "x");
    let (ok, text) = coevo_edge(dir);
    assert!(!ok);
    assert!(
        text.contains("no-such-dataset") && text.contains("No such file"),
        "{text}"
    );

    config("keys/coordinator.pub", "data", "not-the-password");
    let t0 = Instant::now();
    let (ok, text) = coevo_edge(dir);
    assert!(!ok, "exits after max_auth_refusals: {text}");
    assert!(text.contains("broker refused our credentials"), "{text}");
    eprintln!(
        "coevo edge with a wrong password exited after {:?}",
        t0.elapsed()
    );
}
