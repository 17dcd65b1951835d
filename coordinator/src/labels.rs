//! Cleaning upward (issue #18): what the coordinator does with the label counts each camera
//! signs into its delta header ([`coevo_protocol::LabelCounts`]).
//!
//! A camera whose estimated label noise is above `[coevolution] max_client_noise` — with 95 %
//! confidence: the Wilson lower bound of the estimate over the frames it was judged on, so an
//! honest camera is not thrown out on a handful of frames — is left out
//! of the round's merge — and so of the merged student the teacher fuses from — and out of
//! the teacher's fusion ensemble; the others' FedAvg weight (samples) is multiplied by
//! `1 − estimated noise` (`label_weighting`), and fusion multiplies each client student's
//! validation-accuracy weight by the same factor. The report's `labels` list says who was
//! down-weighted or left out and why. A camera that sent no estimate (all labels, no cleaning,
//! or too few confident frames to judge) keeps weight 1: absence of evidence is not noise.

use crate::strategy::{StrategyError, UpdateSource};
use coevo_protocol::LabelCounts;
use std::borrow::Cow;

/// The round report's part ([`coevo_ops`], readable without libtorch).
pub use coevo_ops::report::LabelQuality;

/// Judges each accepted client that sent label counts; clients without any are not listed.
pub fn assess<'a>(
    entries: impl IntoIterator<Item = (&'a str, Option<&'a LabelCounts>)>,
    max_client_noise: f64,
    weighting: bool,
) -> Vec<LabelQuality> {
    let mut out = Vec::new();
    for (client, counts) in entries {
        let Some(noise) = counts.and_then(|c| c.estimated_noise) else {
            continue;
        };
        // A forged or broken estimate must not become a weight above 1 or below 0.
        let noise = if noise.is_finite() {
            noise.clamp(0.0, 1.0)
        } else {
            1.0
        };
        let judged = counts.map_or(0, |c| c.judged);
        let lower = if judged > 0 {
            wilson_lower(noise, judged)
        } else {
            noise
        };
        let (weight, excluded, reason) = if lower > max_client_noise {
            (
                0.0,
                true,
                format!(
                    "label-noise: estimated {noise:.3} (95 % lower bound {lower:.3} over {judged} frames) > max_client_noise {max_client_noise:.3}"
                ),
            )
        } else if weighting && noise > 0.0 {
            (
                1.0 - noise,
                false,
                format!(
                    "down-weighted: estimated label noise {noise:.3}, weight × {:.3}",
                    1.0 - noise
                ),
            )
        } else {
            (
                1.0,
                false,
                format!("kept: estimated label noise {noise:.3}"),
            )
        };
        out.push(LabelQuality {
            client: client.to_string(),
            estimated_noise: Some(noise),
            noise_lower_bound: Some(lower),
            weight,
            excluded,
            reason,
        });
    }
    out
}

/// Wilson score lower bound (95 %) of a proportion `p` observed over `n` trials.
pub fn wilson_lower(p: f64, n: u64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let (z, n) = (1.96f64, n as f64);
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let margin = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - margin) / (1.0 + z2 / n)).clamp(0.0, 1.0)
}

/// The factor of `client` (1 when it was not judged).
pub fn factor(quality: &[LabelQuality], client: &str) -> f64 {
    quality
        .iter()
        .find(|q| q.client == client)
        .map_or(1.0, |q| q.weight)
}

/// The updates of `inner` the label judgement kept, each FedAvg weight (samples) scaled by its
/// factor — what the aggregation rule sees.
pub struct LabelWeighted<'a> {
    inner: &'a dyn UpdateSource,
    kept: Vec<usize>,
    samples: Vec<u64>,
}

impl<'a> LabelWeighted<'a> {
    pub fn new(inner: &'a dyn UpdateSource, quality: &[LabelQuality]) -> Self {
        let mut kept = Vec::new();
        let mut samples = Vec::new();
        for i in 0..inner.len() {
            let f = factor(quality, inner.client(i));
            if f <= 0.0 {
                continue;
            }
            kept.push(i);
            // At least 1: a kept update keeps some say.
            samples.push(((inner.samples(i) as f64 * f).round() as u64).max(1));
        }
        LabelWeighted {
            inner,
            kept,
            samples,
        }
    }
}

impl UpdateSource for LabelWeighted<'_> {
    fn len(&self) -> usize {
        self.kept.len()
    }
    fn client(&self, i: usize) -> &str {
        self.inner.client(self.kept[i])
    }
    fn samples(&self, i: usize) -> u64 {
        self.samples[i]
    }
    fn norm(&self, i: usize) -> Option<f64> {
        self.inner.norm(self.kept[i])
    }
    fn delta(&self, i: usize) -> Result<Cow<'_, coevo_models::Weights>, StrategyError> {
        self.inner.delta(self.kept[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::Update;
    use coevo_models::Weights;

    fn counts(noise: Option<f64>) -> LabelCounts {
        LabelCounts {
            labelled: 50,
            estimated_noise: noise,
            judged: 400,
            ..LabelCounts::default()
        }
    }

    #[test]
    fn a_few_frames_do_not_exclude_a_camera() {
        // 0.6 over 10 frames: the bound is ~0.31, under 0.5; over 400 frames it is ~0.55.
        assert!(wilson_lower(0.6, 10) < 0.35 && wilson_lower(0.6, 10) > 0.25);
        assert!(wilson_lower(0.6, 400) > 0.5);
        assert_eq!(wilson_lower(0.6, 0), 0.0);
        let few = LabelCounts {
            judged: 10,
            ..counts(Some(0.6))
        };
        let q = assess([("a", Some(&few))], 0.5, true);
        assert!(!q[0].excluded && (q[0].weight - 0.4).abs() < 1e-12, "{q:?}");
        let q = assess([("a", Some(&counts(Some(0.6))))], 0.5, true);
        assert!(q[0].excluded, "{q:?}");
    }

    #[test]
    fn noisy_clients_are_excluded_and_the_rest_down_weighted() {
        let (a, b, c, d) = (
            counts(Some(0.1)),
            counts(Some(0.6)),
            counts(None),
            counts(Some(f64::NAN)),
        );
        let q = assess(
            [
                ("a", Some(&a)),
                ("b", Some(&b)),
                ("c", Some(&c)),
                ("d", Some(&d)),
                ("e", None),
            ],
            0.3,
            true,
        );
        assert_eq!(
            q.len(),
            3,
            "only clients with an estimate are judged: {q:?}"
        );
        assert!((q[0].weight - 0.9).abs() < 1e-12 && !q[0].excluded);
        assert!(q[0].reason.starts_with("down-weighted"));
        assert!(q[1].excluded && q[1].weight == 0.0);
        assert!(q[1].reason.starts_with("label-noise"), "{}", q[1].reason);
        assert!(q[2].excluded, "a NaN estimate counts as all noise");
        assert_eq!(factor(&q, "c"), 1.0);
        let unweighted = assess([("a", Some(&a))], 0.3, false);
        assert_eq!(unweighted[0].weight, 1.0);

        let w = Weights::default();
        let updates: Vec<Update> = ["a", "b", "c"]
            .iter()
            .map(|id| Update {
                client: id.to_string(),
                samples: 100,
                delta: w.clone(),
            })
            .collect();
        let src: &[Update] = &updates;
        let lw = LabelWeighted::new(&src, &q);
        assert_eq!(lw.len(), 2);
        assert_eq!((lw.client(0), lw.samples(0)), ("a", 90));
        assert_eq!((lw.client(1), lw.samples(1)), ("c", 100));
    }
}
