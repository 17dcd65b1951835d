//! Small-sample learning and label cleaning at the edge (issue #18).
//!
//! A camera has many frames, few labels, and some of those wrong. Before it trains, the edge
//! runs the round's model — the student the teacher distilled into, trained on everyone else's
//! data, so it has not memorised this camera's mistakes — once over its frames, on a *weak*
//! view (a small shift; a flip only if the data allows it) and a *strong* view (rotation,
//! scale, shift, brightness/contrast jitter, pixel noise, a cut-out square):
//!
//! - **pseudo-labels** (FixMatch, Sohn et al. 2020): an unlabelled frame gets the model's label
//!   when the weak view's confidence is at least the threshold (optionally per class, the
//!   FlexMatch mapping: classes the model rarely predicts confidently get a lower bar) and the
//!   strong view's prediction agrees;
//! - **relabelling**: a labelled frame whose label the model contradicts with that confidence,
//!   on both views, takes the model's label;
//! - **noise estimate**: among labelled frames the model predicts confidently, the
//!   share whose label disagrees — the model's error on such frames is small, so this
//!   estimates the camera's label noise rate without knowing the truth;
//! - **small-loss selection** (Co-teaching, Han et al. 2018: drop the `R = estimated noise`
//!   fraction with the largest loss): after relabelling, the labelled frames with the largest
//!   loss under the model are left out until relabelled + left out ≈ estimated noise × labelled.
//!
//! Then it trains as usual ([`crate::train::train_batches`], so FedProx and the seeded order
//! still apply) on the kept labels (weak views) and the pseudo-labels (strong views: the
//! FixMatch consistency term). Pseudo-labels are fixed for the round rather than recomputed
//! every step: one extra inference pass over the frames per round instead of one per step,
//! which is what a 2-core camera can afford; the next round's model labels afresh.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::nn::{ModuleT, VarStore};
use tch::{Kind, Tensor};

use crate::local::TrainData;
use crate::noise::UNLABELLED;
use crate::train::{guarded, train_batches, TrainConfig, TrainStats};
use crate::ModelError;
pub use coevo_protocol::LabelCounts;

/// Frames per inference batch of the selection pass: bounds its activations (two views of 64
/// frames through the student: a few MB at 32×32 RGB; 256 cost a camera 60 MB more peak RSS).
const VIEW_BATCH: usize = 64;

/// Edge settings of semi-supervised training and cleaning (`[labels]` in `edge.toml`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SemiConfig {
    /// Confidence (top softmax probability on the weak view) a pseudo-label needs.
    pub threshold: f64,
    /// Lower the threshold of classes the model is rarely confident about (FlexMatch):
    /// `τ_c = τ · β_c / (2 − β_c)` with `β_c` the class's confident count over the largest,
    /// never below `min_class_threshold`.
    pub per_class_thresholds: bool,
    /// Floor of the per-class thresholds.
    pub min_class_threshold: f64,
    /// Confidence at which the model may contradict a given label (relabel it, and count it
    /// towards the noise estimate).
    pub relabel_confidence: f64,
    /// Leave out the largest-loss labelled frames up to the estimated noise rate.
    pub small_loss: bool,
    /// Confidently predicted labelled frames needed before the noise is estimated (and labels
    /// cleaned): fewer make the estimate a coin toss.
    pub min_confident: usize,
    /// Largest shift of the weak view, as a fraction of the side.
    pub max_shift: f64,
    /// Mirror the weak view half the time: right for street scenes, wrong for characters and
    /// signs with text (the default).
    pub flip: bool,
}

impl Default for SemiConfig {
    fn default() -> Self {
        SemiConfig {
            threshold: 0.9,
            per_class_thresholds: false,
            min_class_threshold: 0.5,
            relabel_confidence: 0.9,
            small_loss: true,
            min_confident: 20,
            max_shift: 0.1,
            flip: false,
        }
    }
}

impl SemiConfig {
    /// Refuses thresholds outside `[0, 1]` and a negative shift.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (name, v) in [
            ("threshold", self.threshold),
            ("min_class_threshold", self.min_class_threshold),
            ("relabel_confidence", self.relabel_confidence),
            ("max_shift", self.max_shift),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(ModelError::Config(format!(
                    "[labels] {name} = {v} must be within [0, 1]"
                )));
            }
        }
        Ok(())
    }
}

/// The model's view of every frame: weak-view confidence and prediction, strong-view
/// prediction, and the weak view's loss against the given label (labelled frames only).
#[derive(Clone, Debug, Default)]
pub struct Views {
    pub confidence: Vec<f64>,
    pub pred: Vec<i64>,
    pub strong_pred: Vec<i64>,
    pub loss: Vec<f64>,
}

/// What a round trains on: frame index, label, and whether the label is a pseudo-label.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub rows: Vec<(i64, i64, bool)>,
    pub counts: LabelCounts,
}

/// Per-class pseudo-label thresholds (see [`SemiConfig::per_class_thresholds`]); `conf` and
/// `pred` are the unlabelled frames' weak-view confidence and prediction.
pub fn class_thresholds(conf: &[f64], pred: &[i64], classes: usize, cfg: &SemiConfig) -> Vec<f64> {
    if !cfg.per_class_thresholds || classes == 0 {
        return vec![cfg.threshold; classes];
    }
    let mut sigma = vec![0usize; classes];
    for (&c, &p) in conf.iter().zip(pred) {
        if c >= cfg.threshold {
            if let Some(s) = usize::try_from(p).ok().and_then(|p| sigma.get_mut(p)) {
                *s += 1;
            }
        }
    }
    let used: usize = sigma.iter().sum();
    // FlexMatch's warm-up: while most frames are below the bar, normalise by those instead,
    // so early thresholds stay high.
    let norm = sigma
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(conf.len() - used.min(conf.len()));
    sigma
        .iter()
        .map(|&s| {
            let beta = if norm == 0 {
                1.0
            } else {
                s as f64 / norm as f64
            };
            (cfg.threshold * beta / (2.0 - beta)).max(cfg.min_class_threshold)
        })
        .collect()
}

/// Decides the round's training rows from the model's [`Views`] (pure: the unit tests drive
/// it directly). `labels` are the camera's, [`UNLABELLED`] for none.
pub fn select(labels: &[i64], v: &Views, classes: usize, cfg: &SemiConfig) -> Plan {
    let (mut unl_conf, mut unl_pred) = (Vec::new(), Vec::new());
    for (i, _) in labels.iter().enumerate().filter(|(_, &l)| l == UNLABELLED) {
        unl_conf.push(v.confidence[i]);
        unl_pred.push(v.pred[i]);
    }
    let th = class_thresholds(&unl_conf, &unl_pred, classes, cfg);
    let stable = |i: usize| v.pred[i] == v.strong_pred[i];
    let mut counts = LabelCounts::default();
    let mut rows = Vec::new();
    let mut kept_labelled: Vec<(usize, i64)> = Vec::new();
    let (mut confident, mut contradicted, mut agree) = (0usize, 0usize, 0usize);
    for (i, &y) in labels.iter().enumerate() {
        if y == UNLABELLED {
            counts.unlabelled += 1;
            let p = v.pred[i];
            let bar = usize::try_from(p)
                .ok()
                .and_then(|p| th.get(p))
                .copied()
                .unwrap_or(f64::INFINITY);
            if v.confidence[i] >= bar && stable(i) {
                counts.pseudo_labelled += 1;
                rows.push((i as i64, p, true));
            }
            continue;
        }
        counts.labelled += 1;
        if v.pred[i] == y {
            agree += 1;
        }
        // The estimate uses every confident prediction (more evidence); relabelling also
        // needs the strong view to agree (fewer wrong relabels).
        if v.confidence[i] >= cfg.relabel_confidence {
            confident += 1;
            if v.pred[i] != y {
                contradicted += 1;
                if stable(i) {
                    counts.relabelled += 1;
                    rows.push((i as i64, v.pred[i], false));
                    continue;
                }
            }
        }
        kept_labelled.push((i, y));
    }
    if counts.labelled > 0 {
        counts.agreement = Some(agree as f64 / counts.labelled as f64);
    }
    counts.judged = confident as u64;
    // Too few confident frames: no estimate, so no small-loss selection (it would drop an
    // unknown share). Relabels stand: the per-frame evidence (confident on both views) is
    // what pseudo-labels are trusted on too.
    if confident >= cfg.min_confident.max(1) {
        counts.estimated_noise = Some(contradicted as f64 / confident as f64);
    }
    if let (true, Some(p)) = (cfg.small_loss, counts.estimated_noise) {
        let target = (p * counts.labelled as f64).round() as u64;
        let drop = target.saturating_sub(counts.relabelled) as usize;
        // Largest loss first; ties by index so the choice is deterministic.
        kept_labelled.sort_by(|a, b| v.loss[b.0].total_cmp(&v.loss[a.0]).then(a.0.cmp(&b.0)));
        let drop = drop.min(kept_labelled.len());
        counts.discarded = drop as u64;
        kept_labelled.drain(..drop);
    }
    rows.extend(kept_labelled.into_iter().map(|(i, y)| (i as i64, y, false)));
    rows.sort_unstable_by_key(|r| r.0);
    Plan { rows, counts }
}

/// Per-image affine warp (`theta` rows of 6) with background −1 (the loaders' black).
fn warp(images: &Tensor, theta: Vec<f32>) -> Result<Tensor, ModelError> {
    let size = images.size();
    let n = size[0];
    let theta = Tensor::f_from_slice(&theta)?.f_reshape([n, 2, 3])?;
    let grid = Tensor::f_affine_grid_generator(&theta, size.as_slice(), false)?;
    // grid_sampler pads with zeros: shift so the background is 0 while sampling.
    Ok(images
        .f_add_scalar(1.0)?
        .f_grid_sampler(&grid, 0, 0, false)?
        .f_sub_scalar(1.0)?)
}

fn check4(images: &Tensor, what: &str) -> Result<i64, ModelError> {
    let size = images.size();
    if size.len() != 4 {
        return Err(ModelError::Shape(format!(
            "{what}: images {size:?}, expected [N, C, H, W]"
        )));
    }
    Ok(size[0])
}

/// The weak view: a shift of up to `max_shift` of the side (and a mirror half the time with
/// `flip`).
pub fn weak_view(
    images: &Tensor,
    cfg: &SemiConfig,
    rng: &mut StdRng,
) -> Result<Tensor, ModelError> {
    let n = check4(images, "weak view")?;
    let s = 2.0 * cfg.max_shift; // grid coordinates span [−1, 1]
    let mut theta = Vec::with_capacity(n as usize * 6);
    for _ in 0..n {
        let sx = if cfg.flip && rng.gen_bool(0.5) {
            -1.0
        } else {
            1.0
        };
        let (tx, ty) = if s > 0.0 {
            (rng.gen_range(-s..=s), rng.gen_range(-s..=s))
        } else {
            (0.0, 0.0)
        };
        theta.extend_from_slice(&[sx, 0.0, tx as f32, 0.0, 1.0, ty as f32]);
    }
    warp(images, theta)
}

/// The strong view: rotation ±20°, scale ±15 %, shift ±15 %, contrast ×[0.6, 1.4],
/// brightness ±0.3, Gaussian pixel noise (σ 0.1) and a cut-out square of a third of the side,
/// clamped to `[−1, 1]`. Cheap: one warp and a few element-wise passes per batch.
pub fn strong_view(images: &Tensor, rng: &mut StdRng) -> Result<Tensor, ModelError> {
    let n = check4(images, "strong view")?;
    let size = images.size();
    let (h, w) = (size[2], size[3]);
    let mut theta = Vec::with_capacity(n as usize * 6);
    let mut contrast = Vec::with_capacity(n as usize);
    let mut bright = Vec::with_capacity(n as usize);
    let mut mask = vec![1f32; (n * h * w) as usize];
    let (ch, cw) = ((h / 3).max(1), (w / 3).max(1));
    for k in 0..n {
        let a: f64 = rng.gen_range(-20f64..20.0).to_radians();
        let sc: f64 = rng.gen_range(0.85..1.15);
        let (tx, ty): (f64, f64) = (rng.gen_range(-0.3..0.3), rng.gen_range(-0.3..0.3));
        let (c, si) = (a.cos() / sc, a.sin() / sc);
        theta.extend_from_slice(&[
            c as f32, -si as f32, tx as f32, si as f32, c as f32, ty as f32,
        ]);
        contrast.push(rng.gen_range(0.6f32..1.4));
        bright.push(rng.gen_range(-0.3f32..0.3));
        let (y0, x0) = (rng.gen_range(0..=h - ch), rng.gen_range(0..=w - cw));
        for y in y0..y0 + ch {
            let row = (k * h * w + y * w) as usize;
            mask[row + x0 as usize..row + (x0 + cw) as usize].fill(0.0);
        }
    }
    let warped = warp(images, theta)?;
    let contrast = Tensor::f_from_slice(&contrast)?.f_reshape([n, 1, 1, 1])?;
    let bright = Tensor::f_from_slice(&bright)?.f_reshape([n, 1, 1, 1])?;
    let noise = warped.f_randn_like()?.f_mul_scalar(0.1)?;
    let jittered = warped
        .f_mul(&contrast)?
        .f_add(&bright)?
        .f_add(&noise)?
        .f_clamp(-1.0, 1.0)?;
    // Cut-out: the square reads as background (−1) in every channel.
    let mask = Tensor::f_from_slice(&mask)?.f_reshape([n, 1, h, w])?;
    Ok(jittered
        .f_add_scalar(1.0)?
        .f_mul(&mask)?
        .f_sub_scalar(1.0)?)
}

/// Runs `model` (inference mode, no gradients) over every frame on both views.
pub fn views(
    model: &impl ModuleT,
    data: &TrainData,
    cfg: &SemiConfig,
    seed: u64,
) -> Result<Views, ModelError> {
    let labels = data.labels();
    let n = labels.len();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5EED_0F5E_31A5);
    let mut v = Views::default();
    let order: Vec<i64> = (0..n as i64).collect();
    for batch in order.chunks(VIEW_BATCH) {
        let (xs, ys) = data.fetch(batch)?;
        let weak = weak_view(&xs, cfg, &mut rng)?;
        let strong = strong_view(&xs, &mut rng)?;
        let (conf, pred, spred, loss) = guarded("label selection", || {
            tch::no_grad(|| {
                let logp = model
                    .forward_t(&weak, false)
                    .f_log_softmax(-1, Kind::Float)?;
                let (top, pred) = logp.f_max_dim(-1, false)?;
                let spred = model.forward_t(&strong, false).f_argmax(-1, false)?;
                // Loss against the given label; unlabelled rows read class 0 and are ignored.
                let safe = ys.f_clamp_min(0)?;
                let loss = logp.f_gather(-1, &safe.f_unsqueeze(-1)?, false)?.f_neg()?;
                Ok((
                    Vec::<f64>::try_from(&top.f_exp()?.f_to_kind(Kind::Double)?)?,
                    Vec::<i64>::try_from(&pred)?,
                    Vec::<i64>::try_from(&spred)?,
                    Vec::<f64>::try_from(&loss.f_reshape([-1])?.f_to_kind(Kind::Double)?)?,
                ))
            })
        })?;
        v.confidence.extend(conf);
        v.pred.extend(pred);
        v.strong_pred.extend(spred);
        v.loss.extend(loss);
    }
    Ok(v)
}

/// Semi-supervised training with label cleaning (see the module docs): `model` in `vs` holds
/// the round's received weights on entry. Returns the last epoch's statistics (against the
/// labels trained on) and the label counts for the delta header.
pub fn train_semi(
    model: &impl ModuleT,
    vs: &VarStore,
    data: &TrainData,
    cfg: &TrainConfig,
    semi: &SemiConfig,
) -> Result<(TrainStats, LabelCounts), ModelError> {
    semi.validate()?;
    let shape = data.shape();
    let t0 = std::time::Instant::now();
    let v = views(model, data, semi, cfg.seed)?;
    let plan = select(&data.labels(), &v, shape.classes, semi);
    tracing::info!(
        select_ms = t0.elapsed().as_millis() as u64,
        frames = data.len(),
        rows = plan.rows.len(),
        "label selection pass (2 views) done"
    );
    let device = vs.device();
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x0A06_3E47);
    let rows = &plan.rows;
    let stats = train_batches(model, vs, rows.len(), cfg, |batch| {
        let mut frames = Vec::with_capacity(batch.len());
        let mut labels = Vec::with_capacity(batch.len());
        let mut pseudo = Vec::with_capacity(batch.len());
        for &b in batch {
            let (f, y, p) = rows[b as usize];
            frames.push(f);
            labels.push(y);
            pseudo.push(p);
        }
        let (xs, _) = data.fetch(&frames)?;
        let mut xs = weak_view(&xs, semi, &mut rng)?;
        if pseudo.iter().any(|&p| p) {
            let strong = strong_view(&xs, &mut rng)?;
            let mask = Tensor::f_from_slice(&pseudo)?.f_reshape([-1, 1, 1, 1])?;
            xs = strong.f_where_self(&mask, &xs)?;
        }
        Ok((
            xs.f_to_device(device)?,
            Tensor::f_from_slice(&labels)?.f_to_device(device)?,
        ))
    })?;
    Ok((stats, plan.counts))
}

/// The counts of a round trained without selection: only what the labels themselves say.
pub fn plain_counts(labels: &[i64]) -> LabelCounts {
    let unlabelled = labels.iter().filter(|&&l| l == UNLABELLED).count() as u64;
    LabelCounts {
        labelled: labels.len() as u64 - unlabelled,
        unlabelled,
        ..LabelCounts::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::noise::{corrupt, LabelCorruption, NoiseKind};
    use crate::train::{evaluate, train};
    use crate::{DataShape, Student};

    fn views_of(conf: &[f64], pred: &[i64], strong: &[i64], loss: &[f64]) -> Views {
        Views {
            confidence: conf.to_vec(),
            pred: pred.to_vec(),
            strong_pred: strong.to_vec(),
            loss: loss.to_vec(),
        }
    }

    #[test]
    fn pseudo_labels_need_confidence_and_agreement() {
        let u = UNLABELLED;
        let labels = [u, u, u, u];
        let v = views_of(
            &[0.95, 0.95, 0.5, 0.91],
            &[1, 2, 1, 0],
            &[1, 0, 1, 0],
            &[0.0; 4],
        );
        let cfg = SemiConfig::default();
        let p = select(&labels, &v, 3, &cfg);
        // 0: confident and stable; 1: strong view disagrees; 2: below 0.9; 3: kept.
        assert_eq!(p.rows, vec![(0, 1, true), (3, 0, true)]);
        assert_eq!(p.counts.pseudo_labelled, 2);
        assert_eq!(p.counts.unlabelled, 4);
        assert_eq!(p.counts.agreement, None);
    }

    #[test]
    fn per_class_thresholds_lower_the_bar_for_rare_classes() {
        let cfg = SemiConfig {
            per_class_thresholds: true,
            ..SemiConfig::default()
        };
        // Class 0: 6 confident frames, class 1: 3, class 2: none; 1 frame below the bar.
        let conf = [0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.95, 0.95, 0.95, 0.3];
        let pred = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2];
        let th = class_thresholds(&conf, &pred, 3, &cfg);
        assert!((th[0] - 0.9).abs() < 1e-9, "{th:?}");
        // β = 0.5 → 0.9 · 0.5 / 1.5 = 0.3, floored at 0.5.
        assert!((th[1] - 0.5).abs() < 1e-9, "{th:?}");
        assert!((th[2] - 0.5).abs() < 1e-9, "{th:?}");
        let flat = class_thresholds(&conf, &pred, 3, &SemiConfig::default());
        assert_eq!(flat, vec![0.9; 3]);
    }

    #[test]
    fn cleaning_relabels_confident_contradictions_and_drops_large_losses() {
        // 20 labelled frames; the model is confident and stable on all but frames 16..20.
        // It contradicts frames 0 and 1 (relabelled), so the estimate is 2/16 = 0.125 of 20 =
        // 2.5 → 3 frames cleaned: 2 relabelled + the 1 largest loss (frame 17) dropped.
        let n = 20;
        let labels: Vec<i64> = (0..n).map(|i| (i % 3) as i64).collect();
        let mut pred = labels.clone();
        pred[0] = (labels[0] + 1) % 3;
        pred[1] = (labels[1] + 1) % 3;
        let mut conf = vec![0.99; n];
        let mut loss = vec![0.1; n];
        for i in 16..20 {
            conf[i] = 0.4;
            loss[i] = 1.0 + i as f64 / 100.0;
        }
        loss[17] = 5.0;
        let v = views_of(&conf, &pred, &pred, &loss);
        let cfg = SemiConfig {
            min_confident: 8,
            ..SemiConfig::default()
        };
        let p = select(&labels, &v, 3, &cfg);
        assert_eq!(p.counts.labelled, 20);
        assert_eq!(p.counts.relabelled, 2);
        assert_eq!(p.counts.estimated_noise, Some(2.0 / 16.0));
        assert_eq!(p.counts.discarded, 1);
        assert_eq!(p.counts.agreement, Some(18.0 / 20.0));
        assert_eq!(p.rows.len(), 19);
        assert!(!p.rows.iter().any(|r| r.0 == 17), "largest loss dropped");
        assert!(
            p.rows.contains(&(0, pred[0], false)),
            "relabelled to the model's"
        );
        // Too few confident frames: no estimate, so nothing dropped; relabels stand.
        let strict = SemiConfig {
            min_confident: 17,
            ..cfg.clone()
        };
        let p = select(&labels, &v, 3, &strict);
        assert_eq!(p.counts.estimated_noise, None);
        assert_eq!(p.counts.judged, 16);
        assert_eq!((p.counts.relabelled, p.counts.discarded), (2, 0));
        assert_eq!(p.rows.len(), 20);
        assert!(p.rows.contains(&(0, pred[0], false)));
        // Small-loss selection off: only relabelling.
        let no_sl = SemiConfig {
            small_loss: false,
            ..cfg
        };
        assert_eq!(select(&labels, &v, 3, &no_sl).counts.discarded, 0);
    }

    #[test]
    fn views_keep_shape_and_range() {
        let mut rng = StdRng::seed_from_u64(1);
        let x = Tensor::rand([5, 3, 12, 10], (Kind::Float, tch::Device::Cpu)) * 2.0 - 1.0;
        let w = weak_view(&x, &SemiConfig::default(), &mut rng).unwrap();
        let s = strong_view(&x, &mut rng).unwrap();
        assert_eq!(w.size(), x.size());
        assert_eq!(s.size(), x.size());
        assert!(s.max().double_value(&[]) <= 1.0 && s.min().double_value(&[]) >= -1.0);
        // No shift, no flip: the weak view is the image.
        let still = SemiConfig {
            max_shift: 0.0,
            ..SemiConfig::default()
        };
        let same = weak_view(&x, &still, &mut rng).unwrap();
        assert!((same - &x).abs().max().double_value(&[]) < 1e-5);
        assert!(strong_view(
            &Tensor::zeros([3, 4], (Kind::Float, tch::Device::Cpu)),
            &mut rng
        )
        .is_err());
    }

    /// On a learnable toy set, a model trained on clean labels pseudo-labels unlabelled frames
    /// mostly right and finds most flipped labels.
    #[test]
    fn selection_on_a_trained_model_finds_flips() {
        tch::manual_seed(0);
        let shape = DataShape {
            channels: 1,
            height: 12,
            width: 12,
            classes: 5,
        };
        let split = synthetic(800, 200, shape, 7);
        let vs = VarStore::new(tch::Device::Cpu);
        let net = Student::new(&vs.root(), &shape);
        let cfg = TrainConfig {
            epochs: 2,
            ..Default::default()
        };
        train(&net, &vs, &split.train, &cfg).unwrap();
        assert!(evaluate(&net, &split.test, 64).accuracy > 0.8);
        let c = LabelCorruption {
            fraction: 0.5,
            noise: 0.4,
            kind: NoiseKind::Symmetric,
            seed: 9,
        };
        let (noisy, inj) = corrupt(&split.test, &c, "cam").unwrap();
        let data = TrainData::Memory(noisy);
        // The toy classes are fixed pixel patterns, not shift-invariant: no shift here.
        let semi = SemiConfig {
            max_shift: 0.0,
            ..SemiConfig::default()
        };
        let v = views(&net, &data, &semi, 1).unwrap();
        let p = select(&data.labels(), &v, 5, &semi);
        assert_eq!(p.counts.labelled as usize, inj.labelled);
        assert_eq!(p.counts.unlabelled as usize, inj.unlabelled);
        let est = p.counts.estimated_noise.unwrap();
        assert!((est - 0.4).abs() < 0.15, "estimated {est}, injected 0.4");
        let truth = split.test.labels_vec();
        let pseudo: Vec<_> = p.rows.iter().filter(|r| r.2).collect();
        assert!(pseudo.len() > inj.unlabelled / 2, "{}", pseudo.len());
        let right = pseudo.iter().filter(|r| truth[r.0 as usize] == r.1).count();
        let precision = right as f64 / pseudo.len() as f64;
        assert!(precision > 0.9, "pseudo-label precision {precision}");
        // After cleaning, the labels trained on are far cleaner than those given.
        let wrong_after = p
            .rows
            .iter()
            .filter(|r| !r.2 && truth[r.0 as usize] != r.1)
            .count();
        assert!(
            (wrong_after as f64) < 0.5 * inj.flipped as f64,
            "{wrong_after} wrong of {} flipped",
            inj.flipped
        );
        // And training on the plan works end to end.
        let (stats, counts) = train_semi(&net, &vs, &data, &cfg, &semi).unwrap();
        assert!(stats.samples > 0 && stats.loss.is_finite());
        assert_eq!(counts.labelled as usize, inj.labelled);
    }
}
