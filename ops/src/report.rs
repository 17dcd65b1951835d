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
    pub coevolution: Option<CoevolutionReport>,
    pub clients: Vec<ClientReport>,
    /// The guard's check of the merged model before it was published: scores before/after,
    /// verdict, offenders (`null` when nothing was merged or the guard is off).
    #[serde(default)]
    pub guard: Option<GuardReport>,
    /// Accepted deltas whose norm is a robust outlier in this round, rolled back or not.
    #[serde(default)]
    pub flagged: Vec<Flagged>,
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
    pub labels: Vec<LabelQuality>,
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
pub fn load_reports(dir: &std::path::Path) -> Result<Vec<RoundReport>, crate::OpsError> {
    let reports_dir = if dir.join("reports").is_dir() {
        dir.join("reports")
    } else {
        dir.to_path_buf()
    };
    let entries = std::fs::read_dir(&reports_dir)
        .map_err(|e| crate::OpsError::Io(format!("{}: {e}", reports_dir.display())))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("round-") && name.ends_with(".json")) {
            continue;
        }
        let bytes =
            std::fs::read(&p).map_err(|e| crate::OpsError::Io(format!("{}: {e}", p.display())))?;
        let r: RoundReport = serde_json::from_slice(&bytes)
            .map_err(|e| crate::OpsError::Io(format!("{}: {e}", p.display())))?;
        out.push(r);
    }
    out.sort_by_key(|r| r.round);
    Ok(out)
}

// The round report's parts written by the coordinator's teacher loop, guard and label
// assessment (`coevo_coordinator::{coevolve, guard, labels}` and `coevo_models::distill`
// re-export them): here so that reading a report needs no libtorch.

/// Outcome of a guarded update, for the round report.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum GuardOutcome {
    /// The new weights were kept.
    Accepted {
        /// Validation accuracy before the update.
        before: f64,
        /// Validation accuracy after it.
        after: f64,
        /// The yardstick: the best validation accuracy the model has had so far (= `before`
        /// for a guard without memory).
        #[serde(default)]
        best: f64,
        /// Why it was kept (the comparison made).
        #[serde(default)]
        reason: String,
    },
    /// The previous weights were restored.
    RolledBack {
        /// Validation accuracy before the update.
        before: f64,
        /// Validation accuracy of the rejected weights (NaN if the update itself failed).
        after: f64,
        /// The yardstick (see [`GuardOutcome::Accepted`]).
        #[serde(default)]
        best: f64,
        /// Why: the drop and the allowed ε, or the update's error.
        reason: String,
    },
}

impl GuardOutcome {
    /// True for [`GuardOutcome::Accepted`].
    pub fn accepted(&self) -> bool {
        matches!(self, GuardOutcome::Accepted { .. })
    }

    /// `after − before` (NaN when the update failed).
    pub fn delta(&self) -> f64 {
        match self {
            GuardOutcome::Accepted { before, after, .. }
            | GuardOutcome::RolledBack { before, after, .. } => after - before,
        }
    }

    /// Validation accuracy of the model in place after the decision.
    pub fn kept(&self) -> f64 {
        match self {
            GuardOutcome::Accepted { after, .. } => *after,
            GuardOutcome::RolledBack { before, .. } => *before,
        }
    }

    /// Why the step was kept or rolled back.
    pub fn reason(&self) -> &str {
        match self {
            GuardOutcome::Accepted { reason, .. } | GuardOutcome::RolledBack { reason, .. } => {
                reason
            }
        }
    }
}

/// What the teacher loop did in a round, for the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoevolutionReport {
    pub distillation: Option<GuardOutcome>,
    pub fusion: Option<GuardOutcome>,
    /// The fusion ensemble's members and their weights (issue #18): validation accuracy
    /// (agreement with the server's held-out cameras) × label factor.
    #[serde(default)]
    pub fusion_members: Vec<FusionMember>,
}

/// One member of a round's fusion ensemble.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusionMember {
    /// `merged` for the round's merged student, else the client whose student it is.
    pub member: String,
    /// Its accuracy on the server's held-out validation cameras.
    pub validation_accuracy: f64,
    /// `1 − estimated label noise` of the client (1 for the merged student, or without an
    /// estimate).
    pub label_factor: f64,
    /// Its share of the ensemble (weights sum to 1; 0 = left out).
    pub weight: f64,
}

/// A model's score on the guard's data.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub accuracy: f64,
    /// Mean cross-entropy; `null` in JSON when it was not finite (a diverged model).
    #[serde(with = "finite_or_null")]
    pub loss: f64,
}

/// A delta whose norm is far outside the round's distribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flagged {
    pub client: String,
    /// L2 norm of the client's delta.
    pub norm: f64,
    /// Robust z-score: 0.6745 · (norm − median) / MAD (MAD floored, see `coevo_coordinator::guard::flag_outliers`).
    pub z: f64,
}

/// One leave-one-out re-aggregation: the merged model without `client`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaveOneOut {
    pub client: String,
    /// `None` when the rule could not aggregate without this client (e.g. Multi-Krum's 2f+3).
    pub score: Option<Score>,
    /// Whether leaving this client out brings the model back within tolerance.
    pub fixes: bool,
}

/// A client the guard holds responsible for a rolled-back round, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offender {
    pub client: String,
    /// `norm-outlier z=…` and/or `leave-one-out: accuracy a→b`.
    pub evidence: Vec<String>,
}

/// What the guard did in a round (report field `guard`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuardReport {
    /// `server-validation` (the server's held-out set), `test` (the coordinator's evaluation
    /// split, when it has no server data), or `none` (no data at all: nothing was checked).
    pub data: String,
    /// Samples the scores are computed on.
    pub samples: usize,
    /// The round's base model (what the fleet trained from).
    pub before: Option<Score>,
    /// The merged model.
    pub after: Option<Score>,
    /// `passed`, `rolled_back` or `unchecked`.
    pub verdict: String,
    /// Why the round was rolled back (before/after numbers against the tolerance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Named on a rollback: norm outliers and clients whose removal fixes the model.
    #[serde(default)]
    pub offenders: Vec<Offender>,
    #[serde(default)]
    pub leave_one_out: Vec<LeaveOneOut>,
    /// Wall time of the guard's evaluations and re-aggregations, ms.
    pub ms: u64,
}

/// Serialises a non-finite f64 as `null` (JSON has no NaN/∞) and reads `null` back as NaN.
mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// The coordinator's judgement of one camera's labels in a round (report field `labels`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelQuality {
    pub client: String,
    /// What the camera estimated (its signed header).
    pub estimated_noise: Option<f64>,
    /// 95 % Wilson lower bound of the estimate over the frames it was judged on (the point
    /// estimate when the camera did not say how many).
    #[serde(default)]
    pub noise_lower_bound: Option<f64>,
    /// Multiplier of its FedAvg weight and of its fusion weight (0 when excluded).
    pub weight: f64,
    /// Left out of the merge and of fusion.
    pub excluded: bool,
    /// Stable code (`label-noise`, `down-weighted`) and the numbers.
    pub reason: String,
}
