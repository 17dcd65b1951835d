//! `coevo report DIR`: round reports as a table.

use coevo_ops::RoundReport;
use std::fmt::Write;

/// An accuracy for tables and progress lines: 4 decimals, `-` when there is none.
pub fn acc(a: Option<f64>) -> String {
    a.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
}

/// A byte count for tables: bytes below 10 KiB, then KiB, then MiB (one decimal).
pub fn bytes(b: u64) -> String {
    match b {
        b if b >= 10 * 1024 * 1024 => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
        b if b >= 10 * 1024 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// Renders the reports, one line a round, then the rejections with their reasons.
pub fn render(reports: &[RoundReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>5}  {:<9}  {:>8}  {:>8}  {:>8}  {:>8}  {:>11}  {:>11}  {:<16}  {:>9}",
        "round",
        "outcome",
        "accepted",
        "rejected",
        "student",
        "teacher",
        "bytes down",
        "bytes up",
        "codecs down/up",
        "time"
    );
    for r in reports {
        let _ = writeln!(
            s,
            "{:>5}  {:<9}  {:>8}  {:>8}  {:>8}  {:>8}  {:>11}  {:>11}  {:<16}  {:>8.1}s",
            r.round,
            r.outcome,
            format!("{}/{}", r.accepted, r.registered),
            r.rejected.len(),
            acc(r.student.test_accuracy),
            acc(r.teacher.test_accuracy),
            bytes(r.bytes_down),
            bytes(r.bytes_up),
            format!("{}/{}", r.downlink_codec, r.uplink_codec),
            r.duration_ms as f64 / 1000.0
        );
    }
    let rejected: Vec<_> = reports
        .iter()
        .flat_map(|r| r.rejected.iter().map(move |x| (r.round, x)))
        .collect();
    if !rejected.is_empty() {
        let _ = writeln!(s, "\nrejected deltas:");
        for (round, x) in rejected {
            let _ = writeln!(s, "  round {round:>4}  {:<16}  {}", x.client, x.reason);
        }
    }
    s
}

/// The alerts of a history, one line each (nothing when there are none).
pub fn render_alerts(alerts: &[coevo_ops::alerts::Alert]) -> String {
    let mut s = String::new();
    if !alerts.is_empty() {
        let _ = writeln!(s, "\nalerts ({}):", alerts.len());
        for a in alerts {
            let _ = writeln!(
                s,
                "  round {:>4}  {:<21}  {}",
                a.round,
                a.kind.tag(),
                a.message
            );
        }
    }
    s
}
