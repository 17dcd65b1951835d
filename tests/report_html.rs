//! The analysts' report from a real run (issue #15): two `coevolve` rounds on tiny data through
//! the real broker and edge agents; the coordinator's own `out/report.html`, then
//! `coevo report --html/--csv`, rendered in headless Debian `chromium` at phone and desktop
//! size. Asserts the charts are in the rendered DOM with every round and class, the
//! screenshots are not blank, the CSV has a row per client per round, and the page made no
//! network request (checked in chromium's own net log, with a control page proving the check
//! sees requests).

mod common;

use coevo_coordinator::coevolve::{Mode, ServerData};
use coevo_coordinator::Coordinator;
use coevo_models::data::synthetic;
use coevo_models::partition::{partition, PartitionSpec};
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CLIENTS: usize = 3;
const ROUNDS: u64 = 2;

fn chromium() -> PathBuf {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(p).is_file() {
            return p.into();
        }
    }
    panic!(
        "Debian `chromium` is not installed: this test renders the HTML report in it. \
         Run scripts/setup (or `apt-get install chromium`)."
    );
}

/// Runs headless chromium on `page` with `extra` flags, in its own profile under `work`, and
/// returns its standard output. Killed after 90 s.
fn run_chromium(work: &Path, page: &Path, extra: &[String]) -> String {
    let profile = tempfile::tempdir_in(work).unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--no-pings",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium {extra:?} failed: {status}");
            break;
        }
        if t.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("chromium {extra:?} did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

/// URLs of requests a *page* started (chromium's own background requests have the initiator
/// `not an origin`; a `file://` page's subresources have the origin `null`).
fn page_requests(net_log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(net_log).expect("net log written");
    // The log is closed properly on a clean exit; tolerate a missing tail anyway.
    let log: serde_json::Value = serde_json::from_str(&text)
        .or_else(|_| serde_json::from_str(&format!("{}]}}", text.trim_end().trim_end_matches(','))))
        .expect("net log is JSON");
    let start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
        .as_u64()
        .expect("net log names URL_REQUEST_START_JOB");
    log["events"]
        .as_array()
        .expect("net log events")
        .iter()
        .filter(|e| e["type"].as_u64() == Some(start_job))
        .filter(|e| e["params"]["initiator"].as_str() != Some("not an origin"))
        .filter_map(|e| e["params"]["url"].as_str().map(String::from))
        .collect()
}

/// Loads the screenshot and checks its size and that it is not blank: many distinct colours
/// and a real spread of brightness (a white or single-colour page has neither).
fn assert_screenshot(path: &Path, w: u32, h: u32) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    assert_eq!(img.dimensions(), (w, h), "{}", path.display());
    let luma: Vec<f64> = img
        .pixels()
        .map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64)
        .collect();
    let mean = luma.iter().sum::<f64>() / luma.len() as f64;
    let var = luma.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / luma.len() as f64;
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(var > 100.0, "{}: luma variance {var:.1}", path.display());
    assert!(
        colours.len() > 50,
        "{}: {} colours",
        path.display(),
        colours.len()
    );
}

/// The `<svg id="…">…</svg>` element of the DOM.
fn svg<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!(r#"<svg id="{id}""#))
        .unwrap_or_else(|| panic!("no svg#{id} in the rendered DOM"));
    let end = dom[start..].find("</svg>").expect("svg closed") + start;
    &dom[start..end]
}

/// `data-points` of the polylines of one series.
fn series_points(chart: &str, series: &str) -> Vec<usize> {
    let key = format!(r#"data-series="{series}" data-points=""#);
    chart
        .match_indices(&key)
        .map(|(i, _)| {
            let rest = &chart[i + key.len()..];
            rest[..rest.find('"').unwrap()].parse().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_report_of_a_real_run_renders_offline_on_phone_and_desktop() {
    let _ = chromium(); // fail before the run when the browser is missing
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), CLIENTS);
    let broker = start_broker(&fleet);
    let addr = broker.addr;
    let data = synthetic(1200, 200, SHAPE, 51);
    let range = |a: usize, b: usize| data.train.subset(&(a..b).collect::<Vec<_>>());
    let server = ServerData {
        labelled: range(0, 100),
        unlabelled: range(100, 300),
        validation: range(300, 400),
    };
    let clients = range(400, 1200);
    let parts = partition(
        &clients.labels_vec(),
        None,
        &PartitionSpec::Iid { clients: CLIENTS },
        1,
    )
    .unwrap();
    let out = dir.path().join("out");
    let mut cfg = coordinator_config(&fleet, addr, out.clone(), ROUNDS);
    cfg.mode = Mode::Coevolve;
    cfg.coevolution.pretrain_epochs = 2;
    cfg.coevolution.distill.epochs = 1;
    cfg.coevolution.fuse.epochs = 1;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agents: Vec<_> = (0..CLIENTS)
        .map(|i| {
            spawn_agent_for(
                &fleet,
                i,
                addr,
                clients.subset(&parts[i].1),
                &stop_rx,
                Some(ROUNDS),
            )
        })
        .collect();
    let reports = Coordinator::new(
        cfg,
        fleet.coordinator_key.clone(),
        data.test.shallow_clone(),
    )
    .unwrap()
    .with_server_data(server)
    .run(std::future::pending())
    .await
    .unwrap();
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(30), a).await;
    }
    assert_eq!(reports.len(), ROUNDS as usize);
    let classes = reports[0].student.per_class_accuracy.len();
    assert_eq!(classes, SHAPE.classes);

    // The coordinator refreshed out/report.html after every round (the last: both rounds).
    let live =
        std::fs::read_to_string(out.join("report.html")).expect("coordinator wrote report.html");
    assert_eq!(
        series_points(svg(&live, "chart-accuracy"), "student"),
        vec![ROUNDS as usize]
    );
    assert!(
        !out.join("report.tmp").exists(),
        "the temp file was renamed"
    );

    // `coevo report --html --csv` on the same directory.
    let html = dir.path().join("report.html");
    let csv_path = dir.path().join("clients.csv");
    let status = Command::new(env!("CARGO_BIN_EXE_coevo"))
        .arg("report")
        .arg(&out)
        .arg("--html")
        .arg(&html)
        .arg("--csv")
        .arg(&csv_path)
        .status()
        .unwrap();
    assert!(status.success());
    let mut rd = csv::Reader::from_path(&csv_path).unwrap();
    let header: Vec<String> = rd.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header, coevo_coordinator::export::CSV_COLUMNS);
    let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.unwrap()).collect();
    assert_eq!(
        rows.len(),
        CLIENTS * ROUNDS as usize,
        "a row per client per round"
    );
    for (row, r) in rows.iter().zip(
        reports
            .iter()
            .flat_map(|r| r.clients.iter().map(move |c| (r.round, c))),
    ) {
        let (round, c) = r;
        assert_eq!(&row[0], round.to_string());
        assert_eq!(&row[1], c.client);
        assert!(matches!(&row[2], "accepted" | "clipped"), "{row:?}");
        assert_eq!(row[4].parse::<u64>().unwrap(), c.samples);
        assert_eq!(row[8].parse::<u64>().unwrap(), c.bytes_up);
        assert!((row[10].parse::<f64>().unwrap() - c.delta_norm).abs() < 1e-9);
    }

    // Rendered DOM: every chart, every round, every class.
    let work = dir.path();
    let dom = run_chromium(work, &html, &["--dump-dom".to_string()]);
    let acc = svg(&dom, "chart-accuracy");
    for series in ["student", "teacher"] {
        assert_eq!(
            series_points(acc, series),
            vec![ROUNDS as usize],
            "{series}: one unbroken line over every round"
        );
    }
    for model in ["student", "teacher"] {
        let cells = svg(&dom, &format!("heatmap-{model}"))
            .matches(r#"<rect class="cell""#)
            .count();
        assert_eq!(cells, classes * ROUNDS as usize, "{model} heatmap cells");
    }
    assert_eq!(
        svg(&dom, "chart-bytes").matches(r#"class="bar "#).count(),
        2 * ROUNDS as usize
    );
    assert_eq!(
        svg(&dom, "chart-phases").matches(r#"class="bar "#).count(),
        5 * ROUNDS as usize
    );
    assert!(dom.contains(r#"id="coevolution""#) && dom.contains(r#"id="alerts""#));
    for c in &reports[1].clients {
        assert!(
            dom.contains(&format!("<td>{}</td>", c.client)),
            "{} listed",
            c.client
        );
    }

    // Screenshots at phone and desktop size, with the network logged.
    for (name, w, h) in [("phone", 390u32, 844u32), ("desktop", 1280, 900)] {
        let png = work.join(format!("{name}.png"));
        let net = work.join(format!("{name}-net.json"));
        run_chromium(
            work,
            &html,
            &[
                format!("--window-size={w},{h}"),
                format!("--screenshot={}", png.display()),
                format!("--log-net-log={}", net.display()),
            ],
        );
        assert_screenshot(&png, w, h);
        assert_eq!(
            page_requests(&net),
            Vec::<String>::new(),
            "{name}: the page loaded nothing"
        );
    }

    // Control: the same check does see a page's requests (a closed local port: nothing leaves
    // the machine).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let control = work.join("control.html");
    std::fs::write(
        &control,
        format!(
            r#"<!DOCTYPE html><html><body><img src="http://127.0.0.1:{port}/x.png"></body></html>"#
        ),
    )
    .unwrap();
    let net = work.join("control-net.json");
    run_chromium(
        work,
        &control,
        &[
            "--dump-dom".to_string(),
            format!("--log-net-log={}", net.display()),
        ],
    );
    assert_eq!(
        page_requests(&net),
        vec![format!("http://127.0.0.1:{port}/x.png")]
    );
}
