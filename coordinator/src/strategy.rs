//! Aggregation strategies: pure functions of the base model and the accepted updates, no I/O
//! (Flower's `Strategy` split: the server loop owns I/O and time-outs, policy lives here).

use coevo_models::{ModelError, Weights};

/// One accepted client update.
#[derive(Clone, Debug)]
pub struct Update {
    pub client: String,
    /// Local training samples: the FedAvg weight.
    pub samples: u64,
    /// Trained weights minus the round's base weights.
    pub delta: Weights,
}

#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    #[error("no updates to aggregate")]
    Empty,
    #[error("update from {client}: {source}")]
    Layout { client: String, source: ModelError },
}

/// An aggregation rule.
pub trait Strategy: Send + Sync {
    fn name(&self) -> &'static str;
    /// The new global weights from `base` and the round's accepted `updates`.
    fn aggregate(&self, base: &Weights, updates: &[Update]) -> Result<Weights, StrategyError>;
}

/// FedAvg: base + Σ (n_k / N) Δ_k.
#[derive(Clone, Copy, Debug, Default)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn aggregate(&self, base: &Weights, updates: &[Update]) -> Result<Weights, StrategyError> {
        let mut acc = FedAvgAccumulator::new(base);
        for u in updates {
            acc.add(u)?;
        }
        acc.finish(base)
    }
}

/// Streaming FedAvg: O(params) memory however many updates arrive, so the coordinator can fold
/// deltas in as they are read from disk.
pub struct FedAvgAccumulator {
    sum: Weights,
    total: u64,
}

impl FedAvgAccumulator {
    pub fn new(layout: &Weights) -> Self {
        FedAvgAccumulator {
            sum: layout.zeros_like(),
            total: 0,
        }
    }

    /// Adds `samples · Δ`. Updates with zero samples carry no weight and are skipped.
    pub fn add(&mut self, u: &Update) -> Result<(), StrategyError> {
        if u.samples == 0 {
            return Ok(());
        }
        self.sum
            .add_scaled(&u.delta, u.samples as f32)
            .map_err(|source| StrategyError::Layout {
                client: u.client.clone(),
                source,
            })?;
        self.total += u.samples;
        Ok(())
    }

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

    #[test]
    fn weighted_by_samples() {
        let base = w(&[1.0, 1.0]);
        let updates = vec![
            Update {
                client: "a".into(),
                samples: 1,
                delta: w(&[4.0, 0.0]),
            },
            Update {
                client: "b".into(),
                samples: 3,
                delta: w(&[0.0, 4.0]),
            },
        ];
        let out = FedAvg.aggregate(&base, &updates).unwrap();
        assert_eq!(out.tensors["p"].data, vec![2.0, 4.0]);
    }

    #[test]
    fn empty_and_mismatched_layouts_are_errors() {
        let base = w(&[1.0, 1.0]);
        assert!(matches!(
            FedAvg.aggregate(&base, &[]),
            Err(StrategyError::Empty)
        ));
        let bad = vec![Update {
            client: "x".into(),
            samples: 1,
            delta: w(&[1.0]),
        }];
        assert!(matches!(
            FedAvg.aggregate(&base, &bad),
            Err(StrategyError::Layout { .. })
        ));
    }
}
