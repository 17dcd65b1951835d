//! Aggregation throughput: [`FedAvgAccumulator`] (`add` of every client's delta, then `finish`)
//! per client × parameter, next to this machine's memory bandwidth (criterion).
//!
//! `cargo bench -p coevo-coordinator --bench aggregate -- --warm-up-time 1 --measurement-time 5`
//!
//! Two shapes, the ones Flower's `aggregate_inplace` was timed on (issue #13): 1,000 clients ×
//! 28k parameters and 100 clients × 1M parameters. Besides criterion's own lines (throughput
//! in parameters/s), each shape prints `ns/param` from the fastest of a few timed runs, and the
//! bandwidth group prints what a plain read (Σ v² over the same deltas) and a plain copy reach:
//! `add` must read every delta once (4 bytes a parameter) and its norm, so read bandwidth is
//! the floor per parameter. The deltas are built before timing, as decoded updates would be.

use std::hint::black_box;
use std::time::{Duration, Instant};

use coevo_coordinator::strategy::{FedAvgAccumulator, Update};
use coevo_models::{ParamTensor, Weights};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A model of `params` parameters in four tensors (two weight matrices with their biases), so
/// per-tensor overheads (layout checks, loop set-up) are part of the figure.
fn layout(params: usize) -> Vec<(String, usize)> {
    let bias = 64;
    let w1 = (params - 2 * bias) * 3 / 4;
    let w2 = params - 2 * bias - w1;
    vec![
        ("fc1.bias".into(), bias),
        ("fc1.weight".into(), w1),
        ("fc2.bias".into(), bias),
        ("fc2.weight".into(), w2),
    ]
}

fn weights(params: usize, rng: &mut StdRng, scale: f32) -> Weights {
    let mut w = Weights::default();
    for (name, n) in layout(params) {
        let data = (0..n).map(|_| rng.gen_range(-scale..scale)).collect();
        w.tensors.insert(
            name,
            ParamTensor {
                shape: vec![n],
                data,
            },
        );
    }
    assert_eq!(w.num_params(), params);
    w
}

/// `clients` updates of `params` parameters (uniform ±0.01, like one round's delta).
fn updates(clients: usize, params: usize) -> (Weights, Vec<Update>) {
    let mut rng = StdRng::seed_from_u64(13);
    let base = weights(params, &mut rng, 0.1);
    let updates = (0..clients)
        .map(|i| Update {
            client: format!("cam-{i:05}"),
            samples: 100 + (i as u64 % 50),
            delta: weights(params, &mut rng, 0.01),
        })
        .collect();
    (base, updates)
}

fn aggregate(base: &Weights, updates: &[Update]) -> Weights {
    let mut acc = FedAvgAccumulator::new(base);
    for u in updates {
        acc.add(u).unwrap_or_else(|e| panic!("{e}"));
    }
    acc.finish(base).unwrap_or_else(|e| panic!("{e}"))
}

/// Fastest of `runs` timed calls of `f`.
fn fastest(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn fedavg(c: &mut Criterion) {
    let mut g = c.benchmark_group("fedavg");
    for (clients, params, flower_ms) in [(1_000usize, 28_000usize, 167.0), (100, 1_000_000, 322.0)]
    {
        let (base, ups) = updates(clients, params);
        let n = (clients * params) as f64;
        let name = format!("{clients}x{params}");
        g.throughput(Throughput::Elements((clients * params) as u64));
        g.bench_function(&name, |b| {
            b.iter(|| aggregate(black_box(&base), black_box(&ups)))
        });
        let t = fastest(5, || {
            black_box(aggregate(&base, &ups));
        });
        let flower = flower_ms * 1e6 / n;
        let ns = t.as_nanos() as f64 / n;
        eprintln!(
            "fedavg {name}: {:.1} ms, {ns:.3} ns/param (Flower aggregate_inplace: {flower_ms} ms, {flower:.2} ns/param; {:.1}x)",
            t.as_secs_f64() * 1e3,
            flower / ns
        );
        // The same deltas read once (Σ v², what the norm costs) and copied once: the
        // bandwidth floor of an aggregation that must read every delta.
        let read = fastest(5, || {
            let s: f64 = ups.iter().map(|u| u.delta.l2_norm()).sum();
            black_box(s);
        });
        let mut dst = vec![0f32; params];
        let copy = fastest(5, || {
            for u in &ups {
                let mut at = 0;
                for t in u.delta.tensors.values() {
                    dst[at..at + t.data.len()].copy_from_slice(&t.data);
                    at += t.data.len();
                }
                // Every copy is observed, so none can be elided.
                black_box(&mut dst);
            }
        });
        let bytes = n * 4.0;
        eprintln!(
            "bandwidth {name}: read (sum of squares) {:.1} GB/s = {:.3} ns/param; copy {:.1} GB/s = {:.3} ns/param",
            bytes / read.as_secs_f64() / 1e9,
            read.as_nanos() as f64 / n,
            bytes / copy.as_secs_f64() / 1e9,
            copy.as_nanos() as f64 / n,
        );
    }
    g.finish();
}

criterion_group!(benches, fedavg);
criterion_main!(benches);
