//! Round reports: what analysts read. Field names are a stable interface (scripts parse them).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Rejection {
    pub client: String,
    /// Stable code (`bad-signature`, `wrong-round`, …) followed by detail.
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelReport {
    /// `null` when there is no such model (e.g. no teacher in `fedavg` mode).
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    pub per_class_accuracy: Vec<f64>,
    pub params: Option<usize>,
}

impl ModelReport {
    pub fn absent() -> Self {
        ModelReport {
            test_accuracy: None,
            test_loss: None,
            per_class_accuracy: Vec::new(),
            params: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClientReport {
    pub client: String,
    pub samples: u64,
    pub local_loss: f64,
    pub local_accuracy: f64,
    pub train_ms: u64,
    /// Delta payload bytes this client sent (as encoded with the round's uplink codec).
    pub bytes_up: u64,
    /// Model payload bytes this client was sent (the round's encoded student).
    #[serde(default)]
    pub bytes_down: u64,
    pub delta_norm: f64,
    /// The delta's share of the merge under a trust-weighting rule (fltrust: its cosine trust
    /// over the round's total, 0 when excluded); absent for rules without trust scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_weight: Option<f64>,
    /// What the camera did with its labels (issue #18): labelled, unlabelled, pseudo-labelled,
    /// relabelled, discarded, agreement, estimated noise; `null` when every frame had a label
    /// and no selection ran.
    #[serde(default)]
    pub labels: Option<coevo_protocol::LabelCounts>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoundReport {
    pub round: u64,
    pub fleet: String,
    pub mode: String,
    pub strategy: String,
    /// `completed`; `skipped` when quorum was not met; `skipped: …` when the aggregation rule
    /// refused the updates (e.g. too few for Multi-Krum); `rolled_back` when the guard found
    /// the merged model collapsed and kept the last good one (`guard.reason` says why).
    pub outcome: String,
    pub accepted: usize,
    pub quorum: u32,
    pub registered: usize,
    /// Rejected messages, one entry per (client, reason), with how many there were.
    pub rejected: Vec<RejectionCount>,
    /// Deadline extensions used (below-quorum policy).
    pub extensions: u32,
    pub model_digest: String,
    pub uplink_codec: String,
    pub downlink_codec: String,
    /// Model payload bytes for the whole fleet: the encoded student × registered clients (each
    /// fetches the retained model once; MQTT framing not counted).
    pub bytes_down: u64,
    /// Accepted delta payload bytes, summed over clients.
    pub bytes_up: u64,
    pub duration_ms: u64,
    pub phase_ms: PhaseTimings,
    /// Accepted deltas the aggregation rule left out (e.g. Multi-Krum), with why.
    #[serde(default)]
    pub excluded: Vec<Rejection>,
    /// Clients whose delta the rule scaled down (norm clipping).
    #[serde(default)]
    pub clipped: Vec<String>,
    pub student: ModelReport,
    pub teacher: ModelReport,
    /// Distillation and fusion outcomes (coevolve mode only).
    #[serde(default)]
    pub coevolution: Option<crate::coevolve::CoevolutionReport>,
    pub clients: Vec<ClientReport>,
    /// The guard's check of the merged model before it was published: scores before/after,
    /// verdict, offenders (`null` when nothing was merged or the guard is off).
    #[serde(default)]
    pub guard: Option<crate::guard::GuardReport>,
    /// Accepted deltas whose norm is a robust outlier in this round, rolled back or not.
    #[serde(default)]
    pub flagged: Vec<crate::guard::Flagged>,
    /// Messages for a round that had already closed (an honest retry after a restart, or a
    /// replay), per client: counted, not blamed.
    #[serde(default)]
    pub late: Vec<RejectionCount>,
    /// Re-sent copies of already accepted deltas, answered with the receipt again.
    #[serde(default)]
    pub resent: u64,
    /// Acknowledged deltas of this round whose stored copy was missing or corrupt at a restart.
    #[serde(default)]
    pub lost: Vec<LostDelta>,
    /// Memory the round's upload reassembly held at its peak.
    #[serde(default)]
    pub reassembly: ReassemblyReport,
    /// How collection verified and committed deltas: worker pool, group commits, fsyncs.
    #[serde(default)]
    pub collect: CollectReport,
    /// Alerts raised for this round (rollback, collapse, skip, a client rejected round after
    /// round, teacher below student), also logged at ERROR; see [`crate::alerts`].
    #[serde(default)]
    pub alerts: Vec<crate::alerts::Alert>,
    /// Cameras judged by their estimated label noise (issue #18): down-weighted, or left out of
    /// the merge and the teacher's fusion above `max_client_noise`, with why.
    #[serde(default)]
    pub labels: Vec<crate::labels::LabelQuality>,
}

/// The collect pipeline's work in a round (verification on a worker pool, group commit): lets
/// a fleet bench print deltas/s and how well fsyncs were batched.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CollectReport {
    /// Verification workers (the machine's cores).
    pub workers: usize,
    /// Complete uploads verified (accepted or rejected) on the workers.
    pub verified: u64,
    /// Worker time spent verifying, decoding and writing deltas, summed over workers (ms).
    pub verify_ms: u64,
    /// Group commits: each made a batch of delta files and journal lines durable at once.
    pub commits: u64,
    /// Deltas in the largest group commit.
    pub max_batch: u64,
    /// fsync calls made for accepted deltas: one per delta file, plus one directory and one
    /// journal fsync per group commit.
    pub fsyncs: u64,
    /// Wall time spent in group commits (directory + journal fsyncs), ms.
    pub commit_ms: u64,
    /// Most complete uploads waiting for or in verification at once (bounded by
    /// `transfer.max_verifying`).
    #[serde(default)]
    pub max_verifying: u64,
    /// Publishes the coordinator's MQTT session dropped unread during the round because it
    /// held `transfer.incoming_bytes` (their clients re-send; not blamed, not rejected).
    #[serde(default)]
    pub shed: u64,
}

/// How many messages one client had rejected for one reason in a round.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RejectionCount {
    pub client: String,
    /// Stable code (`bad-signature`, `wrong-round`, …) and the detail of the first occurrence.
    pub reason: String,
    pub count: u64,
    /// True when the rejected message carried `client`'s valid signature, so it is proven to
    /// be theirs. False when it failed before any signature check: then only the broker's topic
    /// ACLs vouch for the sender, and on a broker without them anyone could have sent it.
    pub signed: bool,
}

/// An acknowledged delta that a restarted coordinator could not read back.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LostDelta {
    pub client: String,
    pub round: u64,
    /// Payload digest the client's receipt named.
    pub digest: String,
    /// `missing: …` or `corrupt: …`.
    pub reason: String,
}

/// Peak memory of delta reassembly in a round, so tests and operators can check it stays
/// bounded however clients behave.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReassemblyReport {
    /// Payload bytes held over all incomplete uploads.
    pub peak_bytes: u64,
    /// Incomplete uploads in flight.
    pub peak_transfers: u64,
    /// Payload bytes held for the single largest client.
    pub peak_client_bytes: u64,
    /// Chunks refused for lack of shared capacity (not blamed on their sender; it re-sends).
    pub refused_busy: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseTimings {
    pub publish: u64,
    pub collect: u64,
    pub aggregate: u64,
    pub evaluate: u64,
}

/// Reads every `round-NNNN.json` under `dir/reports` (or `dir` itself), sorted by round.
pub fn load_reports(dir: &std::path::Path) -> Result<Vec<RoundReport>, crate::CoordinatorError> {
    let reports_dir = if dir.join("reports").is_dir() {
        dir.join("reports")
    } else {
        dir.to_path_buf()
    };
    let entries = std::fs::read_dir(&reports_dir)
        .map_err(|e| crate::CoordinatorError::Io(format!("{}: {e}", reports_dir.display())))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("round-") && name.ends_with(".json")) {
            continue;
        }
        let bytes = std::fs::read(&p)
            .map_err(|e| crate::CoordinatorError::Io(format!("{}: {e}", p.display())))?;
        let r: RoundReport = serde_json::from_slice(&bytes)
            .map_err(|e| crate::CoordinatorError::Io(format!("{}: {e}", p.display())))?;
        out.push(r);
    }
    out.sort_by_key(|r| r.round);
    Ok(out)
}
