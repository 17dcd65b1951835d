//! Fault tests (issue: reliability). Real broker, real sockets, real processes where a process
//! must die: each test injects a fault mid-round and then checks that the round completed and
//! that the merged model is exactly base + FedAvg of the deltas the coordinator accepted (on
//! disk), so no accepted delta was lost and none counted twice.

mod common;

use coevo_broker::BrokerConfig;
use coevo_coordinator::{Coordinator, RoundEvent};
use coevo_models::data::synthetic;
use coevo_models::partition::{partition, PartitionSpec};
use coevo_models::DataShape;
use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn coevo_bin() -> &'static str {
    env!("CARGO_BIN_EXE_coevo")
}

fn spawn_logged(args: &[&str], log: &std::path::Path) -> Child {
    let f = std::fs::File::create(log).expect("log file");
    Command::new(coevo_bin())
        .args(args)
        .env("RUST_LOG", "info,rumqttd=warn")
        .stdout(f.try_clone().expect("log"))
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn coevo")
}

fn port_open(addr: std::net::SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// 1. The coordinator process is SIGKILLed mid-collection (2 of 3 deltas accepted) and
///    restarted: the same round completes with all three, the two from before intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sigkill_mid_collection_resumes_round() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 3);
    let broker = start_broker(&fleet);
    let addr = broker.addr;
    let out = dir.path().join("out");

    // The coordinator runs as its own process, on an IDX dataset written for it.
    let data = synthetic(900, 200, SHAPE, 11);
    let data_dir = dir.path().join("data");
    write_idx(&data_dir, &data);
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    cfg.data.path = data_dir.clone();
    let cfg_path = dir.path().join("coordinator.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();
    let args = ["coordinator", "--config", cfg_path.to_str().unwrap()];
    let mut coordinator = spawn_logged(&args, &dir.path().join("coordinator-1.log"));

    let parts = partition(
        &data.train.labels_vec(),
        None,
        &PartitionSpec::Iid { clients: 3 },
        1,
    )
    .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut agents = vec![
        spawn_agent(&fleet, 0, addr, data.train.subset(&parts[0].1), &stop_rx),
        spawn_agent(&fleet, 1, addr, data.train.subset(&parts[1].1), &stop_rx),
    ];
    wait_until(
        "2 accepted deltas on disk",
        Duration::from_secs(120),
        || count_deltas(&out, 1) >= 2,
    )
    .await;
    coordinator.kill().expect("SIGKILL coordinator");
    let _ = coordinator.wait();
    assert!(
        !Store::new(&out).report_path(1).exists(),
        "killed before the round closed"
    );

    let restart = Instant::now();
    let mut coordinator = spawn_logged(&args, &dir.path().join("coordinator-2.log"));
    agents.push(spawn_agent(
        &fleet,
        2,
        addr,
        data.train.subset(&parts[2].1),
        &stop_rx,
    ));
    let status = tokio::task::spawn_blocking(move || coordinator.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "restarted coordinator finished the round");
    let recovered = restart.elapsed();

    let report = read_report(&out, 1);
    assert_eq!(report.outcome, "completed");
    assert_eq!(report.accepted, 3, "{:?}", report.rejected);
    let mut merged = assert_merge_consistent(&out, 1);
    merged.sort();
    assert_eq!(merged, ids(3));
    let _ = stop_tx.send(true);
    for a in agents {
        let s = a.await.unwrap().unwrap();
        // A client whose receipt the SIGKILL swallowed may still be re-sending when the round
        // (rounds = 1: the last) closes; the report above is what proves its delta counted.
        assert!(s.rejected_rounds.is_empty(), "{:?}", s.rejected_rounds);
        assert!(s.accepted_rounds.iter().all(|&r| r == 1));
    }
    eprintln!(
        "FAULT coordinator-sigkill: accepted before kill 2, after restart 3, lost 0, \
         restart-to-round-complete {:.2}s",
        recovered.as_secs_f64()
    );
}

/// 2. The broker process is SIGKILLed mid-round and restarted on the same port: clients and
///    coordinator reconnect, the coordinator republishes the round, both rounds complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_round() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 4);
    let addr = coevo_broker::free_local_addr().unwrap();
    let broker_cfg = BrokerConfig {
        listen: addr,
        credentials: Some(fleet.credentials_path.clone()),
        ..BrokerConfig::default()
    };
    let broker_path = dir.path().join("broker.toml");
    std::fs::write(&broker_path, broker_cfg.to_toml_string().unwrap()).unwrap();
    let bargs = ["broker", "--config", broker_path.to_str().unwrap()];
    let mut broker = spawn_logged(&bargs, &dir.path().join("broker-1.log"));
    wait_until("broker up", Duration::from_secs(30), || port_open(addr)).await;

    let data = synthetic(1200, 200, SHAPE, 12);
    let parts = partition(
        &data.train.labels_vec(),
        None,
        &PartitionSpec::Iid { clients: 4 },
        2,
    )
    .unwrap();
    let out = dir.path().join("out");
    let cfg = coordinator_config(&fleet, addr, out.clone(), 2);
    let (coord, mut events) = spawn_coordinator(cfg, &fleet, &data.test);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut agents: Vec<_> = (0..3)
        .map(|i| spawn_agent(&fleet, i, addr, data.train.subset(&parts[i].1), &stop_rx))
        .collect();
    // Wait for the first accepted delta of round 1, then pull the broker out from under it.
    loop {
        match tokio::time::timeout(Duration::from_secs(120), events.recv()).await {
            Ok(Some(RoundEvent::Accepted { round: 1, .. })) => break,
            Ok(Some(_)) => {}
            other => panic!("no delta accepted in round 1: {other:?}"),
        }
    }
    broker.kill().expect("SIGKILL broker");
    let _ = broker.wait();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut broker = spawn_logged(&bargs, &dir.path().join("broker-2.log"));
    wait_until("broker back", Duration::from_secs(30), || port_open(addr)).await;
    // The fourth client only ever sees the restarted broker, so round 1 can't close before it.
    agents.push(spawn_agent(
        &fleet,
        3,
        addr,
        data.train.subset(&parts[3].1),
        &stop_rx,
    ));

    let mut round1_done = None;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(180), events.recv()).await {
        if let RoundEvent::Finished(r) = ev {
            if r.round == 1 {
                round1_done = Some(down.elapsed());
            }
        }
    }
    coord.await.unwrap().unwrap();
    let _ = stop_tx.send(true);
    for a in agents {
        let s = tokio::time::timeout(Duration::from_secs(20), a)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // A receipt sent while the broker was down is lost with it (rumqttd keeps nothing);
        // the client then sees round 2 start and moves on. Its delta still counts: the
        // reports below show all four accepted in both rounds.
        assert!(s.accepted_rounds.ends_with(&[2]), "{:?}", s.accepted_rounds);
        assert!(s.rejected_rounds.is_empty(), "{:?}", s.rejected_rounds);
    }
    for round in 1..=2 {
        let r = read_report(&out, round);
        assert_eq!(r.outcome, "completed");
        assert_eq!(r.accepted, 4, "round {round}: {:?}", r.rejected);
        assert_eq!(assert_merge_consistent(&out, round).len(), 4);
    }
    let _ = broker.kill();
    let _ = broker.wait();
    eprintln!(
        "FAULT broker-restart: deltas accepted 8/8 over 2 rounds, lost 0, \
         broker-kill-to-round-1-complete {:.2}s",
        round1_done.map_or(f64::NAN, |d| d.as_secs_f64())
    );
}

/// Runs one round with 10 clients of which 3 die right after the round starts.
async fn dropout_round(
    quorum: u32,
    below: coevo_coordinator::config::BelowQuorum,
    extensions: u32,
) -> (
    coevo_coordinator::RoundReport,
    std::path::PathBuf,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 10);
    let broker = start_broker(&fleet);
    let addr = broker.addr;
    // The 3 doomed clients hold much more data, so they are still training when killed.
    let data = synthetic(7 * 100 + 3 * 4000, 200, SHAPE, 13);
    let n = data.train.len();
    let mut slices: Vec<Vec<usize>> = (0..7).map(|i| (i * 100..(i + 1) * 100).collect()).collect();
    for k in 0..3 {
        slices.push((700 + k * 4000..(700 + (k + 1) * 4000).min(n)).collect());
    }
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    cfg.round.quorum = quorum;
    cfg.round.timeout_s = 4;
    cfg.round.below_quorum = below;
    cfg.round.max_extensions = extensions;
    let (coord, mut events) = spawn_coordinator(cfg, &fleet, &data.test);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agents: Vec<_> = (0..10)
        .map(|i| spawn_agent(&fleet, i, addr, data.train.subset(&slices[i]), &stop_rx))
        .collect();
    let mut report = None;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(120), events.recv()).await {
        match ev {
            RoundEvent::Started { round: 1, .. } => {
                // Kill 30% of the fleet mid-round.
                for a in &agents[7..] {
                    a.abort();
                }
            }
            RoundEvent::Finished(r) => report = Some(*r),
            _ => {}
        }
    }
    coord.await.unwrap().unwrap();
    let _ = stop_tx.send(true);
    (report.expect("round 1 finished"), out, dir)
}

/// 3a. 30% of clients killed mid-round: the round closes at the deadline with quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropouts_close_at_deadline_with_quorum() {
    let t0 = Instant::now();
    let (r, out, _dir) = dropout_round(7, coevo_coordinator::config::BelowQuorum::Skip, 0).await;
    assert_eq!(r.outcome, "completed");
    assert_eq!(r.accepted, 7);
    assert_eq!(r.registered, 10);
    assert_eq!(r.extensions, 0);
    assert_eq!(assert_merge_consistent(&out, 1).len(), 7);
    eprintln!(
        "FAULT dropout-30%: accepted 7/10 at the deadline, lost 0, round {:.2}s",
        t0.elapsed().as_secs_f64()
    );
}

/// 3b. Below quorum at the deadline, `extend` extends once, then the round is skipped and the
///     global model is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_quorum_extends_then_skips() {
    let (r, out, _dir) = dropout_round(8, coevo_coordinator::config::BelowQuorum::Extend, 1).await;
    assert_eq!(r.outcome, "skipped");
    assert_eq!(r.extensions, 1);
    assert_eq!(r.accepted, 7);
    let store = Store::new(&out);
    assert_eq!(
        std::fs::read(store.checkpoint_path(0)).unwrap(),
        std::fs::read(store.checkpoint_path(1)).unwrap(),
        "a skipped round leaves the model unchanged"
    );
}

use coevo_coordinator::store::Store;

/// Publishes a crafted upload from `client` (signed with its own key) as the given chunks.
async fn send_chunks(session: &coevo_mqtt::Session, chunks: &[(String, Vec<u8>)], order: &[usize]) {
    for &i in order {
        session
            .publish(chunks[i].0.clone(), chunks[i].1.clone(), false)
            .await
            .unwrap();
    }
}

/// Builds the wire chunks of an upload whose signed header describes `full`, carrying `sent`
/// (equal to `full` unless the test truncates it).
#[allow(clippy::too_many_arguments)]
fn upload_chunks(
    client: &str,
    key: &coevo_protocol::SigningKey,
    round: u64,
    base: coevo_protocol::Digest,
    full: &[u8],
    parts: Vec<Vec<u8>>,
    samples: u64,
) -> Vec<(String, Vec<u8>)> {
    use coevo_protocol::envelope::{encode, Kind};
    use coevo_protocol::*;
    let header = DeltaHeader {
        fleet: FLEET.into(),
        round,
        client: client.into(),
        base_digest: base,
        samples,
        metrics: LocalMetrics::default(),
        codec: UplinkCodec::F32,
        payload_digest: digest(full),
        payload_len: full.len() as u64,
        chunks: parts.len() as u32,
    };
    let signed = Signed::sign(Kind::DeltaHeader, &header, client, key);
    let total = parts.len() as u32;
    parts
        .into_iter()
        .enumerate()
        .map(|(i, data)| {
            let c = DeltaChunk {
                client: client.into(),
                round,
                index: i as u32,
                total,
                header: (i == 0).then(|| signed.clone()),
                data,
            };
            (
                Topic::DeltaChunk {
                    client: client.into(),
                    round,
                    index: i as u32,
                }
                .path(FLEET),
                encode(Kind::DeltaChunk, &c),
            )
        })
        .collect()
}

/// 4. Duplicated and reordered chunks reassemble to the right delta (accepted, merged once);
///    a truncated chunk gives a typed rejection; the round completes with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_reordered_and_truncated_chunks() {
    use coevo_models::{WeightCodec as ModelCodec, Weights};
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 3);
    let broker = start_broker(&fleet);
    let addr = broker.addr;
    let data = synthetic(300, 100, SHAPE, 14);
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    cfg.transfer.chunk_size = 4096;
    cfg.transfer.uplink_codec = coevo_protocol::UplinkCodec::F32;
    cfg.round.quorum = 2;
    cfg.round.timeout_s = 8;
    let downlink = cfg.transfer.downlink_codec;
    let (coord, mut events) = spawn_coordinator(cfg, &fleet, &data.test);

    let session_for = |i: usize| {
        let (id, _, pw) = fleet.clients[i].clone();
        let mut s = coevo_mqtt::Settings::new(addr.ip().to_string(), addr.port(), id);
        s.password = Some(pw);
        coevo_mqtt::Session::start(&s, vec![])
    };
    let dup = session_for(1);
    let trunc = session_for(2);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent = spawn_agent(&fleet, 0, addr, data.train.shallow_clone(), &stop_rx);

    let mut report = None;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
        match ev {
            RoundEvent::Started { round: 1, .. } => {
                let base_path = Store::new(&out).checkpoint_path(0);
                let base =
                    Weights::decode(&std::fs::read(base_path).unwrap(), ModelCodec::F32, 1 << 26)
                        .unwrap();
                let base_digest = coevo_protocol::digest(&base.encode_model(downlink).unwrap());
                let mut delta = base.zeros_like();
                for t in delta.tensors.values_mut() {
                    for (j, v) in t.data.iter_mut().enumerate() {
                        *v = ((j % 7) as f32 - 3.0) * 1e-3;
                    }
                }
                let full = coevo_protocol::UplinkCodec::F32
                    .encode(&delta.to_named())
                    .unwrap();
                let parts: Vec<Vec<u8>> = full.chunks(4096).map(<[u8]>::to_vec).collect();
                let n = parts.len();
                assert!(n > 50, "the delta spans many chunks ({n})");
                // cam-1: every chunk twice, last to first.
                let chunks = upload_chunks(
                    "cam-1",
                    &fleet.clients[1].1,
                    1,
                    base_digest,
                    &full,
                    parts.clone(),
                    50,
                );
                let order: Vec<usize> = (0..n).rev().flat_map(|i| [i, i]).collect();
                send_chunks(&dup, &chunks, &order).await;
                // cam-2: one chunk in the middle arrives cut in half.
                let mut cut = parts;
                let mid = n / 2;
                cut[mid].truncate(2048);
                let chunks =
                    upload_chunks("cam-2", &fleet.clients[2].1, 1, base_digest, &full, cut, 50);
                send_chunks(&trunc, &chunks, &(0..n).collect::<Vec<_>>()).await;
            }
            RoundEvent::Finished(r) => report = Some(*r),
            _ => {}
        }
    }
    coord.await.unwrap().unwrap();
    let _ = stop_tx.send(true);
    let _ = agent.await;
    let r = report.expect("round finished");
    assert_eq!(r.outcome, "completed", "{:?} {:?}", r.rejected, r.clients);
    assert_eq!(r.accepted, 2, "{:?}", r.rejected);
    assert!(
        r.rejected
            .iter()
            .any(|x| x.client == "cam-2" && x.reason.starts_with("length-mismatch")),
        "{:?}",
        r.rejected
    );
    let mut merged = assert_merge_consistent(&out, 1);
    merged.sort();
    assert_eq!(merged, vec!["cam-0", "cam-1"]);
}

/// 5. A 20 MB model (and 20 MB deltas) through a broker whose max packet is 1 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_megabyte_model_through_one_mebibyte_packets() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 2);
    let broker = start_broker_with(
        &fleet,
        BrokerConfig {
            max_payload_bytes: 1024 * 1024,
            ..BrokerConfig::default()
        },
    );
    let addr = broker.addr;
    // 200×200 inputs make the student's first dense layer ~5M parameters: ~20 MB in f32.
    let shape = DataShape {
        channels: 1,
        height: 200,
        width: 200,
        classes: 10,
    };
    let data = synthetic(40, 20, shape, 15);
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    cfg.transfer.downlink_codec = coevo_protocol::DownlinkCodec::F32;
    cfg.transfer.uplink_codec = coevo_protocol::UplinkCodec::F32;
    let coordinator = Coordinator::new(
        cfg,
        fleet.coordinator_key.clone(),
        data.test.shallow_clone(),
    )
    .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agents: Vec<_> = (0..2)
        .map(|i| {
            spawn_agent_for(
                &fleet,
                i,
                addr,
                data.train
                    .subset(&(i * 20..(i + 1) * 20).collect::<Vec<_>>()),
                &stop_rx,
                Some(1),
            )
        })
        .collect();
    let t0 = Instant::now();
    let reports = tokio::time::timeout(
        Duration::from_secs(300),
        coordinator.run(std::future::pending()),
    )
    .await
    .expect("round within 5 minutes")
    .unwrap();
    // Each agent ends by itself once it holds its receipt (max_rounds = 1).
    for a in agents {
        assert_eq!(a.await.unwrap().unwrap().accepted_rounds, vec![1]);
    }
    drop(stop_tx);
    let r = &reports[0];
    let model_bytes = r.bytes_down / r.registered as u64;
    assert!(model_bytes >= 20_000_000, "model is {model_bytes} bytes");
    assert_eq!(r.accepted, 2);
    assert!(r.bytes_up >= 40_000_000);
    assert_merge_consistent(&out, 1);
    eprintln!(
        "FAULT big-model: {model_bytes} B model, {} B up, 1 MiB broker packet limit, round {:.2}s",
        r.bytes_up,
        t0.elapsed().as_secs_f64()
    );
}
