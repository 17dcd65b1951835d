//! Aggregation strategies: pure functions of the base model and the accepted updates, no I/O
//! (Flower's `Strategy` split: the server loop owns I/O and time-outs, policy lives here).
//!
//! Every rule returns an [`Aggregation`]: the new weights plus what a round report needs to
//! explain it — each client's delta norm, the clients the rule excluded (and why) and the
//! clients whose deltas were clipped.
//!
//! | rule | weighting | small-n behaviour |
//! |---|---|---|
//! | [`FedAvg`] | samples | any n ≥ 1 |
//! | [`NormClip`] | samples, after clipping to `multiplier × median norm` | any n ≥ 1 |
//! | [`TrimmedMean`] | unweighted, coordinate-wise | trim count capped so ≥ 1 value is kept |
//! | [`Median`] | unweighted, coordinate-wise | any n ≥ 1 (even n: mean of the two middle values) |
//! | [`MultiKrum`] | samples, over the selected updates | [`StrategyError::TooFew`] when n < 2f + 3 |
//! | [`FlTrust`] | trust = max(0, cos(Δ_k, reference)), every Δ_k scaled to the median norm | any n ≥ 1; needs the coordinator's reference delta |
//!
//! Samples are self-reported by clients, so a Byzantine client can inflate its weight in the
//! samples-weighted rules; the coordinate-wise rules ignore samples entirely.

use coevo_models::{ModelError, Weights};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Largest buffer (bytes) the coordinate-wise rules and Multi-Krum hold at once: a block of
/// coordinates across every update. With deltas read back from disk one at a time, a round's
/// memory is then O(params + this), not O(clients × params).
pub const BLOCK_BYTES: usize = 64 << 20;

/// One accepted client update.
#[derive(Clone, Debug)]
pub struct Update {
    pub client: String,
    /// Local training samples: the FedAvg weight.
    pub samples: u64,
    /// Trained weights minus the round's base weights.
    pub delta: Weights,
}

/// Where a rule reads a round's updates from: in memory (`[Update]`, for tests and small
/// tools) or one at a time from wherever the coordinator keeps them (its delta files), so no
/// rule needs every delta in memory at once.
pub trait UpdateSource: Send + Sync {
    /// Number of updates.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn client(&self, i: usize) -> &str;
    /// Local training samples of update `i` (the FedAvg weight).
    fn samples(&self, i: usize) -> u64;
    /// The L2 norm of update `i` when the source knows it without reading the delta (it was
    /// computed when the delta was accepted); `None` makes the rule compute it.
    fn norm(&self, _i: usize) -> Option<f64> {
        None
    }
    /// The delta of update `i`: borrowed from memory or read back and decoded.
    fn delta(&self, i: usize) -> Result<Cow<'_, Weights>, StrategyError>;
}

impl UpdateSource for &[Update] {
    fn len(&self) -> usize {
        <[Update]>::len(self)
    }
    fn client(&self, i: usize) -> &str {
        &self[i].client
    }
    fn samples(&self, i: usize) -> u64 {
        self[i].samples
    }
    fn delta(&self, i: usize) -> Result<Cow<'_, Weights>, StrategyError> {
        Ok(Cow::Borrowed(&self[i].delta))
    }
}

/// The updates of `inner` at `indices` (e.g. all but one, for the guard's leave-one-out).
pub struct Subset<'a> {
    pub inner: &'a dyn UpdateSource,
    pub indices: Vec<usize>,
}

impl Subset<'_> {
    /// Every update of `inner` except those of `client`.
    pub fn without<'a>(inner: &'a dyn UpdateSource, client: &str) -> Subset<'a> {
        let indices = (0..inner.len())
            .filter(|&i| inner.client(i) != client)
            .collect();
        Subset { inner, indices }
    }
}

impl UpdateSource for Subset<'_> {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn client(&self, i: usize) -> &str {
        self.inner.client(self.indices[i])
    }
    fn samples(&self, i: usize) -> u64 {
        self.inner.samples(self.indices[i])
    }
    fn norm(&self, i: usize) -> Option<f64> {
        self.inner.norm(self.indices[i])
    }
    fn delta(&self, i: usize) -> Result<Cow<'_, Weights>, StrategyError> {
        self.inner.delta(self.indices[i])
    }
}

/// A client update the strategy left out of the merge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusion {
    pub client: String,
    /// Stable short code, e.g. `krum-score`.
    pub reason: String,
}

/// The outcome of one aggregation.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregation {
    /// The new global weights.
    pub weights: Weights,
    /// Updates not merged at all, in input order.
    pub excluded: Vec<Exclusion>,
    /// L2 norm of every client's delta (before any clipping), in input order.
    pub norms: Vec<(String, f64)>,
    /// Clients whose delta was scaled down before merging, in input order.
    pub clipped: Vec<String>,
    /// Each client's trust weight, its share of the merge (fltrust: cosine trust over the
    /// round's total; 0 = excluded), in input order; empty for rules without trust scores.
    pub trust: Vec<(String, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    #[error("no updates to aggregate")]
    Empty,
    #[error("update from {client}: {source}")]
    Layout { client: String, source: ModelError },
    #[error("invalid strategy configuration: {0}")]
    Config(String),
    /// A stored delta could not be read back (deleted or damaged since it was accepted).
    #[error("update from {client} could not be read back: {reason}")]
    Read { client: String, reason: String },
    #[error("{strategy} needs at least {need} updates, got {got}")]
    TooFew {
        strategy: &'static str,
        need: usize,
        got: usize,
    },
}

/// An aggregation rule.
pub trait Strategy: Send + Sync {
    /// Stable name, equal to the `kind` of its [`StrategyConfig`].
    fn name(&self) -> &'static str;

    /// The new global weights from `base` and the round's accepted updates, read from `src`
    /// (each delta at most a few times, never all at once), with per-client norms and
    /// exclusions. `reference` is the coordinator's reference delta, for the rules that need
    /// one; the others ignore it.
    fn aggregate_source(
        &self,
        base: &Weights,
        src: &dyn UpdateSource,
        reference: Option<&Weights>,
    ) -> Result<Aggregation, StrategyError>;

    /// [`Strategy::aggregate_source`] over updates in memory, without a reference.
    fn aggregate(&self, base: &Weights, updates: &[Update]) -> Result<Aggregation, StrategyError> {
        self.aggregate_source(base, &updates, None)
    }

    /// Whether the rule needs a *reference delta*: the coordinator's own training step from
    /// `base` on its labelled server data (FLTrust's root dataset).
    fn needs_reference(&self) -> bool {
        false
    }

    /// [`Strategy::aggregate_source`] over updates in memory.
    fn aggregate_with_reference(
        &self,
        base: &Weights,
        updates: &[Update],
        reference: Option<&Weights>,
    ) -> Result<Aggregation, StrategyError> {
        self.aggregate_source(base, &updates, reference)
    }
}

fn default_multiplier() -> f64 {
    1.0
}

/// Which strategy the coordinator uses, as written in its config file:
///
/// ```toml
/// [strategy]
/// kind = "multi-krum"   # fedavg | norm-clip | trimmed-mean | median | multi-krum | fltrust
/// byzantine = 2
/// ```
///
/// Unknown kinds and unknown fields are errors, for the field-less kinds too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    deny_unknown_fields,
    from = "StrategyConfigRepr"
)]
pub enum StrategyConfig {
    /// Samples-weighted mean of the deltas.
    #[default]
    #[serde(rename = "fedavg", alias = "fed-avg")]
    FedAvg,
    /// Clip every delta to `multiplier × median delta norm`, then FedAvg.
    NormClip {
        /// Default 1.0.
        #[serde(default = "default_multiplier")]
        multiplier: f64,
    },
    /// Coordinate-wise mean after dropping the `trim` fraction of largest and of smallest values.
    TrimmedMean {
        /// Fraction trimmed at each end, in `[0, 0.5)`, e.g. 0.2.
        trim: f64,
    },
    /// Coordinate-wise median.
    Median,
    /// Multi-Krum: keep the `select` updates closest to their neighbours, FedAvg them.
    MultiKrum {
        /// Number of Byzantine clients tolerated (f).
        byzantine: usize,
        /// Number of updates kept (m); default n − f.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        select: Option<usize>,
    },
    /// FLTrust: weight each delta by its cosine similarity to the coordinator's reference delta
    /// (negative → excluded), after scaling it to the median delta norm. Needs `[server_data]`.
    #[serde(rename = "fltrust")]
    FlTrust,
}

/// Deserialisation form of [`StrategyConfig`]: serde ignores extra fields next to the tag of a
/// unit variant even with `deny_unknown_fields`, so the field-less kinds are empty structs here.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum StrategyConfigRepr {
    #[serde(rename = "fedavg", alias = "fed-avg")]
    FedAvg {},
    NormClip {
        #[serde(default = "default_multiplier")]
        multiplier: f64,
    },
    TrimmedMean {
        trim: f64,
    },
    Median {},
    MultiKrum {
        byzantine: usize,
        #[serde(default)]
        select: Option<usize>,
    },
    #[serde(rename = "fltrust")]
    FlTrust {},
}

impl From<StrategyConfigRepr> for StrategyConfig {
    fn from(r: StrategyConfigRepr) -> Self {
        match r {
            StrategyConfigRepr::FedAvg {} => StrategyConfig::FedAvg,
            StrategyConfigRepr::NormClip { multiplier } => StrategyConfig::NormClip { multiplier },
            StrategyConfigRepr::TrimmedMean { trim } => StrategyConfig::TrimmedMean { trim },
            StrategyConfigRepr::Median {} => StrategyConfig::Median,
            StrategyConfigRepr::MultiKrum { byzantine, select } => {
                StrategyConfig::MultiKrum { byzantine, select }
            }
            StrategyConfigRepr::FlTrust {} => StrategyConfig::FlTrust,
        }
    }
}

impl StrategyConfig {
    /// Whether the rule needs the coordinator's reference delta, hence server data.
    pub fn needs_reference(&self) -> bool {
        matches!(self, StrategyConfig::FlTrust)
    }

    /// Checks parameter ranges; [`build`] strategies also check at aggregation time.
    pub fn validate(&self) -> Result<(), StrategyError> {
        match *self {
            StrategyConfig::FedAvg | StrategyConfig::Median | StrategyConfig::FlTrust => Ok(()),
            StrategyConfig::NormClip { multiplier } => {
                if multiplier.is_finite() && multiplier > 0.0 {
                    Ok(())
                } else {
                    Err(StrategyError::Config(format!(
                        "norm-clip multiplier must be finite and > 0, got {multiplier}"
                    )))
                }
            }
            StrategyConfig::TrimmedMean { trim } => {
                if (0.0..0.5).contains(&trim) {
                    Ok(())
                } else {
                    Err(StrategyError::Config(format!(
                        "trimmed-mean trim must be in [0, 0.5), got {trim}"
                    )))
                }
            }
            StrategyConfig::MultiKrum { select, .. } => {
                if select == Some(0) {
                    Err(StrategyError::Config(
                        "multi-krum select must be at least 1".into(),
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The strategy described by `cfg`. Invalid parameters surface as [`StrategyError::Config`]
/// from `aggregate` (call [`StrategyConfig::validate`] to catch them at start-up).
pub fn build(cfg: &StrategyConfig) -> Box<dyn Strategy> {
    match *cfg {
        StrategyConfig::FedAvg => Box::new(FedAvg),
        StrategyConfig::NormClip { multiplier } => Box::new(NormClip { multiplier }),
        StrategyConfig::TrimmedMean { trim } => Box::new(TrimmedMean { trim }),
        StrategyConfig::Median => Box::new(Median),
        StrategyConfig::MultiKrum { byzantine, select } => {
            Box::new(MultiKrum { byzantine, select })
        }
        StrategyConfig::FlTrust => Box::new(FlTrust),
    }
}

/// Update `i` of `src`, checked to have `base`'s layout.
fn load<'s>(
    src: &'s dyn UpdateSource,
    i: usize,
    base: &Weights,
) -> Result<Cow<'s, Weights>, StrategyError> {
    let d = src.delta(i)?;
    if d.same_layout(base) {
        Ok(d)
    } else {
        Err(StrategyError::Layout {
            client: src.client(i).to_string(),
            source: ModelError::Shape(format!(
                "delta layout ({} tensors, {} values) differs from the model's \
                 ({} tensors, {} values)",
                d.tensors.len(),
                d.num_params(),
                base.tensors.len(),
                base.num_params()
            )),
        })
    }
}

/// Errors unless every delta has `base`'s layout; returns the per-client norms. A source that
/// knows its norms (and checked its layouts when it took the deltas in) is not read here.
fn check_updates(
    base: &Weights,
    src: &dyn UpdateSource,
) -> Result<Vec<(String, f64)>, StrategyError> {
    if src.is_empty() {
        return Err(StrategyError::Empty);
    }
    (0..src.len())
        .map(|i| {
            let n = match src.norm(i) {
                Some(n) => n,
                None => load(src, i, base)?.l2_norm(),
            };
            Ok((src.client(i).to_string(), n))
        })
        .collect()
}

/// Samples-weighted mean of `scale_k · Δ_k` over the updates with `keep[k]`, added to `base`.
fn weighted_mean(
    base: &Weights,
    src: &dyn UpdateSource,
    keep: impl Fn(usize) -> bool,
    scale: impl Fn(usize) -> f32,
) -> Result<Weights, StrategyError> {
    let mut acc = FedAvgAccumulator::new(base);
    for k in 0..src.len() {
        if keep(k) {
            let d = load(src, k, base)?;
            acc.add_delta(src.client(k), src.samples(k), &d, scale(k))?;
        }
    }
    acc.finish(base)
}

/// Calls `f(lo, hi, cols)` for consecutive coordinate blocks `[lo, hi)` of the flattened
/// model (tensors in name order), where `cols[(k − lo)·n + i]` is coordinate k of update i:
/// every update is read once per block, and a block holds at most `budget` bytes.
fn for_each_block(
    base: &Weights,
    src: &dyn UpdateSource,
    budget: usize,
    mut f: impl FnMut(usize, usize, &mut [f32]),
) -> Result<(), StrategyError> {
    let n = src.len();
    let total = base.num_params();
    let block = (budget / (4 * n.max(1))).max(1).min(total.max(1));
    let mut cols = vec![0f32; block * n];
    let mut lo = 0;
    while lo < total {
        let hi = (lo + block).min(total);
        for i in 0..n {
            let d = load(src, i, base)?;
            let mut pos = 0;
            for t in d.tensors.values() {
                let len = t.data.len();
                let (a, b) = (lo.max(pos), hi.min(pos + len));
                for k in a..b {
                    cols[(k - lo) * n + i] = t.data[k - pos];
                }
                pos += len;
                if pos >= hi {
                    break;
                }
            }
        }
        f(lo, hi, &mut cols[..(hi - lo) * n]);
        lo = hi;
    }
    Ok(())
}

/// `base + g(Δ_1[j], …, Δ_n[j])` for every coordinate j, read in blocks of at most `budget`
/// bytes. `g` may reorder its buffer.
fn coordinatewise(
    base: &Weights,
    src: &dyn UpdateSource,
    budget: usize,
    mut g: impl FnMut(&mut [f32]) -> f64,
) -> Result<Weights, StrategyError> {
    let n = src.len();
    let mut out = base.clone();
    for_each_block(base, src, budget, |lo, hi, cols| {
        let mut pos = 0;
        for t in out.tensors.values_mut() {
            let len = t.data.len();
            let (a, b) = (lo.max(pos), hi.min(pos + len));
            for k in a..b {
                let x = &mut t.data[k - pos];
                let col = &mut cols[(k - lo) * n..(k - lo + 1) * n];
                *x = (f64::from(*x) + g(col)) as f32;
            }
            pos += len;
            if pos >= hi {
                break;
            }
        }
    })?;
    Ok(out)
}

/// Median of `v` (mean of the two middle values for even length); reorders `v`. NaNs sort to
/// the ends (`total_cmp`), so they only matter if they are the majority.
fn median_of(v: &mut [f32]) -> f64 {
    let n = v.len();
    debug_assert!(n > 0);
    let mid = n / 2;
    let (lower, m, _) = v.select_nth_unstable_by(mid, f32::total_cmp);
    let hi = f64::from(*m);
    if n % 2 == 1 {
        hi
    } else {
        let lo = lower.iter().copied().max_by(f32::total_cmp).unwrap_or(*m);
        (f64::from(lo) + hi) / 2.0
    }
}

fn median_f64(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// FedAvg: base + Σ (n_k / N) Δ_k.
#[derive(Clone, Copy, Debug, Default)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn aggregate_source(
        &self,
        base: &Weights,
        src: &dyn UpdateSource,
        _reference: Option<&Weights>,
    ) -> Result<Aggregation, StrategyError> {
        let mut acc = FedAvgAccumulator::new(base);
        for i in 0..src.len() {
            let d = load(src, i, base)?;
            acc.add_delta(src.client(i), src.samples(i), &d, 1.0)?;
        }
        let norms = acc.norms().to_vec();
        if norms.is_empty() {
            return Err(StrategyError::Empty);
        }
        Ok(Aggregation {
            weights: acc.finish(base)?,
            excluded: Vec::new(),
            norms,
            clipped: Vec::new(),
            trust: Vec::new(),
        })
    }
}

/// Streaming FedAvg: O(params) memory however many updates arrive, so the coordinator can fold
/// deltas in as they are read from disk.
pub struct FedAvgAccumulator {
    sum: Weights,
    total: u64,
    norms: Vec<(String, f64)>,
}

impl FedAvgAccumulator {
    pub fn new(layout: &Weights) -> Self {
        FedAvgAccumulator {
            sum: layout.zeros_like(),
            total: 0,
            norms: Vec::new(),
        }
    }

    /// Adds `samples · Δ` and records the delta's norm. The layout is checked for every update;
    /// updates with zero samples then carry no weight.
    pub fn add(&mut self, u: &Update) -> Result<(), StrategyError> {
        self.add_scaled(u, 1.0)
    }

    /// Adds `samples · factor · Δ` (the norm recorded is that of the unscaled Δ).
    pub fn add_scaled(&mut self, u: &Update, factor: f32) -> Result<(), StrategyError> {
        self.add_delta(&u.client, u.samples, &u.delta, factor)
    }

    /// [`FedAvgAccumulator::add_scaled`] for a delta that is not in an [`Update`] (read back
    /// from disk, say), so it need not be copied into one.
    pub fn add_delta(
        &mut self,
        client: &str,
        samples: u64,
        delta: &Weights,
        factor: f32,
    ) -> Result<(), StrategyError> {
        if !self.sum.same_layout(delta) {
            // add_scaled reports the layouts in detail.
            let source = self
                .sum
                .clone()
                .add_scaled(delta, 0.0)
                .err()
                .unwrap_or_else(|| ModelError::Shape("layout differs".into()));
            return Err(StrategyError::Layout {
                client: client.to_string(),
                source,
            });
        }
        if samples == 0 {
            self.norms.push((client.to_string(), delta.l2_norm()));
            return Ok(());
        }
        // One pass over the delta for the add and its norm (aggregation is memory-bound).
        let norm = self
            .sum
            .add_scaled_norm(delta, samples as f32 * factor)
            .map_err(|source| StrategyError::Layout {
                client: client.to_string(),
                source,
            })?;
        self.norms.push((client.to_string(), norm));
        self.total += samples;
        Ok(())
    }

    /// Norms of the deltas added so far, in order.
    pub fn norms(&self) -> &[(String, f64)] {
        &self.norms
    }

    /// `base + Σ n_k Δ_k / Σ n_k`; [`StrategyError::Empty`] if no update carried samples.
    pub fn finish(mut self, base: &Weights) -> Result<Weights, StrategyError> {
        if self.total == 0 {
            return Err(StrategyError::Empty);
        }
        self.sum.scale(1.0 / self.total as f32);
        let mut out = base.clone();
        out.add_scaled(&self.sum, 1.0)
            .map_err(|source| StrategyError::Layout {
                client: "<sum>".into(),
                source,
            })?;
        Ok(out)
    }
}

/// Norm clipping: every delta longer than `multiplier × median(norms)` is scaled down to that
/// bound, then the deltas are FedAvg'd (samples-weighted). Bounds any single client's influence;
/// it does not remove a same-magnitude sign flip.
#[derive(Clone, Copy, Debug)]
pub struct NormClip {
    pub multiplier: f64,
}

impl Strategy for NormClip {
    fn name(&self) -> &'static str {
        "norm-clip"
    }

    fn aggregate_source(
        &self,
        base: &Weights,
        src: &dyn UpdateSource,
        _reference: Option<&Weights>,
    ) -> Result<Aggregation, StrategyError> {
        StrategyConfig::NormClip {
            multiplier: self.multiplier,
        }
        .validate()?;
        let norms = check_updates(base, src)?;
        let values: Vec<f64> = norms.iter().map(|(_, n)| *n).collect();
        let bound = self.multiplier * median_f64(&values);
        let factors: Vec<f32> = values
            .iter()
            .map(|&n| if n > bound { (bound / n) as f32 } else { 1.0 })
            .collect();
        let clipped = norms
            .iter()
            .zip(&factors)
            .filter(|(_, &f)| f < 1.0)
            .map(|((c, _), _)| c.clone())
            .collect();
        let weights = weighted_mean(base, src, |_| true, |k| factors[k])?;
        Ok(Aggregation {
            weights,
            excluded: Vec::new(),
            norms,
            clipped,
            trust: Vec::new(),
        })
    }
}

/// Coordinate-wise trimmed mean (unweighted): per coordinate, drop the ⌊trim·n⌋ largest and
/// ⌊trim·n⌋ smallest values and average the rest. The trim count is capped at ⌊(n−1)/2⌋ so at
/// least one value always remains (for tiny n it degrades towards the median).
#[derive(Clone, Copy, Debug)]
pub struct TrimmedMean {
    pub trim: f64,
}

impl TrimmedMean {
    fn aggregate_blocks(
        &self,
        base: &Weights,
        src: &dyn UpdateSource,
        budget: usize,
    ) -> Result<Aggregation, StrategyError> {
        StrategyConfig::TrimmedMean { trim: self.trim }.validate()?;
        let norms = check_updates(base, src)?;
        let n = src.len();
        let k = ((self.trim * n as f64).floor() as usize).min((n - 1) / 2);
        let weights = coordinatewise(base, src, budget, |v| {
            v.sort_unstable_by(f32::total_cmp);
            let kept = &v[k..n - k];
            kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64
        })?;
        Ok(Aggregation {
            weights,
            excluded: Vec::new(),
            norms,
            clipped: Vec::new(),
            trust: Vec::new(),
        })
    }
}

impl Strategy for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed-mean"
    }

    fn aggregate_source(
        &self,
        base: &Weights,
        src: &dyn UpdateSource,
        _reference: Option<&Weights>,
    ) -> Result<Aggregation, StrategyError> {
        self.aggregate_blocks(base, src, BLOCK_BYTES)
    }
}

/// Coordinate-wise median (unweighted); for even n the mean of the two middle values.
#[derive(Clone, Copy, Debug, Default)]
pub struct Median;

impl Median {
    fn aggregate_blocks(
        &self,
        base: &Weights,
        src: &dyn UpdateSource,
        budget: usize,
    ) -> Result<Aggregation, StrategyError> {
        let norms = check_updates(base, src)?;
        let weights = coordinatewise(base, src, budget, median_of)?;
        Ok(Aggregation {
            weights,
            excluded: Vec::new(),
            norms,
            clipped: Vec::new(),
            trust: Vec::new(),
        })
    }
}

impl Strategy for Median {
    fn name(&self) -> &'static str {
        "median"
    }

    fn aggregate_source(
        &self,
        base: &Weights,
        src: &dyn UpdateSource,
        _reference: Option<&Weights>,
    ) -> Result<Aggregation, StrategyError> {
        self.aggregate_blocks(base, src, BLOCK_BYTES)
    }
}

/// Multi-Krum (Blanchard et al., 2017): each update's score is the sum of squared distances to
/// its n − f − 2 nearest other updates; the `select` (default n − f) lowest-scoring updates are
/// FedAvg'd (samples-weighted) and the others excluded with reason `krum-score`.
///
/// Needs n ≥ 2f + 3 (Krum's condition); fewer updates is [`StrategyError::TooFew`] rather than a
/// silent loss of the guarantee. Cost: O(n² · params) for the pairwise distances, accumulated
/// over coordinate blocks (see [`BLOCK_BYTES`]).
#[derive(Clone, Copy, Debug)]
pub struct MultiKrum {
    pub byzantine: usize,
    pub select: Option<usize>,
}

impl MultiKrum {
    /// Krum scores in input order (`src` must share one layout).
    fn scores(
        &self,
        base: &Weights,
        src: &dyn UpdateSource,
        budget: usize,
    ) -> Result<Vec<f64>, StrategyError> {
        let n = src.len();
        let mut d2 = vec![0f64; n * n];
        for_each_block(base, src, budget, |lo, hi, cols| {
            for k in 0..hi - lo {
                let col = &cols[k * n..(k + 1) * n];
                for i in 0..n {
                    for j in i + 1..n {
                        let e = f64::from(col[i]) - f64::from(col[j]);
                        d2[i * n + j] += e * e;
                    }
                }
            }
        })?;
        for i in 0..n {
            for j in i + 1..n {
                // A NaN distance (non-finite delta) must rank worst, not compare as equal.
                let d = d2[i * n + j];
                let d = if d.is_nan() { f64::INFINITY } else { d };
                d2[i * n + j] = d;
                d2[j * n + i] = d;
            }
        }
        let neighbours = n - self.byzantine - 2;
        Ok((0..n)
            .map(|i| {
                let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d2[i * n + j]).collect();
                row.sort_by(f64::total_cmp);
                row[..neighbours].iter().sum()
            })
            .collect())
    }

    fn aggregate_blocks(
        &self,
        base: &Weights,
        src: &dyn UpdateSource,
        budget: usize,
    ) -> Result<Aggregation, StrategyError> {
        StrategyConfig::MultiKrum {
            byzantine: self.byzantine,
            select: self.select,
        }
        .validate()?;
        let norms = check_updates(base, src)?;
        let n = src.len();
        let need = 2 * self.byzantine + 3;
        if n < need {
            return Err(StrategyError::TooFew {
                strategy: "multi-krum",
                need,
                got: n,
            });
        }
        let scores = self.scores(base, src, budget)?;
        let m = self.select.unwrap_or(n - self.byzantine).min(n);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let mut keep = vec![false; n];
        for &k in &order[..m] {
            keep[k] = true;
        }
        let weights = weighted_mean(base, src, |k| keep[k], |_| 1.0)?;
        let excluded = norms
            .iter()
            .zip(&keep)
            .filter(|(_, &kept)| !kept)
            .map(|((c, _), _)| Exclusion {
                client: c.clone(),
                reason: "krum-score".into(),
            })
            .collect();
        Ok(Aggregation {
            weights,
            excluded,
            norms,
            clipped: Vec::new(),
            trust: Vec::new(),
        })
    }
}

impl Strategy for MultiKrum {
    fn name(&self) -> &'static str {
        "multi-krum"
    }

    fn aggregate_source(
        &self,
        base: &Weights,
        src: &dyn UpdateSource,
        _reference: Option<&Weights>,
    ) -> Result<Aggregation, StrategyError> {
        self.aggregate_blocks(base, src, BLOCK_BYTES)
    }
}

/// FLTrust (Cao et al., NDSS 2021), with the step size taken from the fleet instead of the
/// server.
///
/// The coordinator trains the round's base model on its own labelled data (the same task a
/// client runs) and passes the resulting *reference delta* g₀. Each client delta Δ_k gets the
/// trust score `t_k = max(0, cos(Δ_k, g₀))` and is rescaled to the median client-delta norm;
/// the new model is `base + Σ t_k · Δ̂_k / Σ t_k`. A delta pointing away from the reference
/// (sign flip) has trust 0 and is excluded with reason `untrusted`; pure noise is nearly
/// orthogonal to g₀ and gets almost no weight; a scaled-up delta is scaled back down.
///
/// *Why the median norm and not ‖g₀‖ as in the paper*: the server's labelled set is far larger
/// than one camera's, so its delta is several times longer than any client's and using its norm
/// would change the fleet's step size with the size of the server's dataset. The median is as
/// hard to move as the reference while fewer than half of the clients are Byzantine.
///
/// Sample counts are ignored (they are self-reported). Deltas with a zero or non-finite norm
/// get trust 0.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlTrust;

impl FlTrust {
    /// Trust scores in input order (each delta read once).
    fn trust(
        base: &Weights,
        src: &dyn UpdateSource,
        norms: &[(String, f64)],
        reference: &Weights,
    ) -> Result<Vec<f64>, StrategyError> {
        let ref_norm = reference.l2_norm();
        (0..src.len())
            .zip(norms)
            .map(|(i, &(_, n))| {
                if !(n.is_finite() && n > 0.0 && ref_norm.is_finite() && ref_norm > 0.0) {
                    return Ok(0.0);
                }
                let d = load(src, i, base)?;
                let dot: f64 = d
                    .tensors
                    .values()
                    .zip(reference.tensors.values())
                    .flat_map(|(a, b)| a.data.iter().zip(&b.data))
                    .map(|(&x, &y)| f64::from(x) * f64::from(y))
                    .sum();
                let cos = dot / (n * ref_norm);
                Ok(if cos.is_finite() { cos.max(0.0) } else { 0.0 })
            })
            .collect()
    }
}

impl Strategy for FlTrust {
    fn name(&self) -> &'static str {
        "fltrust"
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn aggregate_source(
        &self,
        base: &Weights,
        src: &dyn UpdateSource,
        reference: Option<&Weights>,
    ) -> Result<Aggregation, StrategyError> {
        let norms = check_updates(base, src)?;
        let reference = reference.ok_or_else(|| {
            StrategyError::Config("fltrust needs the coordinator's reference delta".into())
        })?;
        if !reference.same_layout(base) {
            return Err(StrategyError::Config(
                "fltrust reference delta has another layout than the model".into(),
            ));
        }
        let trust = Self::trust(base, src, &norms, reference)?;
        let finite: Vec<f64> = norms
            .iter()
            .map(|(_, n)| *n)
            .filter(|n| n.is_finite())
            .collect();
        let target = median_f64(&finite);
        let total: f64 = trust.iter().sum();
        let mut weights = base.clone();
        let mut clipped = Vec::new();
        if total > 0.0 {
            for (i, (&(ref client, n), &t)) in norms.iter().zip(&trust).enumerate() {
                if t > 0.0 {
                    let d = load(src, i, base)?;
                    weights
                        .add_scaled(&d, (t / total * target / n) as f32)
                        .map_err(|source| StrategyError::Layout {
                            client: client.clone(),
                            source,
                        })?;
                    if n > target {
                        clipped.push(client.clone());
                    }
                }
            }
        }
        let excluded = norms
            .iter()
            .zip(&trust)
            .filter(|(_, &t)| t <= 0.0)
            .map(|((c, _), _)| Exclusion {
                client: c.clone(),
                reason: "untrusted".into(),
            })
            .collect();
        let shares = norms
            .iter()
            .zip(&trust)
            .map(|((c, _), &t)| (c.clone(), if total > 0.0 { t / total } else { 0.0 }))
            .collect();
        Ok(Aggregation {
            weights,
            excluded,
            norms,
            clipped,
            trust: shares,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coevo_models::ParamTensor;

    fn w(v: &[f32]) -> Weights {
        let mut w = Weights::default();
        w.tensors.insert(
            "p".into(),
            ParamTensor {
                shape: vec![v.len()],
                data: v.to_vec(),
            },
        );
        w
    }

    fn upd(client: &str, samples: u64, delta: &[f32]) -> Update {
        Update {
            client: client.into(),
            samples,
            delta: w(delta),
        }
    }

    fn all_configs() -> Vec<StrategyConfig> {
        vec![
            StrategyConfig::FedAvg,
            StrategyConfig::NormClip { multiplier: 1.0 },
            StrategyConfig::TrimmedMean { trim: 0.2 },
            StrategyConfig::Median,
            StrategyConfig::MultiKrum {
                byzantine: 2,
                select: None,
            },
            StrategyConfig::FlTrust,
        ]
    }

    #[test]
    fn weighted_by_samples() {
        let base = w(&[1.0, 1.0]);
        let updates = vec![upd("a", 1, &[4.0, 0.0]), upd("b", 3, &[0.0, 4.0])];
        let out = FedAvg.aggregate(&base, &updates).unwrap();
        assert_eq!(out.weights.tensors["p"].data, vec![2.0, 4.0]);
        assert_eq!(out.norms, vec![("a".into(), 4.0), ("b".into(), 4.0)]);
        assert!(out.excluded.is_empty() && out.clipped.is_empty());
    }

    #[test]
    fn accumulator_matches_fedavg_and_skips_zero_samples() {
        let base = w(&[0.0]);
        let updates = vec![
            upd("a", 2, &[1.0]),
            upd("b", 0, &[100.0]),
            upd("c", 2, &[3.0]),
        ];
        let mut acc = FedAvgAccumulator::new(&base);
        for u in &updates {
            acc.add(u).unwrap();
        }
        assert_eq!(acc.norms().len(), 3);
        assert_eq!(acc.finish(&base).unwrap().tensors["p"].data, vec![2.0]);
        // Only zero-sample updates: nothing carries weight.
        assert!(matches!(
            FedAvg.aggregate(&base, &[upd("z", 0, &[1.0])]),
            Err(StrategyError::Empty)
        ));
    }

    #[test]
    fn empty_and_mismatched_layouts_are_errors_for_every_strategy() {
        let base = w(&[1.0, 1.0]);
        for cfg in all_configs() {
            let s = build(&cfg);
            assert!(
                matches!(s.aggregate(&base, &[]), Err(StrategyError::Empty)),
                "{}",
                s.name()
            );
            // Enough good updates for Multi-Krum (f = 2 needs 7), one of them the wrong shape;
            // a zero-sample update is checked too.
            let mut updates: Vec<Update> = (0..7)
                .map(|i| upd(&format!("c{i}"), 1, &[0.1, 0.2]))
                .collect();
            updates[4] = upd("bad", 0, &[1.0]);
            match s.aggregate(&base, &updates) {
                Err(StrategyError::Layout { client, .. }) => assert_eq!(client, "bad"),
                other => panic!("{}: {other:?}", s.name()),
            }
            // Another tensor name, same sizes.
            let mut renamed = Weights::default();
            renamed.tensors.insert(
                "q".into(),
                ParamTensor {
                    shape: vec![2],
                    data: vec![0.0, 0.0],
                },
            );
            updates[4] = Update {
                client: "renamed".into(),
                samples: 1,
                delta: renamed,
            };
            assert!(
                matches!(
                    s.aggregate(&base, &updates),
                    Err(StrategyError::Layout { .. })
                ),
                "{}",
                s.name()
            );
        }
    }

    #[test]
    fn names_match_config_kinds() {
        for cfg in all_configs() {
            let json = serde_json::to_value(&cfg).unwrap();
            assert_eq!(json["kind"], build(&cfg).name());
        }
    }

    #[test]
    fn config_serde_round_trip() {
        for cfg in all_configs().into_iter().chain([
            StrategyConfig::MultiKrum {
                byzantine: 1,
                select: Some(3),
            },
            StrategyConfig::NormClip { multiplier: 2.5 },
        ]) {
            let json = serde_json::to_string(&cfg).unwrap();
            assert_eq!(
                serde_json::from_str::<StrategyConfig>(&json).unwrap(),
                cfg,
                "{json}"
            );
            let toml_text = toml::to_string(&cfg).unwrap();
            assert_eq!(
                toml::from_str::<StrategyConfig>(&toml_text).unwrap(),
                cfg,
                "{toml_text}"
            );
        }
        let parse = |s: &str| serde_json::from_str::<StrategyConfig>(s);
        assert_eq!(
            parse(r#"{"kind":"fedavg"}"#).unwrap(),
            StrategyConfig::FedAvg
        );
        assert_eq!(
            parse(r#"{"kind":"fed-avg"}"#).unwrap(),
            StrategyConfig::FedAvg
        );
        assert_eq!(
            parse(r#"{"kind":"norm-clip"}"#).unwrap(),
            StrategyConfig::NormClip { multiplier: 1.0 }
        );
        assert_eq!(
            parse(r#"{"kind":"trimmed-mean","trim":0.2}"#).unwrap(),
            StrategyConfig::TrimmedMean { trim: 0.2 }
        );
        assert_eq!(
            parse(r#"{"kind":"median"}"#).unwrap(),
            StrategyConfig::Median
        );
        assert_eq!(
            parse(r#"{"kind":"multi-krum","byzantine":2}"#).unwrap(),
            StrategyConfig::MultiKrum {
                byzantine: 2,
                select: None
            }
        );
        assert_eq!(
            toml::from_str::<StrategyConfig>("kind = \"multi-krum\"\nbyzantine = 2\nselect = 5\n")
                .unwrap(),
            StrategyConfig::MultiKrum {
                byzantine: 2,
                select: Some(5)
            }
        );
        assert_eq!(StrategyConfig::default(), StrategyConfig::FedAvg);
        // Unknown kinds, unknown fields and missing required fields are errors.
        assert!(parse(r#"{"kind":"krum"}"#).is_err());
        assert!(parse(r#"{"kind":"median","trim":0.1}"#).is_err());
        assert!(parse(r#"{"kind":"fedavg","byzantine":1}"#).is_err());
        assert!(parse(r#"{"kind":"trimmed-mean","trim":0.1,"typo":1}"#).is_err());
        assert!(parse(r#"{"kind":"multi-krum","byzantine":1,"selct":3}"#).is_err());
        assert!(parse(r#"{"kind":"trimmed-mean"}"#).is_err());
        assert!(parse(r#"{"trim":0.1}"#).is_err());
    }

    #[test]
    fn invalid_parameters_are_config_errors() {
        let base = w(&[0.0]);
        let updates: Vec<Update> = (0..5).map(|i| upd(&format!("c{i}"), 1, &[1.0])).collect();
        for cfg in [
            StrategyConfig::NormClip { multiplier: 0.0 },
            StrategyConfig::NormClip {
                multiplier: f64::NAN,
            },
            StrategyConfig::TrimmedMean { trim: 0.5 },
            StrategyConfig::TrimmedMean { trim: -0.1 },
            StrategyConfig::MultiKrum {
                byzantine: 0,
                select: Some(0),
            },
        ] {
            assert!(cfg.validate().is_err(), "{cfg:?}");
            assert!(
                matches!(
                    build(&cfg).aggregate(&base, &updates),
                    Err(StrategyError::Config(_))
                ),
                "{cfg:?}"
            );
        }
        for cfg in all_configs() {
            cfg.validate().unwrap();
        }
    }

    #[test]
    fn small_n() {
        let base = w(&[0.0, 0.0]);
        let one = [upd("a", 1, &[1.0, -1.0])];
        // One update: every coordinate-wise rule returns it.
        for cfg in [
            StrategyConfig::FedAvg,
            StrategyConfig::NormClip { multiplier: 1.0 },
            StrategyConfig::TrimmedMean { trim: 0.4 },
            StrategyConfig::Median,
        ] {
            let out = build(&cfg).aggregate(&base, &one).unwrap();
            assert_eq!(out.weights.tensors["p"].data, vec![1.0, -1.0], "{cfg:?}");
        }
        // Two updates with trim 0.4 (⌊0.8⌋ = 0 trimmed) and three (⌊1.2⌋ = 1: the median).
        let two = [upd("a", 1, &[1.0, 0.0]), upd("b", 1, &[3.0, 2.0])];
        let t = TrimmedMean { trim: 0.4 };
        assert_eq!(
            t.aggregate(&base, &two).unwrap().weights.tensors["p"].data,
            vec![2.0, 1.0]
        );
        let three = [
            upd("a", 1, &[1.0, 0.0]),
            upd("b", 1, &[3.0, 2.0]),
            upd("c", 1, &[100.0, -50.0]),
        ];
        assert_eq!(
            t.aggregate(&base, &three).unwrap().weights.tensors["p"].data,
            vec![3.0, 0.0]
        );
        // Median of an even count is the mean of the two middle values.
        assert_eq!(
            Median.aggregate(&base, &two).unwrap().weights.tensors["p"].data,
            vec![2.0, 1.0]
        );
        // Multi-Krum with f = 1 needs 5 updates.
        let k = MultiKrum {
            byzantine: 1,
            select: None,
        };
        match k.aggregate(&base, &three) {
            Err(StrategyError::TooFew { need, got, .. }) => assert_eq!((need, got), (5, 3)),
            other => panic!("{other:?}"),
        }
        // f = 0 works from 3 updates.
        let k0 = MultiKrum {
            byzantine: 0,
            select: Some(2),
        };
        let out = k0.aggregate(&base, &three).unwrap();
        assert_eq!(out.weights.tensors["p"].data, vec![2.0, 1.0]);
        assert_eq!(
            out.excluded,
            vec![Exclusion {
                client: "c".into(),
                reason: "krum-score".into()
            }]
        );
    }

    #[test]
    fn norm_clip_clips_above_the_median() {
        let base = w(&[0.0, 0.0]);
        let updates = [
            upd("a", 1, &[3.0, 4.0]),  // norm 5
            upd("b", 1, &[0.0, 1.0]),  // norm 1
            upd("c", 1, &[0.0, 50.0]), // norm 50 → clipped to 5
        ];
        let out = NormClip { multiplier: 1.0 }
            .aggregate(&base, &updates)
            .unwrap();
        assert_eq!(out.clipped, vec!["c".to_string()]);
        let p = &out.weights.tensors["p"].data;
        assert!(
            (p[0] - 1.0).abs() < 1e-6 && (p[1] - 10.0 / 3.0).abs() < 1e-6,
            "{p:?}"
        );
        assert_eq!(out.norms[2], ("c".into(), 50.0));
        // A larger multiplier clips nothing here.
        let out = NormClip { multiplier: 10.0 }
            .aggregate(&base, &updates)
            .unwrap();
        assert!(out.clipped.is_empty());
    }

    /// Deterministic PRNG (SplitMix64) with Box–Muller normals: no `rand` dependency.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let u1 = self.uniform().max(f64::MIN_POSITIVE);
            let u2 = self.uniform();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Attack {
        Scale10,
        SignFlip,
        HugeNoise,
    }

    const N: usize = 10;
    const BYZ: usize = 2; // 20 %
    const DIM: usize = 64;

    /// Two tensors (so name-wise iteration is exercised); honest deltas are μ + N(0, 0.05²),
    /// the last `BYZ` clients attack. Returns (base, updates, honest mean delta).
    fn scenario(attack: Attack, seed: u64) -> (Weights, Vec<Update>, Vec<f64>) {
        let mut rng = Rng(seed);
        let mu: Vec<f64> = (0..DIM).map(|_| rng.uniform() * 2.0 - 1.0).collect();
        let split = DIM / 4;
        let make = |v: &[f64]| {
            let mut w = Weights::default();
            w.tensors.insert(
                "a.bias".into(),
                ParamTensor {
                    shape: vec![split],
                    data: v[..split].iter().map(|&x| x as f32).collect(),
                },
            );
            w.tensors.insert(
                "b.weight".into(),
                ParamTensor {
                    shape: vec![3, (DIM - split) / 3],
                    data: v[split..].iter().map(|&x| x as f32).collect(),
                },
            );
            w
        };
        let base_v: Vec<f64> = (0..DIM).map(|_| rng.normal()).collect();
        let mut honest_sum = vec![0f64; DIM];
        let mut updates = Vec::new();
        for c in 0..N {
            let honest: Vec<f64> = mu.iter().map(|m| m + 0.05 * rng.normal()).collect();
            let delta: Vec<f64> = if c < N - BYZ {
                for (s, h) in honest_sum.iter_mut().zip(&honest) {
                    *s += h;
                }
                honest
            } else {
                match attack {
                    Attack::Scale10 => honest.iter().map(|h| 10.0 * h).collect(),
                    Attack::SignFlip => honest.iter().map(|h| -h).collect(),
                    Attack::HugeNoise => (0..DIM).map(|_| 100.0 * rng.normal()).collect(),
                }
            };
            updates.push(Update {
                client: format!("c{c}"),
                samples: 50,
                delta: make(&delta),
            });
        }
        let honest_mean = honest_sum.iter().map(|s| s / (N - BYZ) as f64).collect();
        (make(&base_v), updates, honest_mean)
    }

    /// ‖(out − base) − honest‖ / ‖honest‖.
    fn relative_error(base: &Weights, out: &Weights, honest: &[f64]) -> f64 {
        let delta = out.sub(base).unwrap();
        let got = delta.tensors.values().flat_map(|t| t.data.iter());
        let (mut err, mut norm) = (0f64, 0f64);
        for (&g, &h) in got.zip(honest) {
            err += (f64::from(g) - h).powi(2);
            norm += h * h;
        }
        (err / norm).sqrt()
    }

    #[test]
    fn robust_rules_recover_the_honest_mean_under_attack() {
        for attack in [Attack::Scale10, Attack::SignFlip, Attack::HugeNoise] {
            for seed in [1u64, 2, 3] {
                let (base, updates, honest) = scenario(attack, seed);
                let err = |s: &dyn Strategy| -> (f64, Aggregation) {
                    let out = s.aggregate(&base, &updates).unwrap();
                    (relative_error(&base, &out.weights, &honest), out)
                };
                // Plain FedAvg is visibly pulled away.
                let (fedavg, out) = err(&FedAvg);
                assert_eq!(out.norms.len(), N);
                assert!(fedavg > 0.35, "{attack:?}/{seed}: fedavg error {fedavg}");

                let (trimmed, _) = err(&TrimmedMean { trim: 0.2 });
                assert!(trimmed < 0.1, "{attack:?}/{seed}: trimmed-mean {trimmed}");
                let (median, _) = err(&Median);
                assert!(median < 0.1, "{attack:?}/{seed}: median {median}");

                let (krum, out) = err(&MultiKrum {
                    byzantine: BYZ,
                    select: None,
                });
                assert!(krum < 0.01, "{attack:?}/{seed}: multi-krum {krum}");
                let mut excluded: Vec<&str> =
                    out.excluded.iter().map(|e| e.client.as_str()).collect();
                excluded.sort();
                assert_eq!(excluded, vec!["c8", "c9"], "{attack:?}/{seed}");
                assert!(out.excluded.iter().all(|e| e.reason == "krum-score"));

                // The server's own delta points roughly where the honest ones do.
                let reference = Weights {
                    tensors: updates[0].delta.tensors.clone(),
                };
                let out = FlTrust
                    .aggregate_with_reference(&base, &updates, Some(&reference))
                    .unwrap();
                let trust = relative_error(&base, &out.weights, &honest);
                assert!(trust < 0.15, "{attack:?}/{seed}: fltrust {trust}");
                if let Attack::SignFlip = attack {
                    let excluded: Vec<&str> =
                        out.excluded.iter().map(|e| e.client.as_str()).collect();
                    assert_eq!(excluded, vec!["c8", "c9"], "{seed}");
                    assert!(out.excluded.iter().all(|e| e.reason == "untrusted"));
                }

                let (clip, out) = err(&NormClip { multiplier: 1.0 });
                match attack {
                    // A same-magnitude sign flip passes any norm bound: clipping only caps its
                    // weight (aggregate ≈ (1 − 2f/n)·μ, relative error ≈ 2f/n = 0.4), it cannot
                    // remove it. The guarantee is bounded influence, asserted here.
                    Attack::SignFlip => {
                        assert!(clip < 0.5, "{attack:?}/{seed}: norm-clip {clip}");
                    }
                    // Oversized attacks are clipped to the median norm: what remains is their
                    // lost weight (≈ 2f/n of μ in the worst case) plus a bounded random part.
                    Attack::Scale10 | Attack::HugeNoise => {
                        assert!(clip < 0.35, "{attack:?}/{seed}: norm-clip {clip}");
                        assert!(clip < fedavg / 3.0, "{attack:?}/{seed}: {clip} vs {fedavg}");
                        for attacker in ["c8", "c9"] {
                            assert!(out.clipped.iter().any(|c| c == attacker), "{attack:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn non_finite_values_never_panic() {
        let base = w(&[0.0, 0.0]);
        let mut updates: Vec<Update> = (0..7)
            .map(|i| upd(&format!("c{i}"), 1, &[0.1 * i as f32, 1.0]))
            .collect();
        updates[3] = upd("nan", 1, &[f32::NAN, f32::INFINITY]);
        let reference = w(&[0.1, 1.0]);
        for cfg in all_configs() {
            let _ = build(&cfg)
                .aggregate_with_reference(&base, &updates, Some(&reference))
                .unwrap();
        }
        let out = FlTrust
            .aggregate_with_reference(&base, &updates, Some(&reference))
            .unwrap();
        assert!(out.excluded.iter().any(|e| e.client == "nan"));
        assert!(out.weights.all_finite());
        let out = MultiKrum {
            byzantine: 2,
            select: None,
        }
        .aggregate(&base, &updates)
        .unwrap();
        assert!(out.excluded.iter().any(|e| e.client == "nan"));
        assert!(out.weights.all_finite());
        let out = Median.aggregate(&base, &updates).unwrap();
        assert!(out.weights.all_finite());
    }

    #[test]
    fn fltrust_weights_by_cosine_and_rescales_to_the_median_norm() {
        let base = w(&[0.0, 0.0]);
        let updates = [
            upd("along", 1, &[2.0, 0.0]),    // cos 1, norm 2
            upd("diag", 1, &[0.0, 1.0]),     // cos 0 → excluded
            upd("against", 1, &[-1.0, 0.0]), // cos −1 → excluded
            upd("big", 1, &[30.0, 40.0]),    // cos 0.6, norm 50 → scaled to 2
        ];
        let reference = w(&[1.0, 0.0]);
        let out = FlTrust
            .aggregate_with_reference(&base, &updates, Some(&reference))
            .unwrap();
        // Median norm of (2, 1, 1, 50) = 1.5; Σ trust = 1.6.
        // along → (1.5, 0) · 1/1.6; big → (0.9, 1.2) · 0.6/1.6.
        let p = &out.weights.tensors["p"].data;
        let (x, y) = ((1.5 + 0.6 * 0.9) / 1.6, 0.6 * 1.2 / 1.6);
        assert!((p[0] - x).abs() < 1e-5 && (p[1] - y).abs() < 1e-5, "{p:?}");
        let excluded: Vec<&str> = out.excluded.iter().map(|e| e.client.as_str()).collect();
        assert_eq!(excluded, vec!["diag", "against"]);
        assert_eq!(out.clipped, vec!["along".to_string(), "big".to_string()]);
        assert_eq!(out.norms.len(), 4);
        // Trust weights (reported per client): each one's share of Σ trust = 1.6.
        let trust: Vec<(&str, f64)> = out.trust.iter().map(|(c, t)| (c.as_str(), *t)).collect();
        let want = [
            ("along", 1.0 / 1.6),
            ("diag", 0.0),
            ("against", 0.0),
            ("big", 0.6 / 1.6),
        ];
        assert_eq!(trust.len(), 4);
        for ((c, t), (wc, wt)) in trust.iter().zip(want) {
            assert_eq!(*c, wc);
            assert!((t - wt).abs() < 1e-9, "{c}: {t}");
        }

        // Nothing trusted: the model stays where it was.
        let out = FlTrust
            .aggregate_with_reference(&base, &updates[1..3], Some(&reference))
            .unwrap();
        assert_eq!(out.weights, base);
        assert_eq!(out.excluded.len(), 2);
        // A zero reference trusts nobody.
        let out = FlTrust
            .aggregate_with_reference(&base, &updates, Some(&w(&[0.0, 0.0])))
            .unwrap();
        assert_eq!(out.weights, base);
        // Without a reference, or with another layout, it refuses.
        assert!(FlTrust.needs_reference() && build(&StrategyConfig::FlTrust).needs_reference());
        assert!(matches!(
            FlTrust.aggregate(&base, &updates),
            Err(StrategyError::Config(_))
        ));
        assert!(matches!(
            FlTrust.aggregate_with_reference(&base, &updates, Some(&w(&[1.0]))),
            Err(StrategyError::Config(_))
        ));
        let cfg: StrategyConfig = toml::from_str("kind = \"fltrust\"").unwrap();
        assert_eq!(cfg, StrategyConfig::FlTrust);
        assert!(cfg.needs_reference() && !StrategyConfig::Median.needs_reference());
    }

    /// The in-memory coordinate-wise rule from before deltas were read in blocks: the
    /// reference the block-wise one must reproduce.
    fn coordinatewise_in_memory(
        base: &Weights,
        updates: &[Update],
        mut g: impl FnMut(&mut [f32]) -> f64,
    ) -> Weights {
        let mut out = base.clone();
        let mut buf = vec![0f32; updates.len()];
        for (name, t) in out.tensors.iter_mut() {
            let cols: Vec<&[f32]> = updates
                .iter()
                .map(|u| u.delta.tensors[name].data.as_slice())
                .collect();
            for (j, x) in t.data.iter_mut().enumerate() {
                for (b, col) in buf.iter_mut().zip(&cols) {
                    *b = col[j];
                }
                *x = (f64::from(*x) + g(&mut buf)) as f32;
            }
        }
        out
    }

    /// Multi-Krum's pairwise distances computed over whole deltas in memory (the old way).
    fn krum_d2_in_memory(updates: &[Update]) -> Vec<f64> {
        let n = updates.len();
        let mut d2 = vec![0f64; n * n];
        for i in 0..n {
            for j in i + 1..n {
                let d: f64 = updates[i]
                    .delta
                    .tensors
                    .values()
                    .zip(updates[j].delta.tensors.values())
                    .flat_map(|(a, b)| a.data.iter().zip(&b.data))
                    .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
                    .sum();
                d2[i * n + j] = d;
                d2[j * n + i] = d;
            }
        }
        d2
    }

    fn max_abs_diff(a: &Weights, b: &Weights) -> f32 {
        a.tensors
            .values()
            .zip(b.tensors.values())
            .flat_map(|(x, y)| x.data.iter().zip(&y.data))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn block_wise_rules_match_the_in_memory_ones_for_any_block_size() {
        for attack in [Attack::Scale10, Attack::SignFlip, Attack::HugeNoise] {
            let (base, updates, _) = scenario(attack, 7);
            let n = updates.len();
            let want_median = coordinatewise_in_memory(&base, &updates, median_of);
            let k = 2; // ⌊0.2 · 10⌋
            let want_trim = coordinatewise_in_memory(&base, &updates, |v| {
                v.sort_unstable_by(f32::total_cmp);
                v[k..n - k].iter().map(|&x| f64::from(x)).sum::<f64>() / (n - 2 * k) as f64
            });
            let krum = MultiKrum {
                byzantine: BYZ,
                select: None,
            };
            let want_krum = krum.aggregate(&base, &updates).unwrap();
            let d2 = krum_d2_in_memory(&updates);
            // One coordinate per block, blocks that straddle the two tensors, everything at once.
            for budget in [1, 4 * n, 4 * n * 7, 4 * n * 20, BLOCK_BYTES] {
                let slice = updates.as_slice();
                let src: &dyn UpdateSource = &slice;
                let m = Median.aggregate_blocks(&base, src, budget).unwrap();
                assert_eq!(m.weights, want_median, "{attack:?} median, budget {budget}");
                let t = TrimmedMean { trim: 0.2 }
                    .aggregate_blocks(&base, src, budget)
                    .unwrap();
                assert_eq!(t.weights, want_trim, "{attack:?} trimmed, budget {budget}");
                let got = krum.aggregate_blocks(&base, src, budget).unwrap();
                assert_eq!(got.excluded, want_krum.excluded, "{attack:?} {budget}");
                assert!(max_abs_diff(&got.weights, &want_krum.weights) <= 1e-5);
                // The scores come from the same distances, summed block by block.
                let scores = krum.scores(&base, src, budget).unwrap();
                for (i, s) in scores.iter().enumerate() {
                    let mut row: Vec<f64> =
                        (0..n).filter(|&j| j != i).map(|j| d2[i * n + j]).collect();
                    row.sort_by(f64::total_cmp);
                    let want: f64 = row[..n - BYZ - 2].iter().sum();
                    assert!((s - want).abs() <= 1e-9 * want.max(1.0), "{s} vs {want}");
                }
            }
        }
    }

    /// Deltas known only by index, with their norms, counting reads: what the coordinator's
    /// delta files look like to a rule.
    struct Counting<'a> {
        updates: &'a [Update],
        reads: std::sync::atomic::AtomicUsize,
    }

    impl UpdateSource for Counting<'_> {
        fn len(&self) -> usize {
            self.updates.len()
        }
        fn client(&self, i: usize) -> &str {
            &self.updates[i].client
        }
        fn samples(&self, i: usize) -> u64 {
            self.updates[i].samples
        }
        fn norm(&self, i: usize) -> Option<f64> {
            Some(self.updates[i].delta.l2_norm())
        }
        fn delta(&self, i: usize) -> Result<Cow<'_, Weights>, StrategyError> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Cow::Owned(self.updates[i].delta.clone()))
        }
    }

    #[test]
    fn streaming_sources_give_the_in_memory_result_reading_each_delta_a_bounded_number_of_times() {
        let (base, updates, _) = scenario(Attack::Scale10, 3);
        let reference = Weights {
            tensors: updates[0].delta.tensors.clone(),
        };
        // (rule, reads of each delta at most)
        for (cfg, per_delta) in [
            (StrategyConfig::FedAvg, 1),
            (StrategyConfig::NormClip { multiplier: 1.0 }, 1),
            (StrategyConfig::FlTrust, 2),
            (StrategyConfig::Median, 1),
            (StrategyConfig::TrimmedMean { trim: 0.2 }, 1),
            (
                StrategyConfig::MultiKrum {
                    byzantine: BYZ,
                    select: None,
                },
                2,
            ),
        ] {
            let s = build(&cfg);
            let want = s
                .aggregate_with_reference(&base, &updates, Some(&reference))
                .unwrap();
            let src = Counting {
                updates: &updates,
                reads: Default::default(),
            };
            let got = s.aggregate_source(&base, &src, Some(&reference)).unwrap();
            assert!(max_abs_diff(&got.weights, &want.weights) <= 1e-5, "{cfg:?}");
            assert_eq!(got.excluded, want.excluded, "{cfg:?}");
            assert_eq!(got.clipped, want.clipped, "{cfg:?}");
            assert_eq!(got.norms.len(), want.norms.len(), "{cfg:?}");
            let reads = src.reads.load(std::sync::atomic::Ordering::Relaxed);
            assert!(reads <= per_delta * updates.len(), "{cfg:?}: {reads} reads");
        }
        // Leaving one out is a view, not a copy.
        let all = updates.as_slice();
        let rest = Subset::without(&all, "c3");
        assert_eq!(rest.len(), updates.len() - 1);
        assert!((0..rest.len()).all(|i| rest.client(i) != "c3"));
        let want: Vec<Update> = updates
            .iter()
            .filter(|u| u.client != "c3")
            .cloned()
            .collect();
        assert_eq!(
            FedAvg.aggregate_source(&base, &rest, None).unwrap(),
            FedAvg.aggregate(&base, &want).unwrap()
        );
    }
}
