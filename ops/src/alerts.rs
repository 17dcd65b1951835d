//! Alerts over the round history: what an on-call analyst must not miss (issue #15). A model
//! that died (student 0.796 → 0.10 for 100 rounds in a long run) used to raise nothing.
//!
//! [`AlertState::observe`] is a pure fold over the reports in round order: the coordinator keeps
//! one state for its run, logs each round's alerts at ERROR and stores them in the report
//! (`alerts`); `coevo report` folds a fresh state over the reports on disk ([`evaluate`]), so
//! old runs get their alerts too. The state is bounded by the clients currently in a rejection
//! streak, not by the history.
//!
//! Thresholds (`[alerts]` in the coordinator config, [`AlertConfig`]):
//! - **rolled back**: the round's `outcome` is `rolled_back` (the guard refused the merge).
//! - **collapsed**: a model's test accuracy fell more than `collapse_drop` (0.15, absolute)
//!   below the best it had so far, or to within `chance_factor` (1.5) × chance (1 / classes)
//!   after having been above twice that. The drop rule catches a model that merely got much
//!   worse; the chance rule catches one that stopped learning at all even when its best was
//!   modest. A model that never rose above chance is not "collapsed" (round 1 of a fresh
//!   model often scores near chance).
//! - **skipped**: the round's outcome starts with `skipped` (below quorum, or the aggregation
//!   rule refused the updates).
//! - **client rejected**: one client had messages rejected in `rejected_rounds` (3) rounds in a
//!   row (raised every round the streak lasts, so each report says who is still failing).
//! - **teacher below student**: in coevolve mode the teacher's test accuracy is more than
//!   `teacher_margin` (0.01) below the student's: the teacher is meant to be the stronger
//!   model, and distillation from a weaker one drags the fleet down. The margin keeps test-set
//!   noise (a Fashion-MNIST demo had them 0.0012 apart) from paging anyone.

use crate::report::RoundReport;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Alert thresholds (coordinator config `[alerts]`; `coevo report` flags).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AlertConfig {
    /// Rounds in a row a client must have messages rejected before it is an alert.
    pub rejected_rounds: u32,
    /// Largest fall of test accuracy below the model's best so far that is not a collapse
    /// (absolute: 0.15 = 15 points).
    pub collapse_drop: f64,
    /// Accuracy at or below `chance_factor` × chance (1 / classes) is a collapse, once the
    /// model has been above twice that.
    pub chance_factor: f64,
    /// How far the teacher may fall below the student before it is an alert.
    pub teacher_margin: f64,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            rejected_rounds: 3,
            collapse_drop: 0.15,
            chance_factor: 1.5,
            teacher_margin: 0.01,
        }
    }
}

impl AlertConfig {
    /// Refuses thresholds that would make every round (or none) an alert by accident.
    pub fn validate(&self) -> Result<(), crate::OpsError> {
        let bad = |m: &str| Err(crate::OpsError::Config(format!("alerts.{m}")));
        if self.rejected_rounds == 0 {
            return bad("rejected_rounds must be at least 1");
        }
        if !(self.collapse_drop.is_finite() && self.collapse_drop > 0.0) {
            return bad("collapse_drop must be a positive fraction");
        }
        if !(self.chance_factor.is_finite() && self.chance_factor >= 1.0) {
            return bad("chance_factor must be at least 1");
        }
        if !(self.teacher_margin.is_finite() && self.teacher_margin >= 0.0) {
            return bad("teacher_margin must be 0 or more");
        }
        Ok(())
    }
}

/// One alert, raised for one round.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Alert {
    pub round: u64,
    /// What happened, with the numbers.
    pub kind: AlertKind,
    /// One line for humans (log line, HTML, table).
    pub message: String,
}

/// The alert types, with the numbers that raised them. Serialized with a `type` tag
/// (`rolled_back`, `collapsed`, `skipped`, `client_rejected`, `teacher_below_student`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AlertKind {
    /// The guard rolled the round's merge back.
    RolledBack { reason: Option<String> },
    /// A model's accuracy collapsed (see the module doc for the rule).
    Collapsed {
        /// `student` or `teacher`.
        model: String,
        accuracy: f64,
        best: f64,
        best_round: u64,
        /// 1 / classes (0 when the report has no per-class accuracy).
        chance: f64,
    },
    /// The round closed without a new model.
    Skipped {
        outcome: String,
        accepted: usize,
        quorum: u32,
    },
    /// A client had messages rejected in `rounds` consecutive rounds.
    ClientRejected {
        client: String,
        rounds: u32,
        /// This round's first reason.
        reason: String,
    },
    /// The teacher scored below the student.
    TeacherBelowStudent { teacher: f64, student: f64 },
}

impl AlertKind {
    /// The stable tag (`collapsed`, …), e.g. for grouping and CSS.
    pub fn tag(&self) -> &'static str {
        match self {
            AlertKind::RolledBack { .. } => "rolled_back",
            AlertKind::Collapsed { .. } => "collapsed",
            AlertKind::Skipped { .. } => "skipped",
            AlertKind::ClientRejected { .. } => "client_rejected",
            AlertKind::TeacherBelowStudent { .. } => "teacher_below_student",
        }
    }
}

/// Best accuracy seen so far of one model.
#[derive(Clone, Debug, Default)]
struct Best {
    accuracy: f64,
    round: u64,
    seen: bool,
}

/// What the fold remembers between rounds.
#[derive(Clone, Debug, Default)]
pub struct AlertState {
    cfg: AlertConfig,
    student: Best,
    teacher: Best,
    /// Consecutive rounds with a rejection, per client currently in a streak.
    streaks: BTreeMap<String, u32>,
}

impl AlertState {
    pub fn new(cfg: AlertConfig) -> Self {
        AlertState {
            cfg,
            ..AlertState::default()
        }
    }

    /// The alerts of `r`, given every earlier round already observed (in round order).
    pub fn observe(&mut self, r: &RoundReport) -> Vec<Alert> {
        let mut out = Vec::new();
        let mut push = |kind: AlertKind, message: String| {
            out.push(Alert {
                round: r.round,
                kind,
                message,
            })
        };
        if r.outcome == "rolled_back" {
            let reason = r.guard.as_ref().and_then(|g| g.reason.clone());
            let msg = format!(
                "round {} rolled back: {}",
                r.round,
                reason
                    .as_deref()
                    .unwrap_or("the guard refused the merged model")
            );
            push(AlertKind::RolledBack { reason }, msg);
        }
        if r.outcome.starts_with("skipped") {
            push(
                AlertKind::Skipped {
                    outcome: r.outcome.clone(),
                    accepted: r.accepted,
                    quorum: r.quorum,
                },
                format!(
                    "round {} {} ({} accepted, quorum {})",
                    r.round, r.outcome, r.accepted, r.quorum
                ),
            );
        }
        for (name, model, best) in [
            ("student", &r.student, &mut self.student),
            ("teacher", &r.teacher, &mut self.teacher),
        ] {
            let Some(acc) = model.test_accuracy.filter(|a| a.is_finite()) else {
                continue;
            };
            let classes = model.per_class_accuracy.len();
            let chance = if classes > 0 {
                1.0 / classes as f64
            } else {
                0.0
            };
            if best.seen {
                let dropped = acc < best.accuracy - self.cfg.collapse_drop;
                let at_chance = chance > 0.0
                    && acc <= self.cfg.chance_factor * chance
                    && best.accuracy > 2.0 * chance;
                if dropped || at_chance {
                    push(
                        AlertKind::Collapsed {
                            model: name.into(),
                            accuracy: acc,
                            best: best.accuracy,
                            best_round: best.round,
                            chance,
                        },
                        format!(
                            "{name} collapsed: test accuracy {acc:.4} in round {}, best {:.4} \
                             in round {} (chance {chance:.4})",
                            r.round, best.accuracy, best.round
                        ),
                    );
                }
            }
            if !best.seen || acc > best.accuracy {
                *best = Best {
                    accuracy: acc,
                    round: r.round,
                    seen: true,
                };
            }
        }
        if let (Some(t), Some(s)) = (r.teacher.test_accuracy, r.student.test_accuracy) {
            if t.is_finite() && s.is_finite() && t < s - self.cfg.teacher_margin {
                push(
                    AlertKind::TeacherBelowStudent {
                        teacher: t,
                        student: s,
                    },
                    format!(
                        "teacher below its student in round {}: {t:.4} < {s:.4}",
                        r.round
                    ),
                );
            }
        }
        // First reason per client this round (a client may have several entries).
        let mut rejected: BTreeMap<&str, &str> = BTreeMap::new();
        for x in &r.rejected {
            rejected
                .entry(x.client.as_str())
                .or_insert(x.reason.as_str());
        }
        self.streaks
            .retain(|c, _| rejected.contains_key(c.as_str()));
        for (client, reason) in rejected {
            let n = self.streaks.entry(client.to_string()).or_insert(0);
            *n += 1;
            if *n >= self.cfg.rejected_rounds {
                let rounds = *n;
                push(
                    AlertKind::ClientRejected {
                        client: client.to_string(),
                        rounds,
                        reason: reason.to_string(),
                    },
                    format!("client {client} rejected in {rounds} consecutive rounds: {reason}"),
                );
            }
        }
        out
    }
}

/// Every alert of a history (reports in any order; folded in round order).
pub fn evaluate(reports: &[RoundReport], cfg: &AlertConfig) -> Vec<Alert> {
    let mut sorted: Vec<&RoundReport> = reports.iter().collect();
    sorted.sort_by_key(|r| r.round);
    let mut state = AlertState::new(cfg.clone());
    sorted.into_iter().flat_map(|r| state.observe(r)).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::{ModelReport, PhaseTimings, RejectionCount};

    fn model(acc: Option<f64>, classes: usize) -> ModelReport {
        ModelReport {
            test_accuracy: acc,
            test_loss: None,
            per_class_accuracy: vec![acc.unwrap_or(0.0); classes],
            params: None,
        }
    }

    /// A completed fedavg round with the given student accuracy (10 classes).
    pub(crate) fn round(n: u64, student: f64) -> RoundReport {
        RoundReport {
            round: n,
            fleet: "t".into(),
            mode: "fedavg".into(),
            strategy: "fedavg".into(),
            outcome: "completed".into(),
            accepted: 3,
            quorum: 2,
            registered: 3,
            rejected: vec![],
            extensions: 0,
            model_digest: String::new(),
            uplink_codec: "f32".into(),
            downlink_codec: "f32".into(),
            bytes_down: 0,
            bytes_up: 0,
            duration_ms: 0,
            phase_ms: PhaseTimings::default(),
            excluded: vec![],
            clipped: vec![],
            student: model(Some(student), 10),
            teacher: ModelReport::absent(),
            coevolution: None,
            clients: vec![],
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

    fn tags(alerts: &[Alert]) -> Vec<(u64, &'static str)> {
        alerts.iter().map(|a| (a.round, a.kind.tag())).collect()
    }

    #[test]
    fn a_healthy_run_raises_nothing() {
        let h: Vec<_> = [0.3, 0.5, 0.6, 0.58, 0.7]
            .iter()
            .enumerate()
            .map(|(i, &a)| round(i as u64 + 1, a))
            .collect();
        assert_eq!(evaluate(&h, &AlertConfig::default()), vec![]);
    }

    #[test]
    fn the_issue_collapse_is_raised_every_round_it_lasts() {
        // Issue #15: student 0.796 → 0.10 and stays there.
        let h: Vec<_> = [0.5, 0.796, 0.10, 0.11, 0.10]
            .iter()
            .enumerate()
            .map(|(i, &a)| round(i as u64 + 1, a))
            .collect();
        let alerts = evaluate(&h, &AlertConfig::default());
        assert_eq!(
            tags(&alerts),
            vec![(3, "collapsed"), (4, "collapsed"), (5, "collapsed")]
        );
        match &alerts[0].kind {
            AlertKind::Collapsed {
                model,
                accuracy,
                best,
                best_round,
                chance,
            } => {
                assert_eq!(model, "student");
                assert_eq!((*accuracy, *best, *best_round), (0.10, 0.796, 2));
                assert!((chance - 0.1).abs() < 1e-12);
            }
            k => panic!("{k:?}"),
        }
        assert!(
            alerts[0].message.contains("0.1000"),
            "{}",
            alerts[0].message
        );
    }

    #[test]
    fn a_drop_within_the_threshold_is_not_a_collapse_but_chance_is() {
        let cfg = AlertConfig::default();
        // 0.80 → 0.66: 14 points, under the 15-point threshold.
        let h = vec![round(1, 0.80), round(2, 0.66)];
        assert_eq!(evaluate(&h, &cfg), vec![]);
        // A modest model (best 0.28, chance 0.10) that falls to 0.14: only 14 points, but at
        // chance level.
        let h = vec![round(1, 0.28), round(2, 0.14)];
        assert_eq!(tags(&evaluate(&h, &cfg)), vec![(2, "collapsed")]);
        // A model that never left chance is not "collapsed".
        let h = vec![round(1, 0.11), round(2, 0.10), round(3, 0.12)];
        assert_eq!(evaluate(&h, &cfg), vec![]);
    }

    #[test]
    fn rollback_skip_and_teacher_below_student() {
        let mut r1 = round(1, 0.5);
        r1.outcome = "rolled_back".into();
        let mut r2 = round(2, 0.5);
        r2.outcome = "skipped".into();
        r2.accepted = 1;
        let mut r3 = round(3, 0.6);
        r3.outcome = "skipped: multi-krum needs 5 updates".into();
        let mut r4 = round(4, 0.6);
        r4.teacher = model(Some(0.55), 10);
        // Within the default margin (0.01): noise, not an alert.
        let mut r6 = round(6, 0.6);
        r6.teacher = model(Some(0.595), 10);
        let mut r5 = round(5, 0.6);
        r5.teacher = model(Some(0.7), 10);
        let alerts = evaluate(&[r6, r5, r4, r3, r2, r1], &AlertConfig::default());
        assert_eq!(
            tags(&alerts),
            vec![
                (1, "rolled_back"),
                (2, "skipped"),
                (3, "skipped"),
                (4, "teacher_below_student")
            ]
        );
        assert_eq!(
            alerts[1].kind,
            AlertKind::Skipped {
                outcome: "skipped".into(),
                accepted: 1,
                quorum: 2
            }
        );
    }

    fn rejected(client: &str, reason: &str) -> RejectionCount {
        RejectionCount {
            client: client.into(),
            reason: reason.into(),
            count: 2,
            signed: true,
        }
    }

    #[test]
    fn a_client_rejected_k_rounds_in_a_row() {
        let mut h: Vec<_> = (1..=6).map(|n| round(n, 0.5)).collect();
        // cam-1: rounds 1-4 (streak of 4); cam-2: rounds 1, 2, then 4, 5 (broken streaks).
        for (i, r) in h.iter_mut().enumerate() {
            let n = i + 1;
            if n <= 4 {
                r.rejected.push(rejected("cam-1", "bad-signature: x"));
                r.rejected.push(rejected("cam-1", "wrong-round: y"));
            }
            if n != 3 && n != 6 {
                r.rejected.push(rejected("cam-2", "digest-mismatch"));
            }
        }
        let alerts = evaluate(&h, &AlertConfig::default());
        assert_eq!(
            tags(&alerts),
            vec![(3, "client_rejected"), (4, "client_rejected")]
        );
        assert_eq!(
            alerts[1].kind,
            AlertKind::ClientRejected {
                client: "cam-1".into(),
                rounds: 4,
                reason: "bad-signature: x".into()
            }
        );
        let k2 = AlertConfig {
            rejected_rounds: 2,
            ..AlertConfig::default()
        };
        let clients: Vec<_> = evaluate(&h, &k2)
            .into_iter()
            .filter_map(|a| match a.kind {
                AlertKind::ClientRejected { client, rounds, .. } => Some((a.round, client, rounds)),
                _ => None,
            })
            .collect();
        assert_eq!(
            clients,
            vec![
                (2, "cam-1".to_string(), 2),
                (2, "cam-2".to_string(), 2),
                (3, "cam-1".to_string(), 3),
                (4, "cam-1".to_string(), 4),
                (5, "cam-2".to_string(), 2),
            ]
        );
    }

    #[test]
    fn alerts_round_trip_through_json_and_old_reports_have_none() {
        let mut r = round(1, 0.5);
        r.alerts = vec![Alert {
            round: 1,
            kind: AlertKind::TeacherBelowStudent {
                teacher: 0.4,
                student: 0.5,
            },
            message: "m".into(),
        }];
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["alerts"][0]["kind"]["type"], "teacher_below_student");
        let back: RoundReport = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, r);
        let mut old = json;
        old.as_object_mut().unwrap().remove("alerts");
        let back: RoundReport = serde_json::from_value(old).unwrap();
        assert!(back.alerts.is_empty());
    }

    #[test]
    fn bad_thresholds_are_refused() {
        assert!(AlertConfig::default().validate().is_ok());
        for cfg in [
            AlertConfig {
                rejected_rounds: 0,
                ..AlertConfig::default()
            },
            AlertConfig {
                collapse_drop: f64::NAN,
                ..AlertConfig::default()
            },
            AlertConfig {
                chance_factor: 0.5,
                ..AlertConfig::default()
            },
        ] {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }
}
