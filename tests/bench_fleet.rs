//! `coevo bench fleet` at a small N, through the real binary: the coordinator and the broker
//! (embedded, then Debian's Mosquitto) run as their own processes, 20 synthetic clients with
//! their own keys, passwords and connections upload signed int8 deltas. Every client must get
//! its receipt in one CONNECT, and the summary must hold sane figures.

use std::path::Path;
use std::process::Command;

const CLIENTS: u64 = 20;

fn run_bench(out: &Path, broker: &str, extra: &[&str]) -> serde_json::Value {
    let status = Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(["bench", "fleet", "--clients", &CLIENTS.to_string()])
        .args(["--broker", broker, "--round-timeout-s", "120"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .status()
        .expect("coevo runs");
    assert!(status.success(), "bench fleet --broker {broker}: {status}");
    let text = std::fs::read_to_string(out.join(format!("n-{CLIENTS}/summary.json")))
        .expect("per-size summary.json");
    let svg = std::fs::read_to_string(out.join("fleet.svg")).expect("fleet.svg");
    assert!(svg.starts_with("<svg") && svg.contains("clients"), "plot");
    serde_json::from_str(&text).expect("summary is JSON")
}

fn check(s: &serde_json::Value, broker: &str) {
    check_with(s, broker, true);
}

/// `one_connect`: every client connected once (false when a broker node is killed mid-round:
/// its clients reconnect to another node).
fn check_with(s: &serde_json::Value, broker: &str, one_connect: bool) {
    let u = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing or not a count: {s}"))
    };
    let f = |k: &str| {
        s[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing or not a number: {s}"))
    };
    assert_eq!(s["broker"], broker);
    assert_eq!(u("clients"), CLIENTS);
    assert_eq!(u("params"), 114_314, "the Fashion-MNIST student");
    assert_eq!(s["uplink"], "int8");
    assert_eq!(u("accepted"), CLIENTS, "{s}");
    assert_eq!(u("lost"), 0, "{s}");
    assert_eq!(u("honest_rejections"), 0, "{s}");
    assert_eq!(s["outcomes"][0], "completed");
    if one_connect {
        assert_eq!(u("connect_attempts_max"), 1, "one CONNECT per client: {s}");
        assert_eq!(u("connect_attempts_total"), CLIENTS);
    }
    let connect = f("connect_s");
    assert!(connect > 0.0 && connect < 60.0, "connect_s {connect}");
    let close = s["publish_to_close_ms"][0]
        .as_u64()
        .expect("publish_to_close_ms[0]");
    assert!(close > 0 && close < 120_000, "publish→close {close} ms");
    for phase in ["publish", "collect", "aggregate", "evaluate"] {
        assert!(
            s["phase_ms"][0][phase].is_u64(),
            "phase_ms.{phase} missing: {s}"
        );
    }
    assert!(f("deltas_per_s") > 0.0);
    assert!(s["aggregate_ns_per_param"][0].is_number());
    // Real processes with real memory: above a bare binary, below anything absurd.
    for k in [
        "coordinator_peak_rss_mb",
        "broker_peak_rss_mb",
        "bench_peak_rss_mb",
    ] {
        let mb = f(k);
        assert!(mb > 1.0 && mb < 8192.0, "{k} = {mb}");
    }
}

/// The clustered broker tier (issue #14): a 3-node NATS cluster (MQTT + JetStream), the fleet
/// spread over the nodes, and node 1 — the coordinator's and a third of the fleet's — SIGKILLed
/// once a third of the fleet holds its receipt. Nothing may be lost.
#[test]
fn twenty_clients_nats_cluster_with_a_node_killed_mid_round() {
    let dir = tempfile::tempdir().unwrap();
    // Uploads spread over 6 s as training times spread them: the kill lands mid-round, with
    // two thirds of the fleet still to upload through the surviving nodes.
    let s = run_bench(
        dir.path(),
        "nats-cluster",
        &["--kill-node-at", "0.3", "--train-spread-s", "6"],
    );
    check_with(&s, "nats-cluster", false);
    assert!(s["node_killed_ms"].is_u64(), "node 1 was killed: {s}");
    let nodes = s["broker_node_peak_rss_mb"]
        .as_array()
        .expect("per-node peaks");
    assert_eq!(nodes.len(), 3);
    assert!(
        nodes.iter().all(|m| m.as_f64().is_some_and(|mb| mb > 1.0)),
        "{s}"
    );
    // Every client connected at least once, and node 1's clients at least twice.
    assert!(
        s["connect_attempts_total"].as_u64().unwrap() > CLIENTS,
        "{s}"
    );
}

#[test]
fn twenty_clients_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let s = run_bench(dir.path(), "embedded", &[]);
    check(&s, "embedded");
    assert_eq!(s["front_processes"], 0);
}

/// The embedded broker with its front end in two child processes sharing the port (how 10,000
/// cameras fit under a 20,000 open-file limit): the same round, the same guarantees.
#[test]
fn twenty_clients_embedded_broker_with_front_processes() {
    let dir = tempfile::tempdir().unwrap();
    let s = run_bench(dir.path(), "embedded", &["--front-processes", "2"]);
    check(&s, "embedded");
    assert_eq!(s["front_processes"], 2);
    // Both front processes served clients (the kernel spreads connections over them).
    let log = std::fs::read_to_string(dir.path().join(format!("n-{CLIENTS}/broker.log")))
        .expect("broker.log");
    assert_eq!(
        log.matches("broker front process serving").count(),
        2,
        "two front processes started:\n{log}"
    );
}

#[test]
fn twenty_clients_mosquitto() {
    if Command::new("mosquitto").arg("-h").output().is_err()
        && !Path::new("/usr/sbin/mosquitto").exists()
    {
        panic!("mosquitto is not installed: run scripts/setup");
    }
    let dir = tempfile::tempdir().unwrap();
    let s = run_bench(dir.path(), "mosquitto", &[]);
    check(&s, "mosquitto");
}
