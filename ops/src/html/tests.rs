use super::*;
use crate::alerts::tests::round;
use crate::report::{ClientReport, RejectionCount};

fn client(name: &str, norm: f64) -> ClientReport {
    ClientReport {
        client: name.into(),
        samples: 50,
        local_loss: 0.4,
        local_accuracy: 0.8,
        train_ms: 900,
        bytes_up: 30_000,
        bytes_down: 120_000,
        delta_norm: norm,
        trust_weight: None,
        labels: None,
    }
}

fn history(reports: &[RoundReport]) -> History {
    let run = Run {
        dir: "out".into(),
        reports: reports.to_vec(),
        baseline: None,
        bounds: (None, None),
    };
    History::from_run(&run, AlertConfig::default())
}

#[test]
fn the_page_is_inert_and_escapes_what_clients_send() {
    let mut r = round(1, 0.5);
    r.clients = vec![client("<script>alert(1)</script>", 1.0)];
    r.rejected = vec![RejectionCount {
        client: "cam\"><img src=http://evil/x>".into(),
        reason: "bad-signature: <b>".into(),
        count: 1,
        signed: false,
    }];
    let html = render(&history(&[r]));
    assert!(html.contains("default-src 'none'"));
    assert!(
        !html.contains("<script"),
        "no script element, escaped or not"
    );
    assert!(!html.contains("<img"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!html.contains("http://evil/x>"));
    // The hostile URL is only text: no element or attribute can load it.
    assert!(!html.contains("src=\"http") && !html.contains("href="));
    // A page's own references: only the SVG namespace (an identifier, never fetched).
    let clean = render(&history(&[round(1, 0.5)]));
    let urls: Vec<&str> = clean
        .match_indices("http")
        .map(|(i, _)| &clean[i..i + 26])
        .filter(|u| !u.starts_with("http-equiv"))
        .collect();
    assert!(
        urls.iter()
            .all(|u| u.starts_with("http://www.w3.org/2000/svg")),
        "{urls:?}"
    );
    assert!(!clean.contains("url(") && !clean.contains("@import"));
}

#[test]
fn charts_have_every_round_and_every_class() {
    let reports: Vec<_> = (1..=4)
        .map(|n| {
            let mut r = round(n, 0.2 * n as f64);
            r.mode = "coevolve".into();
            r.teacher = crate::report::ModelReport {
                test_accuracy: Some(0.9),
                test_loss: None,
                per_class_accuracy: vec![0.9; 10],
                params: None,
            };
            r.clients = vec![client("cam-1", 1.0), client("cam-2", 2.0)];
            r
        })
        .collect();
    let html = render(&history(&reports));
    for id in [
        "chart-accuracy",
        "heatmap-student",
        "heatmap-teacher",
        "chart-bytes",
        "chart-phases",
    ] {
        assert!(html.contains(&format!(r#"<svg id="{id}""#)), "{id}");
    }
    assert!(html.contains(r#"class="series c-student" data-series="student" data-points="4""#));
    assert!(html.contains(r#"class="series c-teacher" data-series="teacher" data-points="4""#));
    // 10 classes × 4 rounds, twice (student and teacher).
    assert_eq!(html.matches(r#"<rect class="cell""#).count(), 80);
    // Grouped bytes bars (2 per round) and stacked phases (5 per round).
    assert_eq!(html.matches(r#"<rect class="bar c-down""#).count(), 4);
    assert_eq!(html.matches(r#"<rect class="bar c-publish""#).count(), 4);
    assert!(html.contains(r#"<section id="alerts" class="none">"#));
}

#[test]
fn old_fedavg_and_skipped_rounds_render_with_gaps_and_alerts() {
    // Round 2 skipped (no evaluation happened in an old run: null accuracy, no classes).
    let r1 = round(1, 0.6);
    let mut r2 = round(2, 0.0);
    r2.outcome = "skipped".into();
    r2.accepted = 0;
    r2.student = crate::report::ModelReport::absent();
    let r3 = round(3, 0.65);
    let html = render(&history(&[r1, r2, r3]));
    assert!(!html.contains("heatmap-teacher"));
    assert!(!html.contains(r#"id="coevolution""#));
    // The student line is broken by the skipped round: two runs of one point each.
    assert_eq!(
        html.matches(r#"data-series="student" data-points="1""#)
            .count(),
        2
    );
    assert!(html.contains("m-skipped"));
    assert!(html.contains(r#"<li class="alert" data-kind="skipped">"#));
    assert_eq!(html.matches("cell missing").count(), 10);
}

#[test]
fn a_city_sized_fleet_stays_small_and_totals_every_client() {
    let n = 10_000;
    let reports: Vec<_> = (1..=3)
        .map(|r| {
            let mut rep = round(r, 0.5);
            rep.clients = (0..n)
                .map(|i| client(&format!("cam-{i:05}"), i as f64))
                .collect();
            rep.registered = n;
            rep.rejected = (0..500)
                .map(|i| RejectionCount {
                    client: format!("bad-{i}"),
                    reason: "bad-signature: x".into(),
                    count: 2,
                    signed: true,
                })
                .collect();
            rep
        })
        .collect();
    let h = history(&reports);
    let html = render(&h);
    assert!(html.len() < 400_000, "{} bytes", html.len());
    assert!(
        html.contains("all 10500"),
        "totals over every row of the latest round"
    );
    assert!(html.contains("… 10460 rows not shown"));
    assert!(html.contains("… 10450 more clients"));
    assert!(html.contains(r#"<td class="why">bad-signature ×1000</td>"#));
    // Three rounds of 500 rejected clients: every one is alerted in round 3.
    assert_eq!(h.alerts().len(), 500);
    assert!(html.contains("400 older alerts not shown"));
}

#[test]
fn a_bench_directory_gets_the_fedavg_baseline_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, acc) in [("fedavg", 0.5), ("coevolve", 0.6)] {
        let reports = dir.path().join(mode).join("reports");
        std::fs::create_dir_all(&reports).unwrap();
        for n in 1..=3 {
            let mut r = round(n, acc);
            r.mode = mode.into();
            std::fs::write(
                reports.join(format!("round-{n:04}.json")),
                serde_json::to_vec(&r).unwrap(),
            )
            .unwrap();
        }
    }
    std::fs::write(
        dir.path().join("summary.json"),
        r#"{"lower_bound": 0.4, "upper_bound": 0.9, "curves": []}"#,
    )
    .unwrap();
    let run = Run::load(dir.path()).unwrap();
    assert_eq!(run.reports[0].mode, "coevolve");
    assert_eq!(run.bounds, (Some(0.4), Some(0.9)));
    let html = render(&History::from_run(&run, AlertConfig::default()));
    assert!(html.contains(r#"data-series="fedavg" data-points="3""#));
    assert!(html.contains(r#"data-series="lower""#));
    assert!(html.contains("fedavg student"));
}

#[test]
fn an_empty_history_says_so() {
    let html = render(&History::new("out", AlertConfig::default()));
    assert!(html.contains("no rounds yet"));
    assert!(html.ends_with("</html>"));
}
