//! Partial and noisy labels, simulated (issue #18).
//!
//! # The unlabelled convention
//!
//! In memory a frame without a label has label [`UNLABELLED`] (`-1`) in its [`Dataset`] or
//! [`crate::local::LocalSet`]; plain training ([`crate::train::train`]) skips such frames, and
//! [`crate::semi`] pseudo-labels them. On a camera's disk (see [`crate::local`]):
//! - an image folder: frames under `unlabelled/` (beside the class folders, or under
//!   `train/unlabelled/`) have no label, so `unlabelled` cannot be a class name;
//! - a flat folder with `labels.csv`: a row with an empty label (`frame.png,`);
//! - an IDX directory: label byte 255 (IDX labels are bytes, and no dataset we read has 256
//!   classes).
//!
//! # Simulation
//!
//! Demo and benches hand every simulated camera its own part of a fully labelled dataset and
//! then call [`corrupt`] on it: a seeded choice of which frames keep a label (`fraction`) and
//! which of those get a wrong one (`noise`, symmetric or pair-flip). The corrupted labels are
//! all the edge agent ever gets; the clean ones stay in the simulator, which is the only
//! place that knows the truth, so it can check what the edge and the report say against what
//! it injected ([`Injected`]).
//!
//! Counts are exact, not Bernoulli draws: `round(fraction·n)` frames keep a label (at least one
//! when `fraction > 0`) and `round(noise·labelled)` of them are flipped, so a test can compare
//! the report's counts with what was injected number for number.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tch::Tensor;

use crate::{Dataset, ModelError};

/// The label of a frame that has none (see the module docs).
pub const UNLABELLED: i64 = -1;

/// How a wrong label is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseKind {
    /// Uniformly among the other classes (an operator clicking the wrong class at random).
    #[default]
    Symmetric,
    /// Class `c` becomes `c + 1 mod K` (a systematic confusion between neighbouring classes,
    /// the hard case: the wrong label is consistent, so a majority can be wrong).
    Pair,
}

impl std::str::FromStr for NoiseKind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "symmetric" => Ok(NoiseKind::Symmetric),
            "pair" => Ok(NoiseKind::Pair),
            other => Err(ModelError::Config(format!(
                "noise kind {other:?}: expected symmetric or pair"
            ))),
        }
    }
}

impl std::fmt::Display for NoiseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NoiseKind::Symmetric => "symmetric",
            NoiseKind::Pair => "pair",
        })
    }
}

/// What to do to each simulated camera's labels.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LabelCorruption {
    /// Fraction of frames that keep a label, in `[0, 1]`.
    pub fraction: f64,
    /// Fraction of the labelled frames given a wrong label, in `[0, 1]`.
    pub noise: f64,
    pub kind: NoiseKind,
    /// Combined with the camera's id, so each camera gets its own draw.
    pub seed: u64,
}

impl Default for LabelCorruption {
    fn default() -> Self {
        LabelCorruption {
            fraction: 1.0,
            noise: 0.0,
            kind: NoiseKind::Symmetric,
            seed: 0,
        }
    }
}

impl LabelCorruption {
    /// True when it changes nothing (every frame labelled, none flipped).
    pub fn is_identity(&self) -> bool {
        self.fraction >= 1.0 && self.noise <= 0.0
    }

    /// Refuses fractions outside `[0, 1]` (and NaN).
    pub fn validate(&self) -> Result<(), ModelError> {
        for (name, v) in [
            ("label fraction", self.fraction),
            ("label noise", self.noise),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(ModelError::Config(format!(
                    "{name} {v} must be within [0, 1]"
                )));
            }
        }
        Ok(())
    }
}

/// What [`corrupt`] did to one camera: the simulator's ground truth for checking reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Injected {
    pub frames: usize,
    /// Frames that kept a label (right or wrong).
    pub labelled: usize,
    pub unlabelled: usize,
    /// Labelled frames whose label is wrong.
    pub flipped: usize,
}

/// FNV-1a of the camera id: a stable per-camera seed offset (std's hasher is not stable
/// across releases).
fn id_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Corrupts `labels` (clean, in `0..classes`) in place for camera `id`; see the module docs.
pub fn corrupt_labels(
    labels: &mut [i64],
    classes: usize,
    c: &LabelCorruption,
    id: &str,
) -> Result<Injected, ModelError> {
    c.validate()?;
    let n = labels.len();
    if let Some(bad) = labels.iter().find(|&&l| l < 0 || l as usize >= classes) {
        return Err(ModelError::Shape(format!(
            "label {bad} outside 0..{classes}: corrupt() needs clean labels"
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(c.seed ^ id_hash(id));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let mut keep = ((n as f64) * c.fraction).round() as usize;
    if c.fraction > 0.0 && n > 0 {
        keep = keep.clamp(1, n);
    }
    let (labelled, unlabelled) = order.split_at(keep.min(n));
    for &i in unlabelled {
        labels[i] = UNLABELLED;
    }
    let flips = if classes < 2 {
        0
    } else {
        ((labelled.len() as f64) * c.noise).round() as usize
    };
    for &i in &labelled[..flips.min(labelled.len())] {
        let y = labels[i];
        labels[i] = match c.kind {
            NoiseKind::Pair => (y + 1) % classes as i64,
            NoiseKind::Symmetric => {
                // Uniform over the K − 1 other classes.
                let r = rng.gen_range(0..classes as i64 - 1);
                if r >= y {
                    r + 1
                } else {
                    r
                }
            }
        };
    }
    Ok(Injected {
        frames: n,
        labelled: labelled.len(),
        unlabelled: unlabelled.len(),
        flipped: flips.min(labelled.len()),
    })
}

/// [`corrupt_labels`] on a dataset: the same images with the corrupted labels.
pub fn corrupt(
    data: &Dataset,
    c: &LabelCorruption,
    id: &str,
) -> Result<(Dataset, Injected), ModelError> {
    let mut labels = data.labels_vec();
    if labels.len() != data.len() {
        return Err(ModelError::Shape("labels do not match the images".into()));
    }
    let injected = corrupt_labels(&mut labels, data.shape.classes, c, id)?;
    let mut out = data.shallow_clone();
    out.labels = Tensor::f_from_slice(&labels)?;
    Ok((out, injected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_exact_deterministic_and_per_camera() {
        let clean: Vec<i64> = (0..200).map(|i| i % 10).collect();
        let c = LabelCorruption {
            fraction: 0.1,
            noise: 0.4,
            kind: NoiseKind::Symmetric,
            seed: 3,
        };
        let mut a = clean.clone();
        let inj = corrupt_labels(&mut a, 10, &c, "cam-1").unwrap();
        assert_eq!(
            inj,
            Injected {
                frames: 200,
                labelled: 20,
                unlabelled: 180,
                flipped: 8
            }
        );
        assert_eq!(a.iter().filter(|&&l| l == UNLABELLED).count(), 180);
        let wrong = a
            .iter()
            .zip(&clean)
            .filter(|(l, y)| **l != UNLABELLED && l != y)
            .count();
        assert_eq!(wrong, 8, "every flip lands on another class");
        let mut again = clean.clone();
        corrupt_labels(&mut again, 10, &c, "cam-1").unwrap();
        assert_eq!(a, again, "same seed and camera: same labels");
        let mut other = clean.clone();
        corrupt_labels(&mut other, 10, &c, "cam-2").unwrap();
        assert_ne!(a, other, "another camera draws its own frames");
    }

    #[test]
    fn pair_flip_and_edge_cases() {
        let clean: Vec<i64> = (0..50).map(|i| i % 5).collect();
        let mut a = clean.clone();
        let c = LabelCorruption {
            fraction: 1.0,
            noise: 1.0,
            kind: NoiseKind::Pair,
            seed: 0,
        };
        corrupt_labels(&mut a, 5, &c, "x").unwrap();
        assert!(a.iter().zip(&clean).all(|(l, y)| *l == (y + 1) % 5));
        // A tiny positive fraction still leaves one label.
        let mut b = clean.clone();
        let c = LabelCorruption {
            fraction: 0.001,
            ..LabelCorruption::default()
        };
        assert_eq!(corrupt_labels(&mut b, 5, &c, "x").unwrap().labelled, 1);
        let bad = LabelCorruption {
            noise: 1.5,
            ..LabelCorruption::default()
        };
        assert!(matches!(
            corrupt_labels(&mut clean.clone(), 5, &bad, "x"),
            Err(ModelError::Config(_))
        ));
        assert!("pair".parse::<NoiseKind>().is_ok() && "nope".parse::<NoiseKind>().is_err());
    }
}
