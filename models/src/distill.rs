//! Knowledge distillation in both directions of the co-evolution loop, and the guard that keeps a
//! bad update from replacing a good model.
//!
//! - *Downward* ([`distill`]): the edge student learns from the data-centre teacher's softened
//!   logits on the server's data (Hinton et al.'s KD), so every camera gets what the big model
//!   knows without running it.
//! - *Upward* ([`fuse`]): the teacher learns from the fleet. Client students are weak alone
//!   (each saw one writer), but the average of their logits ([`Ensemble`], FedDF-style) on the
//!   server's unlabelled pool is a good teacher for the teacher; cross-entropy on the server's
//!   labelled set keeps it anchored to ground truth.
//! - [`guard_update`] evaluates a model on held-out data before and after an update and rolls
//!   the update back if accuracy fell by more than ε, so one noisy round cannot undo many.
//!
//! Both directions run the same two-stream loop: each step takes a batch of soft targets (images
//! + target logits) and, when `alpha < 1`, a batch of labelled images, and minimises
//!   `α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE`. The streams are cycled independently, so
//!   a small labelled set next to a large pool is seen several times per epoch instead of
//!   being drowned out.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::arch::Arch;
#[cfg(test)]
use crate::net::{NetKind, Student, Teacher};
use crate::train::{check_data, evaluate, guarded, TrainStats};
use crate::{DataShape, Dataset, ModelError, Weights};

/// Label value meaning "no label" for [`kd_loss`] (PyTorch's default `ignore_index`).
pub const IGNORE_LABEL: i64 = -100;

/// Hyper-parameters of one distillation call (downward KD or upward fusion).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct KdConfig {
    /// Softmax temperature T (> 0): higher exposes more of the "dark knowledge" in non-argmax
    /// classes.
    pub temperature: f64,
    /// Weight α ∈ [0, 1] of the distillation term; 1 − α goes to cross-entropy on the labelled
    /// set (ignored when no labelled set is given).
    pub alpha: f64,
    /// Passes over the larger of the two streams.
    pub epochs: usize,
    /// Mini-batch size of each stream (> 0).
    pub batch_size: usize,
    /// SGD learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay (SGD's `wd`).
    pub weight_decay: f64,
    /// Random affine augmentation (rotation ±10°, scale ±10 %, shift ±10 %) of both streams.
    /// Only effective for soft targets computed online ([`Soft::Model`]): precomputed logits
    /// belong to the un-augmented images, so that stream is then left as is.
    pub augment: bool,
    /// Seed of batch order and augmentation.
    pub seed: u64,
    /// Soft-stream rows whose target's top-class probability (softmax at T = 1) is below this
    /// are left out of the KD term: with many classes and weak members, low-confidence targets
    /// are close to uniform and only pull the model's logits flat (issue #12's collapse).
    /// 0 keeps every row.
    pub min_confidence: f64,
}

impl Default for KdConfig {
    fn default() -> Self {
        KdConfig {
            temperature: 3.0,
            alpha: 0.7,
            epochs: 2,
            batch_size: 64,
            lr: 0.02,
            momentum: 0.9,
            weight_decay: 5e-4,
            augment: false,
            seed: 0,
            min_confidence: 0.0,
        }
    }
}

impl KdConfig {
    fn validate(&self) -> Result<(), ModelError> {
        if self.batch_size == 0 {
            return Err(ModelError::Config("batch_size must be > 0".into()));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(ModelError::Config(
                "temperature must be finite and > 0".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(ModelError::Config("alpha must be in [0, 1]".into()));
        }
        if !(0.0..=1.0).contains(&self.min_confidence) {
            return Err(ModelError::Config(
                "min_confidence must be in [0, 1]".into(),
            ));
        }
        if !(self.lr.is_finite() && self.momentum.is_finite() && self.weight_decay.is_finite()) {
            return Err(ModelError::Config(
                "lr, momentum and weight_decay must be finite".into(),
            ));
        }
        Ok(())
    }
}

/// Where the soft targets of a distillation come from.
#[derive(Clone, Copy)]
pub enum Soft<'a> {
    /// Logits computed once, row-aligned with the images (cheapest; no augmentation).
    Logits(&'a Tensor),
    /// A frozen model queried per batch (e.g. the teacher or an [`Ensemble`]), so augmented
    /// images get their own targets. Called under `no_grad`.
    Model(&'a dyn Fn(&Tensor) -> Result<Tensor, ModelError>),
}

/// What a [`fuse`] (or [`distill`]) call did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FuseStats {
    /// Optimiser steps taken.
    pub steps: usize,
    /// Mean total loss over the last epoch.
    pub loss: f64,
    /// Mean distillation term (T²·KL) over the last epoch.
    pub kd_loss: f64,
    /// Mean cross-entropy on the labelled stream over the last epoch (0 without one).
    pub ce_loss: f64,
    /// Fraction of soft-stream samples whose argmax agrees with the targets' argmax.
    pub agreement: f64,
}

/// Hinton's distillation loss, averaged over the batch:
/// `α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, labels)`.
///
/// The T² factor keeps the soft term's gradient scale independent of T. Labels equal to
/// [`IGNORE_LABEL`] are unlabelled rows: they contribute only to the KD term. Without labels (or
/// when every row is unlabelled) the result is the KD term alone, `T²·KL`, whatever α.
pub fn kd_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    labels: Option<&Tensor>,
    temperature: f64,
    alpha: f64,
) -> Result<Tensor, ModelError> {
    let (ss, ts) = (student_logits.size(), teacher_logits.size());
    if ss.len() != 2 || ss != ts {
        return Err(ModelError::Shape(format!(
            "kd_loss: student logits {ss:?} vs teacher logits {ts:?}: expected equal [N, classes]"
        )));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(ModelError::Config(
            "temperature must be finite and > 0".into(),
        ));
    }
    let n = ss[0].max(1) as f64;
    let t = teacher_logits.f_detach()?.f_div_scalar(temperature)?;
    let p_t = t.f_softmax(-1, Kind::Float)?;
    let log_p_t = t.f_log_softmax(-1, Kind::Float)?;
    let log_p_s = student_logits
        .f_div_scalar(temperature)?
        .f_log_softmax(-1, Kind::Float)?;
    let kl = p_t
        .f_mul(&log_p_t.f_sub(&log_p_s)?)?
        .f_sum(Kind::Float)?
        .f_div_scalar(n)?;
    let kd = kl.f_mul_scalar(temperature * temperature)?;
    let Some(labels) = labels else {
        return Ok(kd);
    };
    if labels.size() != [ss[0]] {
        return Err(ModelError::Shape(format!(
            "kd_loss: labels {:?} for {} rows",
            labels.size(),
            ss[0]
        )));
    }
    let labelled = labels
        .f_ne(IGNORE_LABEL)?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    if labelled == 0 {
        return Ok(kd);
    }
    let ce = student_logits
        .f_log_softmax(-1, Kind::Float)?
        .f_nll_loss::<Tensor>(labels, None, tch::Reduction::Mean, IGNORE_LABEL)?;
    Ok(kd
        .f_mul_scalar(alpha)?
        .f_add(&ce.f_mul_scalar(1.0 - alpha)?)?)
}

/// Logits of `model` on `images` in inference mode, batch by batch, without gradients.
pub fn logits(
    model: &impl ModuleT,
    images: &Tensor,
    batch_size: usize,
) -> Result<Tensor, ModelError> {
    let n = images.size().first().copied().unwrap_or(0);
    let b = batch_size.max(1) as i64;
    guarded("logits", || {
        tch::no_grad(|| {
            let mut parts = Vec::new();
            let mut start = 0;
            while start < n {
                let len = b.min(n - start);
                parts.push(model.forward_t(&images.f_narrow(0, start, len)?, false));
                start += len;
            }
            if parts.is_empty() {
                return Err(ModelError::Shape("logits: no images".into()));
            }
            Ok(Tensor::f_cat(&parts, 0)?)
        })
    })
}

/// A frozen set of same-architecture models whose logits are averaged: the global (merged)
/// student plus the client students `global + Δk`, as in FedDF. Averaging logits of models that
/// each saw one writer cancels much of their individual bias.
pub struct Ensemble {
    members: Vec<(nn::VarStore, Box<dyn ModuleT>)>,
    /// Weight of each member's logits, summing to 1 (uniform unless built with
    /// [`Ensemble::weighted`]).
    weights: Vec<f64>,
}

impl std::fmt::Debug for Ensemble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ensemble")
            .field("members", &self.members.len())
            .finish()
    }
}

impl Ensemble {
    /// Builds one network of `arch` (a [`NetKind`] or an [`Arch`]) per member and loads its
    /// weights (names and shapes must match the architecture built for `shape`).
    pub fn new(
        arch: impl Into<Arch>,
        shape: &DataShape,
        members: &[&Weights],
    ) -> Result<Ensemble, ModelError> {
        let arch = arch.into();
        if members.is_empty() {
            return Err(ModelError::Config(
                "an ensemble needs at least one member".into(),
            ));
        }
        let mut built = Vec::with_capacity(members.len());
        for w in members {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let net: Box<dyn ModuleT> = Box::new(arch.build(&vs.root(), shape)?);
            w.load_into(&mut vs)?;
            vs.freeze();
            built.push((vs, net));
        }
        let n = built.len() as f64;
        Ok(Ensemble {
            weights: vec![1.0 / n; built.len()],
            members: built,
        })
    }

    /// Like [`Ensemble::new`], with member `k`'s logits weighted by `weights[k]` (≥ 0, not all
    /// zero; normalised here), e.g. from [`quality_weights`].
    pub fn weighted(
        arch: impl Into<Arch>,
        shape: &DataShape,
        members: &[&Weights],
        weights: &[f64],
    ) -> Result<Ensemble, ModelError> {
        let norm = normalised(weights, members.len())?;
        let mut e = Ensemble::new(arch, shape, members)?;
        e.weights = norm;
        Ok(e)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: [`Ensemble::new`] refuses an empty member list.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Mean of the members' logits on one batch, in inference mode, without gradients.
    pub fn logits(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        guarded("ensemble logits", || {
            tch::no_grad(|| {
                let mut sum: Option<Tensor> = None;
                for ((_, net), &w) in self.members.iter().zip(&self.weights) {
                    if w == 0.0 {
                        continue;
                    }
                    let l = net.forward_t(images, false).f_mul_scalar(w)?;
                    sum = Some(match sum {
                        None => l,
                        Some(s) => s.f_add(&l)?,
                    });
                }
                sum.ok_or_else(|| ModelError::Config("empty ensemble".into()))
            })
        })
    }
}

/// Mean logits of several student weight sets (e.g. global + each `global + Δk`) on `images`,
/// `[N, classes]`: the soft targets of FedDF-style fusion, computed once per round.
pub fn ensemble_logits(
    shape: &DataShape,
    members: &[&Weights],
    images: &Tensor,
    batch_size: usize,
) -> Result<Tensor, ModelError> {
    let uniform = vec![1.0; members.len()];
    weighted_ensemble_logits(shape, members, &uniform, images, batch_size)
}

/// [`ensemble_logits`] with member `k` weighted by `weights[k]` (normalised here).
pub fn weighted_ensemble_logits(
    shape: &DataShape,
    members: &[&Weights],
    weights: &[f64],
    images: &Tensor,
    batch_size: usize,
) -> Result<Tensor, ModelError> {
    weighted_ensemble_logits_of(
        &Arch::student(),
        shape,
        members,
        weights,
        images,
        batch_size,
    )
}

/// [`weighted_ensemble_logits`] for members of any student architecture (e.g. a TorchScript
/// module).
pub fn weighted_ensemble_logits_of(
    arch: &Arch,
    shape: &DataShape,
    members: &[&Weights],
    weights: &[f64],
    images: &Tensor,
    batch_size: usize,
) -> Result<Tensor, ModelError> {
    let weights = normalised(weights, members.len())?;
    // One scratch network reloaded per member: memory stays O(one student) however many clients.
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = arch.build(&vs.root(), shape)?;
    let mut sum: Option<Tensor> = None;
    for (w, &k) in members.iter().zip(&weights) {
        if k == 0.0 {
            continue;
        }
        w.load_into(&mut vs)?;
        let l = logits(&net, images, batch_size)?.f_mul_scalar(k)?;
        sum = Some(match sum {
            None => l,
            Some(s) => s.f_add(&l)?,
        });
    }
    sum.ok_or_else(|| ModelError::Config("ensemble_logits: no members".into()))
}

/// `weights` scaled to sum to 1; an error unless there is one finite, non-negative weight per
/// member and at least one is positive.
fn normalised(weights: &[f64], members: usize) -> Result<Vec<f64>, ModelError> {
    if weights.len() != members || members == 0 {
        return Err(ModelError::Config(format!(
            "ensemble: {} weights for {members} members",
            weights.len()
        )));
    }
    if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return Err(ModelError::Config(format!(
            "ensemble weights must be finite and ≥ 0: {weights:?}"
        )));
    }
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 {
        return Err(ModelError::Config("ensemble weights are all zero".into()));
    }
    Ok(weights.iter().map(|w| w / sum).collect())
}

/// Validation accuracy of each student weight set: what [`quality_weights`] weighs by.
pub fn member_accuracies(
    shape: &DataShape,
    members: &[&Weights],
    val: &Dataset,
) -> Result<Vec<f64>, ModelError> {
    member_accuracies_of(&Arch::student(), shape, members, val)
}

/// [`member_accuracies`] for members of any student architecture.
pub fn member_accuracies_of(
    arch: &Arch,
    shape: &DataShape,
    members: &[&Weights],
    val: &Dataset,
) -> Result<Vec<f64>, ModelError> {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = arch.build(&vs.root(), shape)?;
    members
        .iter()
        .map(|w| {
            w.load_into(&mut vs)?;
            Ok(evaluate(&net, val, 512).accuracy)
        })
        .collect()
}

/// Ensemble weights from validated quality: members scoring below half the best member are
/// left out (a student that saw one camera knows ~10 of 43 classes and is confidently wrong on
/// the rest), the others weigh `accuracy²`, so the ensemble leans on the members that
/// generalise to cameras nobody trained on. All zeros (no member above 0) falls back to uniform.
pub fn quality_weights(accuracies: &[f64]) -> Vec<f64> {
    let best = accuracies
        .iter()
        .copied()
        .filter(|a| a.is_finite())
        .fold(0.0, f64::max);
    if best <= 0.0 {
        return vec![1.0; accuracies.len()];
    }
    accuracies
        .iter()
        .map(|&a| {
            if a.is_finite() && a >= 0.5 * best {
                a * a
            } else {
                0.0
            }
        })
        .collect()
}

/// Random affine jitter (rotation ±10°, scale ±10 %, translation ±10 % of the side) per image.
/// Pixels outside the source read as background (−1 after the loaders' normalisation).
pub fn augment(images: &Tensor, rng: &mut StdRng) -> Result<Tensor, ModelError> {
    let size = images.size();
    if size.len() != 4 {
        return Err(ModelError::Shape(format!(
            "augment: images {size:?}, expected [N, C, H, W]"
        )));
    }
    let n = size[0] as usize;
    let mut theta = Vec::with_capacity(n * 6);
    for _ in 0..n {
        let a: f64 = rng.gen_range(-10f64..10.0).to_radians();
        let s: f64 = rng.gen_range(0.9..1.1);
        let (tx, ty): (f64, f64) = (rng.gen_range(-0.2..0.2), rng.gen_range(-0.2..0.2));
        let (c, si) = (a.cos() / s, a.sin() / s);
        theta.extend_from_slice(&[
            c as f32, -si as f32, tx as f32, si as f32, c as f32, ty as f32,
        ]);
    }
    let theta = Tensor::f_from_slice(&theta)?.f_reshape([n as i64, 2, 3])?;
    let grid = Tensor::f_affine_grid_generator(&theta, size.as_slice(), false)?;
    // grid_sampler pads with zeros: shift so the background is 0 while sampling.
    let shifted = images.f_add_scalar(1.0)?;
    Ok(shifted
        .f_grid_sampler(&grid, 0, 0, false)?
        .f_sub_scalar(1.0)?)
}

/// Downward KD: trains `student` (variables in `vs`) to match `soft` targets on `images`, plus
/// (1 − α)·CE on `labelled` when given. Warm-starting is the caller's choice: whatever weights
/// are in `vs` are the starting point. Returns the last epoch's statistics; `accuracy` is the
/// agreement with the targets' argmax on the soft stream.
pub fn distill(
    student: &impl ModuleT,
    vs: &nn::VarStore,
    images: &Tensor,
    soft: Soft<'_>,
    labelled: Option<&Dataset>,
    cfg: &KdConfig,
) -> Result<TrainStats, ModelError> {
    let s = kd_train(student, vs, images, soft, labelled, cfg)?;
    Ok(TrainStats {
        samples: images.size().first().copied().unwrap_or(0) as usize,
        loss: s.loss,
        accuracy: s.agreement,
    })
}

/// Upward fusion: trains `teacher` (variables in `vs`) to match the ensemble's soft targets on
/// the unlabelled pool `pool_images`, plus (1 − α)·CE on the labelled set. Same loop as
/// [`distill`]; kept as its own entry point because the round reports it separately and the two
/// directions are configured separately.
pub fn fuse(
    teacher: &impl ModuleT,
    vs: &nn::VarStore,
    pool_images: &Tensor,
    soft: Soft<'_>,
    labelled: Option<&Dataset>,
    cfg: &KdConfig,
) -> Result<FuseStats, ModelError> {
    kd_train(teacher, vs, pool_images, soft, labelled, cfg)
}

fn kd_train(
    model: &impl ModuleT,
    vs: &nn::VarStore,
    images: &Tensor,
    soft: Soft<'_>,
    labelled: Option<&Dataset>,
    cfg: &KdConfig,
) -> Result<FuseStats, ModelError> {
    cfg.validate()?;
    let isz = images.size();
    if isz.len() != 4 {
        return Err(ModelError::Shape(format!(
            "images {isz:?}: expected [N, C, H, W]"
        )));
    }
    let n_soft = isz[0] as usize;
    if let Soft::Logits(l) = &soft {
        if l.size().first().copied() != Some(isz[0]) || l.dim() != 2 {
            return Err(ModelError::Shape(format!(
                "soft logits {:?} for {n_soft} images",
                l.size()
            )));
        }
    }
    let hard = match labelled {
        Some(d) if cfg.alpha < 1.0 && !d.is_empty() => {
            check_data(d, false)?;
            Some(d)
        }
        _ => None,
    };
    let n_hard = hard.map_or(0, Dataset::len);
    let b = cfg.batch_size;
    let steps = n_soft.div_ceil(b).max(n_hard.div_ceil(b));
    if steps == 0 || cfg.epochs == 0 {
        return Ok(FuseStats::default());
    }
    // Only the soft stream present: the KD term gets the full weight.
    let alpha = if hard.is_some() { cfg.alpha } else { 1.0 };
    let mut opt = nn::Sgd {
        momentum: cfg.momentum,
        wd: cfg.weight_decay,
        ..Default::default()
    }
    .build(vs, cfg.lr)?;
    let device = vs.device();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut soft_order: Vec<i64> = (0..n_soft as i64).collect();
    let mut hard_order: Vec<i64> = (0..n_hard as i64).collect();
    let mut stats = FuseStats::default();
    let mut total_steps = 0;
    for _ in 0..cfg.epochs {
        soft_order.shuffle(&mut rng);
        hard_order.shuffle(&mut rng);
        let (mut loss_sum, mut kd_sum, mut ce_sum) = (0.0, 0.0, 0.0);
        let (mut agree, mut seen) = (0i64, 0i64);
        for step in 0..steps {
            let soft_idx = cycle(&soft_order, step, b);
            let hard_idx = cycle(&hard_order, step, b);
            let (l, k, c, a, s) = guarded("distillation step", || {
                let mut terms = Vec::new();
                let (mut k, mut c, mut a, mut s) = (0.0, 0.0, 0, 0);
                if !soft_idx.is_empty() {
                    let idx = Tensor::f_from_slice(&soft_idx)?;
                    let mut xs = images.f_index_select(0, &idx)?;
                    let targets = match &soft {
                        Soft::Logits(l) => l.f_index_select(0, &idx)?,
                        Soft::Model(f) => {
                            if cfg.augment {
                                xs = augment(&xs, &mut rng)?;
                            }
                            tch::no_grad(|| f(&xs))?
                        }
                    };
                    let (xs, targets) = confident(xs, targets, cfg.min_confidence)?;
                    let kept = xs.size().first().copied().unwrap_or(0);
                    if kept > 0 {
                        let xs = xs.f_to_device(device)?;
                        let targets = targets.f_to_device(device)?;
                        let out = model.forward_t(&xs, true);
                        let kd = kd_loss(&out, &targets, None, cfg.temperature, 1.0)?;
                        k = kd.f_double_value(&[])?;
                        (a, s) = tch::no_grad(|| -> Result<(i64, i64), ModelError> {
                            let same = out
                                .f_argmax(-1, false)?
                                .f_eq_tensor(&targets.f_argmax(-1, false)?)?
                                .f_sum(Kind::Int64)?
                                .f_int64_value(&[])?;
                            Ok((same, kept))
                        })?;
                        terms.push(kd.f_mul_scalar(alpha)?);
                    }
                }
                if let (Some(d), false) = (hard, hard_idx.is_empty()) {
                    let idx = Tensor::f_from_slice(&hard_idx)?;
                    let mut xs = d.images.f_index_select(0, &idx)?;
                    if cfg.augment {
                        xs = augment(&xs, &mut rng)?;
                    }
                    let xs = xs.f_to_device(device)?;
                    let ys = d.labels.f_index_select(0, &idx)?.f_to_device(device)?;
                    let ce = model
                        .forward_t(&xs, true)
                        .f_log_softmax(-1, Kind::Float)?
                        .f_nll_loss::<Tensor>(&ys, None, tch::Reduction::Mean, IGNORE_LABEL)?;
                    c = ce.f_double_value(&[])?;
                    terms.push(ce.f_mul_scalar(1.0 - alpha)?);
                }
                // Every soft row filtered out and no labelled stream: nothing to learn here.
                let Some(mut total) = terms.pop() else {
                    return Ok((0.0, 0.0, 0.0, 0, 0));
                };
                for t in terms {
                    total = total.f_add(&t)?;
                }
                opt.backward_step(&total);
                Ok((total.f_double_value(&[])?, k, c, a, s))
            })?;
            if !l.is_finite() {
                return Err(ModelError::Shape(format!(
                    "distillation loss became {l} (lr {} too high?)",
                    cfg.lr
                )));
            }
            loss_sum += l;
            kd_sum += k;
            ce_sum += c;
            agree += a;
            seen += s;
            total_steps += 1;
        }
        stats = FuseStats {
            steps: total_steps,
            loss: loss_sum / steps as f64,
            kd_loss: kd_sum / steps as f64,
            ce_loss: ce_sum / steps as f64,
            agreement: if seen == 0 {
                0.0
            } else {
                agree as f64 / seen as f64
            },
        };
    }
    Ok(stats)
}

/// The rows of a soft batch whose target's top-class probability reaches `min_confidence`
/// (all of them when it is 0).
fn confident(
    xs: Tensor,
    targets: Tensor,
    min_confidence: f64,
) -> Result<(Tensor, Tensor), ModelError> {
    if min_confidence <= 0.0 {
        return Ok((xs, targets));
    }
    let top = targets
        .f_softmax(-1, Kind::Float)?
        .f_amax([-1i64].as_slice(), false)?;
    let keep = top.f_ge(min_confidence)?.f_nonzero()?.f_reshape([-1])?;
    Ok((
        xs.f_index_select(0, &keep)?,
        targets.f_index_select(0, &keep)?,
    ))
}

/// The `step`-th batch of a stream that wraps around when it runs out (so the shorter stream is
/// repeated to match the longer one); empty for an empty stream.
fn cycle(order: &[i64], step: usize, b: usize) -> Vec<i64> {
    if order.is_empty() {
        return Vec::new();
    }
    let start = step * b;
    if start < order.len() {
        order[start..(start + b).min(order.len())].to_vec()
    } else {
        (0..b.min(order.len()))
            .map(|i| order[(start + i) % order.len()])
            .collect()
    }
}

/// Outcome of a guarded update (defined with the round report in [`coevo_ops`], which
/// reads reports without libtorch).
pub use coevo_ops::report::GuardOutcome;

/// The guard's decision: accept unless validation accuracy fell by more than `epsilon`
/// (`epsilon = 0` means "must not drop at all"; a non-finite `after` is always rejected).
pub fn guard(before: f64, after: f64, epsilon: f64) -> GuardOutcome {
    guard_against_best(before, before, after, epsilon)
}

/// The guard with memory: accept only if `after` is within `epsilon` of `best`, the best
/// validation accuracy the model has had, not merely of `before` — so a run of small drops,
/// each within ε of its predecessor, cannot add up.
pub fn guard_against_best(before: f64, best: f64, after: f64, epsilon: f64) -> GuardOutcome {
    let eps = epsilon.max(0.0);
    let best = if best.is_finite() {
        best.max(before)
    } else {
        before
    };
    if after.is_finite() && after >= best - eps {
        GuardOutcome::Accepted {
            before,
            after,
            best,
            reason: format!(
                "validation accuracy {after:.4} >= best so far {best:.4} - ε ({eps:.4})"
            ),
        }
    } else {
        GuardOutcome::RolledBack {
            before,
            after,
            best,
            reason: format!(
                "validation accuracy {after:.4} < best so far {best:.4} - ε ({eps:.4})"
            ),
        }
    }
}

/// Runs `update` on the model in `vs` and keeps the result only if [`guard`] accepts its
/// validation accuracy on `val`; otherwise (or if `update` fails) restores the previous weights.
/// `before` may be passed when already known (it saves one evaluation).
pub fn guard_update<T>(
    model: &impl ModuleT,
    vs: &mut nn::VarStore,
    val: &Dataset,
    epsilon: f64,
    before: Option<f64>,
    update: impl FnOnce(&nn::VarStore) -> Result<T, ModelError>,
) -> Result<(GuardOutcome, Option<T>), ModelError> {
    let before = before.unwrap_or_else(|| evaluate(model, val, 512).accuracy);
    let snapshot = Weights::from_var_store(vs);
    let result = update(vs);
    let (outcome, value) = match result {
        Ok(v) => {
            let after = evaluate(model, val, 512).accuracy;
            let g = guard(before, after, epsilon);
            (g, Some(v))
        }
        Err(e) => (
            GuardOutcome::RolledBack {
                before,
                after: f64::NAN,
                best: before,
                reason: format!("update failed: {e}"),
            },
            None,
        ),
    };
    if !outcome.accepted() {
        snapshot.load_into(vs)?;
    }
    Ok((outcome, value))
}

/// Guarded fusion with early stopping: runs [`fuse`] one epoch at a time (up to `cfg.epochs`),
/// scores each epoch's teacher on `val`, keeps the best-scoring epoch (stopping after the
/// first epoch that does not improve on it), and accepts that teacher only if
/// [`guard_against_best`] does against `best` (the best validation accuracy any accepted
/// teacher had); otherwise the teacher is restored bit for bit. So a fusion step that cannot
/// match the best teacher so far on held-out data is never taken, and an epoch that overfits
/// the ensemble is not the one kept.
#[allow(clippy::too_many_arguments)]
pub fn fuse_guarded(
    teacher: &impl ModuleT,
    vs: &mut nn::VarStore,
    val: &Dataset,
    pool_images: &Tensor,
    soft: Soft<'_>,
    labelled: Option<&Dataset>,
    cfg: &KdConfig,
    epsilon: f64,
    before: Option<f64>,
    best: Option<f64>,
) -> Result<(GuardOutcome, FuseStats), ModelError> {
    let before = before.unwrap_or_else(|| evaluate(teacher, val, 512).accuracy);
    let best = best.unwrap_or(before);
    let snapshot = Weights::from_var_store(vs);
    let mut top: Option<(f64, Weights, usize)> = None;
    let mut stats = FuseStats::default();
    let mut failure = None;
    for epoch in 0..cfg.epochs {
        let one = KdConfig {
            epochs: 1,
            seed: cfg.seed.wrapping_mul(31).wrapping_add(epoch as u64),
            ..cfg.clone()
        };
        match fuse(teacher, vs, pool_images, soft, labelled, &one) {
            Ok(s) => {
                stats = FuseStats {
                    steps: stats.steps + s.steps,
                    ..s
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        let acc = evaluate(teacher, val, 512).accuracy;
        match &top {
            Some((a, _, _)) if acc <= *a => break,
            _ => top = Some((acc, Weights::from_var_store(vs), epoch + 1)),
        }
    }
    let outcome = match (top, failure) {
        (Some((after, w, epochs)), _) => {
            let mut g = guard_against_best(before, best, after, epsilon);
            // With ε = 0 a fusion must *beat* the best teacher: a tie on validation is no
            // evidence of progress, and measured on the camera set a tie cost 1.3 test points.
            if epsilon <= 0.0 && g.accepted() && after <= best {
                g = GuardOutcome::RolledBack {
                    before,
                    after,
                    best,
                    reason: format!(
                        "validation accuracy {after:.4} does not beat the best teacher so far \
                         ({best:.4})"
                    ),
                };
            }
            if g.accepted() {
                w.load_into(vs)?;
            }
            with_reason_suffix(g, &format!(" (best of {epochs} fusion epoch(s))"))
        }
        (None, Some(e)) => GuardOutcome::RolledBack {
            before,
            after: f64::NAN,
            best,
            reason: format!("fusion failed: {e}"),
        },
        (None, None) => GuardOutcome::RolledBack {
            before,
            after: before,
            best,
            reason: "no fusion epochs configured".into(),
        },
    };
    if !outcome.accepted() {
        snapshot.load_into(vs)?;
    }
    Ok((outcome, stats))
}

fn with_reason_suffix(mut g: GuardOutcome, suffix: &str) -> GuardOutcome {
    match &mut g {
        GuardOutcome::Accepted { reason, .. } | GuardOutcome::RolledBack { reason, .. } => {
            reason.push_str(suffix)
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::train::{train, TrainConfig};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn kd_loss_zero_on_equal_logits_and_ce_part_exact() {
        let s = Tensor::from_slice(&[1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0]).reshape([2, 3]);
        let kd = kd_loss(&s, &s.copy(), None, 4.0, 0.5).unwrap();
        assert!(kd.double_value(&[]).abs() < 1e-6);
        let labels = Tensor::from_slice(&[1i64, 2]);
        let ce = s
            .log_softmax(-1, Kind::Float)
            .f_nll_loss::<Tensor>(&labels, None, tch::Reduction::Mean, -100)
            .unwrap()
            .double_value(&[]);
        let mixed = kd_loss(&s, &s.copy(), Some(&labels), 4.0, 0.3)
            .unwrap()
            .double_value(&[]);
        assert!(close(mixed, 0.7 * ce), "{mixed} vs {}", 0.7 * ce);
        // Unlabelled rows only feed the KD term.
        let partial = Tensor::from_slice(&[1i64, IGNORE_LABEL]);
        let ce1 = -s.log_softmax(-1, Kind::Float).double_value(&[0, 1]);
        let got = kd_loss(&s, &s.copy(), Some(&partial), 2.0, 0.0)
            .unwrap()
            .double_value(&[]);
        assert!(close(got, ce1));
        let none = Tensor::from_slice(&[IGNORE_LABEL, IGNORE_LABEL]);
        assert!(
            kd_loss(&s, &s, Some(&none), 2.0, 0.0)
                .unwrap()
                .double_value(&[])
                .abs()
                < 1e-6
        );
        // Different logits: positive, and shape mismatches are errors.
        let t = Tensor::from_slice(&[3.0f32, 0.0, 0.0, 0.0, 3.0, 0.0]).reshape([2, 3]);
        assert!(kd_loss(&s, &t, None, 2.0, 1.0).unwrap().double_value(&[]) > 0.1);
        assert!(kd_loss(&s, &t.narrow(1, 0, 2), None, 2.0, 1.0).is_err());
        assert!(kd_loss(&s, &t, None, 0.0, 1.0).is_err());
    }

    #[test]
    fn kd_gradient_moves_student_toward_teacher() {
        let shape = DataShape {
            channels: 1,
            height: 8,
            width: 8,
            classes: 4,
        };
        let split = synthetic(200, 50, shape, 3);
        tch::manual_seed(5);
        let tvs = nn::VarStore::new(Device::Cpu);
        let teacher = Teacher::new(&tvs.root(), &shape);
        train(
            &teacher,
            &tvs,
            &split.train,
            &TrainConfig {
                epochs: 3,
                ..Default::default()
            },
        )
        .unwrap();
        let t_logits = logits(&teacher, &split.train.images, 64).unwrap();
        let svs = nn::VarStore::new(Device::Cpu);
        let student = Student::new(&svs.root(), &shape);
        let gap = |net: &Student| {
            let s = logits(net, &split.train.images, 64).unwrap();
            kd_loss(&s, &t_logits, None, 2.0, 1.0)
                .unwrap()
                .double_value(&[])
        };
        // One full-batch step without momentum is plain gradient descent on the KD loss: for a
        // small lr it must lower that loss whatever the (global-RNG) initialisation.
        let before = gap(&student);
        let one_step = KdConfig {
            alpha: 1.0,
            epochs: 1,
            batch_size: 200,
            lr: 0.01,
            momentum: 0.0,
            weight_decay: 0.0,
            temperature: 2.0,
            ..Default::default()
        };
        distill(
            &student,
            &svs,
            &split.train.images,
            Soft::Logits(&t_logits),
            None,
            &one_step,
        )
        .unwrap();
        let after = gap(&student);
        assert!(after < before, "KL before {before} after {after}");
        // Then a few epochs: the student ends up agreeing with the teacher.
        let cfg = KdConfig {
            alpha: 1.0,
            epochs: 15,
            lr: 0.01,
            temperature: 2.0,
            ..Default::default()
        };
        // No labels at all: the student can only learn from the teacher.
        let stats = distill(
            &student,
            &svs,
            &split.train.images,
            Soft::Logits(&t_logits),
            None,
            &cfg,
        )
        .unwrap();
        assert!(stats.accuracy > 0.6, "{stats:?} (chance 0.25)");
    }

    #[test]
    fn fuse_with_online_ensemble_and_augmentation() {
        let shape = DataShape {
            channels: 1,
            height: 12,
            width: 12,
            classes: 3,
        };
        let split = synthetic(150, 60, shape, 9);
        tch::manual_seed(2);
        let members: Vec<Weights> = (0..2)
            .map(|i| {
                let vs = nn::VarStore::new(Device::Cpu);
                let net = Student::new(&vs.root(), &shape);
                let cfg = TrainConfig {
                    epochs: 2,
                    seed: i,
                    ..Default::default()
                };
                train(&net, &vs, &split.train, &cfg).unwrap();
                Weights::from_var_store(&vs)
            })
            .collect();
        let refs: Vec<&Weights> = members.iter().collect();
        let ens = Ensemble::new(NetKind::Student, &shape, &refs).unwrap();
        assert_eq!(ens.len(), 2);
        let fixed = ensemble_logits(&shape, &refs, &split.test.images, 32).unwrap();
        let online = ens.logits(&split.test.images).unwrap();
        assert!(fixed.allclose(&online, 1e-5, 1e-5, false));

        let tvs = nn::VarStore::new(Device::Cpu);
        let teacher = Teacher::new(&tvs.root(), &shape);
        let f = |x: &Tensor| ens.logits(x);
        let labelled = split.train.subset(&(0..20).collect::<Vec<_>>());
        let cfg = KdConfig {
            epochs: 10,
            lr: 0.05,
            augment: true,
            ..Default::default()
        };
        let stats = fuse(
            &teacher,
            &tvs,
            &split.train.images,
            Soft::Model(&f),
            Some(&labelled),
            &cfg,
        )
        .unwrap();
        assert_eq!(stats.steps, 10 * 150usize.div_ceil(64));
        assert!(stats.ce_loss > 0.0 && stats.kd_loss.is_finite());
        let acc = evaluate(&teacher, &split.test, 64).accuracy;
        assert!(acc > 0.6, "fused teacher accuracy {acc} (chance 0.33)");
        assert!(Ensemble::new(NetKind::Student, &shape, &[]).is_err());
    }

    #[test]
    fn guard_accepts_and_rolls_back() {
        assert!(guard(0.80, 0.79, 0.02).accepted());
        assert!(guard(0.80, 0.85, 0.0).accepted());
        let g = guard(0.80, 0.70, 0.05);
        assert!(matches!(g, GuardOutcome::RolledBack { .. }));
        assert!(close(g.delta(), -0.10));
        assert!(!guard(0.5, f64::NAN, 1.0).accepted());

        let shape = DataShape {
            channels: 1,
            height: 8,
            width: 8,
            classes: 3,
        };
        let split = synthetic(150, 60, shape, 4);
        tch::manual_seed(0);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let net = Student::new(&vs.root(), &shape);
        train(&net, &vs, &split.train, &TrainConfig::default()).unwrap();
        let good = Weights::from_var_store(&vs);
        // An update that wrecks the model is rolled back, bit for bit.
        let (out, _) = guard_update(&net, &mut vs, &split.test, 0.01, None, |vs| {
            tch::no_grad(|| {
                for mut v in vs.trainable_variables() {
                    let _ = v.fill_(0.0);
                }
            });
            Ok(())
        })
        .unwrap();
        assert!(!out.accepted(), "{out:?}");
        assert_eq!(Weights::from_var_store(&vs), good);
        // A failing update is rolled back with its reason.
        let (out, v) = guard_update(&net, &mut vs, &split.test, 0.01, None, |_| {
            Err::<(), _>(ModelError::Config("boom".into()))
        })
        .unwrap();
        assert!(v.is_none());
        assert!(matches!(&out, GuardOutcome::RolledBack { reason, .. } if reason.contains("boom")));
        // A harmless update is kept.
        let (out, v) = guard_update(&net, &mut vs, &split.test, 0.0, None, |_| Ok(7)).unwrap();
        assert!(out.accepted() && v == Some(7));
    }

    #[test]
    fn guard_against_best_stops_accumulated_drops_and_weights_by_quality() {
        // Three drops of 0.01 each pass a memoryless ε = 0.015 guard, not one against the best.
        let mut current = 0.80;
        let mut best = 0.80;
        let mut accepted = 0;
        for _ in 0..3 {
            let after = current - 0.01;
            let g = guard_against_best(current, best, after, 0.015);
            if g.accepted() {
                accepted += 1;
                current = after;
                best = f64::max(best, after);
            }
            assert!(g.reason().contains("best so far"));
        }
        assert_eq!(accepted, 1, "only the first drop is within ε of the best");
        assert!((current - 0.79).abs() < 1e-9);
        // Quality weights: members under half the best are dropped, the rest weigh acc².
        let w = quality_weights(&[0.6, 0.2, 0.4, f64::NAN]);
        assert_eq!(w.len(), 4);
        assert!((w[0] - 0.36).abs() < 1e-9 && w[1] == 0.0 && (w[2] - 0.16).abs() < 1e-9);
        assert_eq!(w[3], 0.0);
        assert_eq!(quality_weights(&[0.0, 0.0]), vec![1.0, 1.0]);
        assert!(normalised(&[1.0, -1.0], 2).is_err());
        assert!(normalised(&[0.0, 0.0], 2).is_err());
        assert!(normalised(&[1.0], 2).is_err());
    }

    #[test]
    fn confidence_filter_and_fuse_guarded_roll_back_bit_for_bit() {
        let xs = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).reshape([3, 1, 1, 1]);
        // Row 0 confident (class 0), row 1 uniform, row 2 confident (class 1).
        let t = Tensor::from_slice(&[9.0f32, 0.0, 0.0, 0.0, 0.0, 9.0]).reshape([3, 2]);
        let (kx, kt) = confident(xs.shallow_clone(), t.shallow_clone(), 0.9).unwrap();
        assert_eq!(kx.size()[0], 2);
        assert_eq!(
            Vec::<f32>::try_from(kx.reshape([-1])).unwrap(),
            vec![1.0, 3.0]
        );
        assert_eq!(kt.size(), [2, 2]);
        assert_eq!(confident(xs, t, 0.0).unwrap().0.size()[0], 3);

        let shape = DataShape {
            channels: 1,
            height: 8,
            width: 8,
            classes: 3,
        };
        let split = synthetic(150, 60, shape, 4);
        tch::manual_seed(0);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let teacher = Teacher::new(&vs.root(), &shape);
        train(&teacher, &vs, &split.train, &TrainConfig::default()).unwrap();
        let good = Weights::from_var_store(&vs);
        let before = evaluate(&teacher, &split.test, 64).accuracy;
        // Targets that are all "class 0" with full confidence: fusing on them alone (α = 1)
        // wrecks the teacher, so the guard must restore it exactly.
        let n = split.train.len() as i64;
        let bad = Tensor::zeros([n, 3], (Kind::Float, Device::Cpu));
        let _ = bad.narrow(1, 0, 1).fill_(20.0);
        let cfg = KdConfig {
            alpha: 1.0,
            epochs: 3,
            lr: 0.1,
            ..Default::default()
        };
        let (out, stats) = fuse_guarded(
            &teacher,
            &mut vs,
            &split.test,
            &split.train.images,
            Soft::Logits(&bad),
            None,
            &cfg,
            0.0,
            None,
            Some(before),
        )
        .unwrap();
        assert!(!out.accepted(), "{out:?}");
        assert!(stats.steps > 0);
        assert_eq!(Weights::from_var_store(&vs), good);
        // Honest targets (the teacher's own logits) with CE keep it within the best.
        let own = logits(&teacher, &split.train.images, 64).unwrap();
        let (out, _) = fuse_guarded(
            &teacher,
            &mut vs,
            &split.test,
            &split.train.images,
            Soft::Logits(&own),
            Some(&split.train),
            &KdConfig {
                epochs: 2,
                lr: 0.005,
                ..Default::default()
            },
            0.05,
            Some(before),
            Some(before),
        )
        .unwrap();
        assert!(out.accepted(), "{out:?}");
    }
}
