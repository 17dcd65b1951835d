//! What an operator's Prometheus and terminal see (issue #15): a real round (embedded broker,
//! coordinator, two edge agents training with libtorch, one camera sending garbage) with
//! `/metrics` on the coordinator and the broker. Both endpoints are scraped over HTTP while
//! the round collects and after it closed, the text is parsed, and the coordinator's counters
//! must equal the round's JSON report; the broker's must show the connections and the refusals
//! provoked here (a wrong password, an unknown client, a subscription outside the ACL).
//! `coevo status --once --json` is run as a process mid-round and at the end.

mod common;

use coevo_coordinator::metrics::MetricsConfig;
use coevo_coordinator::{Coordinator, RoundEvent, RoundReport};
use coevo_models::data::synthetic;
use coevo_telemetry::{parse, scrape, Samples};
use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

fn scrape_samples(addr: SocketAddr) -> Samples {
    let text = scrape(&format!("http://{addr}/metrics"), SCRAPE_TIMEOUT)
        .unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
    parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.value(name, labels)
        .unwrap_or_else(|| panic!("no {name}{labels:?} in the scrape"))
}

/// `coevo status OUT --once --json`, parsed.
fn status_json(out: &Path) -> serde_json::Value {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(["status", "--once", "--json"])
        .arg(out)
        .output()
        .expect("coevo runs");
    assert!(
        o.status.success(),
        "coevo status failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("coevo status --json prints JSON")
}

/// One MQTT connection as `id`/`password`: CONNECT, then `subscribe` if given, until the broker
/// answers or closes. Returns whether the CONNECT was accepted. Never reconnects, so each call
/// is exactly one attempt the broker counts.
async fn one_connection(
    addr: SocketAddr,
    id: &str,
    password: &str,
    subscribe: Option<&str>,
) -> bool {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_credentials(id, password)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    if let Some(f) = subscribe {
        client.subscribe(f, QoS::AtLeastOnce).await.unwrap();
    }
    let mut accepted = false;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    accepted = true;
                    if subscribe.is_none() {
                        let _ = client.disconnect().await;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    })
    .await;
    accepted
}

/// Rejected messages of a report summed by reason code.
fn rejected_by_code(r: &RoundReport) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for e in &r.rejected {
        let code = e.reason.split(':').next().unwrap_or("").trim().to_string();
        *m.entry(code).or_default() += e.count;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_follow_a_real_round() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 3);
    let broker = start_broker_with(
        &fleet,
        coevo_broker::BrokerConfig {
            metrics: coevo_broker::MetricsConfig {
                listen: Some("127.0.0.1:0".parse().unwrap()),
            },
            ..Default::default()
        },
    );
    let addr = broker.addr;
    let broker_metrics = broker.metrics_addr().expect("broker metrics configured");
    assert_ne!(broker_metrics.port(), 0);

    let data = synthetic(400, 200, SHAPE, 3);
    let parts = iid_clients(&data.train, 2);
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    // cam-2 never sends a valid delta: the round runs to its deadline with quorum, leaving a
    // window to scrape it while it collects.
    cfg.round.quorum = 2;
    cfg.round.timeout_s = 12;
    cfg.metrics = MetricsConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        status_interval_ms: 200,
    };
    let mut coordinator = Coordinator::new(
        cfg,
        fleet.coordinator_key.clone(),
        data.test.shallow_clone(),
    )
    .unwrap();
    // Started here so it outlives `run`: the final numbers are scraped after the round.
    let server = coordinator
        .start_metrics_server()
        .unwrap()
        .expect("coordinator metrics configured");
    let coord_metrics = server.addr();
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let coord = tokio::spawn(coordinator.with_events(tx).run(std::future::pending()));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agents: Vec<_> = parts
        .into_iter()
        .enumerate()
        // Not limited to one round: an agent done with its rounds disconnects (its status
        // turns offline), and the connected count is checked after their deltas are in.
        .map(|(i, (_, d))| spawn_agent(&fleet, i, addr, d, &stop_rx))
        .collect();

    // Wait for the round to open, then let cam-2 send a chunk that is not an envelope.
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("round 1 starts")
            .expect("coordinator running");
        if let RoundEvent::Started { round: 1, .. } = ev {
            break;
        }
    }
    let (cam2, _, cam2_pw) = fleet.clients[2].clone();
    let mut opts = MqttOptions::new(&cam2, addr.ip().to_string(), addr.port());
    opts.set_credentials(&cam2, &cam2_pw);
    let (garbage, mut garbage_loop) = AsyncClient::new(opts, 16);
    let garbage_task = tokio::spawn(async move { while garbage_loop.poll().await.is_ok() {} });
    garbage
        .publish(
            format!("coevo/v1/{FLEET}/delta/{cam2}/1/0"),
            QoS::AtLeastOnce,
            false,
            b"not a delta chunk".to_vec(),
        )
        .await
        .unwrap();

    // Both honest deltas in and the garbage rejected, before the deadline.
    let (mut accepted, mut rejected) = (0, 0);
    while accepted < 2 || rejected < 1 {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("deltas arrive")
            .expect("coordinator running");
        match ev {
            RoundEvent::Accepted { accepted: n, .. } => accepted = n,
            RoundEvent::Rejected { client, reason, .. } => {
                assert_eq!(client, cam2);
                assert!(reason.starts_with("malformed"), "{reason}");
                rejected += 1;
            }
            RoundEvent::Finished(_) => panic!("the round closed before it was scraped"),
            _ => {}
        }
    }

    // Mid-round, over HTTP.
    let s = scrape_samples(coord_metrics);
    assert_eq!(value(&s, "coevo_round", &[]), 1.0);
    assert_eq!(value(&s, "coevo_round_phase", &[("phase", "collect")]), 1.0);
    assert_eq!(
        s.sum("coevo_round_phase"),
        1.0,
        "exactly one phase at a time"
    );
    assert_eq!(value(&s, "coevo_clients_registered", &[]), 3.0);
    assert_eq!(value(&s, "coevo_deltas_accepted_total", &[]), 2.0);
    assert_eq!(
        value(
            &s,
            "coevo_deltas_rejected_total",
            &[("reason", "malformed")]
        ),
        1.0
    );
    assert!(value(&s, "coevo_round_deadline_timestamp_seconds", &[]) > 0.0);
    // The agents' retained "online" statuses (cam-2's raw client publishes none).
    let t0 = std::time::Instant::now();
    while scrape_samples(coord_metrics).value("coevo_clients_connected", &[]) != Some(2.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "connected never reached 2: {:?}",
            std::fs::read_to_string(out.join("status.json"))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And in the operator's terminal.
    let t0 = std::time::Instant::now();
    let live = loop {
        let v = status_json(&out);
        if v["accepted"] == 2 && v["rejected"] == 1 && v["connected"] == 2 {
            break v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "status.json lags: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(live["state"], "running");
    assert_eq!(live["round"], 1);
    assert_eq!(live["phase"], "collect");
    assert_eq!(live["registered"], 3);
    // cam-2's chunk never made a complete upload.
    assert_eq!(live["uploaded"], 2);
    assert!(
        live["time_left_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{live}"
    );

    // The live view follows the round until it closes, then exits by itself.
    let mut follow = std::process::Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(["status", "--json"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("coevo status runs");

    // The broker: provoke one refusal of each kind while the fleet is connected.
    assert!(!one_connection(addr, &fleet.clients[0].0, "wrong password", None).await);
    assert!(!one_connection(addr, "cam-999", "whatever", None).await);
    let other_receipt = format!("coevo/v1/{FLEET}/receipt/{}", fleet.clients[0].0);
    assert!(one_connection(addr, &cam2, &cam2_pw, Some(&other_receipt)).await);
    let b = scrape_samples(broker_metrics);
    let refused = |r| value(&b, "coevo_broker_connects_refused_total", &[("reason", r)]);
    assert_eq!(refused("bad-password"), 1.0);
    assert_eq!(refused("unknown-client"), 1.0);
    assert_eq!(refused("busy"), 0.0);
    assert_eq!(
        value(
            &b,
            "coevo_broker_acl_denials_total",
            &[("packet", "subscribe")]
        ),
        1.0
    );
    assert_eq!(broker.stats().acl_refused_subscribe, 1);
    // coordinator, two agents, cam-2's garbage client, the ACL offender.
    assert!(value(&b, "coevo_broker_connections_accepted_total", &[]) >= 5.0);
    // Open now: at least the coordinator and the agents (cam-2's garbage client was taken
    // over by its ACL-offending namesake, which the broker then closed).
    assert!(value(&b, "coevo_broker_connections_open", &[]) >= 3.0);
    assert!(value(&b, "coevo_broker_publishes_received_total", &[]) > 0.0);
    assert!(value(&b, "coevo_broker_received_bytes_total", &[]) > 0.0);
    assert!(value(&b, "coevo_broker_sent_bytes_total", &[]) > 0.0);

    // After the round: the counters equal its report.
    let reports = tokio::time::timeout(Duration::from_secs(60), coord)
        .await
        .expect("round closes at its deadline")
        .unwrap()
        .expect("coordinator ran");
    let report = reports.last().expect("a report").clone();
    assert_eq!(report.round, 1);
    assert_eq!(report.outcome, "completed");
    let s = scrape_samples(coord_metrics);
    assert_eq!(value(&s, "coevo_round", &[]), report.round as f64);
    assert_eq!(
        value(&s, "coevo_last_closed_round", &[]),
        report.round as f64
    );
    assert_eq!(
        value(&s, "coevo_deltas_accepted_total", &[]),
        report.accepted as f64
    );
    let by_code = rejected_by_code(&report);
    assert_eq!(by_code.values().sum::<u64>(), 1, "{:?}", report.rejected);
    for (code, n) in &by_code {
        assert_eq!(
            value(&s, "coevo_deltas_rejected_total", &[("reason", code)]),
            *n as f64,
            "reason {code}"
        );
    }
    assert_eq!(s.sum("coevo_deltas_rejected_total"), 1.0);
    assert_eq!(
        value(&s, "coevo_delta_bytes_accepted_total", &[]),
        report.bytes_up as f64
    );
    assert_eq!(
        value(&s, "coevo_model_bytes_sent_total", &[]),
        report.bytes_down as f64
    );
    let acc = report.student.test_accuracy.expect("student evaluated");
    assert!((value(&s, "coevo_student_test_accuracy_ratio", &[]) - acc).abs() < 1e-9);
    assert!(
        value(&s, "coevo_teacher_test_accuracy_ratio", &[]).is_nan(),
        "fedavg has no teacher"
    );
    assert_eq!(
        value(&s, "coevo_rounds_total", &[("outcome", "completed")]),
        1.0
    );
    assert_eq!(value(&s, "coevo_rollbacks_total", &[]), 0.0);
    assert_eq!(
        value(&s, "coevo_round_duration_seconds", &[]),
        report.duration_ms as f64 / 1000.0
    );
    assert_eq!(value(&s, "coevo_round_phase", &[("phase", "idle")]), 1.0);

    // `coevo status` (no --once) saw the round close and ended on its own.
    let t0 = std::time::Instant::now();
    while follow.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "coevo status kept running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let followed = follow.wait_with_output().unwrap();
    assert!(followed.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&followed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON document a line"))
        .collect();
    assert!(lines.len() >= 2, "refreshed while the round ran: {lines:?}");
    assert_eq!(lines[0]["phase"], "collect");
    let last = lines.last().unwrap();
    assert_eq!(last["last_round"]["round"], 1, "{last}");

    let end = status_json(&out);
    assert_eq!(end["state"], "finished");
    assert_eq!(end["last_round"]["round"], 1);
    assert_eq!(end["last_round"]["outcome"], "completed");
    assert_eq!(end["last_round"]["accepted"], 2);
    assert!(end["time_left_ms"].is_null());

    let _ = stop_tx.send(true);
    for a in agents {
        let _ = a.await;
    }
    garbage_task.abort();
}

/// A dead coordinator's status is refused with what happened, not shown as live; a missing one
/// says no coordinator runs there.
#[test]
fn status_refuses_a_stale_or_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_coevo"))
            .arg("status")
            .args(args)
            .arg(dir.path())
            .output()
            .expect("coevo runs")
    };
    let o = run(&["--once"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no coordinator has run"), "{err}");

    let status = coevo_coordinator::status::LiveStatus {
        fleet: "city".into(),
        state: "running".into(),
        round: 4,
        phase: "collect".into(),
        interval_ms: 1000,
        updated_unix_ms: 1_000,
        ..Default::default()
    };
    coevo_coordinator::status::write_status(dir.path(), &status).unwrap();
    let o = run(&["--once", "--json"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not running any more"), "{err}");
    assert!(err.contains("round 4"), "{err}");
}

/// `coevo_…` metric names in `text` (PromQL expressions, YAML).
fn metric_names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("coevo_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Names declared (`# TYPE`) in an exposition.
fn declared(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// deploy/: the Grafana dashboard is an importable dashboard whose every query, like every
/// alert rule, uses metrics the coordinator and the broker really export; Prometheus scrapes
/// both at the ports the sample configs suggest.
#[test]
fn deploy_files_use_metrics_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut exported =
        declared(&coevo_coordinator::metrics::CoordinatorMetrics::new("city", 5, 1000).render());
    let broker = coevo_broker::start(coevo_broker::BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics: coevo_broker::MetricsConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
        },
        ..Default::default()
    })
    .expect("broker starts");
    let addr = broker.metrics_addr().expect("metrics configured");
    exported.extend(declared(
        &scrape(&format!("http://{addr}/metrics"), SCRAPE_TIMEOUT).unwrap(),
    ));
    assert!(exported.contains("coevo_round") && exported.contains("coevo_broker_connections_open"));

    let text = std::fs::read_to_string(root.join("deploy/grafana-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert_eq!(
        dash["__inputs"][0]["pluginId"], "prometheus",
        "importable with a data source"
    );
    assert!(dash["uid"].is_string() && dash["schemaVersion"].as_u64() >= Some(30));
    let panels = dash["panels"].as_array().expect("panels");
    let mut titles = String::new();
    let mut queried = std::collections::BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        assert!(p["gridPos"]["w"].as_u64().is_some_and(|w| w > 0), "{p}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel without a query: {}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            queried.extend(metric_names_in(expr));
            exprs.push(expr.to_string());
        }
        titles.push_str(&p["title"].as_str().unwrap_or("").to_lowercase());
        titles.push('|');
    }
    for topic in [
        "round",
        "accuracy",
        "accepted",
        "bytes",
        "clients",
        "refusals",
        "rollbacks",
    ] {
        assert!(titles.contains(topic), "no panel about {topic}: {titles}");
    }
    let alerts = std::fs::read_to_string(root.join("deploy/alerts.yml")).unwrap();
    let used: Vec<String> = queried
        .into_iter()
        .chain(metric_names_in(&alerts))
        .collect();
    for name in &used {
        assert!(
            exported.contains(name),
            "{name} is queried in deploy/ but exported by nobody; exported: {exported:?}"
        );
    }
    for needed in [
        "coevo_rollbacks_total",
        "coevo_deltas_rejected_total",
        "coevo_broker_connects_refused_total",
        "coevo_student_test_accuracy_ratio",
    ] {
        assert!(used.iter().any(|u| u == needed), "{needed} is not used");
    }

    let prom = std::fs::read_to_string(root.join("deploy/prometheus.yml")).unwrap();
    let coordinator_sample =
        std::fs::read_to_string(root.join("coordinator/coordinator.sample.toml")).unwrap();
    let broker_sample = std::fs::read_to_string(root.join("broker/broker.sample.toml")).unwrap();
    for (job, port, sample) in [
        ("coevo-coordinator", "9464", &coordinator_sample),
        ("coevo-broker", "9465", &broker_sample),
    ] {
        assert!(prom.contains(&format!("job_name: {job}")), "{job}");
        assert!(prom.contains(&format!("127.0.0.1:{port}")), "{job} target");
        assert!(
            sample.contains(&format!("listen = \"127.0.0.1:{port}\"")),
            "{job} sample"
        );
    }
    assert!(prom.contains("- alerts.yml"));

    // Prometheus' own checker, where installed (Debian `prometheus`): the scrape config and
    // its rules load, and both expositions pass its lint (naming, units, HELP).
    let Some(promtool) = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("promtool not installed: skipping Prometheus' own checks of deploy/");
        return;
    };
    let ok = |out: std::process::Output, what: &str| {
        assert!(
            out.status.success(),
            "promtool {what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(
        std::process::Command::new(promtool)
            .args(["check", "config"])
            .arg(root.join("deploy/prometheus.yml"))
            .output()
            .unwrap(),
        "check config",
    );
    // Every dashboard query is valid PromQL once Grafana has filled in its variables: checked
    // by loading them as recording rules (YAML takes JSON strings as they are).
    let rules = dir_with_rules(&exprs);
    ok(
        std::process::Command::new(promtool)
            .args(["check", "rules"])
            .arg(rules.path().join("dashboard-rules.yml"))
            .output()
            .unwrap(),
        "check rules (the dashboard's queries)",
    );
    for text in [
        coevo_coordinator::metrics::CoordinatorMetrics::new("city", 5, 1000).render(),
        scrape(&format!("http://{addr}/metrics"), SCRAPE_TIMEOUT).unwrap(),
    ] {
        use std::io::Write;
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        ok(child.wait_with_output().unwrap(), "check metrics");
    }
}

/// What scraping and the status file cost (BENCHMARKS.md): 2,000 sequential scrapes of each
/// endpoint over HTTP and 1,000 status-file writes, with latency percentiles and sizes.
/// `cargo test --test metrics -- --ignored --nocapture measure_scrape_cost`
#[test]
#[ignore]
fn measure_scrape_cost() {
    use coevo_coordinator::metrics::CoordinatorMetrics;
    let pct = |mut v: Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    let measure = |name: &str, addr: SocketAddr| {
        let url = format!("http://{addr}/metrics");
        let body = scrape(&url, SCRAPE_TIMEOUT).unwrap();
        let mut us = Vec::new();
        for _ in 0..2000 {
            let t = std::time::Instant::now();
            let text = scrape(&url, SCRAPE_TIMEOUT).unwrap();
            us.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(!text.is_empty());
        }
        println!(
            "{name}: {} samples, {} bytes; scrape p50 {:.0} µs, p99 {:.0} µs",
            parse(&body).unwrap().0.len(),
            body.len(),
            pct(us.clone(), 0.5),
            pct(us, 0.99)
        );
    };
    // A coordinator mid-round with every rejection reason seen.
    let m = std::sync::Arc::new(CoordinatorMetrics::new("city", 100, 1000));
    for code in [
        "unknown-client",
        "bad-signature",
        "wrong-fleet",
        "wrong-round",
        "wrong-base",
        "client-mismatch",
        "digest-mismatch",
        "length-mismatch",
        "oversized",
        "malformed",
        "non-finite",
        "shape-mismatch",
        "conflicting-upload",
        "round-closed",
    ] {
        m.rejected(code);
    }
    let render = {
        let m = m.clone();
        std::sync::Arc::new(move || m.render())
    };
    let server =
        coevo_telemetry::MetricsServer::start("127.0.0.1:0".parse().unwrap(), "bench", render)
            .unwrap();
    measure("coordinator", server.addr());
    let broker = coevo_broker::start(coevo_broker::BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics: coevo_broker::MetricsConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
        },
        ..Default::default()
    })
    .unwrap();
    measure("broker", broker.metrics_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut us = Vec::new();
    for _ in 0..1000 {
        let t = std::time::Instant::now();
        coevo_coordinator::status::write_status(dir.path(), &m.snapshot()).unwrap();
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let size = std::fs::metadata(dir.path().join("status.json"))
        .unwrap()
        .len();
    println!(
        "status.json: {size} bytes; write p50 {:.0} µs, p99 {:.0} µs",
        pct(us.clone(), 0.5),
        pct(us, 0.99)
    );
}

/// A temporary folder holding `dashboard-rules.yml`: each Grafana query as a recording rule,
/// with Grafana's variables replaced the way Grafana fills them in.
fn dir_with_rules(exprs: &[String]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e.replace("$__rate_interval", "1m").replace("$fleet", ".*");
        yaml.push_str(&format!(
            "      - record: coevo:dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    std::fs::write(dir.path().join("dashboard-rules.yml"), yaml).unwrap();
    dir
}
