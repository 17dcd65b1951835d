//! A pure-Rust state dict and its wire codecs.
//!
//! Aggregation (FedAvg, deltas, norms) is plain arithmetic over named `f32` arrays; keeping it
//! out of libtorch lets the coordinator's strategies be tested without tensors and keeps the
//! only tch ↔ bytes bridge in one place ([`Weights::from_var_store`] / [`Weights::load_into`]).
//! On disk (checkpoints, the teacher) weights are safetensors bytes (a documented,
//! self-describing format), optionally zstd-compressed. On the wire they go through the shared
//! [`coevo_protocol::codec`] (f32/f16/int8 models, f32/int8/top-k deltas): [`Weights::encode_model`],
//! [`Weights::decode_model`], [`Weights::decode_delta`]. Decoding is bounded either way because
//! files and payloads may be corrupt or hostile.

use std::collections::BTreeMap;
use std::io::Read;

use coevo_protocol::codec::{DownlinkCodec, Limits, NamedTensor, TensorSpec, UplinkCodec};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{nn, Kind, Tensor};

use crate::ModelError;

/// Largest zstd window (log2 bytes) a decoder accepts: 8 MiB.
const ZSTD_MAX_WINDOW_LOG: u32 = 23;

/// zstd level for [`WeightCodec::F32Zstd`]: level 3 is zstd's default speed/ratio trade-off.
const ZSTD_LEVEL: i32 = 3;

/// One named parameter: row-major `f32` data with its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamTensor {
    /// Dimensions; the empty shape is a scalar.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

/// Named parameters, ordered by name so iteration (and therefore encoding) is deterministic.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Weights {
    /// Parameter name (`conv1.weight`, …) → tensor.
    pub tensors: BTreeMap<String, ParamTensor>,
}

/// How [`Weights`] are stored on disk (checkpoints, teacher, round bases): exact `f32`, so a
/// restarted coordinator reads back bit for bit what it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightCodec {
    /// safetensors, float32.
    F32,
    /// zstd of the safetensors float32 bytes.
    F32Zstd,
}

fn layout_error(what: &str, a: &Weights, b: &Weights) -> ModelError {
    let names = |w: &Weights| w.tensors.keys().cloned().collect::<Vec<_>>().join(",");
    ModelError::Shape(format!(
        "{what}: layouts differ ({} tensors [{}] vs {} tensors [{}])",
        a.tensors.len(),
        names(a),
        b.tensors.len(),
        names(b)
    ))
}

/// `x += a · y` over the common length: the aggregation kernel (one FedAvg step per client).
///
/// A plain zip over contiguous slices with no reduction, so LLVM vectorises it (4 or 8 lanes
/// per instruction) and it runs at memory bandwidth; callers check the lengths match.
#[inline]
pub fn axpy(x: &mut [f32], y: &[f32], a: f32) {
    let n = x.len().min(y.len());
    for (x, y) in x[..n].iter_mut().zip(&y[..n]) {
        *x += a * *y;
    }
}

/// Lanes of [`sum_squares`]: eight independent f64 sums fill two 256-bit vectors.
const NORM_LANES: usize = 8;

/// `Σ v²` in f64 (no f32 round-off over a million terms).
///
/// Why lanes: one running sum is a serial chain (each add waits for the previous one, ~4
/// cycles), and the compiler may not reorder float adds to vectorise it. Eight independent
/// partial sums let it vectorise and pipeline; the result differs from the serial sum only in
/// f64 rounding (relative ~1e-16 per term), far below the f32 inputs' precision.
#[inline]
pub fn sum_squares(data: &[f32]) -> f64 {
    let mut lanes = [0f64; NORM_LANES];
    let mut chunks = data.chunks_exact(NORM_LANES);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            let v = f64::from(v);
            *l += v * v;
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    lanes.iter().sum::<f64>() + tail
}

/// Elements per block of [`axpy_sum_squares`]: 4,096 f32 (16 KiB of the delta) stay in L1
/// between the block's two loops.
const FUSED_BLOCK: usize = 4096;

/// `x += a · y` and `Σ y²` (f64) with one trip of `y` through memory: what adding a delta and
/// recording its norm cost together. Aggregation is bound by memory bandwidth, so reading each
/// delta once instead of twice (norm, then add) is most of the speed-up. Blocked rather than
/// one fused loop: each block runs [`axpy`] then [`sum_squares`] (both vectorise on their own,
/// a loop doing both does not), the second reading the block from L1.
#[inline]
pub fn axpy_sum_squares(x: &mut [f32], y: &[f32], a: f32) -> f64 {
    let n = x.len().min(y.len());
    x[..n]
        .chunks_mut(FUSED_BLOCK)
        .zip(y[..n].chunks(FUSED_BLOCK))
        .map(|(xb, yb)| {
            axpy(xb, yb, a);
            sum_squares(yb)
        })
        .sum()
}

fn tensor_to_param(t: &Tensor) -> Result<ParamTensor, ModelError> {
    let shape = t
        .size()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ModelError::Shape("negative dimension".into()))?;
    let flat = t.f_detach()?.f_to_kind(Kind::Float)?.f_reshape([-1])?;
    let data = Vec::<f32>::try_from(&flat)?;
    Ok(ParamTensor { shape, data })
}

impl Weights {
    /// Snapshots every variable of the store (trainable or not, e.g. batch-norm statistics)
    /// as `f32`. A variable libtorch cannot read back is logged and skipped; this cannot happen
    /// for CPU float stores.
    pub fn from_var_store(vs: &nn::VarStore) -> Weights {
        let mut tensors = BTreeMap::new();
        for (name, t) in vs.variables() {
            match tensor_to_param(&t) {
                Ok(p) => {
                    tensors.insert(name, p);
                }
                Err(e) => tracing::error!(%name, error = %e, "cannot read variable"),
            }
        }
        Weights { tensors }
    }

    /// Copies these weights into `vs`. Names and shapes must match exactly (no missing, no
    /// extra) — checked before anything is written, so a rejected update leaves `vs` untouched.
    pub fn load_into(&self, vs: &mut nn::VarStore) -> Result<(), ModelError> {
        let vars = vs.variables();
        let mut problems = Vec::new();
        for (name, var) in &vars {
            match self.tensors.get(name) {
                None => problems.push(format!("missing {name}")),
                Some(p) => {
                    let want: Vec<i64> = var.size();
                    let have: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
                    if want != have {
                        problems.push(format!("{name}: model {want:?}, weights {have:?}"));
                    } else if p.data.len() != var.numel() {
                        problems.push(format!(
                            "{name}: {} values for shape {want:?}",
                            p.data.len()
                        ));
                    }
                }
            }
        }
        for name in self.tensors.keys() {
            if !vars.contains_key(name) {
                problems.push(format!("unexpected {name}"));
            }
        }
        if !problems.is_empty() {
            problems.sort();
            return Err(ModelError::Shape(problems.join("; ")));
        }
        tch::no_grad(|| -> Result<(), ModelError> {
            for (name, var) in &vars {
                if let Some(p) = self.tensors.get(name) {
                    let src = Tensor::f_from_slice(&p.data)?
                        .f_reshape(var.size())?
                        .f_to_kind(var.kind())?
                        .f_to_device(var.device())?;
                    let mut dst = var.shallow_clone();
                    dst.f_copy_(&src)?;
                }
            }
            Ok(())
        })
    }

    /// Total scalar count.
    pub fn num_params(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum()
    }

    /// False if any value is NaN or infinite (a diverged or malicious update).
    pub fn all_finite(&self) -> bool {
        self.tensors
            .values()
            .all(|t| t.data.iter().all(|v| v.is_finite()))
    }

    /// Same names and shapes (values may differ).
    pub fn same_layout(&self, other: &Weights) -> bool {
        self.tensors.len() == other.tensors.len()
            && self
                .tensors
                .iter()
                .zip(&other.tensors)
                .all(|((n1, t1), (n2, t2))| {
                    n1 == n2 && t1.shape == t2.shape && t1.data.len() == t2.data.len()
                })
    }

    /// Same layout, all values zero (the accumulator of a weighted average).
    pub fn zeros_like(&self) -> Weights {
        Weights {
            tensors: self
                .tensors
                .iter()
                .map(|(n, t)| {
                    (
                        n.clone(),
                        ParamTensor {
                            shape: t.shape.clone(),
                            data: vec![0.0; t.data.len()],
                        },
                    )
                })
                .collect(),
        }
    }

    /// `self − other` (a client's update delta).
    pub fn sub(&self, other: &Weights) -> Result<Weights, ModelError> {
        let mut out = self.clone();
        out.add_scaled(other, -1.0)?;
        Ok(out)
    }

    /// `self += scale · other`.
    pub fn add_scaled(&mut self, other: &Weights, scale: f32) -> Result<(), ModelError> {
        if !self.same_layout(other) {
            return Err(layout_error("add_scaled", self, other));
        }
        for (a, b) in self.tensors.values_mut().zip(other.tensors.values()) {
            axpy(&mut a.data, &b.data, scale);
        }
        Ok(())
    }

    /// `self += scale · other`, returning `other`'s Euclidean norm (as [`Weights::l2_norm`]),
    /// in one pass over `other`: the aggregation step of a FedAvg accumulator.
    pub fn add_scaled_norm(&mut self, other: &Weights, scale: f32) -> Result<f64, ModelError> {
        if !self.same_layout(other) {
            return Err(layout_error("add_scaled_norm", self, other));
        }
        let mut sq = 0f64;
        for (a, b) in self.tensors.values_mut().zip(other.tensors.values()) {
            sq += axpy_sum_squares(&mut a.data, &b.data, scale);
        }
        Ok(sq.sqrt())
    }

    /// `self *= factor`.
    pub fn scale(&mut self, factor: f32) {
        for t in self.tensors.values_mut() {
            t.data.iter_mut().for_each(|x| *x *= factor);
        }
    }

    /// Euclidean norm over all values (accumulated in f64 to avoid f32 round-off).
    pub fn l2_norm(&self) -> f64 {
        self.tensors
            .values()
            .map(|t| sum_squares(&t.data))
            .sum::<f64>()
            .sqrt()
    }

    /// As the wire codecs' tensor list, in name order.
    pub fn to_named(&self) -> Vec<NamedTensor> {
        self.tensors
            .iter()
            .map(|(name, t)| NamedTensor {
                name: name.clone(),
                shape: t.shape.clone(),
                values: t.data.clone(),
            })
            .collect()
    }

    /// From the wire codecs' tensor list; duplicate names are an error.
    pub fn from_named(tensors: Vec<NamedTensor>) -> Result<Weights, ModelError> {
        let mut out = Weights::default();
        for t in tensors {
            let name = t.name;
            let p = ParamTensor {
                shape: t.shape,
                data: t.values,
            };
            if out.tensors.insert(name.clone(), p).is_some() {
                return Err(ModelError::Shape(format!("tensor {name} appears twice")));
            }
        }
        Ok(out)
    }

    /// Names and shapes, in name order: the layout a decoder checks payloads against.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.tensors
            .iter()
            .map(|(name, t)| TensorSpec {
                name: name.clone(),
                shape: t.shape.clone(),
            })
            .collect()
    }

    /// Encodes a model for the downlink.
    pub fn encode_model(&self, codec: DownlinkCodec) -> Result<Vec<u8>, ModelError> {
        Ok(codec.encode(&self.to_named())?)
    }

    /// Decodes a downlink model that must have `layout`'s names and shapes (the receiver's own
    /// network), so a payload can never make it allocate more than that model.
    pub fn decode_model(
        bytes: &[u8],
        codec: DownlinkCodec,
        layout: &Weights,
    ) -> Result<Weights, ModelError> {
        let limits = Limits::for_params(layout.num_params());
        Weights::from_named(codec.decode(bytes, limits, Some(&layout.specs()))?)
    }

    /// Decodes an uplink delta that must have `layout`'s names and shapes; a top-k payload with
    /// more entries than the codec's ρ allows is refused.
    pub fn decode_delta(
        bytes: &[u8],
        codec: UplinkCodec,
        layout: &Weights,
    ) -> Result<Weights, ModelError> {
        let limits = Limits::for_params(layout.num_params());
        Weights::from_named(codec.decode(bytes, limits, Some(&layout.specs()))?)
    }

    /// Serialises with `codec`.
    pub fn encode(&self, codec: WeightCodec) -> Result<Vec<u8>, ModelError> {
        let mut bytes = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return Err(ModelError::Shape(format!(
                    "{name}: {} values for shape {:?}",
                    t.data.len(),
                    t.shape
                )));
            }
            let raw: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            bytes.push((name, t.shape.clone(), raw));
        }
        let views = bytes
            .iter()
            .map(|(name, shape, raw)| {
                TensorView::new(Dtype::F32, shape.clone(), raw)
                    .map(|v| (name.as_str(), v))
                    .map_err(|e| ModelError::Codec(format!("{name}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let st =
            safetensors::serialize(views, None).map_err(|e| ModelError::Codec(e.to_string()))?;
        match codec {
            WeightCodec::F32 => Ok(st),
            WeightCodec::F32Zstd => zstd::bulk::compress(&st, ZSTD_LEVEL)
                .map_err(|e| ModelError::Codec(format!("zstd: {e}"))),
        }
    }

    /// Decodes bytes produced by [`Weights::encode`].
    ///
    /// Bounded: refuses input over `max_bytes`, and stops zstd decompression as soon as the
    /// output would exceed `max_bytes` (a small bomb cannot allocate gigabytes). Rejects non-f32
    /// dtypes and shape/length mismatches with a typed error; never panics on any input.
    pub fn decode(
        bytes: &[u8],
        codec: WeightCodec,
        max_bytes: usize,
    ) -> Result<Weights, ModelError> {
        if bytes.len() > max_bytes {
            return Err(ModelError::Limit(format!(
                "payload of {} bytes exceeds {max_bytes}",
                bytes.len()
            )));
        }
        let owned;
        let st_bytes: &[u8] = match codec {
            WeightCodec::F32 => bytes,
            WeightCodec::F32Zstd => {
                let mut decoder = zstd::stream::read::Decoder::new(bytes)
                    .map_err(|e| ModelError::Codec(format!("zstd: {e}")))?;
                // A frame may ask for a window of up to 128 MiB, which the decoder would
                // allocate up front whatever the output cap; our encoder (level 3) never uses
                // more than 2 MiB, so refuse anything past 8 MiB.
                decoder
                    .window_log_max(ZSTD_MAX_WINDOW_LOG)
                    .map_err(|e| ModelError::Codec(format!("zstd: {e}")))?;
                let mut out = Vec::new();
                let cap = u64::try_from(max_bytes)
                    .unwrap_or(u64::MAX)
                    .saturating_add(1);
                decoder
                    .take(cap)
                    .read_to_end(&mut out)
                    .map_err(|e| ModelError::Codec(format!("zstd: {e}")))?;
                if out.len() > max_bytes {
                    return Err(ModelError::Limit(format!(
                        "decompressed payload exceeds {max_bytes} bytes"
                    )));
                }
                owned = out;
                &owned
            }
        };
        let st = SafeTensors::deserialize(st_bytes)
            .map_err(|e| ModelError::Codec(format!("safetensors: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            if view.dtype() != Dtype::F32 {
                return Err(ModelError::Codec(format!(
                    "{name}: dtype {:?}, only F32 is accepted",
                    view.dtype()
                )));
            }
            let shape = view.shape().to_vec();
            let numel = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| ModelError::Codec(format!("{name}: shape {shape:?} overflows")))?;
            let raw = view.data();
            if numel.checked_mul(4) != Some(raw.len()) {
                return Err(ModelError::Codec(format!(
                    "{name}: {} bytes for shape {shape:?}",
                    raw.len()
                )));
            }
            let data = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name.to_string(), ParamTensor { shape, data });
        }
        Ok(Weights { tensors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DataShape, Student};
    use proptest::prelude::*;
    use tch::Device;

    fn sample() -> Weights {
        let mut w = Weights::default();
        w.tensors.insert(
            "a.weight".into(),
            ParamTensor {
                shape: vec![2, 3],
                data: vec![1.0, -2.0, 3.5, 0.0, 1e-7, -1e9],
            },
        );
        w.tensors.insert(
            "b.bias".into(),
            ParamTensor {
                shape: vec![1],
                data: vec![0.25],
            },
        );
        w.tensors.insert(
            "s".into(),
            ParamTensor {
                shape: vec![],
                data: vec![7.0],
            },
        );
        w
    }

    #[test]
    fn encode_decode_round_trip_both_codecs() {
        let w = sample();
        for codec in [WeightCodec::F32, WeightCodec::F32Zstd] {
            let bytes = w.encode(codec).unwrap();
            assert_eq!(Weights::decode(&bytes, codec, 1 << 20).unwrap(), w);
            // Limits apply to input and to decompressed output.
            assert!(matches!(
                Weights::decode(&bytes, codec, 10),
                Err(ModelError::Limit(_))
            ));
        }
        let empty = Weights::default();
        let bytes = empty.encode(WeightCodec::F32Zstd).unwrap();
        assert_eq!(
            Weights::decode(&bytes, WeightCodec::F32Zstd, 1024).unwrap(),
            empty
        );
    }

    #[test]
    fn zstd_bomb_is_capped() {
        let mut w = Weights::default();
        w.tensors.insert(
            "z".into(),
            ParamTensor {
                shape: vec![1 << 20],
                data: vec![0.0; 1 << 20],
            },
        );
        let bytes = w.encode(WeightCodec::F32Zstd).unwrap();
        assert!(bytes.len() < 10_000, "{}", bytes.len());
        assert!(matches!(
            Weights::decode(&bytes, WeightCodec::F32Zstd, 100_000),
            Err(ModelError::Limit(_))
        ));
        assert_eq!(
            Weights::decode(&bytes, WeightCodec::F32Zstd, 8 << 20).unwrap(),
            w
        );
    }

    #[test]
    fn rejects_non_f32_and_corrupt() {
        let raw = [0u8; 8];
        let view = TensorView::new(Dtype::I32, vec![2], &raw).unwrap();
        let bytes = safetensors::serialize([("x", view)], None).unwrap();
        assert!(matches!(
            Weights::decode(&bytes, WeightCodec::F32, 1 << 20),
            Err(ModelError::Codec(_))
        ));
        let good = sample().encode(WeightCodec::F32).unwrap();
        assert!(matches!(
            Weights::decode(&good[..good.len() - 1], WeightCodec::F32, 1 << 20),
            Err(ModelError::Codec(_))
        ));
        assert!(matches!(
            Weights::decode(&good, WeightCodec::F32Zstd, 1 << 20),
            Err(ModelError::Codec(_))
        ));
        let mut inconsistent = sample();
        inconsistent
            .tensors
            .get_mut("b.bias")
            .unwrap()
            .data
            .push(1.0);
        assert!(matches!(
            inconsistent.encode(WeightCodec::F32),
            Err(ModelError::Shape(_))
        ));
    }

    #[test]
    fn arithmetic() {
        let w = sample();
        let mut acc = w.zeros_like();
        assert!(acc.same_layout(&w));
        assert_eq!(acc.l2_norm(), 0.0);
        acc.add_scaled(&w, 0.5).unwrap();
        acc.add_scaled(&w, 0.5).unwrap();
        assert_eq!(acc, w);
        let d = w.sub(&w).unwrap();
        assert_eq!(d.l2_norm(), 0.0);
        let mut s = sample();
        s.scale(2.0);
        assert_eq!(s.tensors["b.bias"].data, vec![0.5]);
        assert_eq!(w.num_params(), 8);
        assert!(w.all_finite());
        s.tensors.get_mut("s").unwrap().data[0] = f32::NAN;
        assert!(!s.all_finite());
        let mut other = sample();
        other.tensors.remove("s");
        assert!(!w.same_layout(&other));
        assert!(matches!(w.sub(&other), Err(ModelError::Shape(_))));
        let one = Weights {
            tensors: [(
                "x".to_string(),
                ParamTensor {
                    shape: vec![2],
                    data: vec![3.0, 4.0],
                },
            )]
            .into(),
        };
        assert!((one.l2_norm() - 5.0).abs() < 1e-12);
    }

    #[test]
    fn var_store_round_trip_and_mismatch() {
        let shape = DataShape {
            channels: 1,
            height: 8,
            width: 8,
            classes: 4,
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let _a = Student::new(&vs.root(), &shape);
        let w = Weights::from_var_store(&vs);
        assert_eq!(w.num_params(), crate::net::param_count(&vs));
        let mut vs2 = nn::VarStore::new(Device::Cpu);
        let _b = Student::new(&vs2.root(), &shape);
        assert_ne!(Weights::from_var_store(&vs2), w);
        w.load_into(&mut vs2).unwrap();
        assert_eq!(Weights::from_var_store(&vs2), w);

        // Different class count → fc2 shapes differ → typed error and vs untouched.
        let mut vs3 = nn::VarStore::new(Device::Cpu);
        let _c = Student::new(
            &vs3.root(),
            &DataShape {
                classes: 5,
                ..shape
            },
        );
        let before = Weights::from_var_store(&vs3);
        let err = w.load_into(&mut vs3).unwrap_err();
        assert!(
            matches!(&err, ModelError::Shape(m) if m.contains("fc2")),
            "{err}"
        );
        assert_eq!(Weights::from_var_store(&vs3), before);
        // Missing tensor.
        let mut partial = w.clone();
        partial.tensors.remove("conv1.bias");
        assert!(matches!(
            partial.load_into(&mut vs2),
            Err(ModelError::Shape(_))
        ));
    }

    proptest! {
        #[test]
        fn decode_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Weights::decode(&bytes, WeightCodec::F32, 4096);
            let _ = Weights::decode(&bytes, WeightCodec::F32Zstd, 4096);
        }

        #[test]
        fn decode_mutated_valid_payload_never_panics(idx in 0usize..4096, byte: u8, zstd: bool) {
            let codec = if zstd { WeightCodec::F32Zstd } else { WeightCodec::F32 };
            let mut bytes = sample().encode(codec).unwrap();
            let i = idx % bytes.len();
            bytes[i] = byte;
            let _ = Weights::decode(&bytes, codec, 1 << 16);
        }

        /// The kernels against the obvious serial loops: `axpy` bit for bit (same operations,
        /// same order per element), `sum_squares` within f64 rounding of the serial sum.
        #[test]
        fn kernels_match_serial_loops(
            y in proptest::collection::vec(-1e3f32..1e3, 0..200),
            a in -4f32..4.0,
        ) {
            let mut x: Vec<f32> = y.iter().map(|v| v * 0.5 + 1.0).collect();
            let want: Vec<f32> = x.iter().zip(&y).map(|(x, y)| x + a * y).collect();
            axpy(&mut x, &y, a);
            prop_assert_eq!(&x, &want);
            let serial: f64 = y.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let fast = sum_squares(&y);
            prop_assert!((fast - serial).abs() <= 1e-12 * serial.max(1.0), "{} vs {}", fast, serial);
            let mut fused: Vec<f32> = y.iter().map(|v| v * 0.5 + 1.0).collect();
            let sq = axpy_sum_squares(&mut fused, &y, a);
            prop_assert_eq!(&fused, &x);
            prop_assert!((sq - serial).abs() <= 1e-12 * serial.max(1.0), "{} vs {}", sq, serial);
        }

        #[test]
        fn round_trip_random(data in proptest::collection::vec(-1e6f32..1e6, 1..64)) {
            let mut w = Weights::default();
            w.tensors.insert("t".into(), ParamTensor { shape: vec![data.len()], data });
            for codec in [WeightCodec::F32, WeightCodec::F32Zstd] {
                let bytes = w.encode(codec).unwrap();
                prop_assert_eq!(&Weights::decode(&bytes, codec, 1 << 16).unwrap(), &w);
            }
        }
    }

    #[test]
    fn wire_codecs_round_trip_against_the_receivers_layout() {
        let mut w = sample();
        // f16 can't carry −1e9; keep the model in a range every downlink codec represents.
        w.tensors.get_mut("a.weight").unwrap().data[5] = -9.0;
        assert_eq!(Weights::from_named(w.to_named()).unwrap(), w);
        for codec in [DownlinkCodec::F32, DownlinkCodec::F16, DownlinkCodec::Int8] {
            let bytes = w.encode_model(codec).unwrap();
            let back = Weights::decode_model(&bytes, codec, &w).unwrap();
            assert!(back.same_layout(&w), "{codec}");
            let err = back.sub(&w).unwrap().l2_norm();
            assert!(err < 0.05, "{codec}: {err}");
            // Another receiver's network (other shapes) refuses the payload.
            let mut other = w.clone();
            other.tensors.get_mut("a.weight").unwrap().shape = vec![3, 2];
            assert!(matches!(
                Weights::decode_model(&bytes, codec, &other),
                Err(ModelError::Wire(_))
            ));
        }
        let delta = w.to_named();
        let codec: UplinkCodec = "top-k:0.5".parse().unwrap();
        let bytes = codec.encode(&delta).unwrap();
        let back = Weights::decode_delta(&bytes, codec, &w).unwrap();
        let sent = back
            .tensors
            .values()
            .flat_map(|t| &t.data)
            .filter(|v| **v != 0.0)
            .count();
        assert_eq!(sent, codec.keep_count(w.num_params()).unwrap());
        // Duplicate names can't come out of a decoder, but from_named refuses them anyway.
        let mut twice = w.to_named();
        twice.push(twice[0].clone());
        assert!(Weights::from_named(twice).is_err());
    }
}
