//! The coordinator's collect path against hostile and unlucky clients, over real MQTT (the
//! embedded broker on 127.0.0.1) with real signatures. The cameras here are scripted: they
//! connect with their own credentials, read the signed manifest and publish signed deltas
//! (constant-valued, so no training is needed), which lets each test play exact sequences.
//!
//! - a flood of chunks with made-up rounds and an oversized upload from one client, while the
//!   honest ones complete the round: nothing of the flood is held beyond one client's cap, the
//!   counts are exact, and the honest cameras are never blamed;
//! - re-sent accepted deltas are re-receipted, not rejected; a coordinator killed mid-round and
//!   restarted names an acknowledged delta whose file was deleted; retries of the previous
//!   round after a restart get their receipt again (journalled) or are counted as late;
//! - a coordinator whose workers are full stops reading and sheds what it cannot hold; the
//!   cameras re-send and nothing is lost or blamed;
//! - an output directory with rounds but no `state.json` is refused.

mod common;

use coevo::provision::Fleet;
use coevo_coordinator::config::TransferConfig;
use coevo_coordinator::{Coordinator, RoundEvent, RoundReport};
use coevo_models::data::synthetic;
use coevo_models::{Student, Weights};
use coevo_mqtt::{Incoming, Session, Settings};
use coevo_protocol::chunk::split;
use coevo_protocol::envelope::{self, Kind};
use coevo_protocol::{
    digest, DeltaChunk, DeltaHeader, Digest, LocalMetrics, Receipt, ReceiptOutcome, RejectReason,
    RoundManifest, Signed, SigningKey, Topic,
};
use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

/// A camera driven step by step by the test.
struct Cam {
    id: String,
    key: SigningKey,
    session: Session,
    coordinator: coevo_protocol::PublicKey,
    manifests: Vec<RoundManifest>,
    receipts: Vec<Receipt>,
}

/// One signed upload, as it goes on the wire.
struct Upload {
    round: u64,
    digest: Digest,
    messages: Vec<(String, Vec<u8>)>,
}

impl Cam {
    async fn connect(fleet: &Fleet, i: usize, addr: SocketAddr) -> Cam {
        let (id, key, pw) = fleet.clients[i].clone();
        let mut s = Settings::new(addr.ip().to_string(), addr.port(), &id);
        s.password = Some(pw);
        let filters = vec![
            Topic::RoundCurrent.path(FLEET),
            Topic::Receipt { client: id.clone() }.path(FLEET),
        ];
        let mut session = Session::start(&s, filters);
        tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(ev) = session.recv().await {
                if let Incoming::Connected { .. } = ev {
                    return;
                }
            }
        })
        .await
        .expect("camera connects");
        Cam {
            id,
            key,
            session,
            coordinator: fleet.coordinator_key.public_key(),
            manifests: Vec::new(),
            receipts: Vec::new(),
        }
    }

    /// Takes in the next message (a manifest or one of our receipts).
    async fn pump(&mut self) {
        let ev = tokio::time::timeout(Duration::from_secs(60), self.session.recv())
            .await
            .expect("a message within 60 s")
            .expect("session alive");
        let Incoming::Publish(p) = ev else { return };
        if p.payload.is_empty() {
            return;
        }
        match Topic::parse(FLEET, &p.topic) {
            Ok(Topic::RoundCurrent) => {
                let m = envelope::decode::<Signed>(&p.payload, Kind::Manifest, 1 << 16)
                    .and_then(|s| {
                        s.verify_from::<RoundManifest>(
                            Kind::Manifest,
                            "coordinator",
                            &self.coordinator,
                            1 << 16,
                        )
                    })
                    .expect("the manifest verifies");
                self.manifests.push(m);
            }
            Ok(Topic::Receipt { .. }) => {
                let r = envelope::decode::<Signed>(&p.payload, Kind::Receipt, 1 << 16)
                    .and_then(|s| {
                        s.verify_from::<Receipt>(
                            Kind::Receipt,
                            "coordinator",
                            &self.coordinator,
                            1 << 16,
                        )
                    })
                    .expect("the receipt verifies");
                assert_eq!(r.client, self.id, "only our own receipts reach us");
                self.receipts.push(r);
            }
            _ => {}
        }
    }

    /// The manifest of `round`, once published.
    async fn manifest(&mut self, round: u64) -> RoundManifest {
        loop {
            if let Some(m) = self.manifests.iter().rev().find(|m| m.round == round) {
                return m.clone();
            }
            self.pump().await;
        }
    }

    /// The outcome of the receipt for `u` (waits for it).
    async fn receipt(&mut self, u: &Upload) -> ReceiptOutcome {
        loop {
            if let Some(i) = self
                .receipts
                .iter()
                .position(|r| r.round == u.round && r.payload_digest == u.digest)
            {
                return self.receipts.remove(i).outcome;
            }
            self.pump().await;
        }
    }

    /// A signed delta for `m` with every value `fill`, under the topic of round `round`.
    fn upload(&self, m: &RoundManifest, round: u64, layout: &Weights, fill: f32) -> Upload {
        let mut w = layout.zeros_like();
        w.tensors.values_mut().for_each(|t| t.data.fill(fill));
        let payload = m.uplink_codec.encode(&w.to_named()).expect("encodes");
        let parts = split(&payload, m.chunk_size as usize);
        let header = DeltaHeader {
            fleet: FLEET.into(),
            round,
            client: self.id.clone(),
            base_digest: m.model.digest,
            samples: 10,
            metrics: LocalMetrics::default(),
            codec: m.uplink_codec,
            payload_digest: digest(&payload),
            payload_len: payload.len() as u64,
            chunks: parts.len() as u32,
        };
        let signed = Signed::sign(Kind::DeltaHeader, &header, &self.id, &self.key);
        let messages = parts
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let c = DeltaChunk {
                    client: self.id.clone(),
                    round,
                    index: i as u32,
                    total: parts.len() as u32,
                    header: (i == 0).then(|| signed.clone()),
                    data: data.to_vec(),
                };
                (
                    Topic::DeltaChunk {
                        client: self.id.clone(),
                        round,
                        index: i as u32,
                    }
                    .path(FLEET),
                    envelope::encode(Kind::DeltaChunk, &c),
                )
            })
            .collect();
        Upload {
            round,
            digest: digest(&payload),
            messages,
        }
    }

    async fn send(&self, u: &Upload) {
        for (t, b) in &u.messages {
            self.session
                .publish(t.clone(), b.clone(), false)
                .await
                .unwrap();
        }
    }
}

/// The student's tensor names and shapes (what every delta must match).
fn layout() -> Weights {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net = Student::new(&vs.root(), &SHAPE);
    Weights::from_var_store(&vs)
}

/// Waits for the report of `round`, counting `Rejected` events per client on the way.
async fn finished(
    events: &mut UnboundedReceiver<RoundEvent>,
    round: u64,
    rejected_events: &mut Vec<String>,
) -> RoundReport {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(120), events.recv())
            .await
            .expect("the coordinator makes progress")
            .expect("the coordinator is running");
        match ev {
            RoundEvent::Finished(r) if r.round == round => return *r,
            RoundEvent::Rejected { client, .. } => rejected_events.push(client),
            _ => {}
        }
    }
}

const HONEST: [&str; 3] = ["cam-0", "cam-1", "cam-2"];

fn assert_no_honest_blame(r: &RoundReport) {
    for x in r.rejected.iter().chain(&r.late) {
        assert!(
            !HONEST.contains(&x.client.as_str()),
            "round {}: an honest camera is listed: {x:?}",
            r.round
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_client_never_takes_the_others_round() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 4);
    let broker = start_broker(&fleet);
    let addr = broker.addr;
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    // The uploads are scripted constants, not training: the merge guard would rightly roll
    // them back, and this test is about collection (tests/guard.rs covers the guard).
    cfg.guard.enabled = false;
    // cam-3 never sends a valid delta, so the round closes at its deadline with 3 ≥ quorum.
    cfg.round.quorum = 3;
    cfg.round.timeout_s = 10;
    const CAP: usize = 256 * 1024;
    cfg.transfer = TransferConfig {
        chunk_size: 16 * 1024,
        max_delta_bytes: CAP as u64,
        ..TransferConfig::default()
    };
    let data = synthetic(60, 60, SHAPE, 3);
    let (coord, mut events) = spawn_coordinator(cfg, &fleet, &data.test);
    let layout = layout();

    let mut honest = Vec::new();
    for i in 0..3 {
        honest.push(Cam::connect(&fleet, i, addr).await);
    }
    let mut mallory = Cam::connect(&fleet, 3, addr).await;
    let m = mallory.manifest(1).await;
    let t0 = Instant::now();

    // 1. 500 chunks for rounds that don't exist yet, 500 for a closed one: none may hold state.
    const MADE_UP: u64 = 500;
    for r in 2..2 + MADE_UP {
        let t = Topic::DeltaChunk {
            client: "cam-3".into(),
            round: r,
            index: 0,
        };
        mallory
            .session
            .publish(t.path(FLEET), b"x".to_vec(), false)
            .await
            .unwrap();
    }
    for i in 0..MADE_UP {
        let t = Topic::DeltaChunk {
            client: "cam-3".into(),
            round: 0,
            index: i as u32,
        };
        mallory
            .session
            .publish(t.path(FLEET), b"x".to_vec(), false)
            .await
            .unwrap();
    }
    // 2. An upload for the open round that never ends: 17 chunks of 16 KiB + 1 byte. The 16th
    //    takes it past the per-client cap (the transfer is dropped), the 17th starts anew.
    for i in 0..17u32 {
        let c = DeltaChunk {
            client: "cam-3".into(),
            round: 1,
            index: i,
            total: 17,
            header: None,
            data: vec![0xab; 16 * 1024 + 1],
        };
        let t = Topic::DeltaChunk {
            client: "cam-3".into(),
            round: 1,
            index: i,
        };
        let bytes = envelope::encode(Kind::DeltaChunk, &c);
        mallory
            .session
            .publish(t.path(FLEET), bytes, false)
            .await
            .unwrap();
    }

    // 3. The honest cameras upload behind the flood and are all accepted.
    for (i, cam) in honest.iter_mut().enumerate() {
        let m = cam.manifest(1).await;
        let u = cam.upload(&m, 1, &layout, 0.01 * (i + 1) as f32);
        cam.send(&u).await;
        assert_eq!(
            cam.receipt(&u).await,
            ReceiptOutcome::Accepted,
            "{}",
            cam.id
        );
    }
    let honest_done = t0.elapsed();
    let mut rejected_events = Vec::new();
    let r = finished(&mut events, 1, &mut rejected_events).await;
    let _ = coord.await;
    assert_eq!(m.round, 1);

    assert_eq!(r.outcome, "completed");
    assert_eq!(r.accepted, 3);
    let clients: Vec<&str> = r.clients.iter().map(|c| c.client.as_str()).collect();
    assert_eq!(clients, HONEST);
    assert_no_honest_blame(&r);
    let count = |list: &[coevo_coordinator::report::RejectionCount], code: &str| -> u64 {
        list.iter()
            .filter(|x| x.client == "cam-3" && x.reason.starts_with(code))
            .map(|x| x.count)
            .sum()
    };
    assert_eq!(
        count(&r.rejected, "wrong-round"),
        MADE_UP,
        "{:?}",
        r.rejected
    );
    assert_eq!(count(&r.late, "late"), MADE_UP, "{:?}", r.late);
    assert_eq!(count(&r.rejected, "malformed"), 1, "{:?}", r.rejected);
    assert_eq!(
        r.rejected.len(),
        2,
        "one entry per reason: {:?}",
        r.rejected
    );
    assert!(
        r.rejected.iter().all(|x| !x.signed),
        "none of the flood was signed"
    );
    // One event (= one log line) per client and reason, not one per message.
    assert_eq!(rejected_events, vec!["cam-3".to_string(); 2]);
    // Memory: cam-3 held at most its cap (and did reach it: the limit, not luck, stopped it).
    let re = &r.reassembly;
    assert!(
        re.peak_client_bytes as usize <= CAP && re.peak_client_bytes >= 15 * (16 * 1024 + 1),
        "{re:?}"
    );
    assert!(re.peak_transfers <= 4, "{re:?}");
    assert!(re.peak_bytes as usize <= 4 * CAP, "{re:?}");
    assert_eq!(re.refused_busy, 0);
    eprintln!(
        "BENCH chunk-flood: {} made-up-round chunks + {} oversized chunks from cam-3; honest \
         3/3 accepted in {:.2}s; report entries for cam-3: {} rejected + {} late; rejection \
         events {}; peak reassembly {} B total, {} B for one client (cap {CAP}), {} transfers",
        2 * MADE_UP,
        17,
        honest_done.as_secs_f64(),
        r.rejected.len(),
        r.late.len(),
        rejected_events.len(),
        re.peak_bytes,
        re.peak_client_bytes,
        re.peak_transfers,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_restarts_and_lost_deltas_are_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 4);
    let broker = start_broker(&fleet);
    let addr = broker.addr;
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 2);
    // The uploads are scripted constants, not training: the merge guard would rightly roll
    // them back, and this test is about collection (tests/guard.rs covers the guard).
    cfg.guard.enabled = false;
    cfg.round.timeout_s = 60;
    let data = synthetic(60, 60, SHAPE, 5);
    let layout = layout();
    let mut cams = Vec::new();
    for i in 0..4 {
        cams.push(Cam::connect(&fleet, i, addr).await);
    }

    // Round 1: cam-0 and cam-1 are accepted; cam-0 re-sends (its receipt "lost") and gets the
    // receipt again.
    let (coord, _events) = spawn_coordinator(cfg.clone(), &fleet, &data.test);
    let m1 = cams[0].manifest(1).await;
    let mut first = Vec::new();
    for (i, cam) in cams.iter_mut().enumerate().take(2) {
        let u = cam.upload(&m1, 1, &layout, 0.01 * (i + 1) as f32);
        cam.send(&u).await;
        assert_eq!(cam.receipt(&u).await, ReceiptOutcome::Accepted);
        first.push(u);
    }
    cams[0].send(&first[0]).await;
    assert_eq!(cams[0].receipt(&first[0]).await, ReceiptOutcome::Accepted);

    // The coordinator dies mid-round; cam-1's acknowledged delta file is lost meanwhile.
    coord.abort();
    let _ = coord.await;
    let lost_file = coevo_coordinator::store::Store::new(&out)
        .delta_dir(1)
        .join("cam-1.bin");
    std::fs::remove_file(&lost_file).expect("cam-1's delta was on disk");

    // Restarted, it resumes round 1 with cam-0's delta and names cam-1's as lost. cam-1
    // sending again (same digest) is taken afresh; cam-2 and cam-3 complete the round.
    let (coord, mut events) = spawn_coordinator(cfg.clone(), &fleet, &data.test);
    cams[0].send(&first[0]).await;
    assert_eq!(cams[0].receipt(&first[0]).await, ReceiptOutcome::Accepted);
    cams[1].send(&first[1]).await;
    assert_eq!(cams[1].receipt(&first[1]).await, ReceiptOutcome::Accepted);
    for (i, cam) in cams.iter_mut().enumerate().skip(2) {
        let u = cam.upload(&m1, 1, &layout, 0.01 * (i + 1) as f32);
        cam.send(&u).await;
        assert_eq!(cam.receipt(&u).await, ReceiptOutcome::Accepted);
    }
    let mut rejected_events = Vec::new();
    let r1 = finished(&mut events, 1, &mut rejected_events).await;
    assert_eq!(r1.outcome, "completed");
    assert_eq!(r1.accepted, 4);
    assert_eq!(r1.lost.len(), 1, "{:?}", r1.lost);
    assert_eq!(r1.lost[0].client, "cam-1");
    assert_eq!(r1.lost[0].digest, first[1].digest.to_string());
    assert!(r1.lost[0].reason.starts_with("missing"), "{:?}", r1.lost);
    assert!(r1.resent >= 1, "cam-0's re-send was answered");
    assert!(r1.rejected.is_empty(), "{:?}", r1.rejected);
    assert!(rejected_events.is_empty());

    // Restart between rounds: retries of round 1 reach a coordinator that opened round 2.
    coord.abort();
    let _ = coord.await;
    let (coord, mut events) = spawn_coordinator(cfg, &fleet, &data.test);
    let m2 = cams[0].manifest(2).await;
    // cam-0's journalled round-1 delta: the round-1 receipt again, no blame.
    cams[0].send(&first[0]).await;
    assert_eq!(cams[0].receipt(&first[0]).await, ReceiptOutcome::Accepted);
    // cam-3's round-1 delta it was never receipted for: told the round closed, counted late.
    let stale = cams[3].upload(&m1, 1, &layout, 0.5);
    cams[3].send(&stale).await;
    assert_eq!(
        cams[3].receipt(&stale).await,
        ReceiptOutcome::Rejected(RejectReason::RoundClosed)
    );
    for (i, cam) in cams.iter_mut().enumerate() {
        let u = cam.upload(&m2, 2, &layout, 0.02 * (i + 1) as f32);
        cam.send(&u).await;
        assert_eq!(cam.receipt(&u).await, ReceiptOutcome::Accepted);
    }
    let r2 = finished(&mut events, 2, &mut rejected_events).await;
    let _ = coord.await;
    assert_eq!(r2.outcome, "completed");
    assert_eq!(r2.accepted, 4);
    assert!(r2.rejected.is_empty(), "nobody blamed: {:?}", r2.rejected);
    assert!(r2.resent >= 1);
    assert_eq!(r2.late.len(), 1, "{:?}", r2.late);
    assert_eq!(
        (
            r2.late[0].client.as_str(),
            r2.late[0].count,
            r2.late[0].signed
        ),
        ("cam-3", 1, true)
    );
    assert!(r2.lost.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_dir_with_rounds_but_no_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("reports")).unwrap();
    std::fs::write(out.join("reports/round-0001.json"), b"{}").unwrap();
    // No broker: the refusal comes before any connection attempt.
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cfg = coordinator_config(&fleet, addr, out.clone(), 2);
    let data = synthetic(20, 20, SHAPE, 1);
    let c = Coordinator::new(cfg, fleet.coordinator_key.clone(), data.test).unwrap();
    let e = tokio::time::timeout(Duration::from_secs(60), c.run(std::future::pending()))
        .await
        .expect("refused at once")
        .expect_err("refused")
        .to_string();
    assert!(e.contains("no state.json"), "{e}");
    assert!(e.contains("restore") && e.contains("start fresh"), "{e}");
    assert!(!out.join("state.json").exists(), "nothing written");
    assert!(!out.join("checkpoints").exists(), "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_is_behind_sheds_and_cameras_that_resend_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 6);
    let broker = start_broker(&fleet);
    let addr = broker.addr;
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    cfg.guard.enabled = false;
    cfg.round.timeout_s = 60;
    // One upload verified at a time and nothing held unread beyond one publish: a burst of
    // uploads must be shed, not queued.
    cfg.transfer.max_verifying = 1;
    cfg.transfer.incoming_bytes = 1;
    let data = synthetic(60, 60, SHAPE, 5);
    let layout = layout();
    let mut cams = Vec::new();
    for i in 0..6 {
        cams.push(Cam::connect(&fleet, i, addr).await);
    }
    let (coord, mut events) = spawn_coordinator(cfg, &fleet, &data.test);
    let mut uploads = Vec::new();
    for (i, cam) in cams.iter_mut().enumerate() {
        let m = cam.manifest(1).await;
        uploads.push(cam.upload(&m, 1, &layout, 0.01 * (i + 1) as f32));
    }
    // Everyone at once, three times over (as if their receipts were late). Counted in
    // publishes (chunks), the unit the session sheds.
    let mut sends = 0u64;
    for _ in 0..3 {
        for (cam, u) in cams.iter().zip(&uploads) {
            cam.send(u).await;
            sends += u.messages.len() as u64;
        }
    }
    // Like an edge: wait a little for the receipt, re-send if none came.
    for (cam, u) in cams.iter_mut().zip(&uploads) {
        let outcome = loop {
            match tokio::time::timeout(Duration::from_secs(3), cam.receipt(u)).await {
                Ok(o) => break o,
                Err(_) => {
                    cam.send(u).await;
                    sends += u.messages.len() as u64;
                }
            }
        };
        assert_eq!(outcome, ReceiptOutcome::Accepted, "{}", cam.id);
    }
    let r = finished(&mut events, 1, &mut Vec::new()).await;
    let _ = coord.await;
    assert_eq!(r.outcome, "completed");
    assert_eq!(r.accepted, 6);
    assert!(r.rejected.is_empty(), "nobody blamed: {:?}", r.rejected);
    assert!(r.lost.is_empty());
    assert_eq!(r.collect.max_verifying, 1, "{:?}", r.collect);
    // Each accepted upload was read whole; what was shed is at most the rest.
    let read_at_least: u64 = uploads.iter().map(|u| u.messages.len() as u64).sum();
    assert!(
        r.collect.shed + read_at_least <= sends,
        "{sends} publishes sent: {:?} resent {} busy {}",
        r.collect,
        r.resent,
        r.reassembly.refused_busy
    );
    // The copies were either shed, or read and answered as re-sends (or refused as busy).
    assert!(
        r.collect.shed + r.resent + r.reassembly.refused_busy > 0,
        "18 uploads at once were neither shed nor answered as re-sends: {:?}",
        r.collect
    );
}
