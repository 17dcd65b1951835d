//! Per-client rows of round reports (`coevo report DIR --csv`, and the HTML report's client
//! tables): one row per client per round and status, so a spreadsheet or
//! `pandas.read_csv` sees every client the report names, not only the accepted ones.

use crate::report::RoundReport;
use serde::Serialize;
use std::collections::BTreeMap;

/// What happened to a client's contribution in a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted, verified and merged as sent.
    Accepted,
    /// Accepted and merged, scaled down by norm clipping.
    Clipped,
    /// Accepted, then left out by the aggregation rule (Multi-Krum, fltrust, …).
    Excluded,
    /// Messages refused at verification (signature, round, digest, …).
    Rejected,
    /// Messages for a round already closed: counted, not blamed.
    Late,
    /// Acknowledged, but its stored copy was missing or corrupt at a restart.
    Lost,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Clipped => "clipped",
            Status::Excluded => "excluded",
            Status::Rejected => "rejected",
            Status::Late => "late",
            Status::Lost => "lost",
        }
    }

    /// True for the statuses an analyst should look at first.
    pub fn is_trouble(self) -> bool {
        matches!(self, Status::Excluded | Status::Rejected | Status::Lost)
    }
}

/// One CSV row. Numeric fields are empty for rows without an accepted delta (rejected, late,
/// lost); `messages`/`signed` are set only for rejected and late rows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientRow {
    pub round: u64,
    pub client: String,
    pub status: Status,
    /// Exclusion or rejection reason (stable code first), `norm outlier z=…` for a flagged
    /// delta; empty for a plain accepted one.
    pub reason: String,
    pub samples: Option<u64>,
    pub local_loss: Option<f64>,
    pub local_accuracy: Option<f64>,
    pub train_ms: Option<u64>,
    pub bytes_up: Option<u64>,
    pub bytes_down: Option<u64>,
    pub delta_norm: Option<f64>,
    /// The aggregation weight the rule gave the delta, when the report has one.
    pub trust_weight: Option<f64>,
    /// Rejected/late messages counted in this row.
    pub messages: Option<u64>,
    /// Whether the rejected message carried the client's valid signature.
    pub signed: Option<bool>,
}

/// Every client row of one round: accepted clients first (in report order), then rejected,
/// late and lost entries.
pub fn client_rows(r: &RoundReport) -> Vec<ClientRow> {
    let excluded: BTreeMap<&str, &str> = r
        .excluded
        .iter()
        .map(|x| (x.client.as_str(), x.reason.as_str()))
        .collect();
    let clipped: std::collections::BTreeSet<&str> = r.clipped.iter().map(|c| c.as_str()).collect();
    let flagged: BTreeMap<&str, f64> = r.flagged.iter().map(|f| (f.client.as_str(), f.z)).collect();
    let empty = |client: &str, status: Status, reason: String| ClientRow {
        round: r.round,
        client: client.to_string(),
        status,
        reason,
        samples: None,
        local_loss: None,
        local_accuracy: None,
        train_ms: None,
        bytes_up: None,
        bytes_down: None,
        delta_norm: None,
        trust_weight: None,
        messages: None,
        signed: None,
    };
    let mut rows = Vec::with_capacity(r.clients.len() + r.rejected.len());
    for c in &r.clients {
        let name = c.client.as_str();
        let (status, mut reason) = match excluded.get(name) {
            Some(why) => (Status::Excluded, (*why).to_string()),
            None if clipped.contains(name) => (Status::Clipped, String::new()),
            None => (Status::Accepted, String::new()),
        };
        if let Some(z) = flagged.get(name) {
            if !reason.is_empty() {
                reason.push_str("; ");
            }
            reason.push_str(&format!("norm outlier z={z:.1}"));
        }
        rows.push(ClientRow {
            samples: Some(c.samples),
            local_loss: Some(c.local_loss),
            local_accuracy: Some(c.local_accuracy),
            train_ms: Some(c.train_ms),
            bytes_up: Some(c.bytes_up),
            bytes_down: Some(c.bytes_down),
            delta_norm: Some(c.delta_norm),
            trust_weight: c.trust_weight,
            ..empty(name, status, reason)
        });
    }
    for (status, list) in [(Status::Rejected, &r.rejected), (Status::Late, &r.late)] {
        for x in list {
            rows.push(ClientRow {
                messages: Some(x.count),
                signed: Some(x.signed),
                ..empty(&x.client, status, x.reason.clone())
            });
        }
    }
    for l in &r.lost {
        rows.push(empty(&l.client, Status::Lost, l.reason.clone()));
    }
    rows
}

/// Writes the rows of every report (in the order given) as CSV with a header line.
pub fn write_csv<W: std::io::Write>(reports: &[RoundReport], w: W) -> Result<u64, csv::Error> {
    let mut out = csv::Writer::from_writer(w);
    let mut n = 0u64;
    let mut wrote_header = false;
    for r in reports {
        for row in client_rows(r) {
            out.serialize(&row)?;
            wrote_header = true;
            n += 1;
        }
    }
    if !wrote_header {
        // serde writes the header with the first row; an empty history still gets one, so
        // pandas reads an empty frame with the right columns instead of failing.
        out.write_record(CSV_COLUMNS)?;
    }
    out.flush()?;
    Ok(n)
}

/// The CSV header, in column order (the [`ClientRow`] fields).
pub const CSV_COLUMNS: [&str; 14] = [
    "round",
    "client",
    "status",
    "reason",
    "samples",
    "local_loss",
    "local_accuracy",
    "train_ms",
    "bytes_up",
    "bytes_down",
    "delta_norm",
    "trust_weight",
    "messages",
    "signed",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ClientReport, LostDelta, Rejection, RejectionCount};

    fn client(name: &str, norm: f64) -> ClientReport {
        ClientReport {
            client: name.into(),
            samples: 100,
            local_loss: 0.5,
            local_accuracy: 0.75,
            train_ms: 1200,
            bytes_up: 4000,
            bytes_down: 9000,
            delta_norm: norm,
            trust_weight: None,
            labels: None,
        }
    }

    fn report() -> RoundReport {
        let mut r = crate::alerts::tests::round(7, 0.6);
        r.clients = vec![
            client("cam-a", 1.0),
            client("cam-b, \"quoted\"", 2.0),
            client("cam-c", 9.0),
        ];
        r.clients[0].trust_weight = Some(0.25);
        r.clipped = vec!["cam-c".into()];
        r.excluded = vec![Rejection {
            client: "cam-b, \"quoted\"".into(),
            reason: "untrusted".into(),
        }];
        r.flagged = vec![crate::report::Flagged {
            client: "cam-c".into(),
            norm: 9.0,
            z: 6.25,
        }];
        r.rejected = vec![RejectionCount {
            client: "cam-d".into(),
            reason: "bad-signature: header".into(),
            count: 3,
            signed: false,
        }];
        r.late = vec![RejectionCount {
            client: "cam-e".into(),
            reason: "wrong-round: 6".into(),
            count: 1,
            signed: true,
        }];
        r.lost = vec![LostDelta {
            client: "cam-f".into(),
            round: 7,
            digest: "00".into(),
            reason: "missing: file".into(),
        }];
        r
    }

    #[test]
    fn every_client_the_report_names_gets_a_row_with_its_status() {
        let rows = client_rows(&report());
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.client.as_str(), r.status, r.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("cam-a", Status::Accepted, ""),
                ("cam-b, \"quoted\"", Status::Excluded, "untrusted"),
                ("cam-c", Status::Clipped, "norm outlier z=6.2"),
                ("cam-d", Status::Rejected, "bad-signature: header"),
                ("cam-e", Status::Late, "wrong-round: 6"),
                ("cam-f", Status::Lost, "missing: file"),
            ]
        );
        assert_eq!(rows[0].trust_weight, Some(0.25));
        assert_eq!((rows[3].messages, rows[3].signed), (Some(3), Some(false)));
        assert_eq!(rows[3].samples, None);
    }

    #[test]
    fn csv_reads_back_with_the_csv_crate() {
        let mut r2 = crate::alerts::tests::round(8, 0.6);
        r2.clients = vec![client("cam-a", 1.5)];
        let mut buf = Vec::new();
        let n = write_csv(&[report(), r2], &mut buf).unwrap();
        assert_eq!(n, 7);
        let mut rd = csv::Reader::from_reader(buf.as_slice());
        let header: Vec<String> = rd.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(header, CSV_COLUMNS);
        let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), 7);
        // The quoted, comma-holding client id survives as one field.
        assert_eq!(&rows[1][1], "cam-b, \"quoted\"");
        assert_eq!(&rows[1][2], "excluded");
        assert_eq!(&rows[0][11], "0.25");
        // Rejected rows leave numeric fields empty (NaN in pandas), not 0.
        assert_eq!(&rows[3][4], "");
        assert_eq!(&rows[3][12], "3");
        assert_eq!(&rows[3][13], "false");
        assert_eq!(
            (&rows[6][0], &rows[6][1], &rows[6][10]),
            ("8", "cam-a", "1.5")
        );
    }

    #[test]
    fn an_empty_history_still_has_the_header() {
        let mut buf = Vec::new();
        assert_eq!(write_csv(&[], &mut buf).unwrap(), 0);
        assert_eq!(
            String::from_utf8(buf).unwrap().trim_end(),
            CSV_COLUMNS.join(",")
        );
    }
}
