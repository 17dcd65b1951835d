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
            .publish(
                Topic::Report { round }.path(&cfg.fleet),
                published_report(&report, json)?,
                true,
            )
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

/// Largest round report published on MQTT. Brokers cap packets (the embedded one at
/// `max_payload_bytes`, 1 MiB + 64 KiB by default; Mosquitto at `message_size_limit`) and close
/// a connection that sends more, which would cut the coordinator off at every round's end; a
/// 10,000-client report is ~2.5 MB. The file under `reports/` always has everything.
const MAX_PUBLISHED_REPORT: usize = 512 * 1024;

/// What goes on `report/{round}`: the report as written to disk when it fits
/// [`MAX_PUBLISHED_REPORT`]; else the same report, compact and without its per-client lists
/// (`clients`, `rejected`, `excluded`, `clipped`, `flagged`, `lost`, `labels`): the counts and
/// the models' figures a dashboard subscribes for.
fn published_report(report: &RoundReport, full: Vec<u8>) -> Result<Vec<u8>, CoordinatorError> {
    if full.len() <= MAX_PUBLISHED_REPORT {
        return Ok(full);
    }
    let mut slim = report.clone();
    slim.clients.clear();
    slim.rejected.clear();
    slim.excluded.clear();
    slim.clipped.clear();
    slim.flagged.clear();
    slim.lost.clear();
    slim.labels.clear();
    let json =
        serde_json::to_vec(&slim).map_err(|e| CoordinatorError::Io(format!("report: {e}")))?;
    tracing::info!(
        round = report.round,
        full_bytes = full.len(),
        published_bytes = json.len(),
        "round report published on MQTT without its per-client lists (the file has them)"
    );
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A completed round of `n` accepted clients with their per-client rows.
    fn report(n: usize) -> RoundReport {
        let model = ModelReport {
            test_accuracy: Some(0.8),
            test_loss: None,
            per_class_accuracy: vec![0.8; 10],
            params: None,
        };
        RoundReport {
            round: 1,
            fleet: "city".into(),
            mode: "fedavg".into(),
            strategy: "fedavg".into(),
            outcome: "completed".into(),
            accepted: n,
            quorum: 1,
            registered: n,
            rejected: vec![],
            extensions: 0,
            model_digest: String::new(),
            uplink_codec: "int8".into(),
            downlink_codec: "f32".into(),
            bytes_down: 0,
            bytes_up: 0,
            duration_ms: 0,
            phase_ms: PhaseTimings::default(),
            excluded: vec![],
            clipped: vec![],
            student: model,
            teacher: ModelReport::absent(),
            coevolution: None,
            clients: (0..n)
                .map(|i| ClientReport {
                    client: format!("cam-{i:05}"),
                    samples: 100,
                    local_loss: 0.5,
                    local_accuracy: 0.7,
                    train_ms: 1000,
                    bytes_up: 120_000,
                    bytes_down: 460_000,
                    delta_norm: 1.0,
                    trust_weight: None,
                    labels: None,
                })
                .collect(),
            guard: None,
            flagged: vec![],
            late: vec![],
            labels: vec![],
            resent: 0,
            lost: vec![],
            reassembly: Default::default(),
            collect: Default::default(),
            alerts: vec![],
        }
    }

    #[test]
    fn a_city_sized_report_is_published_without_its_client_rows() {
        let small = report(10);
        let json = serde_json::to_vec_pretty(&small).unwrap();
        assert_eq!(published_report(&small, json.clone()).unwrap(), json);

        let big = report(10_000);
        let json = serde_json::to_vec_pretty(&big).unwrap();
        assert!(json.len() > MAX_PUBLISHED_REPORT, "{} bytes", json.len());
        let out = published_report(&big, json).unwrap();
        assert!(out.len() <= MAX_PUBLISHED_REPORT, "{} bytes", out.len());
        let back: RoundReport = serde_json::from_slice(&out).unwrap();
        assert!(back.clients.is_empty());
        assert_eq!(back.accepted, 10_000);
        assert_eq!(back.student, big.student);
    }
}
