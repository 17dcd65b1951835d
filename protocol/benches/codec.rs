//! Codec throughput on a 1M-parameter model/delta (criterion; MB/s of raw f32 input, 4 MB).
//!
//! `cargo bench -p coevo-protocol --bench codec -- --warm-up-time 1 --measurement-time 3`
//!
//! The data is Gaussian (σ = 0.01, a plausible one-round delta; for the downlink it stands in
//! for weights: the codecs' cost does not depend on the scale) in a two-layer layout, so per-row
//! and per-tensor overheads are part of the figure. Uplink encoding goes through
//! [`ErrorFeedback::compress`] with a non-zero residual, as on a client.

use std::hint::black_box;

use coevo_protocol::codec::Limits;
use coevo_protocol::{DownlinkCodec, ErrorFeedback, NamedTensor, UplinkCodec};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

const PARAMS: usize = 1_000_000;

/// 1 000 000 parameters: two weight matrices with their biases.
fn model(seed: u64) -> Vec<NamedTensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.01).unwrap_or_else(|e| panic!("{e}"));
    let layout: [(&str, Vec<usize>); 4] = [
        ("fc1.weight", vec![500, 1000]),
        ("fc1.bias", vec![500]),
        ("fc2.weight", vec![499, 1000]),
        ("fc2.bias", vec![500]),
    ];
    let tensors: Vec<NamedTensor> = layout
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let values = (0..n).map(|_| normal.sample(&mut rng)).collect();
            NamedTensor::new(name, shape, values).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    assert_eq!(
        tensors.iter().map(|t| t.values.len()).sum::<usize>(),
        PARAMS
    );
    tensors
}

fn downlink(c: &mut Criterion) {
    let m = model(1);
    let limits = Limits::for_params(PARAMS);
    let mut g = c.benchmark_group("downlink");
    g.throughput(Throughput::Bytes((PARAMS * 4) as u64));
    for codec in [DownlinkCodec::F32, DownlinkCodec::F16, DownlinkCodec::Int8] {
        let payload = codec.encode(&m).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "downlink {codec}: {} bytes, ratio {:.1}x",
            payload.len(),
            (PARAMS * 4) as f64 / payload.len() as f64
        );
        g.bench_function(format!("encode/{codec}"), |b| {
            b.iter(|| codec.encode(black_box(&m)))
        });
        g.bench_function(format!("decode/{codec}"), |b| {
            b.iter(|| codec.decode(black_box(&payload), limits, None))
        });
    }
    g.finish();
}

fn uplink(c: &mut Criterion) {
    let delta = model(2);
    let limits = Limits::for_params(PARAMS);
    let mut g = c.benchmark_group("uplink");
    g.throughput(Throughput::Bytes((PARAMS * 4) as u64));
    let codecs = [
        UplinkCodec::F32,
        UplinkCodec::Int8,
        UplinkCodec::TopK {
            rho: 0.1,
            error_feedback: true,
        },
        UplinkCodec::TopK {
            rho: 0.01,
            error_feedback: true,
        },
        UplinkCodec::TopK {
            rho: 0.001,
            error_feedback: true,
        },
    ];
    for codec in codecs {
        // A realistic client state: one round already compressed, so the residual is non-zero.
        let (_, ef) = ErrorFeedback::new()
            .compress(&model(3), codec)
            .unwrap_or_else(|e| panic!("{e}"));
        let (payload, _) = ef.compress(&delta, codec).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "uplink {codec}: {} bytes, ratio {:.1}x",
            payload.len(),
            (PARAMS * 4) as f64 / payload.len() as f64
        );
        g.bench_function(format!("encode/{codec}"), |b| {
            b.iter(|| ef.compress(black_box(&delta), codec))
        });
        g.bench_function(format!("decode/{codec}"), |b| {
            b.iter(|| codec.decode(black_box(&payload), limits, None))
        });
    }
    g.finish();
}

criterion_group!(benches, downlink, uplink);
criterion_main!(benches);
