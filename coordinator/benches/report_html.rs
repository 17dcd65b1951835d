//! The HTML report's cost for a city-sized fleet (issue #15): what the coordinator spends after
//! every round to fold the round into its history and re-render `OUT/report.html`, and how large
//! the page gets (criterion).
//!
//! `cargo bench -p coevo-coordinator --bench report_html -- --warm-up-time 1 --measurement-time 5`
//!
//! 10,000 accepted clients a round (50 of them also rejected for a bad signature), 62 classes
//! (FEMNIST), 100 rounds of history. Prints the page size and how many bytes the history holds
//! in per-client totals, so the "bounded" claim has numbers next to it.

use std::hint::black_box;

use coevo_coordinator::alerts::AlertConfig;
use coevo_coordinator::html::{render, History};
use coevo_coordinator::report::{ClientReport, ModelReport, RejectionCount, RoundReport};
use criterion::{criterion_group, criterion_main, Criterion};

const CLIENTS: usize = 10_000;
const CLASSES: usize = 62;
const ROUNDS: u64 = 100;

fn report(round: u64) -> RoundReport {
    let model = |acc: f64| ModelReport {
        test_accuracy: Some(acc),
        test_loss: Some(1.0 - acc),
        per_class_accuracy: (0..CLASSES)
            .map(|c| (acc + c as f64 * 0.003) % 1.0)
            .collect(),
        params: Some(114_314),
    };
    let mut r: RoundReport = serde_json::from_value(serde_json::json!({
        "round": round, "fleet": "city", "mode": "coevolve", "strategy": "norm-clip",
        "outcome": "completed", "accepted": CLIENTS, "quorum": 5000, "registered": CLIENTS,
        "rejected": [], "extensions": 0, "model_digest": "00", "uplink_codec": "int8",
        "downlink_codec": "int8", "bytes_down": 27_000u64 * CLIENTS as u64,
        "bytes_up": 24_000u64 * CLIENTS as u64, "duration_ms": 15_000,
        "phase_ms": {"publish": 900, "collect": 12_000, "aggregate": 1500, "evaluate": 600},
        "student": null, "teacher": null, "clients": [],
    }))
    .expect("a round report");
    r.student = model(0.5 + round as f64 * 0.003);
    r.teacher = model(0.6 + round as f64 * 0.002);
    r.clients = (0..CLIENTS)
        .map(|i| ClientReport {
            client: format!("cam-{i:05}"),
            samples: 78,
            local_loss: 0.5 + (i % 97) as f64 * 0.01,
            local_accuracy: 0.8,
            train_ms: 1200,
            bytes_up: 24_000,
            bytes_down: 27_000,
            delta_norm: 1.0 + (i % 101) as f64 * 0.02,
            trust_weight: None,
            labels: None,
        })
        .collect();
    r.clipped = (0..CLIENTS / 20)
        .map(|i| format!("cam-{:05}", i * 20))
        .collect();
    r.rejected = (0..50)
        .map(|i| RejectionCount {
            client: format!("cam-{:05}", i * 7),
            reason: "bad-signature: header".into(),
            count: 2,
            signed: false,
        })
        .collect();
    r
}

fn bench(c: &mut Criterion) {
    let rounds: Vec<RoundReport> = (1..=ROUNDS).map(report).collect();
    let mut h = History::new("out", AlertConfig::default());
    for r in &rounds[..rounds.len() - 1] {
        h.observe(r);
        h.push(r);
    }
    let last = rounds.last().expect("rounds");
    let page = {
        let mut h2 = History::new("out", AlertConfig::default());
        for r in &rounds {
            h2.observe(r);
            h2.push(r);
        }
        render(&h2)
    };
    let json = serde_json::to_vec(last).expect("json").len();
    println!(
        "{CLIENTS} clients x {ROUNDS} rounds, {CLASSES} classes: page {} bytes; one round's JSON report {json} bytes",
        page.len()
    );
    let mut g = c.benchmark_group("report_html");
    g.sample_size(10);
    g.bench_function("observe+push one 10k-client round", |b| {
        b.iter_batched(
            || {
                let mut h = History::new("out", AlertConfig::default());
                h.observe(&rounds[0]);
                h.push(&rounds[0]);
                h
            },
            |mut h| {
                h.observe(black_box(last));
                h.push(black_box(last));
                h
            },
            criterion::BatchSize::LargeInput,
        )
    });
    h.observe(last);
    h.push(last);
    g.bench_function("render 100 rounds x 10k clients", |b| {
        b.iter(|| black_box(render(black_box(&h))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
