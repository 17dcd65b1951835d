//! Verified, durable deltas per second through the coordinator's collect pipeline
//! (`coevo_coordinator::ingest`): Ed25519 signature, SHA-256 digest, int8 decode and finiteness
//! check on the worker pool, each delta file written and fsync'd, then group commits (one
//! directory + one journal fsync per batch) — everything but MQTT. Goal (issue #13): ≥ 1,000/s
//! at 114k params on 2 cores.
//!
//! `cargo bench -p coevo-coordinator --bench collect`; the output directory is a temp dir
//! (`TMPDIR` picks the disk).

use coevo_coordinator::ingest::{default_workers, Ingest, RoundSpec, Upload};
use coevo_coordinator::store::Store;
use coevo_coordinator::FleetRegistry;
use coevo_models::{ParamTensor, Weights};
use coevo_protocol::envelope::Kind;
use coevo_protocol::{digest, DeltaHeader, LocalMetrics, Signed, SigningKey, UplinkCodec};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The Fashion-MNIST student's parameter count.
const PARAMS: usize = 114_314;
/// Uploads per measured batch.
const CLIENTS: usize = 400;

fn layout() -> Weights {
    let mut w = Weights::default();
    let rows = 256;
    let cols = PARAMS / rows;
    w.tensors.insert(
        "a.weight".into(),
        ParamTensor {
            shape: vec![rows, cols],
            data: vec![0.0; rows * cols],
        },
    );
    w.tensors.insert(
        "b.bias".into(),
        ParamTensor {
            shape: vec![PARAMS - rows * cols],
            data: vec![0.0; PARAMS - rows * cols],
        },
    );
    w
}

/// A registry of `CLIENTS` clients and one signed int8 upload from each.
fn fleet(layout: &Weights) -> (FleetRegistry, Vec<Upload>) {
    let mut registry = FleetRegistry::default();
    let mut uploads = Vec::new();
    let base_digest = digest(b"bench-base");
    for i in 0..CLIENTS {
        let client = format!("cam-{i:05}");
        let key = SigningKey::generate().expect("key");
        registry
            .add(&client, &key.public_key())
            .expect("registry add");
        let mut delta = layout.clone();
        for (j, t) in delta.tensors.values_mut().enumerate() {
            // SplitMix64 noise: a realistic (incompressible) int8 payload, ~1 byte a param.
            let mut s = (i as u64) << 32 | j as u64;
            for x in t.data.iter_mut() {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                *x = ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-2;
            }
        }
        let payload = UplinkCodec::Int8.encode(&delta.to_named()).expect("encode");
        let h = DeltaHeader {
            fleet: "city".into(),
            round: 1,
            client: client.clone(),
            base_digest,
            samples: 100,
            metrics: LocalMetrics::default(),
            codec: UplinkCodec::Int8,
            payload_digest: digest(&payload),
            payload_len: payload.len() as u64,
            chunks: 1,
        };
        let header = Signed::sign(Kind::DeltaHeader, &h, &client, &key);
        uploads.push(Upload {
            client,
            round: 1,
            header: Some(header),
            payload,
        });
    }
    (registry, uploads)
}

/// Runs every upload through the pipeline into a fresh output directory; returns the time and
/// the pipeline's counters.
async fn ingest_all(
    spec: Arc<RoundSpec>,
    uploads: Vec<Upload>,
) -> (Duration, coevo_coordinator::report::CollectReport) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::new(dir.path());
    let n = uploads.len();
    let t = Instant::now();
    // COLLECT_WORKERS overrides the pool size (to compare CPU-sized and I/O-sized pools).
    let workers = std::env::var("COLLECT_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(default_workers);
    let mut ingest = Ingest::new(spec, store, workers);
    for (i, up) in uploads.into_iter().enumerate() {
        ingest.submit(i as u64, up);
    }
    let mut accepted = 0;
    while ingest.in_flight() > 0 {
        let done = ingest.recv().await;
        let mut batch = Vec::new();
        for d in done {
            match d.outcome {
                Ok(Ok(meta)) => batch.push((d.upload.client, meta.header.payload_digest)),
                Ok(Err(r)) => panic!("{} rejected: {}", d.upload.client, r.reason),
                Err(e) => panic!("{e}"),
            }
        }
        accepted += batch.len();
        ingest.commit(batch).await.expect("commit");
    }
    assert_eq!(accepted, n);
    (t.elapsed(), ingest.stats.clone())
}

fn bench(c: &mut Criterion) {
    let layout = layout();
    let (registry, uploads) = fleet(&layout);
    let spec = Arc::new(RoundSpec {
        fleet: "city".into(),
        round: 1,
        base_digest: digest(b"bench-base"),
        uplink_codec: UplinkCodec::Int8,
        max_delta_bytes: 4 << 20,
        layout,
        registry,
    });
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    // One plain run first, to print what a fleet bench would (deltas/s and fsync batching).
    let (t, stats) = rt.block_on(ingest_all(spec.clone(), uploads.clone()));
    eprintln!(
        "collect pipeline: {CLIENTS} int8 deltas of {PARAMS} params ({} B each) in {:.3} s = \
         {:.0} verified+durable deltas/s on {} workers; {} group commits (largest {}), {} fsyncs, \
         worker time {} ms, commit time {} ms",
        uploads[0].payload.len(),
        t.as_secs_f64(),
        CLIENTS as f64 / t.as_secs_f64(),
        stats.workers,
        stats.commits,
        stats.max_batch,
        stats.fsyncs,
        stats.verify_ms,
        stats.commit_ms
    );
    let mut g = c.benchmark_group("collect");
    g.sample_size(10);
    g.throughput(Throughput::Elements(CLIENTS as u64));
    g.bench_function("verify+durable int8 114k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(ingest_all(spec.clone(), uploads.clone())).0;
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
