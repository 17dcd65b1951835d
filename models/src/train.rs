//! Local training and evaluation.
//!
//! Shuffling uses our own seeded RNG (not libtorch's global generator) so a client's epoch order
//! is reproducible from its [`TrainConfig::seed`] without touching process-wide state.

use std::panic::{catch_unwind, AssertUnwindSafe};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Kind, Tensor};

use crate::noise::UNLABELLED;
use crate::{Dataset, ModelError};

/// Hyper-parameters of one local training call.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Passes over the local data.
    pub epochs: usize,
    /// Mini-batch size (> 0).
    pub batch_size: usize,
    /// SGD learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// FedProx μ; 0 disables the proximal term.
    pub prox_mu: f64,
    /// Seed of the batch shuffling.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            batch_size: 32,
            lr: 0.05,
            momentum: 0.9,
            prox_mu: 0.0,
            seed: 0,
        }
    }
}

/// Mean loss / accuracy over the last epoch (what a client reports after training).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TrainStats {
    /// Samples seen in the last epoch.
    pub samples: usize,
    /// Mean cross-entropy (without the proximal term).
    pub loss: f64,
    /// Fraction of correct predictions.
    pub accuracy: f64,
}

/// Result of [`evaluate`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    /// Overall fraction of correct predictions.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Accuracy per class (`data.shape.classes` entries); a class with no test samples gets 0.0,
    /// so a per-class report never contains NaN.
    pub per_class: Vec<f64>,
    /// Samples evaluated.
    pub samples: usize,
}

/// Turns a libtorch panic (e.g. a model that does not fit the data's shape) into an error, so a
/// bad input cannot take the whole client down.
pub(crate) fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, ModelError>,
) -> Result<T, ModelError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "libtorch panic".into());
        Err(ModelError::Shape(format!("{what}: {msg}")))
    })
}

/// Checks shapes and that labels are in `0..classes`; with `allow_unlabelled`, also
/// [`crate::noise::UNLABELLED`] (training skips those frames; evaluation must not see them).
pub(crate) fn check_data(data: &Dataset, allow_unlabelled: bool) -> Result<(), ModelError> {
    let n = data.len() as i64;
    let isz = data.images.size();
    if isz.len() != 4 || isz[0] != n || data.labels.size().len() != 1 {
        return Err(ModelError::Shape(format!(
            "images {:?} / labels {:?}: expected [N, C, H, W] and [N]",
            isz,
            data.labels.size()
        )));
    }
    let classes = data.shape.classes as i64;
    if n > 0 {
        let lo = data.labels.f_min()?.f_int64_value(&[])?;
        let hi = data.labels.f_max()?.f_int64_value(&[])?;
        let floor = if allow_unlabelled { UNLABELLED } else { 0 };
        if lo < floor || hi >= classes {
            return Err(ModelError::Shape(format!(
                "labels span {lo}..={hi} but the data has {classes} classes"
            )));
        }
    }
    Ok(())
}

/// Trains `model` (whose variables live in `vs`) with SGD + momentum over seeded, shuffled
/// mini-batches. With `prox_mu > 0` adds FedProx's μ/2·‖w − w0‖², w0 being the weights at call
/// time, which keeps non-IID clients from drifting far from the global model.
pub fn train(
    model: &impl ModuleT,
    vs: &nn::VarStore,
    data: &Dataset,
    cfg: &TrainConfig,
) -> Result<TrainStats, ModelError> {
    check_data(data, true)?;
    let device = vs.device();
    train_batches(model, vs, data.len(), cfg, |batch| {
        let idx = Tensor::f_from_slice(batch)?;
        let xs = data.images.f_index_select(0, &idx)?.f_to_device(device)?;
        let ys = data.labels.f_index_select(0, &idx)?.f_to_device(device)?;
        Ok((xs, ys))
    })
}

/// [`train`] over any source of mini-batches: `fetch` turns a batch of sample indices (in
/// `0..n`) into `(images [B, C, H, W] float, labels [B] int64)`. This is what lets a camera
/// decode its frames batch by batch instead of holding the whole set as floats.
///
/// Frames labelled [`UNLABELLED`] add nothing to the loss (a batch of only such frames is
/// skipped) and are not counted in the returned statistics.
pub fn train_batches(
    model: &impl ModuleT,
    vs: &nn::VarStore,
    n: usize,
    cfg: &TrainConfig,
    mut fetch: impl FnMut(&[i64]) -> Result<(Tensor, Tensor), ModelError>,
) -> Result<TrainStats, ModelError> {
    if cfg.batch_size == 0 {
        return Err(ModelError::Config("batch_size must be > 0".into()));
    }
    if !(cfg.lr.is_finite() && cfg.momentum.is_finite() && cfg.prox_mu.is_finite()) {
        return Err(ModelError::Config(
            "lr, momentum and prox_mu must be finite".into(),
        ));
    }
    if n == 0 || cfg.epochs == 0 {
        return Ok(TrainStats::default());
    }
    let mut opt = nn::Sgd {
        momentum: cfg.momentum,
        ..Default::default()
    }
    .build(vs, cfg.lr)?;
    let params = vs.trainable_variables();
    let anchors: Vec<Tensor> = if cfg.prox_mu > 0.0 {
        params.iter().map(|t| t.detach().copy()).collect()
    } else {
        Vec::new()
    };
    let device = vs.device();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<i64> = (0..n as i64).collect();
    let mut stats = TrainStats::default();
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0i64, 0usize);
        for batch in order.chunks(cfg.batch_size) {
            let (xs, ys) = fetch(batch)?;
            let labelled = ys
                .f_ne(UNLABELLED)?
                .f_sum(Kind::Int64)?
                .f_int64_value(&[])?;
            if labelled == 0 {
                continue;
            }
            let (l, c) = guarded("training step", || {
                let logits = model.forward_t(&xs, true);
                let ce = logits
                    .f_log_softmax(-1, Kind::Float)?
                    .f_nll_loss::<Tensor>(&ys, None, tch::Reduction::Mean, UNLABELLED)?;
                let total = if anchors.is_empty() {
                    ce.shallow_clone()
                } else {
                    // Out-of-place adds: the sum must stay in the autograd graph.
                    let prox = params
                        .iter()
                        .zip(&anchors)
                        .map(|(p, a)| (p - a).square().sum(Kind::Float))
                        .fold(Tensor::zeros([], (Kind::Float, device)), |acc, t| acc + t);
                    &ce + prox * (cfg.prox_mu / 2.0)
                };
                opt.backward_step(&total);
                let c = tch::no_grad(|| {
                    logits
                        .argmax(-1, false)
                        .eq_tensor(&ys)
                        .sum(Kind::Int64)
                        .f_int64_value(&[])
                })?;
                Ok((ce.f_double_value(&[])?, c))
            })?;
            loss_sum += l * labelled as f64;
            correct += c;
            seen += labelled as usize;
        }
        let per = seen.max(1) as f64;
        stats = TrainStats {
            samples: seen,
            loss: loss_sum / per,
            accuracy: correct as f64 / per,
        };
    }
    Ok(stats)
}

/// Evaluates without gradients and in inference mode (`train = false`).
///
/// Infallible by signature because evaluation is reporting, not control flow: on malformed data
/// (or a model that does not fit it) the problem is logged and an all-zero evaluation with
/// `samples = 0` and `loss = NaN` is returned. A `batch_size` of 0 is treated as 256.
pub fn evaluate(model: &impl ModuleT, data: &Dataset, batch_size: usize) -> Evaluation {
    let classes = data.shape.classes;
    let failed = |e: ModelError| {
        tracing::error!(error = %e, "evaluation failed");
        Evaluation {
            accuracy: 0.0,
            loss: f64::NAN,
            per_class: vec![0.0; classes],
            samples: 0,
        }
    };
    if let Err(e) = check_data(data, false) {
        return failed(e);
    }
    let batch_size = if batch_size == 0 { 256 } else { batch_size };
    let n = data.len();
    let result = guarded("evaluation", || {
        tch::no_grad(|| {
            let mut loss_sum = 0.0;
            let mut hits = vec![0usize; classes];
            let mut totals = vec![0usize; classes];
            let mut start = 0usize;
            while start < n {
                let len = batch_size.min(n - start);
                let xs = data.images.f_narrow(0, start as i64, len as i64)?;
                let ys = data.labels.f_narrow(0, start as i64, len as i64)?;
                let logits = model.forward_t(&xs, false).f_to_device(ys.device())?;
                let ce = logits
                    .f_log_softmax(-1, Kind::Float)?
                    .f_nll_loss::<Tensor>(&ys, None, tch::Reduction::Sum, -100)?;
                loss_sum += ce.f_double_value(&[])?;
                let pred = Vec::<i64>::try_from(&logits.f_argmax(-1, false)?)?;
                let truth = Vec::<i64>::try_from(&ys)?;
                for (p, t) in pred.iter().zip(&truth) {
                    let t = *t as usize; // check_data guarantees 0 <= t < classes
                    totals[t] += 1;
                    if p == &(t as i64) {
                        hits[t] += 1;
                    }
                }
                start += len;
            }
            let correct: usize = hits.iter().sum();
            Ok(Evaluation {
                accuracy: if n == 0 {
                    0.0
                } else {
                    correct as f64 / n as f64
                },
                loss: if n == 0 { 0.0 } else { loss_sum / n as f64 },
                per_class: hits
                    .iter()
                    .zip(&totals)
                    .map(|(&h, &t)| if t == 0 { 0.0 } else { h as f64 / t as f64 })
                    .collect(),
                samples: n,
            })
        })
    });
    result.unwrap_or_else(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::{DataShape, Student, Weights};
    use tch::Device;

    #[test]
    fn training_on_synthetic_beats_chance() {
        tch::manual_seed(0);
        let shape = DataShape {
            channels: 1,
            height: 12,
            width: 12,
            classes: 5,
        };
        let split = synthetic(600, 200, shape, 7);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Student::new(&vs.root(), &shape);
        let before = evaluate(&net, &split.test, 64);
        let cfg = TrainConfig {
            epochs: 2,
            ..Default::default()
        };
        let stats = train(&net, &vs, &split.train, &cfg).unwrap();
        assert_eq!(stats.samples, 600);
        assert!(stats.loss.is_finite());
        let after = evaluate(&net, &split.test, 64);
        assert_eq!(after.samples, 200);
        assert_eq!(after.per_class.len(), 5);
        assert!(after.accuracy > 0.8, "before {before:?} after {after:?}");
        assert!(after.loss < before.loss);
    }

    #[test]
    fn prox_term_keeps_weights_closer() {
        let shape = DataShape {
            channels: 1,
            height: 8,
            width: 8,
            classes: 3,
        };
        let split = synthetic(200, 10, shape, 1);
        let drift = |mu: f64| {
            tch::manual_seed(1);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = Student::new(&vs.root(), &shape);
            let w0 = Weights::from_var_store(&vs);
            let cfg = TrainConfig {
                epochs: 2,
                prox_mu: mu,
                lr: 0.05,
                ..Default::default()
            };
            train(&net, &vs, &split.train, &cfg).unwrap();
            Weights::from_var_store(&vs).sub(&w0).unwrap().l2_norm()
        };
        let free = drift(0.0);
        let prox = drift(10.0);
        assert!(prox < free, "prox {prox} free {free}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let shape = DataShape {
            channels: 1,
            height: 8,
            width: 8,
            classes: 3,
        };
        let split = synthetic(20, 10, shape, 1);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Student::new(&vs.root(), &shape);
        let cfg = TrainConfig {
            batch_size: 0,
            ..Default::default()
        };
        assert!(matches!(
            train(&net, &vs, &split.train, &cfg),
            Err(ModelError::Config(_))
        ));
        // A model built for another geometry: libtorch's failure becomes a typed error.
        let other = DataShape {
            channels: 3,
            height: 8,
            width: 8,
            classes: 3,
        };
        let vs2 = nn::VarStore::new(Device::Cpu);
        let wrong = Student::new(&vs2.root(), &other);
        assert!(matches!(
            train(&wrong, &vs2, &split.train, &TrainConfig::default()),
            Err(ModelError::Shape(_))
        ));
        assert_eq!(evaluate(&wrong, &split.test, 4).samples, 0);
        // Labels out of range.
        let mut bad = split.train.subset(&[0, 1]);
        bad.labels = Tensor::from_slice(&[0i64, 7]);
        assert!(matches!(
            train(&net, &vs, &bad, &TrainConfig::default()),
            Err(ModelError::Shape(_))
        ));
    }
}
