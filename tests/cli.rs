//! The README's "running a fleet by hand" path, as separate processes of the real binary:
//! `coevo keys gen`, `coevo fleet add|password|list`, `coevo broker`, `coevo coordinator`,
//! `coevo edge` ×2 and `coevo report`, configured from files like an operator would.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn coevo(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run coevo");
    assert!(
        out.status.success(),
        "coevo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn fleet_by_hand_with_separate_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Small IDX data set on disk, as a device or the coordinator would find it.
    let shape = common::SHAPE;
    let data = coevo_models::data::synthetic(600, 200, shape, 41);
    common::write_idx(&dir.join("data"), &data);

    coevo(dir, &["keys", "gen", "keys/coordinator.pk8"]);
    let coordinator_pw = stdout(&coevo(dir, &["fleet", "password", "coordinator"]));
    let mut device_pw = Vec::new();
    for id in ["cam-001", "cam-002"] {
        coevo(dir, &["keys", "gen", &format!("keys/{id}.pk8")]);
        let pw = coevo(
            dir,
            &["fleet", "add", id, "--key", &format!("keys/{id}.pub")],
        );
        device_pw.push(stdout(&pw));
    }
    let list = stdout(&coevo(dir, &["fleet", "list"]));
    assert!(
        list.contains("cam-001") && list.contains("cam-002"),
        "{list}"
    );
    // Refusing to overwrite a key without --force.
    let again = Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(["keys", "gen", "keys/cam-001.pk8"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!again.status.success());

    let addr = coevo_broker::free_local_addr().unwrap();
    std::fs::write(
        dir.join("broker.toml"),
        format!("listen = \"{addr}\"\ncredentials = \"credentials.toml\"\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("coordinator.toml"),
        format!(
            "fleet = \"city\"\nrounds = 2\n[broker]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"{coordinator_pw}\"\n\
             [data]\npath = \"data\"\n[round]\nquorum = 2\ntimeout_s = 60\n",
            addr.port()
        ),
    )
    .unwrap();
    for (i, id) in ["cam-001", "cam-002"].iter().enumerate() {
        std::fs::write(
            dir.join(format!("{id}.toml")),
            format!(
                "fleet = \"city\"\nclient_id = \"{id}\"\nkey = \"keys/{id}.pk8\"\ncoordinator_key = \"keys/coordinator.pub\"\n\
                 max_rounds = 2\n[broker]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"{}\"\n\
                 [data]\npath = \"data\"\npartition = \"iid:2\"\npart = \"{i}\"\nseed = 3\n",
                addr.port(),
                device_pw[i]
            ),
        )
        .unwrap();
    }

    let spawn = |args: &[&str], log: &str| {
        let f = std::fs::File::create(dir.join(log)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_coevo"))
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap()
    };
    let mut broker = spawn(&["broker", "--config", "broker.toml"], "broker.log");
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "broker did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut coordinator = spawn(
        &["coordinator", "--config", "coordinator.toml"],
        "coordinator.log",
    );
    let mut edges: Vec<_> = ["cam-001", "cam-002"]
        .iter()
        .map(|id| {
            spawn(
                &["edge", "--config", &format!("{id}.toml")],
                &format!("{id}.log"),
            )
        })
        .collect();
    let status = coordinator.wait().unwrap();
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    assert!(status.success(), "coordinator: {}", log("coordinator.log"));
    for (e, id) in edges.iter_mut().zip(["cam-001", "cam-002"]) {
        let s = e.wait().unwrap();
        assert!(s.success(), "{id}: {}", log(&format!("{id}.log")));
    }
    let _ = broker.kill();
    let _ = broker.wait();

    let table = stdout(&coevo(dir, &["report", "out"]));
    assert!(table.contains("completed"), "{table}");
    let json = stdout(&coevo(dir, &["report", "out", "--json"]));
    let rounds: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rounds.len(), 2);
    for r in &rounds {
        assert_eq!(r["accepted"], 2);
        assert!(r["student"]["test_accuracy"].as_f64().unwrap() > 0.2);
        // The config names no mode: coevolve is the default, so the coordinator kept its
        // share of the data, trained a teacher and reports it too.
        assert!(r["teacher"]["test_accuracy"].as_f64().is_some(), "{r}");
        assert!(r["coevolution"]["fusion"].is_object(), "{r}");
    }
}
