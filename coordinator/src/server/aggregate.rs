//! Stage 3, aggregate: the rule merges the accepted deltas, read back from disk one at a time
//! or in coordinate blocks (never all in memory), and the guard scores the result before
//! anything builds on it.

use super::collect::Collected;
use super::publish::Published;
use super::{Coordinator, RoundInputs};
use crate::guard::{Flagged, GuardReport};
use crate::ingest::DeltaFiles;
use crate::store::Store;
use crate::strategy::{build as build_strategy, Aggregation, StrategyError, UpdateSource};
use crate::CoordinatorError;
use coevo_models::train::{train, TrainConfig};
use coevo_models::{Dataset, Weights};
use std::sync::Arc;

/// What aggregation hands to the evolve and report stages.
pub(super) struct Aggregated {
    /// `completed`, `skipped`, `skipped: …` (the rule refused) or `rolled_back`.
    pub outcome: String,
    /// Whether `global` now holds a merged model that passed the guard.
    pub merged: bool,
    pub aggregation: Aggregation,
    pub guard: Option<GuardReport>,
    pub flagged: Vec<Flagged>,
    /// The round's accepted deltas, on disk (fusion reads its ensemble members from here).
    pub source: Arc<DeltaFiles>,
    pub strategy: &'static str,
    /// Clients judged by their estimated label noise (issue #18): weight, exclusion, why.
    pub label_quality: Vec<crate::labels::LabelQuality>,
}

impl Coordinator {
    /// Merges the collected deltas into `global` (the round's base) and runs the guard; on a
    /// rollback or refusal `global` is left as the base and `merged` is false.
    pub(super) async fn aggregate_stage(
        &self,
        inputs: &RoundInputs,
        store: &Store,
        global: &mut Weights,
        published: &Published,
        collected: &Collected,
    ) -> Result<Aggregated, CoordinatorError> {
        let cfg = &self.cfg;
        let round = inputs.round;
        let strategy = build_strategy(&cfg.aggregation);
        let source = Arc::new(DeltaFiles::new(
            store.clone(),
            round,
            published.round_base.clone(),
            cfg.transfer.max_delta_bytes as usize + 64 * 1024,
            collected
                .book
                .accepted
                .iter()
                .map(|(c, m)| (c.clone(), m.clone()))
                .collect(),
        ));
        let mut aggregation = Aggregation {
            weights: Weights::default(),
            excluded: Vec::new(),
            norms: Vec::new(),
            clipped: Vec::new(),
            trust: Vec::new(),
        };
        let mut outcome = collected.outcome.to_string();
        let mut merged = false;
        let mut reference = None;
        let label_quality = crate::labels::assess(
            source
                .entries()
                .iter()
                .map(|(c, m)| (c.as_str(), m.header.metrics.labels.as_ref())),
            cfg.coevolution.max_client_noise,
            cfg.coevolution.label_weighting,
        );
        for q in label_quality.iter().filter(|q| q.excluded) {
            tracing::warn!(round, client = %q.client, reason = %q.reason, "left out of the merge and of fusion");
        }
        let all_excluded = !label_quality.is_empty()
            && label_quality.iter().filter(|q| q.excluded).count() == source.len();
        if outcome == "completed" && all_excluded {
            outcome =
                "skipped: every update's estimated label noise is above max_client_noise".into();
        }
        if outcome == "completed" && !source.is_empty() {
            if strategy.needs_reference() {
                reference = Some(self.reference_delta(global, round).await?);
            }
            // Reads every delta file at least once: off the async threads.
            let (base, src, s, r, q) = (
                global.clone(),
                source.clone(),
                cfg.aggregation.clone(),
                reference.clone(),
                label_quality.clone(),
            );
            let result = tokio::task::spawn_blocking(move || {
                if q.is_empty() {
                    build_strategy(&s).aggregate_source(&base, &*src, r.as_ref())
                } else {
                    let weighted = crate::labels::LabelWeighted::new(&*src, &q);
                    build_strategy(&s).aggregate_source(&base, &weighted, r.as_ref())
                }
            })
            .await
            .map_err(|e| CoordinatorError::Io(format!("aggregation task: {e}")))?;
            match result {
                Ok(a) => {
                    aggregation = a;
                    aggregation
                        .excluded
                        .extend(label_quality.iter().filter(|q| q.excluded).map(|q| {
                            crate::strategy::Exclusion {
                                client: q.client.clone(),
                                reason: q.reason.clone(),
                            }
                        }));
                    *global = std::mem::take(&mut aggregation.weights);
                    merged = true;
                }
                // Too few updates for the rule's guarantee (e.g. Multi-Krum needs 2f+3): keep
                // the model rather than merge unsafely, and say so in the report.
                Err(e @ StrategyError::TooFew { .. }) => {
                    tracing::warn!(round, error = %e, "aggregation refused; the round is skipped");
                    outcome = format!("skipped: {e}");
                }
                Err(e) => return Err(e.into()),
            }
        }
        // The guard: the merged model is scored before anything builds on it (fusion, the
        // next round's publish); a collapse keeps the round's base, as a skipped round would.
        let norms: Vec<(String, f64)> = source
            .entries()
            .iter()
            .map(|(c, m)| (c.clone(), m.norm))
            .collect();
        let flagged = crate::guard::flag_outliers(&norms, &cfg.guard);
        for f in &flagged {
            tracing::warn!(round, client = %f.client, norm = f.norm, z = f.z, "delta norm far outside the round's distribution");
        }
        let mut guard = None;
        if merged && cfg.guard.enabled {
            let g = crate::guard::check(
                &cfg.guard,
                inputs.guard.as_ref(),
                crate::guard::Candidate {
                    base: &published.round_base,
                    merged: global,
                    updates: source.clone(),
                    strategy: &cfg.aggregation,
                    reference: reference.as_ref(),
                    norms: &norms,
                    flagged: &flagged,
                },
            )
            .await?;
            if g.verdict == "rolled_back" {
                let named: Vec<&str> = g.offenders.iter().map(|o| o.client.as_str()).collect();
                tracing::error!(round, reason = g.reason.as_deref().unwrap_or(""), offenders = ?named, "merged model collapsed on held-out data: rolled back, the last good model stays published");
                outcome = "rolled_back".into();
                merged = false;
            }
            guard = Some(g);
        }
        Ok(Aggregated {
            outcome,
            merged,
            aggregation,
            guard,
            flagged,
            source,
            strategy: strategy.name(),
            label_quality,
        })
    }

    /// The coordinator's own training step from `base` on its labelled data, with the round's
    /// task (what an honest client would send if it held the server's data).
    async fn reference_delta(
        &self,
        base: &Weights,
        round: u64,
    ) -> Result<Weights, CoordinatorError> {
        let data = self
            .reference_data
            .lock()
            .ok()
            .and_then(|d| d.as_ref().map(Dataset::shallow_clone))
            .ok_or_else(|| CoordinatorError::Config("no server data for the reference".into()))?;
        let task = &self.cfg.task;
        let cfg = TrainConfig {
            epochs: task.epochs as usize,
            batch_size: task.batch_size as usize,
            lr: task.lr,
            momentum: task.momentum,
            prox_mu: task.prox_mu,
            seed: self.cfg.seed.wrapping_mul(7_919).wrapping_add(round),
        };
        let base = base.clone();
        let arch = self.archs.student.clone();
        tokio::task::spawn_blocking(move || -> Result<Weights, CoordinatorError> {
            let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let net = arch.build(&vs.root(), &data.shape)?;
            base.load_into(&mut vs)?;
            let start = Weights::from_var_store(&vs);
            train(&net, &vs, &data, &cfg)?;
            Ok(Weights::from_var_store(&vs).sub(&start)?)
        })
        .await
        .map_err(|e| CoordinatorError::Io(format!("reference training task: {e}")))?
    }
}
