//! Bring your own model (issue #16) end to end over real MQTT: the user's TorchScript student
//! and teacher (`examples/models/*.pt`, exported by `scripts/export-model.py`) in a full
//! coevolve round with real edge agents that fetch the student's module by the digest the
//! signed manifest names; a tampered module refused by cameras (on the wire and in their
//! cache); a module whose output does not fit the dataset refused at start-up.

mod common;

use coevo_coordinator::coevolve::{Mode, ServerData};
use coevo_coordinator::Coordinator;
use coevo_edge::IgnoreReason;
use coevo_models::data::synthetic;
use coevo_models::partition::{partition, PartitionSpec};
use coevo_models::{Arch, DataShape, ScriptModule, Weights};
use coevo_mqtt::{Incoming, Session, Settings};
use coevo_protocol::chunk::split;
use coevo_protocol::envelope::{self, Kind};
use coevo_protocol::{
    digest, DownlinkCodec, ModelArch, ModelChunk, ModelRef, ModuleRef, RoundManifest, Signed,
    Topic, TrainTask, UplinkCodec,
};
use common::*;
use rumqttc::QoS;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/models")
        .join(name)
}

/// The coordinator publishes the module and both agents train it: one installed with the file
/// (`[model] student`), one that fetches it over MQTT after finding its cached copy tampered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coevolve_round_with_torchscript_student_and_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 2);
    let broker = start_broker(&fleet);
    let addr = broker.addr;
    let data = synthetic(700, 100, SHAPE, 16);
    let range = |a: usize, b: usize| data.train.subset(&(a..b).collect::<Vec<_>>());
    let server = ServerData {
        labelled: range(0, 100),
        unlabelled: range(100, 200),
        validation: range(200, 300),
    };
    let clients = range(300, 700);
    let parts = partition(
        &clients.labels_vec(),
        None,
        &PartitionSpec::Iid { clients: 2 },
        1,
    )
    .unwrap();
    let student = ScriptModule::read(&fixture("student.pt")).expect("student fixture");

    // Camera 0's cache holds a tampered copy under the module's digest.
    let state0 = dir.path().join("state-0");
    let cached = state0
        .join(coevo_edge::module_fetch::MODULE_DIR)
        .join(format!("{}.pt", student.digest()));
    std::fs::create_dir_all(cached.parent().unwrap()).unwrap();
    let mut tampered = student.bytes().to_vec();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    std::fs::write(&cached, &tampered).unwrap();

    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    cfg.mode = Mode::Coevolve;
    cfg.coevolution.pretrain_epochs = 1;
    cfg.coevolution.distill.epochs = 1;
    cfg.coevolution.fuse.epochs = 1;
    cfg.model.student = Some(fixture("student.pt"));
    cfg.model.teacher = Some(fixture("teacher.pt"));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let installed = student.clone();
    let agents = vec![
        spawn_agent_custom(&fleet, 0, addr, clients.subset(&parts[0].1), &stop_rx, {
            let state0 = state0.clone();
            move |o| {
                o.max_rounds = Some(1);
                o.state_dir = Some(state0);
            }
        }),
        spawn_agent_custom(&fleet, 1, addr, clients.subset(&parts[1].1), &stop_rx, {
            move |o| {
                o.max_rounds = Some(1);
                o.student_module = Some(installed);
            }
        }),
    ];
    let reports = Coordinator::new(
        cfg,
        fleet.coordinator_key.clone(),
        data.test.shallow_clone(),
    )
    .expect("the modules fit the data")
    .with_server_data(server)
    .run(std::future::pending())
    .await
    .expect("round runs");
    let mut summaries = Vec::new();
    for a in agents {
        let s = tokio::time::timeout(Duration::from_secs(60), a)
            .await
            .expect("agent finishes")
            .unwrap()
            .unwrap();
        assert_eq!(s.accepted_rounds, vec![1]);
        summaries.push(s);
    }
    drop(stop_tx);
    // Camera 0 refused its cached copy, counted it, fetched the module and cached that.
    assert_eq!(
        summaries[0]
            .ignored
            .get(&IgnoreReason::ModuleDigestMismatch),
        Some(&1)
    );
    assert_eq!(std::fs::read(&cached).unwrap(), student.bytes());
    // Camera 1 used the module it was installed with.
    assert_eq!(
        summaries[1]
            .ignored
            .get(&IgnoreReason::ModuleDigestMismatch),
        None
    );

    let r = &reports[0];
    assert_eq!(r.mode, "coevolve");
    assert_eq!(r.accepted, 2);
    // The state dict that travels is the module's: its parameters and BatchNorm statistics.
    assert_eq!(r.student.params, Some(9610));
    assert_eq!(r.teacher.params, Some(227_242));
    let s = r.student.test_accuracy.expect("student evaluated");
    assert!((0.0..=1.0).contains(&s));
    let c = r.coevolution.as_ref().expect("coevolution ran");
    assert!(c.distillation.is_some() && c.fusion.is_some());
    // The merged checkpoint holds the averaged running statistics, and they moved off the
    // export's initial values (mean 0, variance 1): the clients' statistics were merged.
    let ckpt = std::fs::read(out.join("checkpoints/base-0001.safetensors")).unwrap();
    let merged = Weights::decode(&ckpt, coevo_models::WeightCodec::F32, 1 << 30).unwrap();
    let means: Vec<_> = merged
        .tensors
        .iter()
        .filter(|(k, _)| k.ends_with("running_mean"))
        .collect();
    assert_eq!(means.len(), 7, "one per BatchNorm layer");
    assert!(means
        .iter()
        .any(|(_, t)| t.data.iter().any(|v| v.abs() > 1e-4)));
}

/// A module exported for 10 classes, a dataset with 62: the coordinator refuses to start and
/// says which file, what it outputs and what the data needs. Same for the teacher.
#[test]
fn module_with_wrong_output_size_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let shape = DataShape {
        classes: 62,
        ..SHAPE
    };
    let data = synthetic(10, 10, shape, 1);
    let addr = "127.0.0.1:1".parse().unwrap();
    for role in ["student", "teacher"] {
        let mut cfg = coordinator_config(&fleet, addr, dir.path().join("out"), 1);
        let file = fixture(&format!("{role}.pt"));
        match role {
            "student" => cfg.model.student = Some(file),
            _ => cfg.model.teacher = Some(file),
        }
        let err = Coordinator::new(
            cfg,
            fleet.coordinator_key.clone(),
            data.test.shallow_clone(),
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(err.contains(&format!("[model] {role}")), "{err}");
        assert!(err.contains(&format!("{role}.pt")), "{err}");
        assert!(err.contains("[2, 10]"), "{err}");
        assert!(err.contains("62 classes"), "{err}");
    }
    // Not a TorchScript file at all.
    let mut cfg = coordinator_config(&fleet, addr, dir.path().join("out"), 1);
    let junk = dir.path().join("junk.pt");
    std::fs::write(&junk, b"not a module").unwrap();
    cfg.model.student = Some(junk);
    let err = Coordinator::new(
        cfg,
        fleet.coordinator_key.clone(),
        data.test.shallow_clone(),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("not a loadable TorchScript module"), "{err}");
}

/// A coordinator played by the test (signing with the fleet's key) publishes a manifest that
/// names the module's real digest but retained chunks whose bytes were altered: the camera
/// counts the mismatch, never trains on those bytes and gives the round up at its deadline;
/// with the genuine chunks in the next round it trains and uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_module_on_the_wire_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let broker = start_broker(&fleet);
    let addr = broker.addr;
    let module = ScriptModule::read(&fixture("student.pt")).unwrap();
    let chunk = 16 * 1024;

    let mut s = Settings::new(addr.ip().to_string(), addr.port(), "coordinator");
    s.password = Some(fleet.coordinator_password.clone());
    let mut session = Session::start(&s, vec![Topic::all_deltas_filter(FLEET)]);
    tokio::time::timeout(Duration::from_secs(30), async {
        while !matches!(session.recv().await, Some(Incoming::Connected { .. })) {}
    })
    .await
    .expect("scripted coordinator connects");
    let client = session.client().clone();
    let uploads = Arc::new(Mutex::new(Vec::<u64>::new()));
    let seen = uploads.clone();
    let listener = tokio::spawn(async move {
        while let Some(ev) = session.recv().await {
            if let Incoming::Publish(p) = ev {
                if let Ok(Topic::DeltaChunk {
                    round, index: 0, ..
                }) = Topic::parse(FLEET, &p.topic)
                {
                    seen.lock().unwrap().push(round);
                }
                let _ = session.ack(&p).await;
            }
        }
    });

    let chunks = |bytes: &[u8], d| -> Vec<(String, Vec<u8>)> {
        let parts = split(bytes, chunk);
        parts
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
            .collect()
    };
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net = Arch::Script(module.clone())
        .build(&vs.root(), &SHAPE)
        .unwrap();
    let weights = Weights::from_var_store(&vs)
        .encode_model(DownlinkCodec::F32)
        .unwrap();
    let wd = digest(&weights);
    let module_ref = ModuleRef {
        digest: module.digest(),
        size: module.bytes().len() as u64,
        chunks: split(module.bytes(), chunk).len() as u32,
    };
    let manifest = |round: u64, deadline_ms: u64| {
        let m = RoundManifest {
            fleet: FLEET.into(),
            round,
            coordinator: "coordinator".into(),
            model: ModelRef {
                digest: wd,
                size: weights.len() as u64,
                codec: DownlinkCodec::F32,
                chunks: split(&weights, chunk).len() as u32,
                arch: ModelArch {
                    name: coevo_coordinator::server::SCRIPT_ARCH.into(),
                    channels: 1,
                    height: 28,
                    width: 28,
                    classes: 10,
                    module: Some(module_ref.clone()),
                },
            },
            task: TrainTask {
                epochs: 1,
                batch_size: 32,
                lr: 0.05,
                momentum: 0.0,
                prox_mu: 0.0,
            },
            uplink_codec: UplinkCodec::F32,
            max_delta_bytes: 64 << 20,
            chunk_size: chunk as u32,
            deadline_unix_ms: coevo_edge::state::now_unix_ms() + deadline_ms,
            quorum: 1,
            issued_unix_ms: coevo_edge::state::now_unix_ms(),
        };
        envelope::encode(
            Kind::Manifest,
            &Signed::sign(Kind::Manifest, &m, "coordinator", &fleet.coordinator_key),
        )
    };
    let publish = |msgs: Vec<(String, Vec<u8>)>| {
        let client = client.clone();
        async move {
            for (t, b) in msgs {
                client
                    .publish(t, QoS::AtLeastOnce, true, b)
                    .await
                    .expect("publish");
            }
        }
    };
    // Round 1: genuine weights, module chunks with one byte flipped (same lengths, so only the
    // digest over the whole module can tell).
    let mut bad = module.bytes().to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    publish(chunks(&weights, wd)).await;
    publish(chunks(&bad, module.digest())).await;
    publish(vec![(Topic::RoundCurrent.path(FLEET), manifest(1, 4_000))]).await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let data = synthetic(128, 8, SHAPE, 3).train;
    let agent = spawn_agent_custom(&fleet, 0, addr, data, &stop_rx, |o| {
        o.deadline_grace = Duration::from_secs(1);
    });
    // Round 2, once round 1 is past its deadline: the genuine module.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        uploads.lock().unwrap().is_empty(),
        "trained on a tampered module"
    );
    publish(chunks(module.bytes(), module.digest())).await;
    publish(vec![(Topic::RoundCurrent.path(FLEET), manifest(2, 60_000))]).await;
    let seen = uploads.clone();
    wait_until("a delta for round 2", Duration::from_secs(60), move || {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    stop_tx.send(true).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    listener.abort();
    assert_eq!(uploads.lock().unwrap()[0], 2, "no delta for round 1");
    assert_eq!(summary.given_up_rounds, vec![1]);
    let refused = summary
        .ignored
        .get(&IgnoreReason::ModuleDigestMismatch)
        .copied()
        .unwrap_or(0);
    assert!(refused >= 1, "{:?}", summary.ignored);
}

/// `coevo bench byom` in small: the built-in student against its TorchScript export
/// (`examples/models/builtin_student_10.pt`) from the same initial weights, on a tiny IDX
/// dataset with writers. Same architecture, same data, same start: the two fleets end within
/// a few points (on FEMNIST the goal is ±0.5; here 60 test images make a point 1/60).
#[test]
fn byom_bench_compares_the_builtin_student_with_its_export() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = synthetic(360, 60, SHAPE, 9);
    write_idx(&dir.join("data"), &data);
    let writers: String = (0..360).map(|i| format!("w{:02}\n", i % 8)).collect();
    std::fs::write(dir.join("data/train-clients.txt"), writers).unwrap();
    let student = fixture("builtin_student_10.pt");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(["bench", "byom", "--data", "data", "--rounds", "2"])
        .args(["--server-labelled", "2", "--server-unlabelled", "2"])
        .args(["--clients", "4", "--local-epochs", "1", "--out", "byom"])
        .arg("--student")
        .arg(&student)
        .current_dir(dir)
        .output()
        .expect("run coevo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("final student accuracy"), "{stdout}");
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("byom/summary.json")).unwrap()).unwrap();
    for run in ["builtin", "torchscript"] {
        assert_eq!(s[run]["accuracy_curve"].as_array().unwrap().len(), 2, "{s}");
        assert_eq!(s[run]["params"], 114_314, "{s}");
    }
    let gap = s["accuracy_gap"].as_f64().expect("both runs evaluated");
    assert!(gap.abs() <= 0.05, "{s}");
    assert!(s["round_time_ratio"].as_f64().unwrap() > 0.0);
    // Not an export of the built-in student: refused with the module's parameters.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(["bench", "byom", "--data", "data", "--rounds", "1"])
        .args(["--server-labelled", "2", "--server-unlabelled", "2"])
        .args(["--clients", "4", "--out", "byom2", "--student"])
        .arg(fixture("student.pt"))
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not an export of the built-in student"),
        "{stderr}"
    );
}
