//! A hostile camera against a running fleet (issue #11): one registered camera, `mallory`,
//! logged in with its own id and password, plays every attack we know of while three honest
//! cameras train, on the embedded broker and on Mosquitto with the exported configuration.
//!
//! Each scenario asserts what an operator needs to be true: the round completes with every
//! honest delta, no honest camera is blamed in the report, the retained manifest and model are
//! byte for byte what the coordinator published, mallory never reads another camera's traffic,
//! and the coordinator holds at most one bounded transfer for mallory whatever it floods.
//!
//! mallory talks raw MQTT ([`Raw`]): no reconnects, no protocol library between it and the
//! broker, so what it gets is what the broker let through.

mod common;

use coevo_coordinator::RoundEvent;
use coevo_models::data::synthetic;
use coevo_models::partition::{partition, PartitionSpec};
use coevo_protocol::envelope::{self, Kind};
use coevo_protocol::{DeltaChunk, Topic};
use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// What a raw connection saw: every publish (topic → last payload and how many arrived) and
/// whether the broker has closed it.
#[derive(Default)]
struct Seen {
    messages: BTreeMap<String, (Vec<u8>, usize)>,
}

/// A hostile client's single MQTT connection.
struct Raw {
    client: AsyncClient,
    seen: Arc<Mutex<Seen>>,
    /// `Some(true)` once CONNACK accepted, `Some(false)` once refused or closed.
    state: watch::Receiver<Option<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Raw {
    /// Connects with MQTT client id `client_id`, user `user` and `password`; returns once the
    /// broker answered (accepted or not: check [`Raw::is_open`]).
    async fn connect(addr: SocketAddr, client_id: &str, user: &str, password: &str) -> Raw {
        let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        opts.set_credentials(user, password)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(4 << 20, 4 << 20)
            .set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (tx, state) = watch::channel(None);
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = tx.send(Some(true));
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let mut seen = s.lock().unwrap();
                        let e = seen
                            .messages
                            .entry(p.topic.clone())
                            .or_insert((Vec::new(), 0));
                        e.0 = p.payload.to_vec();
                        e.1 += 1;
                    }
                    Ok(_) => {}
                    // No reconnects: a hostile client that was thrown out stays out.
                    Err(_) => {
                        let _ = tx.send(Some(false));
                        return;
                    }
                }
            }
        });
        let mut raw = Raw {
            client,
            seen,
            state,
            task,
        };
        tokio::time::timeout(Duration::from_secs(20), raw.state.wait_for(|s| s.is_some()))
            .await
            .expect("the broker answers a CONNECT")
            .expect("event loop alive");
        raw
    }

    fn is_open(&self) -> bool {
        *self.state.borrow() == Some(true)
    }

    /// Waits up to `limit` for the broker to close the connection; true if it did.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.state.wait_for(|s| *s == Some(false)))
            .await
            .is_ok()
    }

    async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        // A broker that closes the connection makes later publishes fail: that is the point.
        let _ = self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await;
    }

    async fn subscribe(&self, filter: &str) {
        let _ = self.client.subscribe(filter, QoS::AtLeastOnce).await;
    }

    fn topics(&self) -> Vec<String> {
        self.seen.lock().unwrap().messages.keys().cloned().collect()
    }

    fn payload(&self, topic: &str) -> Option<Vec<u8>> {
        self.seen
            .lock()
            .unwrap()
            .messages
            .get(topic)
            .map(|m| m.0.clone())
    }

    async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

/// The fleet's retained round: the manifest and every model chunk it names, as a camera reads
/// them on `addr` right now.
async fn retained_round(addr: SocketAddr, id: &str, pw: &str) -> BTreeMap<String, Vec<u8>> {
    let mut raw = Raw::connect(addr, id, id, pw).await;
    assert!(raw.is_open(), "{id} may log in");
    let manifest_topic = Topic::RoundCurrent.path(FLEET);
    raw.subscribe(&manifest_topic).await;
    raw.subscribe(&format!("coevo/v1/{FLEET}/model/+/+")).await;
    let manifest = wait_for(&mut raw, |r| r.payload(&manifest_topic)).await;
    let signed: coevo_protocol::Signed =
        envelope::decode(&manifest, Kind::Manifest, 1 << 20).expect("retained manifest decodes");
    let m: coevo_protocol::RoundManifest =
        envelope::decode(&signed.body, Kind::Manifest, 1 << 20).expect("manifest body decodes");
    let chunk_topics: Vec<String> = (0..m.model.chunks)
        .map(|i| {
            Topic::ModelChunk {
                digest: m.model.digest,
                index: i,
            }
            .path(FLEET)
        })
        .collect();
    wait_for(&mut raw, |r| {
        let t = r.topics();
        chunk_topics.iter().all(|c| t.contains(c)).then_some(())
    })
    .await;
    let mut out = BTreeMap::new();
    out.insert(manifest_topic.clone(), manifest);
    for c in &chunk_topics {
        out.insert(c.clone(), raw.payload(c).expect("chunk seen"));
    }
    raw.close().await;
    out
}

async fn wait_for<T>(raw: &mut Raw, mut f: impl FnMut(&Raw) -> Option<T>) -> T {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(v) = f(raw) {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting on a retained message"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The broker under attack.
enum Broker {
    Embedded(coevo_broker::BrokerHandle),
    Mosquitto(Mosquitto),
}

impl Broker {
    fn addr(&self) -> SocketAddr {
        match self {
            Broker::Embedded(h) => h.addr,
            Broker::Mosquitto(m) => m.addr,
        }
    }
}

/// A valid-looking delta chunk envelope from `client` (no header: it never completes).
fn junk_chunk(client: &str, round: u64, index: u32, total: u32, bytes: usize) -> (String, Vec<u8>) {
    let c = DeltaChunk {
        client: client.into(),
        round,
        index,
        total,
        header: None,
        data: vec![0x5a; bytes],
    };
    (
        Topic::DeltaChunk {
            client: client.into(),
            round,
            index,
        }
        .path(FLEET),
        envelope::encode(Kind::DeltaChunk, &c),
    )
}

/// Publishes one message on a connection of its own, then hangs up: the embedded broker
/// closes a connection at its first refused publish, so each attack gets a fresh one.
async fn attack_once(addr: SocketAddr, pw: &str, topic: String, payload: Vec<u8>, retain: bool) {
    let raw = Raw::connect(addr, "mallory", "mallory", pw).await;
    assert!(
        raw.is_open(),
        "mallory is a registered camera and may log in"
    );
    raw.publish(topic, payload, retain).await;
    raw.close().await;
}

const HONEST: usize = 3;

/// Plays every attack of issue #11 against one round on `mosquitto` or the embedded broker.
async fn play(mosquitto: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut names = ids(HONEST);
    names.push("mallory".into());
    init_logs();
    let fleet = coevo::provision::provision(dir.path(), "coordinator", &names).unwrap();
    let broker = if mosquitto {
        let addr = coevo_broker::free_local_addr().unwrap();
        let mdir = dir.path().join("mosquitto");
        export_mosquitto(&fleet, addr, &mdir, None);
        Broker::Mosquitto(start_mosquitto(&mdir, addr, dir.path().join("mosquitto.log")).await)
    } else {
        Broker::Embedded(start_broker(&fleet))
    };
    let addr = broker.addr();
    let mallory_pw = fleet.clients[HONEST].2.clone();

    let data = synthetic(600, 200, SHAPE, 31);
    let parts = partition(
        &data.train.labels_vec(),
        None,
        &PartitionSpec::Iid { clients: HONEST },
        5,
    )
    .unwrap();
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    // mallory is registered and never uploads a valid delta: the round closes at its deadline
    // with the honest quorum.
    cfg.round.quorum = HONEST as u32;
    cfg.round.timeout_s = 25;
    cfg.transfer.max_delta_bytes = 2 << 20;
    let (coord, mut events) = spawn_coordinator(cfg, &fleet, &data.test);
    loop {
        match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
            Ok(Some(RoundEvent::Started { round: 1, .. })) => break,
            Ok(Some(_)) => {}
            other => panic!("round 1 never started: {other:?}"),
        }
    }
    let published = retained_round(addr, "mallory", &mallory_pw).await;
    let model_chunk0 = published
        .keys()
        .find(|t| t.contains("/model/"))
        .cloned()
        .expect("a model chunk is retained");

    // 1. Read everyone's traffic: wildcard and shared subscriptions.
    let spy = Raw::connect(addr, "mallory", "mallory", &mallory_pw).await;
    spy.subscribe("coevo/v1/#").await;
    let spy2 = Raw::connect(addr, "mallory", "mallory", &mallory_pw).await;
    spy2.subscribe(&format!("coevo/v1/{FLEET}/delta/+/+/+"))
        .await;

    // 2. Take the coordinator's client id with mallory's own credentials.
    let takeover = Raw::connect(addr, "coordinator", "mallory", &mallory_pw).await;

    // 3. Retained garbage where cameras look for the round, and forged traffic for others.
    let garbage = b"not a coevo message".to_vec();
    for (topic, retain) in [
        (model_chunk0.clone(), true),
        (Topic::RoundCurrent.path(FLEET), true),
        (
            Topic::DeltaChunk {
                client: "cam-1".into(),
                round: 1,
                index: 0,
            }
            .path(FLEET),
            false,
        ),
        (
            Topic::Receipt {
                client: "cam-0".into(),
            }
            .path(FLEET),
            false,
        ),
        (
            Topic::Status {
                client: "cam-2".into(),
            }
            .path(FLEET),
            true,
        ),
        (Topic::Report { round: 1 }.path(FLEET), true),
    ] {
        attack_once(addr, &mallory_pw, topic, garbage.clone(), retain).await;
    }

    // 4. Flood its own delta topic with chunks of made-up rounds, and the open round with
    //    more than its budget: none of this may cost honest cameras their slots.
    let flood = Raw::connect(addr, "mallory", "mallory", &mallory_pw).await;
    for i in 0..200u32 {
        let round = if i % 4 == 0 {
            1
        } else {
            2 + u64::from(i) * 7919
        };
        // Within the chunk-count limit, so each message reaches reassembly.
        let (t, p) = junk_chunk("mallory", round, i % 8, 8, 32 * 1024);
        flood.publish(t, p, false).await;
    }
    flood.close().await;

    // Honest cameras start after all that, so they see whatever stuck to the retained topics.
    let (stop_tx, stop_rx) = watch::channel(false);
    let agents: Vec<_> = parts
        .iter()
        .enumerate()
        .map(|(i, (_, idx))| {
            spawn_agent_for(&fleet, i, addr, data.train.subset(idx), &stop_rx, Some(1))
        })
        .collect();
    let report = loop {
        match tokio::time::timeout(Duration::from_secs(120), events.recv()).await {
            Ok(Some(RoundEvent::Finished(r))) => break *r,
            Ok(Some(_)) => {}
            other => panic!("round 1 never finished: {other:?}"),
        }
    };
    let kind = if mosquitto { "mosquitto" } else { "embedded" };
    println!(
        "hostile[{kind}]: outcome={} accepted={}/{HONEST} rejected={:?} excluded={:?}",
        report.outcome, report.accepted, report.rejected, report.excluded
    );
    for a in agents {
        let s = tokio::time::timeout(Duration::from_secs(30), a)
            .await
            .expect("agent ends after its receipt")
            .unwrap()
            .unwrap();
        assert_eq!(
            s.accepted_rounds,
            vec![1],
            "every honest camera's delta is accepted"
        );
    }
    drop(stop_tx);
    coord.await.unwrap().unwrap();

    // The round completed with every honest delta, merged exactly.
    assert_eq!(report.outcome, "completed", "{report:?}");
    assert_eq!(report.accepted, HONEST);
    let merged = assert_merge_consistent(&out, 1);
    assert_eq!(merged.len(), HONEST);
    // No honest camera is blamed, not even as late; mallory is listed once per reason, not
    // once per message.
    let blamed = report
        .rejected
        .iter()
        .chain(&report.late)
        .map(|x| &x.client)
        .chain(report.excluded.iter().map(|x| &x.client));
    for c in blamed {
        assert_eq!(c, "mallory", "an honest camera was blamed: {report:?}");
    }
    let mut codes: Vec<_> = report
        .rejected
        .iter()
        .map(|x| x.reason.split(':').next().unwrap_or_default())
        .collect();
    let n = codes.len();
    codes.sort();
    codes.dedup();
    assert_eq!(
        codes.len(),
        n,
        "one entry per reason: {:?}",
        report.rejected
    );
    assert!(
        n <= 4,
        "mallory's flood is summarised: {:?}",
        report.rejected
    );
    let counted: u64 = report
        .rejected
        .iter()
        .chain(&report.late)
        .map(|x| x.count)
        .sum();
    assert!(
        counted >= 100,
        "the flood's 200 chunks are counted: {:?} {:?}",
        report.rejected,
        report.late
    );
    // mallory never held more than one upload's worth of the coordinator's memory.
    println!("hostile[{kind}]: reassembly {:?}", report.reassembly);
    assert!(
        report.reassembly.peak_client_bytes <= 2 << 20,
        "{:?}",
        report.reassembly
    );

    // The retained round is byte for byte what the coordinator published.
    // (The round is over; its manifest and model stay retained until the next round.)
    let after = retained_round(addr, "cam-0", &fleet.clients[0].2).await;
    assert_eq!(published, after, "retained manifest or model changed");

    // mallory read nothing but what every camera may read.
    for raw in [&spy, &spy2, &takeover] {
        for t in raw.topics() {
            let own = t.ends_with("/receipt/mallory");
            let public = t == Topic::RoundCurrent.path(FLEET) || t.contains("/model/");
            assert!(own || public, "mallory read {t}");
        }
    }
    match &broker {
        Broker::Mosquitto(m) => {
            // use_username_as_clientid: mallory's connection is "mallory", whatever it asked.
            let log = m.log();
            assert!(
                !log.contains("Client coordinator already connected"),
                "mallory took over the coordinator's session:\n{log}"
            );
        }
        Broker::Embedded(h) => {
            // The embedded broker refuses a client id that is not the user name outright.
            assert!(!takeover.is_open());
            let _ = h;
        }
    }
    spy.close().await;
    spy2.close().await;
    takeover.close().await;

    // The broker's memory stayed bounded through the attacks.
    match &broker {
        Broker::Mosquitto(m) => {
            let hwm = vm_hwm_kib(m.child.id()).expect("mosquitto's /proc status");
            println!("hostile[{kind}]: mosquitto peak RSS {} KiB", hwm);
            assert!(hwm < 64 * 1024, "mosquitto grew to {hwm} KiB");
        }
        Broker::Embedded(h) => {
            let s = h.stats();
            println!("hostile[{kind}]: broker {s:?}");
            // Two wildcard subscriptions, the forged publishes, the borrowed client id: each
            // refused and counted.
            assert!(s.acl_refused_subscribe >= 2, "{s:?}");
            assert!(s.acl_refused_publish >= 6, "{s:?}");
            assert!(s.client_id_mismatch >= 1, "{s:?}");
        }
    }

    // Revocation: the operator removes mallory; its open connection is closed and it cannot
    // come back. The embedded broker re-reads the credential file by itself; Mosquitto gets a
    // re-export and a SIGHUP, as `coevo fleet remove` tells the operator.
    let mut lurker = Raw::connect(addr, "mallory", "mallory", &mallory_pw).await;
    assert!(lurker.is_open(), "mallory is still registered");
    lurker.subscribe(&Topic::RoundCurrent.path(FLEET)).await;
    let out = Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(["fleet", "remove", "mallory", "--registry"])
        .arg(&fleet.registry_path)
        .arg("--credentials")
        .arg(&fleet.credentials_path)
        .output()
        .expect("coevo runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = std::time::Instant::now();
    if let Broker::Mosquitto(m) = &broker {
        export_mosquitto(&fleet, addr, &dir.path().join("mosquitto"), None);
        let hup = Command::new("kill")
            .args(["-HUP", &m.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(hup.success());
    }
    let closed = lurker.closed_within(Duration::from_secs(10)).await;
    println!(
        "hostile[{kind}]: after `coevo fleet remove mallory`: open connection {} after {:.2} s",
        if closed { "closed" } else { "still open" },
        t0.elapsed().as_secs_f64()
    );
    assert!(closed, "the removed camera's connection stays open");
    let again = Raw::connect(addr, "mallory", "mallory", &mallory_pw).await;
    assert!(!again.is_open(), "a removed camera logged in again");
}

/// Peak resident set of process `pid` (VmHWM), in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_camera_on_the_embedded_broker() {
    play(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_camera_on_mosquitto_with_the_exported_config() {
    play(true).await;
}
