//! Few and noisy labels through the whole stack (issue #18): a coevolve fleet of 4 cameras over
//! the embedded broker whose labels the simulator corrupted — 3 cameras with 30 % of frames
//! labelled and 30 % of those flipped (symmetric), one camera with every frame labelled and
//! 80 % pair-flipped. The edges pseudo-label and clean with the round's model; the test checks
//! that the signed counts in the report match what was injected, that the estimates track the
//! injected noise, and that the camera over `max_client_noise` is left out of the merge and of
//! fusion, with the reason in the report.

mod common;

use coevo::bench::labels::corrupt_clients;
use coevo::demo::{run_fleet_with, FleetRun};
use coevo_coordinator::coevolve::{Mode, ServerData};
use coevo_coordinator::config::{BelowQuorum, RoundPolicy};
use coevo_models::data::synthetic;
use coevo_models::noise::{LabelCorruption, NoiseKind};
use coevo_models::semi::SemiConfig;
use coevo_models::DataShape;

const CLIENTS: usize = 4;
const ROUNDS: u64 = 3;
const NOISY: &str = "cam-3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_counts_match_injected_and_the_noisy_camera_is_left_out() {
    common::init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("labels");
    let shape = DataShape {
        channels: 1,
        height: 12,
        width: 12,
        classes: 5,
    };
    let data = synthetic(2000, 300, shape, 4);
    let server = ServerData {
        labelled: data.train.subset(&(0..200).collect::<Vec<_>>()),
        unlabelled: data.train.subset(&(200..400).collect::<Vec<_>>()),
        validation: data.train.subset(&(400..600).collect::<Vec<_>>()),
    };
    let rest = data.train.subset(&(600..2000).collect::<Vec<_>>());
    let clients = common::iid_clients(&rest, CLIENTS);
    let few = LabelCorruption {
        fraction: 0.3,
        noise: 0.3,
        kind: NoiseKind::Symmetric,
        seed: 11,
    };
    let (mut corrupted, mut injected) =
        corrupt_clients(clients[..3].to_vec_shallow(), &few).expect("corrupt the three cameras");
    let bad = LabelCorruption {
        fraction: 1.0,
        noise: 0.8,
        kind: NoiseKind::Pair,
        seed: 11,
    };
    let (noisy, inj) = corrupt_clients(clients[3..].to_vec_shallow(), &bad).expect("corrupt");
    corrupted.extend(noisy);
    injected.extend(inj);
    assert_eq!(injected[NOISY].flipped, injected[NOISY].labelled * 4 / 5);
    // The toy classes are fixed pixel patterns, not shift-invariant: no weak shift.
    let semi = SemiConfig {
        max_shift: 0.0,
        ..SemiConfig::default()
    };
    let reports = run_fleet_with(
        FleetRun {
            fleet: "labels",
            out: &out,
            clients: corrupted,
            test: data.test.shallow_clone(),
            seed: 3,
        },
        |c| {
            c.rounds = ROUNDS;
            c.mode = Mode::Coevolve;
            c.coevolution.pretrain_epochs = 5;
            c.coevolution.ensemble_clients = CLIENTS;
            c.coevolution.max_client_noise = 0.5;
            // This toy task reaches a loss near 0, where the guard's "loss ×2" rule rolls
            // rounds back; the test is about labels, so fusion must run.
            c.guard.enabled = false;
            c.round = RoundPolicy {
                quorum: CLIENTS as u32,
                timeout_s: 60,
                below_quorum: BelowQuorum::Extend,
                max_extensions: 3,
            };
        },
        |c| c.with_server_data(server),
        |o| o.labels = Some(semi.clone()),
        &mut |_| {},
    )
    .await
    .expect("fleet run");
    assert_eq!(reports.len(), ROUNDS as usize);
    for r in &reports {
        println!(
            "round {}: student {:?} labels {}",
            r.round,
            r.student.test_accuracy,
            serde_json::to_string(&r.labels).unwrap_or_default()
        );
        assert_eq!(r.accepted, CLIENTS, "round {}", r.round);
        for c in &r.clients {
            let l = c.labels.as_ref().expect("signed label counts");
            let inj = &injected[&c.client];
            println!("  {} {l:?} injected {inj:?}", c.client);
            // The signed counts are exactly what the simulator injected.
            assert_eq!(l.labelled as usize, inj.labelled, "{}", c.client);
            assert_eq!(l.unlabelled as usize, inj.unlabelled, "{}", c.client);
            assert!(l.pseudo_labelled <= l.unlabelled);
            assert!(l.relabelled + l.discarded <= l.labelled);
        }
    }
    let last = reports.last().expect("a report");
    for c in &last.clients {
        let l = c.labels.as_ref().expect("counts");
        let inj = &injected[&c.client];
        let truth = inj.flipped as f64 / inj.labelled as f64;
        let est = l
            .estimated_noise
            .expect("an estimate once the model is good");
        if c.client == NOISY {
            assert!(est > 0.5, "{}: estimated {est}, injected {truth}", c.client);
        } else {
            assert!(
                (est - truth).abs() < 0.15,
                "{}: estimated {est}, injected {truth}",
                c.client
            );
            assert!(l.pseudo_labelled > 0, "{}: {l:?}", c.client);
            assert!(l.relabelled + l.discarded > 0, "{}: {l:?}", c.client);
        }
    }
    let mut fused = 0;
    for r in &reports {
        assert_eq!(r.outcome, "completed", "round {}", r.round);
        // The pair-flipped camera is named and left out of the merge and of fusion.
        let judged = |client: &str| r.labels.iter().find(|q| q.client == client).cloned();
        let q = judged(NOISY).expect("judged");
        assert!(q.excluded && q.reason.starts_with("label-noise"), "{q:?}");
        assert!(r
            .excluded
            .iter()
            .any(|x| x.client == NOISY && x.reason.starts_with("label-noise")));
        for id in ["cam-0", "cam-1", "cam-2"] {
            let q = judged(id).expect("judged");
            assert!(!q.excluded && q.weight < 1.0 && q.weight > 0.5, "{q:?}");
        }
        let co = r.coevolution.as_ref().expect("coevolution report");
        if co.fusion.is_some() {
            fused += 1;
            let members: Vec<&str> = co
                .fusion_members
                .iter()
                .map(|m| m.member.as_str())
                .collect();
            assert_eq!(
                members,
                ["merged", "cam-0", "cam-1", "cam-2"],
                "round {}",
                r.round
            );
            let total: f64 = co.fusion_members.iter().map(|m| m.weight).sum();
            assert!((total - 1.0).abs() < 1e-9, "{:?}", co.fusion_members);
            assert!(co.fusion_members[1..].iter().all(|m| m.label_factor < 1.0));
        }
    }
    assert_eq!(fused, ROUNDS, "every round fuses");
}

/// `Vec<(String, Dataset)>` has no `Clone` (tensors); shallow handles are enough here.
trait ShallowVec {
    fn to_vec_shallow(&self) -> Vec<(String, coevo_models::Dataset)>;
}

impl ShallowVec for [(String, coevo_models::Dataset)] {
    fn to_vec_shallow(&self) -> Vec<(String, coevo_models::Dataset)> {
        self.iter()
            .map(|(id, d)| (id.clone(), d.shallow_clone()))
            .collect()
    }
}

/// `coevo bench labels` on a tiny synthetic writer split (the FEMNIST grid is hours): every
/// run through the broker, summary.json with runs, curves and goals, and a second call reuses
/// the finished runs instead of training again.
#[test]
fn bench_labels_tiny_grid_writes_summary_and_resumes() {
    use coevo::bench::labels::{run, LabelsArgs, Method, Summary};
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let shape = DataShape {
        channels: 1,
        height: 12,
        width: 12,
        classes: 5,
    };
    let data = synthetic(1000, 200, shape, 8);
    common::write_idx(&data_dir, &data);
    let writers: Vec<String> = (0..1000).map(|i| format!("w{:02}", i % 10)).collect();
    std::fs::write(data_dir.join("train-clients.txt"), writers.join("\n")).expect("clients");
    let out = dir.path().join("bench");
    let args = LabelsArgs {
        split: coevo::bench::split::SplitArgs {
            data: data_dir,
            server_labelled: 2,
            server_validation: 1,
            server_unlabelled: 2,
            clients: 4,
            seed: 1,
        },
        out: out.clone(),
        rounds: 1,
        local: coevo::bench::LocalArgs {
            local_epochs: 1,
            lr: 0.05,
            batch: 16,
        },
        fractions: vec![1.0],
        noises: vec![0.0, 0.4],
        noise_kind: NoiseKind::Symmetric,
        methods: vec![Method::Fedavg, Method::CoevolveClean],
        pretrain_epochs: 2,
        fuse_epochs: 1,
        max_client_noise: 0.5,
        threshold: 0.9,
        round_timeout: 60,
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    run(&rt, &args).expect("bench");
    let read = || -> Summary {
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary"))
            .expect("summary parses")
    };
    let s = read();
    assert_eq!(s.runs.len(), 4);
    for r in &s.runs {
        assert!(r.final_student.is_some(), "{}", r.name);
        assert_eq!(r.curve.len(), 1, "{}", r.name);
        assert_eq!(r.injected.labelled, if r.noise > 0.0 { 400 } else { 0 });
        assert_eq!(r.injected.flipped, if r.noise > 0.0 { 160 } else { 0 });
        assert_eq!(r.final_teacher.is_some(), r.method == Method::CoevolveClean);
    }
    let clean_noisy = s
        .runs
        .iter()
        .find(|r| r.method == Method::CoevolveClean && r.noise > 0.0)
        .expect("run");
    assert_eq!(
        clean_noisy.curve[0].labelled, 400,
        "the fleet's signed counts"
    );
    assert!(s.goals.noise_within_3_points.is_some() && s.goals.noise_loss_fedavg.is_some());
    assert!(
        s.goals.ten_percent_ratio.is_none(),
        "no 10 % run in this grid"
    );
    // Again: every run is reused, nothing retrains, the summary is the same.
    run(&rt, &args).expect("resumed bench");
    let again = read();
    let finals = |s: &Summary| -> Vec<_> {
        s.runs
            .iter()
            .map(|r| (r.name.clone(), r.final_student))
            .collect()
    };
    assert_eq!(finals(&s), finals(&again));
}
