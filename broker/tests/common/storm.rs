//! A connect storm: N clients, each a real `coevo_mqtt::Session` (the edge's and
//! coordinator's client code), started at once against one broker. Shared by
//! `broker/tests/storm.rs` (2,000 clients, in the suite) and `broker/examples/storm.rs`
//! (any N, broker in its own process, for BENCHMARKS.md).

use std::time::{Duration, Instant};

use coevo_mqtt::{Incoming, Session, Settings};

/// What the storm saw from the clients' side.
#[derive(Default)]
pub struct StormResult {
    pub clients: usize,
    /// Clients that got a CONNACK (Success) within the deadline.
    pub connected: usize,
    /// Clients whose first attempt failed (refused, busy, timed out, dropped): each of these
    /// needed more than one CONNECT.
    pub retried: usize,
    /// Failed attempts in all.
    pub failed_attempts: usize,
    /// Why attempts failed (reason → count), for the report.
    pub reasons: std::collections::BTreeMap<String, usize>,
    /// From the first session start to the last CONNACK.
    pub all_connected: Duration,
    /// Median and 99th percentile time to CONNACK.
    pub p50: Duration,
    pub p99: Duration,
    /// Sessions, kept open so the broker holds N connections while it is measured.
    pub sessions: Vec<Session>,
}

/// Starts `clients` sessions at once (id, password) and waits up to `deadline` for all of
/// them to be connected.
pub async fn storm(
    host: &str,
    port: u16,
    clients: &[(String, String)],
    deadline: Duration,
) -> StormResult {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (id, pw) in clients {
        let mut s = Settings::new(host, port, id);
        s.password = Some(pw.clone());
        tasks.spawn(async move {
            let mut session = Session::start(&s, Vec::new());
            let mut failed = Vec::new();
            let outcome = tokio::time::timeout(deadline, async {
                loop {
                    match session.recv().await {
                        Some(Incoming::Connected { .. }) => return Some(start.elapsed()),
                        Some(Incoming::Disconnected(reason)) => failed.push(reason),
                        Some(Incoming::AuthRefused { error, .. }) => failed.push(error.to_string()),
                        Some(Incoming::Publish(_) | Incoming::Shed(_)) => {}
                        None => return None,
                    }
                }
            })
            .await
            .ok()
            .flatten();
            (session, outcome, failed)
        });
    }
    let mut result = StormResult {
        clients: clients.len(),
        ..StormResult::default()
    };
    let mut times = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let Ok((session, outcome, failed)) = joined else {
            continue;
        };
        result.failed_attempts += failed.len();
        if !failed.is_empty() {
            result.retried += 1;
        }
        for reason in failed {
            // "retrying in 1.2s" differs per client: count by the reason alone.
            let reason = reason.split("; retrying").next().unwrap_or("").to_owned();
            *result.reasons.entry(reason).or_default() += 1;
        }
        if let Some(t) = outcome {
            result.connected += 1;
            times.push(t);
        }
        result.sessions.push(session);
    }
    times.sort();
    let at = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    result.all_connected = times.last().copied().unwrap_or_default();
    result.p50 = at(0.5);
    result.p99 = at(0.99);
    result
}
