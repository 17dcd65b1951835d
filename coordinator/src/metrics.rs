//! What the coordinator exposes while it runs: Prometheus metrics (`[metrics] listen`) and the
//! live status file ([`crate::status`]), both fed from one [`CoordinatorMetrics`] that the round
//! stages update as they go.
//!
//! Counters are cumulative since the coordinator process started (Prometheus handles restarts
//! by itself); within one run, each round's increments equal that round's report: accepted
//! deltas, rejected messages by reason code, accepted delta bytes, model bytes sent.

use crate::registry::FleetRegistry;
use crate::report::RoundReport;
use crate::status::{state, ClosedRound, LiveStatus};
use coevo_telemetry::{Counter, Gauge, Registry};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;

/// `[metrics]` in the coordinator config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics on `http://LISTEN/metrics` (e.g. `"127.0.0.1:9464"`). Unset:
    /// no HTTP listener (the default: exposing one is a deliberate choice). Port 0 picks a
    /// free port (logged).
    pub listen: Option<SocketAddr>,
    /// Rewrite `out/status.json` (what `coevo status` reads) this often while running, in
    /// milliseconds. 0 turns the file off.
    pub status_interval_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            status_interval_ms: 1000,
        }
    }
}

/// The stages of a round, for the `coevo_round_phase` gauge and `status.json`.
pub mod phase {
    pub const STARTING: &str = "starting";
    pub const DISTILL: &str = "distill";
    pub const PUBLISH: &str = "publish";
    pub const COLLECT: &str = "collect";
    pub const AGGREGATE: &str = "aggregate";
    pub const FUSE: &str = "fuse";
    pub const EVALUATE: &str = "evaluate";
    pub const IDLE: &str = "idle";
    /// Every value, in round order.
    pub const ALL: [&str; 8] = [
        STARTING, DISTILL, PUBLISH, COLLECT, AGGREGATE, FUSE, EVALUATE, IDLE,
    ];
}

/// Round outcomes counted in `coevo_rounds_total{outcome}` (a report's `skipped: …` counts as
/// `skipped`).
const OUTCOMES: [&str; 3] = ["completed", "skipped", "rolled_back"];

/// The coordinator's metrics and live status. Shared (`Arc`) between the round loop, the
/// `/metrics` endpoint and the status-file writer.
pub struct CoordinatorMetrics {
    registry: Registry,
    round: Gauge,
    rounds_configured: Gauge,
    phases: Vec<(&'static str, Gauge)>,
    registered: Gauge,
    connected: Gauge,
    uploaded: Gauge,
    deadline: Gauge,
    quorum: Gauge,
    uploads: Counter,
    accepted: Counter,
    bytes_up: Counter,
    bytes_down: Counter,
    late: Counter,
    resent: Counter,
    refused_busy: Counter,
    lost: Counter,
    rollbacks: Counter,
    outcomes: Vec<(&'static str, Counter)>,
    student_accuracy: Gauge,
    teacher_accuracy: Gauge,
    round_seconds: Gauge,
    phase_seconds: [Gauge; 4],
    last_round: Gauge,
    /// Counters by rejection reason code, registered on first use.
    rejected: Mutex<HashMap<&'static str, Counter>>,
    live: Mutex<Live>,
}

impl std::fmt::Debug for CoordinatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorMetrics").finish_non_exhaustive()
    }
}

/// What `status.json` is built from.
#[derive(Default)]
struct Live {
    status: LiveStatus,
    /// Registered clients whose last status message said online.
    online: HashSet<String>,
    /// Clients with a complete upload this round.
    uploaded: HashSet<String>,
}

impl CoordinatorMetrics {
    pub fn new(fleet: &str, rounds: u64, interval_ms: u64) -> Self {
        let r = Registry::new();
        let phases = phase::ALL
            .iter()
            .map(|p| {
                (
                    *p,
                    r.gauge_with(
                        "coevo_round_phase",
                        "1 for the stage the current round is in, 0 for the others.",
                        &[("phase", p)],
                    ),
                )
            })
            .collect();
        let outcomes = OUTCOMES
            .iter()
            .map(|o| {
                (
                    *o,
                    r.counter_with(
                        "coevo_rounds_total",
                        "Rounds closed, by outcome (completed, skipped, rolled_back).",
                        &[("outcome", o)],
                    ),
                )
            })
            .collect();
        let phase_seconds = ["publish", "collect", "aggregate", "evaluate"].map(|p| {
            r.gauge_with(
                "coevo_round_phase_duration_seconds",
                "Time the last closed round spent in each phase (its report's phase_ms).",
                &[("phase", p)],
            )
        });
        let m = CoordinatorMetrics {
            round: r.gauge(
                "coevo_round",
                "The round being run (the last one once the coordinator is done).",
            ),
            rounds_configured: r.gauge(
                "coevo_rounds_configured",
                "Rounds the coordinator is configured to run.",
            ),
            phases,
            registered: r.gauge(
                "coevo_clients_registered",
                "Clients in the fleet registry this round.",
            ),
            connected: r.gauge(
                "coevo_clients_connected",
                "Registered clients whose retained status on the broker says online.",
            ),
            uploaded: r.gauge(
                "coevo_clients_uploaded",
                "Registered clients that completed an upload this round.",
            ),
            deadline: r.gauge(
                "coevo_round_deadline_timestamp_seconds",
                "The current round's deadline (Unix seconds); 0 outside the collect phase.",
            ),
            quorum: r.gauge(
                "coevo_round_quorum",
                "Accepted deltas needed to aggregate at the deadline.",
            ),
            uploads: r.counter(
                "coevo_uploads_total",
                "Complete delta uploads received (before verification).",
            ),
            accepted: r.counter(
                "coevo_deltas_accepted_total",
                "Deltas verified, stored and receipted.",
            ),
            bytes_up: r.counter(
                "coevo_delta_bytes_accepted_total",
                "Payload bytes of accepted deltas (the reports' bytes_up).",
            ),
            bytes_down: r.counter(
                "coevo_model_bytes_sent_total",
                "Model payload bytes for the fleet: encoded student x registered clients (the reports' bytes_down).",
            ),
            late: r.counter(
                "coevo_messages_late_total",
                "Delta messages for a round that had closed (counted, not blamed).",
            ),
            resent: r.counter(
                "coevo_deltas_resent_total",
                "Re-sent copies of accepted deltas, answered with the receipt again.",
            ),
            refused_busy: r.counter(
                "coevo_chunks_refused_busy_total",
                "Delta chunks refused for lack of reassembly capacity (the client re-sends).",
            ),
            lost: r.counter(
                "coevo_deltas_lost_total",
                "Acknowledged deltas whose stored copy was missing or corrupt after a restart.",
            ),
            rollbacks: r.counter(
                "coevo_rollbacks_total",
                "Rounds whose merged model the guard rolled back.",
            ),
            outcomes,
            student_accuracy: r.gauge(
                "coevo_student_test_accuracy_ratio",
                "Test accuracy of the global student after the last closed round.",
            ),
            teacher_accuracy: r.gauge(
                "coevo_teacher_test_accuracy_ratio",
                "Test accuracy of the teacher after the last closed round (NaN without one).",
            ),
            round_seconds: r.gauge(
                "coevo_round_duration_seconds",
                "Wall time of the last closed round.",
            ),
            phase_seconds,
            last_round: r.gauge(
                "coevo_last_closed_round",
                "The last round that closed (its report is written).",
            ),
            rejected: Mutex::new(HashMap::new()),
            live: Mutex::new(Live::default()),
            registry: r,
        };
        // Known before any round, so dashboards show the usual reasons at 0 rather than no
        // data; rarer codes appear on first use.
        for code in [
            "bad-signature",
            "unknown-client",
            "wrong-round",
            "malformed",
        ] {
            m.rejected_counter(code);
        }
        m.rounds_configured.set(rounds as f64);
        m.teacher_accuracy.set(f64::NAN);
        m.student_accuracy.set(f64::NAN);
        m.with_live(|l| {
            l.status = LiveStatus {
                fleet: fleet.to_string(),
                pid: std::process::id(),
                state: state::STARTING.into(),
                rounds,
                interval_ms,
                ..LiveStatus::default()
            };
        });
        m.set_phase(phase::STARTING);
        m
    }

    /// The Prometheus text format of every metric.
    pub fn render(&self) -> String {
        self.registry.render()
    }

    /// The live status as of now.
    pub fn snapshot(&self) -> LiveStatus {
        let mut s = self.with_live(|l| l.status.clone());
        s.updated_unix_ms = crate::server::now_ms();
        s
    }

    fn with_live<T>(&self, f: impl FnOnce(&mut Live) -> T) -> T {
        // A poisoned lock only means a panic elsewhere; the numbers are still usable.
        let mut l = self.live.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut l)
    }

    fn rejected_counter(&self, code: &'static str) -> Counter {
        let mut map = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(code)
            .or_insert_with(|| {
                self.registry.counter_with(
                    "coevo_deltas_rejected_total",
                    "Rejected delta messages, by reason code (the reports' rejected[].count).",
                    &[("reason", code)],
                )
            })
            .clone()
    }

    /// The coordinator's life cycle (see [`state`]); `error` when it failed.
    pub fn set_state(&self, s: &str, error: Option<String>) {
        self.with_live(|l| {
            l.status.state = s.to_string();
            l.status.error = error;
        });
        if s != state::STARTING && s != state::RUNNING {
            self.set_phase(phase::IDLE);
        }
    }

    /// The stage the round is in (one of [`phase::ALL`]).
    pub fn set_phase(&self, p: &'static str) {
        for (name, g) in &self.phases {
            g.set(if *name == p { 1.0 } else { 0.0 });
        }
        self.with_live(|l| {
            l.status.phase = p.to_string();
            if p != phase::COLLECT {
                l.status.deadline_unix_ms = None;
            }
        });
        if p != phase::COLLECT {
            self.deadline.set(0.0);
        }
    }

    /// A round begins: its number, registry and quorum; per-round counts start at zero.
    pub fn round_started(&self, round: u64, registry: &FleetRegistry, quorum: u32) {
        self.round.set(round as f64);
        self.registered.set(registry.len() as f64);
        self.quorum.set(f64::from(quorum));
        self.uploaded.set(0.0);
        let connected = self.with_live(|l| {
            l.online.retain(|c| registry.clients.contains_key(c));
            l.uploaded.clear();
            let s = &mut l.status;
            s.state = state::RUNNING.into();
            s.round = round;
            s.registered = registry.len();
            s.connected = l.online.len();
            s.uploaded = 0;
            s.accepted = 0;
            s.rejected = 0;
            s.quorum = quorum;
            s.round_started_unix_ms = 0;
            s.deadline_unix_ms = None;
            l.online.len()
        });
        self.connected.set(connected as f64);
    }

    /// The model and manifest are out: `model_bytes` for each registered client, and the
    /// deadline clients were given.
    pub fn published(&self, model_bytes: u64, registered: usize, deadline_unix_ms: u64) {
        self.bytes_down
            .increment(model_bytes.saturating_mul(registered as u64));
        self.with_live(|l| l.status.round_started_unix_ms = crate::server::now_ms());
        self.set_deadline(deadline_unix_ms);
    }

    /// The deadline in force (at publication, and again after an extension).
    pub fn set_deadline(&self, deadline_unix_ms: u64) {
        self.deadline.set(deadline_unix_ms as f64 / 1000.0);
        self.with_live(|l| l.status.deadline_unix_ms = Some(deadline_unix_ms));
    }

    /// A client's retained online/offline status (only registered clients are counted).
    pub fn client_status(&self, client: &str, online: bool) {
        let n = self.with_live(|l| {
            if online {
                l.online.insert(client.to_string());
            } else {
                l.online.remove(client);
            }
            l.status.connected = l.online.len();
            l.online.len()
        });
        self.connected.set(n as f64);
    }

    /// A complete upload from `client` goes to verification.
    pub fn upload(&self, client: &str) {
        self.uploads.increment(1);
        let n = self.with_live(|l| {
            l.uploaded.insert(client.to_string());
            l.status.uploaded = l.uploaded.len();
            l.uploaded.len()
        });
        self.uploaded.set(n as f64);
    }

    /// A delta is accepted (or taken back from disk after a restart): `bytes` of payload.
    pub fn accepted(&self, client: &str, bytes: u64) {
        self.accepted.increment(1);
        self.bytes_up.increment(bytes);
        let n = self.with_live(|l| {
            l.status.accepted += 1;
            // A delta taken back after a restart was uploaded too.
            l.uploaded.insert(client.to_string());
            l.status.uploaded = l.uploaded.len();
            l.uploaded.len()
        });
        self.uploaded.set(n as f64);
    }

    /// A message is rejected, by its reason's stable code.
    pub fn rejected(&self, code: &'static str) {
        self.rejected_counter(code).increment(1);
        self.with_live(|l| l.status.rejected += 1);
    }

    /// A round's report is written: accuracy, duration, outcome and what collection only
    /// counted (late, re-sent, refused for capacity, lost).
    pub fn round_finished(&self, r: &RoundReport) {
        let outcome = OUTCOMES
            .iter()
            .find(|o| r.outcome.starts_with(**o))
            .copied()
            .unwrap_or("skipped");
        for (o, c) in &self.outcomes {
            if *o == outcome {
                c.increment(1);
            }
        }
        if outcome == "rolled_back" {
            self.rollbacks.increment(1);
        }
        self.late.increment(r.late.iter().map(|l| l.count).sum());
        self.resent.increment(r.resent);
        self.refused_busy.increment(r.reassembly.refused_busy);
        self.lost.increment(r.lost.len() as u64);
        self.student_accuracy
            .set(r.student.test_accuracy.unwrap_or(f64::NAN));
        self.teacher_accuracy
            .set(r.teacher.test_accuracy.unwrap_or(f64::NAN));
        self.round_seconds.set(r.duration_ms as f64 / 1000.0);
        let p = &r.phase_ms;
        for (g, ms) in
            self.phase_seconds
                .iter()
                .zip([p.publish, p.collect, p.aggregate, p.evaluate])
        {
            g.set(ms as f64 / 1000.0);
        }
        self.last_round.set(r.round as f64);
        self.with_live(|l| {
            l.status.last_round = Some(ClosedRound {
                round: r.round,
                outcome: r.outcome.clone(),
                accepted: r.accepted,
                registered: r.registered,
                student_accuracy: r.student.test_accuracy,
                teacher_accuracy: r.teacher.test_accuracy,
                duration_ms: r.duration_ms,
            })
        });
        self.set_phase(phase::IDLE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coevo_telemetry::parse;

    #[test]
    fn round_counts_reach_metrics_and_status() {
        let m = CoordinatorMetrics::new("city", 5, 1000);
        let mut registry = FleetRegistry::default();
        for id in ["a", "b", "c"] {
            let entry = crate::registry::ClientEntry {
                public_key: String::new(),
            };
            registry.clients.insert(id.to_string(), entry);
        }
        m.client_status("a", true);
        // Went online while registered, then was removed from the registry.
        m.client_status("gone", true);
        m.round_started(2, &registry, 2);
        m.set_phase(phase::COLLECT);
        m.published(100, 3, 60_000);
        m.client_status("b", true);
        m.upload("a");
        m.accepted("a", 40);
        m.upload("b");
        m.rejected("bad-signature");
        m.rejected("length-mismatch");
        m.rejected("bad-signature");
        let s = parse(&m.render()).unwrap();
        assert_eq!(s.value("coevo_round", &[]), Some(2.0));
        assert_eq!(
            s.value("coevo_round_phase", &[("phase", "collect")]),
            Some(1.0)
        );
        assert_eq!(s.sum("coevo_round_phase"), 1.0);
        assert_eq!(s.value("coevo_clients_connected", &[]), Some(2.0));
        assert_eq!(s.value("coevo_clients_uploaded", &[]), Some(2.0));
        assert_eq!(s.value("coevo_deltas_accepted_total", &[]), Some(1.0));
        assert_eq!(
            s.value(
                "coevo_deltas_rejected_total",
                &[("reason", "bad-signature")]
            ),
            Some(2.0)
        );
        assert_eq!(s.sum("coevo_deltas_rejected_total"), 3.0);
        assert_eq!(s.value("coevo_delta_bytes_accepted_total", &[]), Some(40.0));
        assert_eq!(s.value("coevo_model_bytes_sent_total", &[]), Some(300.0));
        assert_eq!(
            s.value("coevo_round_deadline_timestamp_seconds", &[]),
            Some(60.0)
        );
        let st = m.snapshot();
        assert_eq!(
            (
                st.round,
                st.connected,
                st.uploaded,
                st.accepted,
                st.rejected
            ),
            (2, 2, 2, 1, 3)
        );
        assert_eq!(st.deadline_unix_ms, Some(60_000));
        assert_eq!(st.phase, "collect");
        // The next stage clears the deadline.
        m.set_phase(phase::AGGREGATE);
        assert_eq!(m.snapshot().deadline_unix_ms, None);
        m.set_state(state::FINISHED, None);
        assert_eq!(m.snapshot().phase, "idle");
    }
}
