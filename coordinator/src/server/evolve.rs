//! Coevolve mode's two steps around a round: the teacher distils into the student before it
//! is published, and learns from the merged and client students after aggregation.

use super::aggregate::Aggregated;
use super::{on_teacher, pick_ensemble, Coordinator, SharedTeacher};
use crate::coevolve::CoevolutionReport;
use crate::store::{write_atomic, Store};
use crate::strategy::UpdateSource;
use crate::CoordinatorError;
use coevo_models::Weights;

impl Coordinator {
    /// Stage 0: the teacher distils into the student. The result is this round's base, saved
    /// before it is published so a restarted coordinator publishes the same one.
    pub(super) async fn distill_stage(
        &self,
        round: u64,
        teacher: Option<&SharedTeacher>,
        store: &Store,
        global: &mut Weights,
        coevolution: &mut Option<CoevolutionReport>,
    ) -> Result<(), CoordinatorError> {
        let Some(t) = teacher else {
            return Ok(());
        };
        let base_path = store.base_path(round);
        if base_path.exists() {
            let bytes = std::fs::read(&base_path)
                .map_err(|e| CoordinatorError::Io(format!("{}: {e}", base_path.display())))?;
            *global = Weights::decode(
                &bytes,
                coevo_models::WeightCodec::F32,
                global.num_params() * 4 + 65536,
            )?;
        } else {
            let g = global.clone();
            let (w, outcome) = on_teacher(t, move |tl| tl.distill_into(&g)).await?;
            tracing::info!(round, ?outcome, "distillation");
            *global = w;
            write_atomic(&base_path, &global.encode(coevo_models::WeightCodec::F32)?)?;
            if let Some(c) = coevolution.as_mut() {
                c.distillation = Some(outcome);
            }
        }
        Ok(())
    }

    /// Stage 4 (after aggregation): the teacher learns from the merged student and `k` client
    /// students (base + delta, each read back from disk).
    pub(super) async fn fuse_stage(
        &self,
        round: u64,
        teacher: Option<&SharedTeacher>,
        global: &Weights,
        round_base: &Weights,
        aggregated: &Aggregated,
        coevolution: &mut Option<CoevolutionReport>,
    ) -> Result<(), CoordinatorError> {
        let src = &aggregated.source;
        let (Some(t), true) = (
            teacher,
            aggregated.outcome == "completed" && !src.is_empty(),
        ) else {
            return Ok(());
        };
        let mut members = vec![global.clone()];
        let mut names = vec!["merged".to_string()];
        let mut factors = vec![1.0];
        // Cameras over the label-noise bound are never fused from (issue #18); the rest count
        // by validation accuracy × (1 − estimated noise).
        let q = &aggregated.label_quality;
        let eligible: Vec<usize> = (0..src.len())
            .filter(|&i| crate::labels::factor(q, src.client(i)) > 0.0)
            .collect();
        let picked = pick_ensemble(eligible.len(), self.cfg.coevolution.ensemble_clients, round);
        for i in picked.into_iter().map(|k| eligible[k]) {
            let mut w = round_base.clone();
            let d = src.delta(i)?;
            w.add_scaled(&d, 1.0)?;
            members.push(w);
            names.push(src.client(i).to_string());
            factors.push(crate::labels::factor(q, src.client(i)));
        }
        let (outcome, accuracies, shares) = on_teacher(t, move |tl| {
            let refs: Vec<&Weights> = members.iter().collect();
            tl.fuse_from_weighted(&refs, &factors, round)
                .map(|(o, a, s)| (o, a, s, factors))
        })
        .await
        .map(|(o, a, s, f)| (o, a, s.into_iter().zip(f).collect::<Vec<_>>()))?;
        tracing::info!(round, ?outcome, "fusion");
        if let Some(c) = coevolution.as_mut() {
            c.fusion = Some(outcome);
            c.fusion_members = names
                .into_iter()
                .zip(accuracies)
                .zip(shares)
                .map(|((member, validation_accuracy), (weight, label_factor))| {
                    crate::coevolve::FusionMember {
                        member,
                        validation_accuracy,
                        label_factor,
                        weight,
                    }
                })
                .collect();
        }
        Ok(())
    }
}
