//! The edge agent's round loop.

use crate::attack::{stale_replay, Attack, WireUpload};
use crate::module_fetch::{Lookup, ModuleCache};
use crate::state::{check_fresh, now_unix_ms, IgnoreReason, Ignored, LastRound, Stale};
use crate::EdgeError;
use coevo_models::local::TrainData;
use coevo_models::train::TrainConfig;
use coevo_models::{Arch, DataShape, ScriptModule, Student, Weights};
use coevo_mqtt::{ClientTls, Incoming, Session, Settings};
use coevo_protocol::chunk::{chunk_count, split, Reassembler};
use coevo_protocol::codec::Limits;
use coevo_protocol::envelope::{self, Kind};
use coevo_protocol::{
    digest, DeltaChunk, DeltaHeader, Digest, ErrorFeedback, LocalMetrics, ModelChunk, PublicKey,
    Receipt, ReceiptOutcome, RoundManifest, Signed, SigningKey, Status, StatusState, Topic,
};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Largest manifest or receipt we decode.
const MAX_CONTROL_BYTES: usize = 64 * 1024;
/// Model chunks requested at a time (below every broker's in-flight window).
const FETCH_WINDOW: usize = 32;
/// How long to wait for a window of chunks before asking again for the missing ones.
const FETCH_WINDOW_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest model we accept, whatever a manifest claims.
const MAX_MODEL_BYTES: u64 = 512 * 1024 * 1024;
/// First wait before asking again for a model chunk that arrived malformed or for a model
/// that failed its digest check; doubles up to [`FETCH_RETRY_MAX`]. Retained garbage is handed
/// to every new subscription, so asking again at once would only spin.
const FETCH_RETRY_MIN: Duration = Duration::from_secs(1);
const FETCH_RETRY_MAX: Duration = Duration::from_secs(30);

/// How an agent connects and whom it trusts.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub fleet: String,
    pub client_id: String,
    pub broker_host: String,
    pub broker_port: u16,
    /// Every node of a clustered broker (with `broker_host:broker_port`); the agent starts on
    /// one picked by its id and fails over to the others. Empty: the one broker only.
    pub cluster: Vec<(String, u16)>,
    /// Subscribe at QoS 0 (`[broker] subscribe_qos = 0`; see coevo_mqtt's Settings).
    pub qos0_subscriptions: bool,
    /// Cap of the reconnect backoff (`[broker] max_reconnect_wait_s`).
    pub max_reconnect_wait: Duration,
    pub password: Option<String>,
    /// Fleet CA certificate (PEM): connect over TLS and trust only brokers it signed.
    /// `None`: plain TCP.
    pub ca_cert: Option<PathBuf>,
    /// Signer id of the coordinator, and its pinned public key.
    pub coordinator_id: String,
    pub coordinator_key: PublicKey,
    /// Stop after this many rounds (None: run until shut down).
    pub max_rounds: Option<u64>,
    /// Where the agent keeps what must survive a restart: the uplink's error-feedback residual
    /// (`residual.bin`, what compressed rounds computed but have not sent yet). `None`: in
    /// memory only, so a restart drops the residual.
    pub state_dir: Option<PathBuf>,
    pub seed: u64,
    /// First wait for a receipt before re-sending; doubles up to `max_retry_wait`.
    pub retry_wait: Duration,
    pub max_retry_wait: Duration,
    /// Byzantine behaviour for tests and benches (see [`crate::attack`]); `None`, the
    /// default, for every real device.
    pub attack: Option<Attack>,
    /// Shared by agents simulated in one process (demo, benches): at most this many train at
    /// once. Without it, 75 agents each start libtorch's thread pool on 2 cores and the
    /// oversubscription costs more than the parallelism gains. `None` on a real device.
    pub train_slots: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    /// How long past a round's signed deadline the edge still acts on it: clock skew between
    /// camera and coordinator. Past it a manifest is ignored, and a model that could not be
    /// fetched and verified, or a delta without a receipt, is given up.
    pub deadline_grace: Duration,
    /// Consecutive refusals of our credentials by the broker after which the agent stops with
    /// [`coevo_mqtt::MqttError::AuthRefused`] instead of retrying forever.
    pub max_auth_refusals: u32,
    /// Oldest error-feedback residual, in rounds, still added to a delta (at least 1: in
    /// steady state the residual is from the previous round). An edge back from being offline
    /// drops an older one; why drop and not rescale: [`crate::state::stale_residual_age`].
    pub max_residual_age_rounds: u64,
    /// libtorch intra-op threads for training (`[threads] train`); `None` leaves libtorch's
    /// setting alone (simulated fleets share one process and set it once).
    pub train_threads: Option<usize>,
    /// The student's TorchScript module installed with the device (`[model] student`), if
    /// any: used when a manifest names its digest, so the first round needs no download.
    /// Whatever module a manifest names is fetched when not held (issue #16).
    pub student_module: Option<ScriptModule>,
    /// Pseudo-label unlabelled frames and clean labels with the round's model before training
    /// (`[labels]` in `edge.toml`; issue #18, [`coevo_models::semi`]). `None`: plain training
    /// on the labelled frames only.
    pub labels: Option<coevo_models::semi::SemiConfig>,
}

impl AgentOptions {
    pub fn new(
        fleet: &str,
        client_id: &str,
        coordinator_id: &str,
        coordinator_key: PublicKey,
    ) -> Self {
        AgentOptions {
            fleet: fleet.into(),
            client_id: client_id.into(),
            broker_host: "127.0.0.1".into(),
            broker_port: 1883,
            cluster: Vec::new(),
            qos0_subscriptions: false,
            max_reconnect_wait: Duration::from_secs(5),
            password: None,
            ca_cert: None,
            coordinator_id: coordinator_id.into(),
            coordinator_key,
            max_rounds: None,
            state_dir: None,
            seed: 0,
            retry_wait: Duration::from_secs(10),
            max_retry_wait: Duration::from_secs(60),
            attack: None,
            train_slots: None,
            deadline_grace: Duration::from_secs(30),
            max_auth_refusals: 3,
            max_residual_age_rounds: crate::state::DEFAULT_MAX_RESIDUAL_AGE_ROUNDS,
            train_threads: None,
            student_module: None,
            labels: None,
        }
    }
}

/// What an agent did, for the demo and tests.
#[derive(Clone, Debug, Default)]
pub struct AgentSummary {
    /// Rounds whose delta was accepted.
    pub accepted_rounds: Vec<u64>,
    /// Rounds whose delta was rejected, with the coordinator's reason.
    pub rejected_rounds: Vec<(u64, String)>,
    /// Messages ignored for any reason (the sum of `ignored`).
    pub ignored_messages: u64,
    /// Messages ignored, by reason: unverifiable, stale or malformed manifests, chunks and
    /// receipts.
    pub ignored: BTreeMap<IgnoreReason, u64>,
    /// Rounds given up at their deadline (model not fetched and verified, or no receipt).
    pub given_up_rounds: Vec<u64>,
    /// L2 norm of the error-feedback residual read back from `state_dir` at the first
    /// compressed round (`None`: nothing on disk, or no `state_dir`).
    pub restored_residual_norm: Option<f64>,
    /// Error-feedback residuals dropped as too old (the edge missed rounds), oldest first.
    pub dropped_residuals: Vec<DroppedResidual>,
}

/// A residual left out of a round's delta because it was computed against an old model.
#[derive(Clone, Debug, PartialEq)]
pub struct DroppedResidual {
    /// The round whose delta it would have been added to.
    pub round: u64,
    /// The round it was computed in (`None`: unknown, e.g. saved by an older version).
    pub computed_in: Option<u64>,
    /// Its L2 norm: how much unsent update was discarded.
    pub norm: f64,
}

/// Typed view of what arrives on our subscriptions.
enum Event {
    Connected,
    /// A verified manifest that passes the freshness rule.
    Manifest(Box<RoundManifest>),
    /// A decoded model chunk and the index its topic names.
    ModelChunk {
        topic_index: u32,
        chunk: ModelChunk,
    },
    /// Something on a model chunk topic that does not decode.
    BadModelChunk {
        digest: Digest,
        index: u32,
    },
    Receipt(Receipt),
    Other,
}

enum Upload {
    Receipt(ReceiptOutcome),
    Newer(Box<RoundManifest>),
    /// No receipt by the round's deadline (plus grace).
    Expired,
}

/// What [`Agent::fetch_blob`] fetches: a digest-addressed byte string the signed manifest names.
pub(crate) struct Blob {
    pub digest: Digest,
    pub size: u64,
    pub chunks: u32,
    /// Counted when the assembled bytes do not match `digest`.
    pub mismatch: IgnoreReason,
}

pub(crate) enum Fetched {
    Model(Vec<u8>),
    Newer(Box<RoundManifest>),
    /// Not assembled and verified by the round's deadline (plus grace).
    GaveUp,
}

/// The tokio instant of a Unix-ms time (now, if it has passed).
fn instant_of(unix_ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(unix_ms.saturating_sub(now_unix_ms()))
}

pub struct Agent {
    opts: AgentOptions,
    /// Loaded from `opts.ca_cert` in [`Agent::new`], so a bad CA file fails there.
    tls: Option<ClientTls>,
    key: SigningKey,
    /// In a mutex because tch tensors are `Send` but not `Sync`, and the round futures borrow
    /// `self` across awaits.
    data: std::sync::Mutex<TrainData>,
    samples: usize,
    shape: DataShape,
    /// Parameters of the student for `shape` (every round's model must have this shape): the
    /// bound for reading the error-feedback residual back from disk.
    model_params: usize,
    summary: AgentSummary,
    /// Last round's upload, kept only under [`Attack::StaleReplay`].
    replay: Option<WireUpload>,
    /// The uplink's error-feedback residual; `None` until read from `state_dir` (lazily: its
    /// bound is the size of the first round's model).
    feedback: Option<ErrorFeedback>,
    /// The round whose delta produced `feedback` (`None`: unknown or no residual yet).
    feedback_round: Option<u64>,
    /// The last round completed, persisted in `state_dir`.
    last_round: LastRound,
    /// The round being worked on (for one log line per ignore reason per round).
    working_round: u64,
    ignored: Ignored,
    /// TorchScript student modules by digest (issue #16).
    modules: ModuleCache,
}

/// File name of the error-feedback residual in [`AgentOptions::state_dir`].
pub const RESIDUAL_FILE: &str = "residual.bin";

impl Agent {
    /// `data` is this device's local training data.
    pub fn new(
        opts: AgentOptions,
        key: SigningKey,
        data: impl Into<TrainData>,
    ) -> Result<Self, EdgeError> {
        let data: TrainData = data.into();
        coevo_protocol::topic::validate_id(&opts.client_id)
            .map_err(|e| EdgeError::Config(format!("client_id: {e}")))?;
        coevo_protocol::topic::validate_id(&opts.fleet)
            .map_err(|e| EdgeError::Config(format!("fleet: {e}")))?;
        if data.is_empty() {
            return Err(EdgeError::Config("the local dataset is empty".into()));
        }
        if opts.max_residual_age_rounds == 0 {
            return Err(EdgeError::Config(
                "max_residual_age_rounds must be at least 1 (1: only the previous round's residual is kept)".into(),
            ));
        }
        let tls = opts
            .ca_cert
            .as_deref()
            .map(ClientTls::from_ca_file)
            .transpose()?;
        let last_round = LastRound::load(opts.state_dir.as_deref())?;
        if last_round.get() > 0 {
            tracing::info!(client = %opts.client_id, round = last_round.get(), "last completed round read from state_dir; older manifests will be ignored");
        }
        let modules = ModuleCache::new(opts.state_dir.as_deref(), opts.student_module.clone());
        Ok(Agent {
            modules,
            opts,
            tls,
            key,
            samples: data.len(),
            shape: data.shape(),
            model_params: {
                let vs = tch::nn::VarStore::new(tch::Device::Cpu);
                let _net = Student::new(&vs.root(), &data.shape());
                Weights::from_var_store(&vs).num_params()
            },
            data: std::sync::Mutex::new(data),
            summary: AgentSummary::default(),
            replay: None,
            feedback: None,
            feedback_round: None,
            working_round: last_round.get(),
            last_round,
            ignored: Ignored::default(),
        })
    }

    /// Runs rounds until `max_rounds` or `shutdown`.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<AgentSummary, EdgeError> {
        let o = &self.opts;
        let status_topic = Topic::Status {
            client: o.client_id.clone(),
        }
        .path(&o.fleet);
        let mut settings = Settings::new(&o.broker_host, o.broker_port, &o.client_id);
        settings.spread_over(&o.cluster);
        settings.qos0_subscriptions = o.qos0_subscriptions;
        settings.max_backoff = o.max_reconnect_wait;
        settings.password = o.password.clone();
        settings.tls = self.tls.clone();
        settings.max_packet_bytes = 2 * 1024 * 1024;
        settings.last_will = Some((status_topic, self.status(StatusState::Offline, None)));
        let filters = vec![
            Topic::RoundCurrent.path(&o.fleet),
            Topic::Receipt {
                client: o.client_id.clone(),
            }
            .path(&o.fleet),
        ];
        let mut session = Session::start(&settings, filters);
        let result = tokio::select! {
            r = self.rounds(&mut session) => r,
            _ = shutdown => Ok(()),
        };
        // A broker that refuses us will take no last status either: waiting for its
        // acknowledgement would only delay the error by `close`'s timeout.
        let refused = matches!(
            result,
            Err(EdgeError::Mqtt(coevo_mqtt::MqttError::AuthRefused(_)))
        );
        if !refused {
            let status = self.status(
                StatusState::Offline,
                self.summary.accepted_rounds.last().copied(),
            );
            let _ = session.publish(self.status_topic(), status, true).await;
            session.close().await;
        }
        self.summary.ignored = self.ignored.counts().clone();
        self.summary.ignored_messages = self.ignored.total();
        result.map(|_| self.summary)
    }

    /// Counts an ignored message; logs it if it is the first for `reason` this round.
    fn ignore(&mut self, reason: IgnoreReason, detail: &dyn std::fmt::Display) {
        if self.ignored.record(reason, self.working_round) {
            tracing::warn!(client = %self.opts.client_id, round = self.working_round, %reason, %detail, "ignoring a message (further ones for this reason are counted, not logged, this round)");
        }
    }

    /// The freshness rule of [`crate::state`] for `m`, now.
    fn fresh(&self, m: &RoundManifest) -> Result<(), Stale> {
        check_fresh(
            m.round,
            m.deadline_unix_ms,
            now_unix_ms(),
            self.last_round.get(),
            self.opts.deadline_grace.as_millis() as u64,
        )
    }

    /// Records `round` as completed, in memory and in `state_dir`.
    fn complete(&mut self, round: u64) -> Result<(), EdgeError> {
        self.last_round.complete(round)
    }

    fn status_topic(&self) -> String {
        Topic::Status {
            client: self.opts.client_id.clone(),
        }
        .path(&self.opts.fleet)
    }

    fn status(&self, state: StatusState, last_round: Option<u64>) -> Vec<u8> {
        envelope::encode(
            Kind::Status,
            &Status {
                client: self.opts.client_id.clone(),
                state,
                last_round,
                error: None,
            },
        )
    }

    async fn rounds(&mut self, session: &mut Session) -> Result<(), EdgeError> {
        let mut pending: Option<Box<RoundManifest>> = None;
        let mut done = 0u64;
        loop {
            if self.opts.max_rounds.is_some_and(|m| done >= m) {
                return Ok(());
            }
            // A manifest held while we were busy may have gone stale meanwhile.
            let mut manifest = match pending.take() {
                Some(m) if self.fresh(&m).is_ok() => m,
                _ => self.next_manifest(session).await?,
            };
            let round = manifest.round;
            self.working_round = round;
            let base = match self.fetch_model(session, &mut manifest).await? {
                Fetched::Model(bytes) => bytes,
                Fetched::Newer(newer) => {
                    pending = Some(newer);
                    continue;
                }
                Fetched::GaveUp => {
                    tracing::warn!(client = %self.opts.client_id, round, "could not fetch and verify the round's model by its deadline; waiting for the next round");
                    self.summary.given_up_rounds.push(round);
                    continue;
                }
            };
            let arch = match self.student_arch(session, &mut manifest).await {
                Ok(Ok(arch)) => arch,
                Ok(Err(Fetched::Newer(newer))) => {
                    pending = Some(newer);
                    continue;
                }
                Ok(Err(_)) => {
                    tracing::warn!(client = %self.opts.client_id, round, "could not fetch and verify the round's TorchScript module by its deadline; waiting for the next round");
                    self.summary.given_up_rounds.push(round);
                    continue;
                }
                // Signed by the coordinator but unusable here (does not load, or does not
                // fit this camera's data): nothing to train this round.
                Err(EdgeError::Model(e)) => {
                    tracing::error!(client = %self.opts.client_id, round, error = %e, "cannot use this round's TorchScript module");
                    self.complete(round)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (delta, metrics) = match self.train_round(&manifest, &base, arch).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(client = %self.opts.client_id, round, error = %e, "cannot train on this round's model");
                    self.complete(round)?;
                    continue;
                }
            };
            match self.upload(session, &mut manifest, &delta, metrics).await? {
                Upload::Receipt(ReceiptOutcome::Accepted) => {
                    tracing::info!(client = %self.opts.client_id, round, "delta accepted");
                    self.summary.accepted_rounds.push(round);
                    let s = self.status(StatusState::Online, Some(round));
                    session.publish(self.status_topic(), s, true).await?;
                }
                Upload::Receipt(ReceiptOutcome::Rejected(reason)) => {
                    tracing::error!(client = %self.opts.client_id, round, reason = %reason, "delta rejected");
                    self.summary
                        .rejected_rounds
                        .push((round, reason.to_string()));
                }
                Upload::Newer(m) => {
                    tracing::warn!(client = %self.opts.client_id, round, "round closed before a receipt arrived");
                    pending = Some(m);
                }
                Upload::Expired => {
                    // Not recorded as completed: a coordinator that resumes this round after
                    // a restart re-issues its manifest with a new deadline, and we take part.
                    tracing::warn!(client = %self.opts.client_id, round, "no receipt by the round's deadline; waiting for the next round");
                    self.summary.given_up_rounds.push(round);
                    continue;
                }
            }
            self.complete(round)?;
            done += 1;
        }
    }

    /// Decodes and verifies one incoming message.
    fn classify(&mut self, ev: Incoming) -> Event {
        let p = match ev {
            Incoming::Connected { .. } => return Event::Connected,
            Incoming::Disconnected(e) => {
                tracing::debug!(client = %self.opts.client_id, error = %e, "disconnected; reconnecting");
                return Event::Other;
            }
            // Handled in `next_event`, which may end the agent.
            Incoming::AuthRefused { .. } => return Event::Other,
            // Only sessions with an incoming bound shed; the agent's has none.
            Incoming::Shed(_) => return Event::Other,
            Incoming::Publish(p) => p,
        };
        let topic = match Topic::parse(&self.opts.fleet, &p.topic) {
            Ok(t) => t,
            Err(_) => return Event::Other,
        };
        if p.payload.is_empty() {
            return Event::Other; // a cleared retained message
        }
        match topic {
            Topic::RoundCurrent => match self.verify_manifest(&p.payload) {
                Ok(m) => match self.fresh(&m) {
                    Ok(()) => Event::Manifest(Box::new(m)),
                    Err(stale) => {
                        let reason = match stale {
                            Stale::NotNewer { .. } => IgnoreReason::OldManifest,
                            Stale::Expired { .. } => IgnoreReason::ExpiredManifest,
                        };
                        self.ignore(reason, &stale);
                        Event::Other
                    }
                },
                Err(e) => {
                    self.ignore(IgnoreReason::UnverifiedManifest, &e);
                    Event::Other
                }
            },
            Topic::ModelChunk { digest, index } => {
                match envelope::decode::<ModelChunk>(&p.payload, Kind::ModelChunk, 4 * 1024 * 1024)
                {
                    Ok(chunk) => Event::ModelChunk {
                        topic_index: index,
                        chunk,
                    },
                    Err(e) => {
                        self.ignore(IgnoreReason::MalformedModelChunk, &e);
                        Event::BadModelChunk { digest, index }
                    }
                }
            }
            Topic::Receipt { .. } => {
                let r = envelope::decode::<Signed>(&p.payload, Kind::Receipt, MAX_CONTROL_BYTES)
                    .and_then(|s| {
                        s.verify_from::<Receipt>(
                            Kind::Receipt,
                            &self.opts.coordinator_id,
                            &self.opts.coordinator_key,
                            MAX_CONTROL_BYTES,
                        )
                    });
                match r {
                    Ok(r) if r.client == self.opts.client_id && r.fleet == self.opts.fleet => {
                        Event::Receipt(r)
                    }
                    Ok(_) => Event::Other,
                    Err(e) => {
                        self.ignore(IgnoreReason::UnverifiedReceipt, &e);
                        Event::Other
                    }
                }
            }
            _ => Event::Other,
        }
    }

    fn verify_manifest(&self, bytes: &[u8]) -> Result<RoundManifest, String> {
        let signed: Signed = envelope::decode(bytes, Kind::Manifest, MAX_CONTROL_BYTES)
            .map_err(|e| e.to_string())?;
        let m: RoundManifest = signed
            .verify_from(
                Kind::Manifest,
                &self.opts.coordinator_id,
                &self.opts.coordinator_key,
                MAX_CONTROL_BYTES,
            )
            .map_err(|e| e.to_string())?;
        if m.fleet != self.opts.fleet || m.coordinator != self.opts.coordinator_id {
            return Err(format!(
                "manifest for fleet {} from {}",
                m.fleet, m.coordinator
            ));
        }
        if m.model.size > MAX_MODEL_BYTES {
            return Err(format!("model of {} bytes is over our limit", m.model.size));
        }
        Ok(m)
    }

    async fn next_event(&mut self, session: &mut Session) -> Result<Event, EdgeError> {
        let ev = session
            .recv()
            .await
            .ok_or_else(|| EdgeError::Broker("MQTT session ended".into()))?;
        if let Incoming::AuthRefused { error, consecutive } = ev {
            let max = self.opts.max_auth_refusals.max(1);
            tracing::error!(client = %self.opts.client_id, %error, consecutive, max, "check broker.password (or COEVO_BROKER_PASSWORD) and that this client is in the fleet");
            if consecutive >= max {
                return Err(EdgeError::Mqtt(error));
            }
            return Ok(Event::Other);
        }
        let ev = self.classify(ev);
        if let Event::Connected = ev {
            let s = self.status(
                StatusState::Online,
                self.summary.accepted_rounds.last().copied(),
            );
            session.publish(self.status_topic(), s, true).await?;
        }
        Ok(ev)
    }

    /// Waits for a verified manifest that passes the freshness rule.
    async fn next_manifest(
        &mut self,
        session: &mut Session,
    ) -> Result<Box<RoundManifest>, EdgeError> {
        loop {
            if let Event::Manifest(m) = self.next_event(session).await? {
                return Ok(m);
            }
        }
    }

    /// Fetches and checks the manifest's model; a newer manifest arriving meanwhile wins.
    ///
    /// Never stalls on a bad chunk: a chunk that does not decode or does not fit the manifest
    /// is ignored and asked for again (a new subscription gets the retained copy, which the
    /// coordinator republishes) with backoff, and a model that fails its digest is fetched
    /// again. Past the round's deadline plus grace the round is given up; a re-signed
    /// manifest of the same round and model (the coordinator extended it) moves the deadline
    /// in `m`.
    async fn fetch_model(
        &mut self,
        session: &mut Session,
        m: &mut RoundManifest,
    ) -> Result<Fetched, EdgeError> {
        let blob = Blob {
            digest: m.model.digest,
            size: m.model.size,
            chunks: m.model.chunks,
            mismatch: IgnoreReason::ModelDigestMismatch,
        };
        self.fetch_blob(session, m, blob).await
    }

    /// [`Agent::fetch_model`] for any blob the manifest names by digest (the model, or the
    /// student's TorchScript module): same topics, windows, checks and backoff.
    pub(crate) async fn fetch_blob(
        &mut self,
        session: &mut Session,
        m: &mut RoundManifest,
        blob: Blob,
    ) -> Result<Fetched, EdgeError> {
        let total = blob.chunks.max(1);
        let size = blob.size as usize;
        // Model chunks are cut at the manifest's chunk size; when the counts agree, each
        // chunk's exact length is known, so a forged one is refused before it can spoil the
        // chunks already held.
        let cut = m.chunk_size as usize;
        let exact = cut > 0 && chunk_count(size, cut) == total;
        let fits = |c: &ModelChunk, topic_index: u32| {
            let len_ok = if exact {
                let start = topic_index as usize * cut;
                c.data.len() == cut.min(size.saturating_sub(start))
            } else {
                c.data.len() <= size
            };
            c.digest == blob.digest && c.index == topic_index && c.total == total && len_ok
        };
        let mut reasm: Reassembler<Digest> = Reassembler::new(1, size, total);
        let mut received: BTreeSet<u32> = BTreeSet::new();
        let grace = self.opts.deadline_grace.as_millis() as u64;
        let mut give_up = instant_of(m.deadline_unix_ms.saturating_add(grace));
        let mut retry = FETCH_RETRY_MIN;
        loop {
            if tokio::time::Instant::now() >= give_up {
                return Ok(Fetched::GaveUp);
            }
            // Ask for the next window of missing chunks by their exact topics. A broker hands
            // retained messages to a new subscription only up to its in-flight window (rumqttd
            // silently drops the rest), so a wildcard over a big model would never complete.
            let want: Vec<u32> = (0..total)
                .filter(|i| !received.contains(i))
                .take(FETCH_WINDOW)
                .collect();
            let topics: Vec<String> = want
                .iter()
                .map(|&index| {
                    Topic::ModelChunk {
                        digest: blob.digest,
                        index,
                    }
                    .path(&self.opts.fleet)
                })
                .collect();
            for t in &topics {
                session.subscribe(t).await?;
            }
            let mut until = tokio::time::Instant::now() + FETCH_WINDOW_TIMEOUT;
            let mut bad = false;
            let outcome = loop {
                let ev = tokio::select! {
                    // Events first: a queued extension must be seen before the deadline fires.
                    biased;
                    ev = self.next_event(session) => ev?,
                    _ = tokio::time::sleep_until(until) => break None,
                    _ = tokio::time::sleep_until(give_up) => break None,
                };
                match ev {
                    Event::Manifest(other)
                        if other.round > m.round
                            || (other.round == m.round && other.model.digest != m.model.digest) =>
                    {
                        break Some(Fetched::Newer(other));
                    }
                    // The coordinator extended the round: so do we.
                    Event::Manifest(same)
                        if same.round == m.round && same.deadline_unix_ms > m.deadline_unix_ms =>
                    {
                        m.deadline_unix_ms = same.deadline_unix_ms;
                        give_up = instant_of(m.deadline_unix_ms.saturating_add(grace));
                    }
                    Event::ModelChunk { topic_index, chunk } if want.contains(&topic_index) => {
                        if !fits(&chunk, topic_index) {
                            let detail = format!(
                                "chunk {}/{} of {} bytes on the topic of chunk {topic_index}",
                                chunk.index,
                                chunk.total,
                                chunk.data.len()
                            );
                            self.ignore(IgnoreReason::MalformedModelChunk, &detail);
                            bad = true;
                            until = until.min(tokio::time::Instant::now() + retry);
                            continue;
                        }
                        match reasm.insert(chunk.digest, topic_index, chunk.total, chunk.data) {
                            Ok(Some(bytes)) => {
                                if bytes.len() == size && digest(&bytes) == blob.digest {
                                    break Some(Fetched::Model(bytes));
                                }
                                self.ignore(
                                    blob.mismatch,
                                    &"bytes do not match the signed digest; fetching again",
                                );
                                received.clear();
                                bad = true;
                                until = until.min(tokio::time::Instant::now() + retry);
                            }
                            Ok(None) => {
                                received.insert(topic_index);
                            }
                            Err(e) => {
                                // The reassembler dropped what it held: start over.
                                self.ignore(IgnoreReason::MalformedModelChunk, &e);
                                received.clear();
                                bad = true;
                                until = until.min(tokio::time::Instant::now() + retry);
                            }
                        }
                        if want.iter().all(|i| received.contains(i)) {
                            break None;
                        }
                    }
                    Event::BadModelChunk { digest, index }
                        if digest == blob.digest && want.contains(&index) =>
                    {
                        bad = true;
                        until = until.min(tokio::time::Instant::now() + retry);
                    }
                    _ => {}
                }
            };
            for t in &topics {
                session.unsubscribe(t).await?;
            }
            if let Some(result) = outcome {
                return Ok(result);
            }
            retry = if bad {
                tracing::debug!(client = %self.opts.client_id, round = m.round, ?retry, "asking again for model chunks that were malformed");
                (retry * 2).min(FETCH_RETRY_MAX)
            } else {
                FETCH_RETRY_MIN
            };
        }
    }

    /// The student architecture `m` names: the built-in CNN, or the TorchScript module whose
    /// digest it signs — from the cache, else fetched like the model. A cached copy or a
    /// download that does not match the digest is counted
    /// ([`IgnoreReason::ModuleDigestMismatch`]) and fetched again; a module that matches but
    /// does not load or fit the local data is an error (nothing to train on this round).
    async fn student_arch(
        &mut self,
        session: &mut Session,
        m: &mut RoundManifest,
    ) -> Result<Result<Arch, Fetched>, EdgeError> {
        let Some(r) = m.model.arch.module.clone() else {
            return Ok(Ok(Arch::student()));
        };
        if r.size > MAX_MODEL_BYTES {
            return Err(EdgeError::Model(coevo_models::ModelError::Limit(format!(
                "TorchScript module of {} bytes is over our limit",
                r.size
            ))));
        }
        let module = match self.modules.lookup(&r) {
            Lookup::Hit(module) => module,
            found => {
                if let Lookup::Tampered(detail) = found {
                    self.ignore(IgnoreReason::ModuleDigestMismatch, &detail);
                }
                tracing::info!(client = %self.opts.client_id, round = m.round, module = %r.digest.short(), bytes = r.size, "fetching the round's TorchScript module");
                let blob = Blob {
                    digest: r.digest,
                    size: r.size,
                    chunks: r.chunks,
                    mismatch: IgnoreReason::ModuleDigestMismatch,
                };
                match self.fetch_blob(session, m, blob).await? {
                    Fetched::Model(bytes) => {
                        let module = ScriptModule::from_bytes(bytes)?;
                        self.modules.insert(module.clone())?;
                        module
                    }
                    other => return Ok(Err(other)),
                }
            }
        };
        let info = module.check(&self.shape)?;
        // The residual's bound is this model's size.
        self.model_params = self.model_params.max(info.params);
        Ok(Ok(Arch::Script(module)))
    }

    /// The residual kept in `state_dir` (or a zero one): read once, bounded by the model
    /// size. An unreadable file is logged and replaced, never fatal: the residual is an
    /// optimisation of future rounds, not data the fleet depends on.
    fn feedback(&mut self, max_params: usize) -> ErrorFeedback {
        if let Some(f) = &self.feedback {
            return f.clone();
        }
        let loaded = match self.residual_path() {
            None => None,
            Some(path) => match ErrorFeedback::load(&path, Limits::for_params(max_params)) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(client = %self.opts.client_id, error = %e, "discarding an unreadable error-feedback residual");
                    None
                }
            },
        };
        if let Some(f) = &loaded {
            let norm = f.residual_norm();
            self.feedback_round = self
                .opts
                .state_dir
                .as_deref()
                .and_then(crate::state::load_residual_round);
            tracing::info!(client = %self.opts.client_id, norm, computed_in = ?self.feedback_round, "restored the error-feedback residual");
            self.summary.restored_residual_norm = Some(norm);
        }
        let f = loaded.unwrap_or_default();
        self.feedback = Some(f.clone());
        f
    }

    /// The residual to add to `round`'s delta: the kept one, or a zero one when it is older
    /// than `max_residual_age_rounds` (the edge was offline; see
    /// [`crate::state::stale_residual_age`]). A dropped residual is recorded in the summary;
    /// the file is replaced once this round's residual is saved.
    fn feedback_for(&mut self, round: u64, max_params: usize) -> ErrorFeedback {
        let f = self.feedback(max_params);
        if f.residual().is_empty() {
            return f;
        }
        let computed_in = self.feedback_round;
        let Some(age) =
            crate::state::stale_residual_age(round, computed_in, self.opts.max_residual_age_rounds)
        else {
            return f;
        };
        let norm = f.residual_norm();
        tracing::warn!(client = %self.opts.client_id, round, ?computed_in, age, max_age = self.opts.max_residual_age_rounds, norm, "dropping a stale error-feedback residual (this edge missed rounds)");
        self.summary.dropped_residuals.push(DroppedResidual {
            round,
            computed_in,
            norm,
        });
        let fresh = ErrorFeedback::new();
        self.feedback = Some(fresh.clone());
        self.feedback_round = None;
        fresh
    }

    fn residual_path(&self) -> Option<PathBuf> {
        self.opts.state_dir.as_ref().map(|d| d.join(RESIDUAL_FILE))
    }

    /// Fine-tunes on local data; returns the encoded delta against the weights as received.
    ///
    /// The delta is compressed with the round's uplink codec through error feedback: what the
    /// codec leaves out is added to the next round's delta. The new residual is saved to
    /// `state_dir` before the upload, so a restart continues from it.
    async fn train_round(
        &mut self,
        m: &RoundManifest,
        base: &[u8],
        arch: Arch,
    ) -> Result<(Vec<u8>, LocalMetrics), EdgeError> {
        let shape = DataShape {
            channels: m.model.arch.channels as usize,
            height: m.model.arch.height as usize,
            width: m.model.arch.width as usize,
            classes: m.model.arch.classes as usize,
        };
        if shape != self.shape {
            return Err(EdgeError::Config(format!(
                "the round's model expects {shape:?}, local data is {:?} (a camera that lacks some classes lists the fleet's in [data] classes)",
                self.shape
            )));
        }
        let cfg = TrainConfig {
            epochs: m.task.epochs as usize,
            batch_size: m.task.batch_size as usize,
            lr: m.task.lr,
            momentum: m.task.momentum,
            prox_mu: m.task.prox_mu,
            seed: self.opts.seed.wrapping_mul(1_000_003).wrapping_add(m.round),
        };
        let codec = m.model.codec;
        let up_codec = m.uplink_codec;
        let attack = self.opts.attack.clone();
        let corruption_seed = crate::attack::corruption_seed(&self.opts.client_id, cfg.seed);
        let base = base.to_vec();
        let data = self
            .data
            .lock()
            .map_err(|_| EdgeError::Task("dataset lock poisoned".into()))?
            .handle();
        let _slot = match &self.opts.train_slots {
            Some(s) => Some(
                s.clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| EdgeError::Task("training slots closed".into()))?,
            ),
            None => None,
        };
        let residual_path = self.residual_path();
        let client = self.opts.client_id.clone();
        let feedback = self.feedback_for(m.round, self.model_params);
        let round = m.round;
        // Under `top-k:…:no-ef` the residual is carried unchanged, so it keeps its round.
        let carried = up_codec.error_feedback() && attack != Some(Attack::NonFinite);
        let train_threads = self.opts.train_threads;
        let semi = self.opts.labels.clone();
        let (payload, metrics, feedback) = tokio::task::spawn_blocking(
            move || -> Result<(Vec<u8>, LocalMetrics, ErrorFeedback), EdgeError> {
                if let Some(n) = train_threads {
                    // Set on the training thread itself: libtorch's OpenMP pool size is
                    // per calling thread.
                    tch::set_num_threads(n as i32);
                }
                let t0 = Instant::now();
                let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
                let net = arch.build(&vs.root(), &shape)?;
                let layout = Weights::from_var_store(&vs);
                let received = Weights::decode_model(&base, codec, &layout)?;
                received.load_into(&mut vs)?;
                // The delta is taken against the weights exactly as loaded (DESIGN §5.3).
                let received = Weights::from_var_store(&vs);
                crate::cli::log_memory("model loaded");
                let (stats, labels) = match &semi {
                    Some(semi) => {
                        let (stats, counts) =
                            coevo_models::semi::train_semi(&net, &vs, &data, &cfg, semi)?;
                        tracing::info!(client = %client, round, labelled = counts.labelled,
                            unlabelled = counts.unlabelled, pseudo = counts.pseudo_labelled,
                            relabelled = counts.relabelled, discarded = counts.discarded,
                            estimated_noise = ?counts.estimated_noise, "labels selected");
                        (stats, Some(counts))
                    }
                    None => {
                        let counts = coevo_models::semi::plain_counts(&data.labels());
                        let partial = counts.unlabelled > 0;
                        (data.train(&net, &vs, &cfg)?, partial.then_some(counts))
                    }
                };
                crate::cli::log_memory("trained");
                let train_ms = t0.elapsed().as_millis() as u64;
                tracing::info!(client = %client, round, train_ms, threads = tch::get_num_threads(),
                    samples = stats.samples, loss = stats.loss, "local training done");
                let mut delta = Weights::from_var_store(&vs).sub(&received)?;
                if let Some(a) = &attack {
                    a.corrupt_delta(&mut delta, corruption_seed);
                }
                let named = delta.to_named();
                let (payload, feedback) = if attack == Some(Attack::NonFinite) {
                    (crate::attack::raw_f32_payload(&delta)?, feedback)
                } else {
                    match feedback.compress(&named, up_codec) {
                        Ok(x) => x,
                        // A residual of another architecture (the fleet's model changed):
                        // it can't be added to this delta, so start a fresh one.
                        Err(coevo_protocol::CodecError::Layout(e)) => {
                            tracing::warn!(client = %client, error = %e, "error-feedback residual does not fit the new model; starting a fresh one");
                            ErrorFeedback::new().compress(&named, up_codec)?
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                if let Some(path) = &residual_path {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir)
                            .map_err(|e| EdgeError::Config(format!("{}: {e}", dir.display())))?;
                    }
                    feedback.save(path)?;
                    if let Some(dir) = path.parent().filter(|_| carried) {
                        crate::state::save_residual_round(dir, round)?;
                    }
                }
                Ok((
                    payload,
                    LocalMetrics {
                        loss: stats.loss,
                        accuracy: stats.accuracy,
                        train_ms,
                        labels,
                    },
                    feedback,
                ))
            },
        )
        .await
        .map_err(|e| EdgeError::Task(e.to_string()))??;
        // The round's model, optimizer and batches are freed by now; hand the pages back so a
        // camera idles at its baseline between rounds, not at its training peak.
        crate::cli::trim_heap();
        crate::cli::log_memory("round done, heap trimmed");
        self.feedback = Some(feedback);
        if carried {
            self.feedback_round = Some(m.round);
        }
        Ok((payload, metrics))
    }

    /// Publishes the signed delta and re-sends it with backoff until a receipt arrives or a
    /// newer round starts.
    async fn upload(
        &mut self,
        session: &mut Session,
        m: &mut RoundManifest,
        payload: &[u8],
        metrics: LocalMetrics,
    ) -> Result<Upload, EdgeError> {
        let o = &self.opts;
        // The id the upload claims: ours, unless a test's impersonation attack says otherwise.
        let me = o
            .attack
            .as_ref()
            .map_or(o.client_id.as_str(), |a| a.claimed_id(&o.client_id));
        let mut sent = signed_upload(
            &o.fleet,
            me,
            &self.key,
            m,
            payload,
            self.samples as u64,
            metrics,
        );
        if self.opts.attack == Some(Attack::StaleReplay) {
            sent = stale_replay(&mut self.replay, sent);
        }
        // An attacker whose receipt goes to another client's topic sends once, then waits for
        // the next round.
        let resend = self
            .opts
            .attack
            .as_ref()
            .is_none_or(Attack::expects_receipt);
        let mut attempt = 0u32;
        let grace = self.opts.deadline_grace.as_millis() as u64;
        let mut give_up = instant_of(m.deadline_unix_ms.saturating_add(grace));
        let mut first = true;
        loop {
            // Checked after the first send and after the events queued during training (an
            // extension among them) have been read.
            if !first && tokio::time::Instant::now() >= give_up {
                return Ok(Upload::Expired);
            }
            if first || resend {
                for (topic, bytes) in &sent.messages {
                    session.publish(topic.clone(), bytes.clone(), false).await?;
                }
            }
            first = false;
            let wait = resend_wait(
                &self.opts.client_id,
                sent.round,
                attempt,
                self.opts.retry_wait,
                self.opts.max_retry_wait,
            );
            attempt = attempt.saturating_add(1);
            let until = tokio::time::Instant::now() + wait;
            loop {
                let ev = tokio::select! {
                    biased;
                    ev = self.next_event(session) => ev?,
                    _ = tokio::time::sleep_until(until) => break,
                    _ = tokio::time::sleep_until(give_up) => break,
                };
                match ev {
                    // The coordinator extended the round: keep trying until the new deadline.
                    Event::Manifest(same)
                        if same.round == m.round
                            && same.model.digest == m.model.digest
                            && same.deadline_unix_ms > m.deadline_unix_ms =>
                    {
                        m.deadline_unix_ms = same.deadline_unix_ms;
                        give_up = instant_of(m.deadline_unix_ms.saturating_add(grace));
                    }
                    Event::Receipt(r)
                        if r.round == sent.round && r.payload_digest == sent.payload_digest =>
                    {
                        return Ok(Upload::Receipt(r.outcome));
                    }
                    Event::Manifest(newer) if newer.round > m.round => {
                        return Ok(Upload::Newer(newer));
                    }
                    // After a reconnect the broker may have lost our in-flight chunks.
                    Event::Connected => break,
                    _ => {}
                }
            }
            tracing::debug!(client = %self.opts.client_id, round = m.round, "no receipt yet; re-sending");
        }
    }
}

/// How long to wait for a receipt after send number `attempt` (0 = the first) of `client`'s
/// delta in `round`: `first` doubled per attempt up to `max`, times a factor in [0.75, 1.25)
/// drawn from a digest of (client, round, attempt). Why: a fleet's cameras upload within
/// seconds of each other; with one fixed wait, everyone whose receipt is late re-sends at the
/// same instant, and 10,000 re-sends at once are what made the receipts late. Doubling backs
/// off from a busy coordinator, the spread keeps the re-sends from arriving together, and
/// deriving it from the id (not a clock) keeps a test reproducible.
pub fn resend_wait(
    client: &str,
    round: u64,
    attempt: u32,
    first: Duration,
    max: Duration,
) -> Duration {
    let base = first
        .saturating_mul(1u32 << attempt.min(16))
        .min(max.max(first));
    let d = digest(format!("{client}\0{round}\0{attempt}").as_bytes());
    let x = f64::from(u16::from_le_bytes([d.0[0], d.0[1]])) / 65_536.0;
    base.mul_f64(0.75 + 0.5 * x)
}

/// The MQTT messages of one signed delta upload: a [`DeltaHeader`] (fleet, round, client, base
/// digest, samples, codec, payload digest and length) signed with `key` as `client`, carried in
/// the first of the payload's chunks (cut at the manifest's chunk size), each chunk on its own
/// `delta/{client}/{round}/{index}` topic. Shared by the agent and `coevo bench fleet`'s
/// synthetic clients, so the load generator sends exactly what a camera sends.
pub fn signed_upload(
    fleet: &str,
    client: &str,
    key: &SigningKey,
    m: &RoundManifest,
    payload: &[u8],
    samples: u64,
    metrics: LocalMetrics,
) -> WireUpload {
    let parts = split(payload, m.chunk_size as usize);
    let payload_digest = digest(payload);
    let header = DeltaHeader {
        fleet: fleet.to_string(),
        round: m.round,
        client: client.to_string(),
        base_digest: m.model.digest,
        samples,
        metrics,
        codec: m.uplink_codec,
        payload_digest,
        payload_len: payload.len() as u64,
        chunks: parts.len() as u32,
    };
    let signed = Signed::sign(Kind::DeltaHeader, &header, client, key);
    let messages = parts
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let c = DeltaChunk {
                client: client.to_string(),
                round: m.round,
                index: i as u32,
                total: parts.len() as u32,
                header: (i == 0).then(|| signed.clone()),
                data: data.to_vec(),
            };
            (
                Topic::DeltaChunk {
                    client: client.to_string(),
                    round: m.round,
                    index: i as u32,
                }
                .path(fleet),
                envelope::encode(Kind::DeltaChunk, &c),
            )
        })
        .collect();
    WireUpload {
        round: m.round,
        payload_digest,
        messages,
    }
}

#[cfg(test)]
mod tests {
    use super::resend_wait;
    use std::time::Duration;

    #[test]
    fn resend_waits_double_to_the_cap_and_spread_a_fleet() {
        let (first, max) = (Duration::from_secs(10), Duration::from_secs(60));
        for attempt in 0..8u32 {
            let base = (first * 2u32.pow(attempt.min(10))).min(max);
            let waits: Vec<Duration> = (0..1000)
                .map(|i| resend_wait(&format!("cam-{i}"), 3, attempt, first, max))
                .collect();
            assert!(
                waits
                    .iter()
                    .all(|w| *w >= base.mul_f64(0.75) && *w < base.mul_f64(1.25)),
                "attempt {attempt}: within ±25 % of {base:?}"
            );
            // Spread over the window, not bunched: both quarters of it are used.
            let low = waits.iter().filter(|w| **w < base).count();
            assert!(
                (300..700).contains(&low),
                "attempt {attempt}: {low} of 1000 below the base"
            );
        }
        // Reproducible per client, round and attempt.
        assert_eq!(
            resend_wait("cam-1", 3, 1, first, max),
            resend_wait("cam-1", 3, 1, first, max)
        );
    }
}
