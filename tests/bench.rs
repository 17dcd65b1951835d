//! `coevo bench coevolution` end to end on a tiny IDX dataset with a clients file: every part
//! runs (bounds, a FedAvg fleet and a co-evolving fleet through the real broker), and
//! `summary.json` holds the fields the issue names, consistent with each other.

mod common;

use std::process::{Command, Stdio};

/// A tiny bench: 2 rounds, few epochs; fusion on augmented views of the pool (the
/// online-ensemble path).
const ARGS: &[&str] = &[
    "bench",
    "coevolution",
    "--data",
    "data",
    "--rounds",
    "2",
    "--server-labelled",
    "2",
    "--server-unlabelled",
    "2",
    "--clients",
    "6",
    "--upper-epochs",
    "2",
    "--pretrain-epochs",
    "2",
    "--fuse-epochs",
    "1",
    "--ensemble-clients",
    "2",
    "--fuse-augment",
    "true",
];

#[test]
fn coevolution_bench_writes_a_consistent_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = coevo_models::data::synthetic(480, 160, common::SHAPE, 5);
    common::write_idx(&dir.join("data"), &data);
    // 12 writers of 40 samples: 2 labelled, 2 pool, 6 clients (2 left out).
    let writers: String = (0..480).map(|i| format!("w{:02}\n", i % 12)).collect();
    std::fs::write(dir.join("data/train-clients.txt"), writers).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(ARGS)
        .args(["--out", "bench"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run coevo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("gap_closed"), "{stdout}");

    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("bench/summary.json")).unwrap()).unwrap();
    let acc = |k: &str| {
        let v = s[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {s}"));
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
        v
    };
    let (lo, hi, teacher) = (
        acc("lower_bound"),
        acc("upper_bound"),
        acc("coevolve_teacher"),
    );
    acc("fedavg_student");
    acc("coevolve_student");
    if hi > lo {
        let gap = s["gap_closed"].as_f64().unwrap();
        assert!((gap - (teacher - lo) / (hi - lo)).abs() < 1e-9);
    }
    let curves = s["curves"].as_array().unwrap();
    assert_eq!(curves.len(), 2);
    for p in curves {
        for k in ["fedavg_student", "coevolve_student", "coevolve_teacher"] {
            assert!(
                p[k].as_f64().is_some(),
                "round {} lacks {k}: {p}",
                p["round"]
            );
        }
        assert!(p["fusion"].as_str().is_some(), "{p}");
    }
    // The split is by writer: one client per writer.
    assert_eq!(s["settings"]["client_writers"], 6);
    // Both fleets left their round reports behind.
    for mode in ["fedavg", "coevolve"] {
        let reports = coevo_coordinator::report::load_reports(&dir.join("bench").join(mode))
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(reports.len(), 2, "{mode}");
        assert!(reports.iter().all(|r| r.accepted == 6), "{mode}");
    }
    // Another fusion setting, reusing the bounds and the FedAvg fleet of the first bench.
    let args2: Vec<String> = ARGS
        .iter()
        .map(|a| a.to_string())
        .chain(["--out", "bench2", "--only", "coevolve", "--reuse", "bench"].map(String::from))
        .collect();
    // The plain-logits path of fusion this time.
    let args2: Vec<String> = args2
        .into_iter()
        .map(|a| if a == "true" { "false".into() } else { a })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(&args2)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("bench2/summary.json")).unwrap()).unwrap();
    assert_eq!(s2["lower_bound"], s["lower_bound"]);
    assert_eq!(s2["fedavg_student"], s["fedavg_student"]);
    assert!(s2["coevolve_teacher"].as_f64().is_some());
    assert!(
        !dir.join("bench2/fedavg").exists(),
        "fedavg was not to run again"
    );
    // A bench of another split can't be reused.
    let out = Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(ARGS)
        .args([
            "--out", "bench3", "--only", "coevolve", "--reuse", "bench", "--seed", "9",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not comparable"));

    // A second run into the same directory is refused rather than mixing results.
    let again = Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(["bench", "coevolution", "--data", "data", "--out", "bench"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds"));
}

#[test]
fn bench_needs_a_clients_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = coevo_models::data::synthetic(100, 20, common::SHAPE, 5);
    common::write_idx(&dir.join("data"), &data);
    let out = Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(["bench", "coevolution", "--data", "data", "--out", "b"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("clients file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
