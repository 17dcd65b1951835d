//! Stage 5, report: evaluate the student (and teacher), write the report and the checkpoint,
//! mark the round complete and publish the report.

use super::aggregate::Aggregated;
use super::collect::Collected;
use super::publish::Published;
use super::{on_teacher, Coordinator, Evaluator, RoundInputs, SharedEvaluator, SharedTeacher};
use crate::coevolve::{CoevolutionReport, Mode};
use crate::report::{ClientReport, ModelReport, PhaseTimings, Rejection, RoundReport};
use crate::store::{write_atomic, State, Store};
use crate::CoordinatorError;
use coevo_models::train::evaluate;
use coevo_models::Weights;
use coevo_mqtt::Session;
use coevo_protocol::Topic;
use std::time::Instant;

/// Everything the report is made of, handed over by the earlier stages.
pub(super) struct Finished {
    pub published: Published,
    pub collected: Collected,
    pub aggregated: Aggregated,
    pub coevolution: Option<CoevolutionReport>,
    pub phases: PhaseTimings,
    pub started: Instant,
}

impl Coordinator {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn report_stage(
        &self,
        inputs: &RoundInputs,
        session: &Session,
        store: &Store,
        global: &Weights,
        evaluator: &SharedEvaluator,
        teacher: Option<&SharedTeacher>,
        f: Finished,
    ) -> Result<RoundReport, CoordinatorError> {
        let cfg = &self.cfg;
        let round = inputs.round;
        let Finished {
            published,
            collected,
            aggregated,
            coevolution,
            mut phases,
            started,
        } = f;
        let t_eval = Instant::now();
        let eval = {
            let evaluator = evaluator.clone();
            let weights = global.clone();
            tokio::task::spawn_blocking(move || -> Result<_, CoordinatorError> {
                let mut ev = evaluator
                    .lock()
                    .map_err(|_| CoordinatorError::Io("evaluator lock poisoned".into()))?;
                let Evaluator { vs, net, test } = &mut *ev;
                weights.load_into(vs)?;
                Ok(evaluate(&*net, test, 1000))
            })
            .await
            .map_err(|e| CoordinatorError::Io(format!("evaluation task: {e}")))??
        };
        let teacher_report = match teacher {
            None => ModelReport::absent(),
            Some(t) => {
                let evaluator = evaluator.clone();
                let (eval, weights) = on_teacher(t, move |tl| {
                    let ev = evaluator
                        .lock()
                        .map_err(|_| CoordinatorError::Io("evaluator lock poisoned".into()))?;
                    Ok((tl.evaluate_teacher(&ev.test), tl.teacher_weights()))
                })
                .await?;
                write_atomic(
                    &store.teacher_path(round),
                    &weights.encode(coevo_models::WeightCodec::F32)?,
                )?;
                ModelReport {
                    test_accuracy: Some(eval.accuracy),
                    test_loss: Some(eval.loss),
                    per_class_accuracy: eval.per_class,
                    params: Some(weights.num_params()),
                }
            }
        };
        phases.evaluate = t_eval.elapsed().as_millis() as u64;
        let book = &collected.book;
        let trust: std::collections::HashMap<&str, f64> = aggregated
            .aggregation
            .trust
            .iter()
            .map(|(c, t)| (c.as_str(), *t))
            .collect();
        let clients: Vec<ClientReport> = book
            .accepted
            .iter()
            .map(|(c, a)| ClientReport {
                client: c.clone(),
                samples: a.header.samples,
                local_loss: a.header.metrics.loss,
                local_accuracy: a.header.metrics.accuracy,
                train_ms: a.header.metrics.train_ms,
                bytes_up: a.bytes,
                bytes_down: published.model_bytes,
                delta_norm: a.norm,
                trust_weight: trust.get(c.as_str()).copied(),
                labels: a.header.metrics.labels.clone(),
            })
            .collect();
        let outcome = aggregated.outcome.clone();
        let mut report = RoundReport {
            round,
            fleet: cfg.fleet.clone(),
            mode: match cfg.mode {
                Mode::Fedavg => "fedavg".into(),
                Mode::Coevolve => "coevolve".into(),
            },
            strategy: aggregated.strategy.into(),
            outcome: outcome.clone(),
            accepted: book.accepted.len(),
            quorum: cfg.round.quorum,
            registered: inputs.registry.len(),
            rejected: book.rejected.clone(),
            extensions: collected.extensions,
            model_digest: published.model_digest.to_string(),
            uplink_codec: cfg.transfer.uplink_codec.to_string(),
            downlink_codec: cfg.transfer.downlink_codec.to_string(),
            bytes_down: published.model_bytes * inputs.registry.len() as u64,
            bytes_up: clients.iter().map(|c| c.bytes_up).sum(),
            duration_ms: started.elapsed().as_millis() as u64,
            phase_ms: phases,
            excluded: aggregated
                .aggregation
                .excluded
                .iter()
                .map(|x| Rejection {
                    client: x.client.clone(),
                    reason: x.reason.clone(),
                })
                .collect(),
            clipped: aggregated.aggregation.clipped.clone(),
            student: ModelReport {
                test_accuracy: Some(eval.accuracy),
                test_loss: Some(eval.loss),
                per_class_accuracy: eval.per_class.clone(),
                params: Some(global.num_params()),
            },
            teacher: teacher_report,
            coevolution,
            clients,
            guard: aggregated.guard,
            flagged: aggregated.flagged,
            late: book.late.counts(),
            resent: book.resent,
            lost: collected.lost,
            reassembly: collected.reassembly,
            collect: collected.collect,
            alerts: Vec::new(),
            labels: aggregated.label_quality.clone(),
        };
        report.alerts = self.round_alerts(store, &report);
        let json = serde_json::to_vec_pretty(&report)
            .map_err(|e| CoordinatorError::Io(format!("report: {e}")))?;
        write_atomic(
            &store.checkpoint_path(round),
            &global.encode(coevo_models::WeightCodec::F32)?,
        )?;
        write_atomic(&store.report_path(round), &json)?;
        store.save_state(&State {
            completed_round: round,
        })?;
        session
            .publish(Topic::Report { round }.path(&cfg.fleet), json, true)
            .await?;
        self.refresh_html(store, &report).await;
        tracing::info!(
            round,
            accepted = report.accepted,
            rejected = report.rejected.len(),
            accuracy = eval.accuracy,
            "round {outcome}"
        );
        Ok(report)
    }
}
