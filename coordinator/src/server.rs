//! The round loop: the only part of the coordinator that does I/O (MQTT, disk, the clock).

use crate::coevolve::{CoevolutionReport, Mode, ServerData, TeacherLoop};
use crate::collect::{admit, Admission, RejectionTally};
use crate::config::{BelowQuorum, CoordinatorConfig};
use crate::guard::{GuardEvaluator, SharedGuardEvaluator};
use crate::registry::FleetRegistry;
use crate::report::{
    ClientReport, ModelReport, PhaseTimings, ReassemblyReport, Rejection, RejectionCount,
    RoundReport,
};
use crate::store::{write_atomic, JournalEntry, State, Store};
use crate::strategy::{build as build_strategy, Aggregation, Update};
use crate::verify::{verify_signer, verify_upload, RoundContext};
use crate::CoordinatorError;
use coevo_models::train::{evaluate, train, TrainConfig};
use coevo_models::{Dataset, Student, Weights};
use coevo_mqtt::{Incoming, Publish, Session, Settings};
use coevo_protocol::chunk::{split, Reassembler};
use coevo_protocol::envelope::{self, Kind};
use coevo_protocol::{
    digest, DeltaChunk, DeltaHeader, Digest, ModelArch, ModelChunk, ModelRef, Receipt,
    ReceiptOutcome, RejectReason, RoundManifest, Signed, SigningKey, Topic, TrainTask,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Smallest incoming MQTT packet limit of the coordinator's session (see `run_rounds`).
const MAX_INCOMING_PACKET: usize = 4 << 20;

/// Architecture name clients must build for the weights in a manifest.
pub const STUDENT_ARCH: &str = "student-cnn-v1";

/// Progress notifications, for the demo's display and for tests that wait on events.
#[derive(Clone, Debug)]
pub enum RoundEvent {
    Started {
        round: u64,
        registered: usize,
        model_bytes: u64,
    },
    Accepted {
        round: u64,
        client: String,
        accepted: usize,
    },
    Rejected {
        round: u64,
        client: String,
        reason: String,
    },
    Finished(Box<RoundReport>),
}

/// The student net used to evaluate global weights; behind a mutex so evaluation can run on a
/// blocking thread without holding up MQTT.
struct Evaluator {
    vs: tch::nn::VarStore,
    net: Student,
    test: Dataset,
}

// SAFETY-free note: tch tensors are Send; the mutex serialises all access.
type SharedEvaluator = Arc<Mutex<Evaluator>>;

struct Accepted {
    header: DeltaHeader,
    delta: Weights,
    bytes: u64,
}

/// Per-round bookkeeping.
#[derive(Default)]
struct RoundBook {
    accepted: BTreeMap<String, Accepted>,
    /// The report's list, taken from `tally` when collection ends.
    rejected: Vec<RejectionCount>,
    tally: RejectionTally,
    /// Messages for closed rounds: counted, never blamed.
    late: RejectionTally,
    /// Re-sent copies of accepted deltas, answered with the receipt again.
    resent: u64,
    /// Chunks refused for lack of shared reassembly capacity.
    refused_busy: u64,
}

/// The collect phase's reassembly state, bounded per client (see `collect::admit`).
struct CollectState {
    reasm: Reassembler<(String, u64)>,
    /// Signed headers of transfers in `reasm`, never more than it holds transfers.
    headers: HashMap<(String, u64), Signed>,
    chunk_limit: usize,
    /// (client, digest) acknowledged in the previous round, from its journal.
    previous_acks: BTreeSet<(String, String)>,
}

pub struct Coordinator {
    cfg: CoordinatorConfig,
    key: SigningKey,
    /// Taken by `run`. In a mutex because tch tensors are `Send` but not `Sync`, and the round
    /// futures borrow `self` across awaits.
    test: Mutex<Option<Dataset>>,
    /// Taken by `run` in coevolve mode.
    server_data: Mutex<Option<ServerData>>,
    /// The labelled server set, kept (shallowly) for strategies that need a reference delta.
    reference_data: Mutex<Option<Dataset>>,
    /// The server's held-out validation set, kept (shallowly) for the guard.
    guard_data: Mutex<Option<Dataset>>,
    events: Option<mpsc::UnboundedSender<RoundEvent>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Coordinator {
    /// `test` evaluates the global model every round and defines the model's input shape.
    pub fn new(
        cfg: CoordinatorConfig,
        key: SigningKey,
        test: Dataset,
    ) -> Result<Self, CoordinatorError> {
        cfg.validate()?;
        Ok(Coordinator {
            cfg,
            key,
            test: Mutex::new(Some(test)),
            server_data: Mutex::new(None),
            reference_data: Mutex::new(None),
            guard_data: Mutex::new(None),
            events: None,
        })
    }

    /// The server's labelled, unlabelled and validation data (needed in coevolve mode and by
    /// strategies with a reference delta, which train on the labelled part).
    pub fn with_server_data(self, data: ServerData) -> Self {
        if let Ok(mut d) = self.reference_data.lock() {
            *d = Some(data.labelled.shallow_clone());
        }
        if let Ok(mut d) = self.guard_data.lock() {
            *d = Some(data.validation.shallow_clone());
        }
        if let Ok(mut d) = self.server_data.lock() {
            *d = Some(data);
        }
        self
    }

    /// Sends [`RoundEvent`]s to `tx` as the rounds progress.
    pub fn with_events(mut self, tx: mpsc::UnboundedSender<RoundEvent>) -> Self {
        self.events = Some(tx);
        self
    }

    fn emit(&self, ev: RoundEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }

    /// Runs rounds until `cfg.rounds` are complete or `shutdown` resolves. Resumes after the
    /// last completed round found in `cfg.out`. Returns the reports of all rounds on disk.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Vec<RoundReport>, CoordinatorError> {
        let out = self.cfg.out.clone();
        tokio::select! {
            r = self.run_rounds() => r?,
            _ = shutdown => tracing::info!("coordinator shutting down"),
        }
        crate::report::load_reports(&out)
    }

    async fn run_rounds(&mut self) -> Result<(), CoordinatorError> {
        let cfg = self.cfg.clone();
        // Read before the (slow) teacher pretraining, so a bad CA file fails at once.
        let tls = cfg
            .broker
            .ca_cert
            .as_deref()
            .map(coevo_mqtt::ClientTls::from_ca_file)
            .transpose()?;
        if cfg.aggregation.needs_reference()
            && !self.reference_data.lock().is_ok_and(|d| d.is_some())
        {
            return Err(CoordinatorError::Config(
                "the fltrust strategy trains a reference delta on the server's labelled data: \
                 configure [server_data]"
                    .into(),
            ));
        }
        let store = Store::new(&cfg.out);
        let state = store.load_or_init_state()?;
        let test = self
            .test
            .lock()
            .ok()
            .and_then(|mut t| t.take())
            .ok_or_else(|| CoordinatorError::Config("coordinator already ran".into()))?;
        let shape = test.shape;
        tch::manual_seed(cfg.seed as i64);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let net = Student::new(&vs.root(), &shape);
        let mut global = Weights::from_var_store(&vs);
        let f32_cap = global.num_params() * 4 + 64 * 1024;
        // The round's base model is always read back from disk, so a coordinator restarted
        // mid-round publishes the very same model (same digest) and in-flight deltas stay valid.
        let path = store.checkpoint_path(state.completed_round);
        if state.completed_round == 0 && !path.exists() {
            write_atomic(&path, &global.encode(coevo_models::WeightCodec::F32)?)?;
        }
        let bytes = std::fs::read(&path)
            .map_err(|e| CoordinatorError::Io(format!("{}: {e}", path.display())))?;
        global = Weights::decode(&bytes, coevo_models::WeightCodec::F32, f32_cap)?;
        if state.completed_round > 0 {
            tracing::info!(round = state.completed_round, "resuming from checkpoint");
        }
        let guard = self.guard_evaluator(&test);
        let evaluator: SharedEvaluator = Arc::new(Mutex::new(Evaluator { vs, net, test }));
        let arch = ModelArch {
            name: STUDENT_ARCH.into(),
            channels: shape.channels as u32,
            height: shape.height as u32,
            width: shape.width as u32,
            classes: shape.classes as u32,
        };

        let teacher = match cfg.mode {
            Mode::Fedavg => None,
            Mode::Coevolve => Some(
                self.start_teacher(&store, state.completed_round, shape)
                    .await?,
            ),
        };

        let mut settings = Settings::new(&cfg.broker.host, cfg.broker.port, &cfg.client_id);
        settings.password = cfg
            .broker
            .password
            .clone()
            .or_else(|| std::env::var("COEVO_BROKER_PASSWORD").ok());
        settings.tls = tls;
        // Fixed id + persistent session + manual acks: a delta is acknowledged to the broker
        // only once it is durably on disk, so a crash before that makes the broker re-deliver.
        settings.clean_session = false;
        settings.manual_acks = true;
        // Room for any message a broker lets through (embedded: 4 chunks + 64 KiB; the
        // Mosquitto export: 2 MiB), not just for a well-formed chunk: rumqttc drops the
        // connection on a packet over this limit, and with a persistent session the broker
        // hands the same message over again on every reconnect — one oversized publish by any
        // client would cut the coordinator off for good. Oversized chunks are rejected by the
        // envelope decoder instead, with a reason.
        settings.max_packet_bytes =
            (cfg.transfer.chunk_size as usize + 64 * 1024).max(MAX_INCOMING_PACKET);
        let mut session = Session::start(&settings, vec![Topic::all_deltas_filter(&cfg.fleet)]);
        wait_connected(&mut session, &cfg).await?;

        let mut previous_model: Option<(Digest, u32)> = None;
        for round in state.completed_round + 1..=cfg.rounds {
            let registry = FleetRegistry::load(&cfg.registry)?;
            let ctx = RoundInputs {
                round,
                arch: arch.clone(),
                registry,
                guard: guard.clone(),
            };
            let (report, model) = self
                .run_round(
                    &ctx,
                    &mut session,
                    &mut global,
                    &evaluator,
                    teacher.as_ref(),
                    &store,
                    previous_model,
                )
                .await?;
            previous_model = Some(model);
            self.emit(RoundEvent::Finished(Box::new(report)));
        }
        session.close().await;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_round(
        &self,
        inputs: &RoundInputs,
        session: &mut Session,
        global: &mut Weights,
        evaluator: &SharedEvaluator,
        teacher: Option<&SharedTeacher>,
        store: &Store,
        previous_model: Option<(Digest, u32)>,
    ) -> Result<(RoundReport, (Digest, u32)), CoordinatorError> {
        let cfg = &self.cfg;
        let round = inputs.round;
        let t0 = Instant::now();
        let mut phases = PhaseTimings::default();

        // 0. Coevolve: the teacher distils into the student. The result is this round's base,
        //    saved before it is published so a restarted coordinator publishes the same one.
        let mut coevolution = teacher.map(|_| CoevolutionReport {
            distillation: None,
            fusion: None,
        });
        if let Some(t) = teacher {
            let base_path = store.base_path(round);
            if base_path.exists() {
                let bytes = std::fs::read(&base_path)
                    .map_err(|e| CoordinatorError::Io(format!("{}: {e}", base_path.display())))?;
                *global = Weights::decode(
                    &bytes,
                    coevo_models::WeightCodec::F32,
                    global.num_params() * 4 + 65536,
                )?;
            } else {
                let g = global.clone();
                let (w, outcome) = on_teacher(t, move |tl| tl.distill_into(&g)).await?;
                tracing::info!(round, ?outcome, "distillation");
                *global = w;
                write_atomic(&base_path, &global.encode(coevo_models::WeightCodec::F32)?)?;
                if let Some(c) = coevolution.as_mut() {
                    c.distillation = Some(outcome);
                }
            }
        }

        // 1. Publish the model (retained chunks) and the signed manifest. Clients train from
        //    the model as they decode it, so the round's base is that decoded model: deltas are
        //    merged onto exactly what they were computed against, and the downlink's rounding
        //    is never silently added to the next round's error.
        let model_bytes = global.encode_model(cfg.transfer.downlink_codec)?;
        let undecoded = std::mem::replace(
            global,
            Weights::decode_model(&model_bytes, cfg.transfer.downlink_codec, global)?,
        );
        let round_base = global.clone();
        let model_digest = digest(&model_bytes);
        let chunk_size = cfg.transfer.chunk_size as usize;
        let chunks = split(&model_bytes, chunk_size);
        let mut manifest = RoundManifest {
            fleet: cfg.fleet.clone(),
            round,
            coordinator: cfg.client_id.clone(),
            model: ModelRef {
                digest: model_digest,
                size: model_bytes.len() as u64,
                codec: cfg.transfer.downlink_codec,
                chunks: chunks.len() as u32,
                arch: inputs.arch.clone(),
            },
            task: TrainTask {
                epochs: cfg.task.epochs,
                batch_size: cfg.task.batch_size,
                lr: cfg.task.lr,
                momentum: cfg.task.momentum,
                prox_mu: cfg.task.prox_mu,
            },
            uplink_codec: cfg.transfer.uplink_codec,
            max_delta_bytes: cfg.transfer.max_delta_bytes,
            chunk_size: cfg.transfer.chunk_size,
            deadline_unix_ms: now_ms() + cfg.round.timeout_s * 1000,
            quorum: cfg.round.quorum,
            issued_unix_ms: now_ms(),
        };
        let signed = Signed::sign(Kind::Manifest, &manifest, &cfg.client_id, &self.key);
        let mut manifest_wire = envelope::encode(Kind::Manifest, &signed);
        let model_wire: Vec<(String, Vec<u8>)> = chunks
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let c = ModelChunk {
                    digest: model_digest,
                    index: i as u32,
                    total: chunks.len() as u32,
                    data: data.to_vec(),
                };
                (
                    Topic::ModelChunk {
                        digest: model_digest,
                        index: i as u32,
                    }
                    .path(&cfg.fleet),
                    envelope::encode(Kind::ModelChunk, &c),
                )
            })
            .collect();
        publish_round(session, &cfg.fleet, &model_wire, &manifest_wire).await?;
        if let Some((old, n)) = previous_model {
            if old != model_digest {
                // Clear the old model's retained chunks: an empty retained payload deletes them.
                for i in 0..n {
                    let t = Topic::ModelChunk {
                        digest: old,
                        index: i,
                    };
                    session
                        .publish(t.path(&cfg.fleet), Vec::new(), true)
                        .await?;
                }
            }
        }
        phases.publish = t0.elapsed().as_millis() as u64;
        self.emit(RoundEvent::Started {
            round,
            registered: inputs.registry.len(),
            model_bytes: model_bytes.len() as u64,
        });
        tracing::info!(round, model = %model_digest.short(), bytes = model_bytes.len(), clients = inputs.registry.len(), "round published");

        // 2. Collect.
        let t_collect = Instant::now();
        let ctx = RoundContext {
            fleet: &cfg.fleet,
            round,
            base_digest: model_digest,
            uplink_codec: cfg.transfer.uplink_codec,
            max_delta_bytes: cfg.transfer.max_delta_bytes,
            layout: global,
            registry: &inputs.registry,
        };
        let mut book = RoundBook::default();
        // Deltas acknowledged before a restart are on disk: take them back, and name any whose
        // stored copy is gone or damaged (its client holds a receipt, so it won't re-send).
        let (recovered, lost) = crate::collect::recover(
            store,
            &ctx,
            cfg.transfer.max_delta_bytes as usize + 64 * 1024,
        )?;
        for r in recovered {
            book.accepted.insert(
                r.client,
                Accepted {
                    header: r.verified.header,
                    delta: r.verified.delta,
                    bytes: r.bytes,
                },
            );
        }
        for l in &lost {
            tracing::error!(round, client = %l.client, digest = %l.digest, reason = %l.reason, "an acknowledged delta is lost and cannot be merged");
        }
        let max_chunks = (cfg.transfer.max_delta_bytes / cfg.transfer.chunk_size as u64 + 1) as u32;
        // Only registered clients' chunks for this round are held (collect::admit), so the
        // per-client limits times the registry bound the total; `reassembly_bytes` caps it too.
        let per_client = cfg.transfer.uploads_per_client.max(1) as usize;
        let mut st = CollectState {
            reasm: Reassembler::new(
                (inputs.registry.len() * per_client).max(1),
                cfg.transfer.max_delta_bytes as usize,
                max_chunks,
            )
            .with_owner_limits(
                per_client,
                cfg.transfer.per_client_bytes() as usize,
                cfg.transfer.reassembly_bytes as usize,
            ),
            headers: HashMap::new(),
            chunk_limit: chunk_size + 16 * 1024,
            previous_acks: match round {
                1 => BTreeSet::new(),
                r => crate::collect::acknowledged(store, r - 1)?,
            },
        };
        let timeout = Duration::from_secs(cfg.round.timeout_s);
        let mut deadline = tokio::time::Instant::now() + timeout;
        let mut extensions = 0u32;
        let stale = Duration::from_secs(cfg.transfer.stale_transfer_s.max(1));
        let mut sweep = tokio::time::interval(stale.min(Duration::from_secs(10)));
        let outcome = loop {
            if !inputs.registry.is_empty() && book.accepted.len() >= inputs.registry.len() {
                break "completed";
            }
            let ev = tokio::select! {
                ev = session.recv() => ev,
                _ = sweep.tick() => {
                    for key in st.reasm.expire(stale) {
                        tracing::warn!(client = %key.0, round = key.1, "dropping a stale incomplete upload");
                        st.headers.remove(&key);
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if book.accepted.len() >= cfg.round.quorum.max(1) as usize {
                        break "completed";
                    }
                    if cfg.round.below_quorum == BelowQuorum::Extend && extensions < cfg.round.max_extensions {
                        extensions += 1;
                        deadline += timeout;
                        tracing::warn!(round, accepted = book.accepted.len(), quorum = cfg.round.quorum, "below quorum at the deadline: extending");
                        // Edges drop a manifest whose deadline has passed, so the extension is
                        // signed and published; the model goes again too, which also replaces
                        // any retained chunk a broker lost or let someone overwrite.
                        manifest.deadline_unix_ms += cfg.round.timeout_s * 1000;
                        let signed = Signed::sign(Kind::Manifest, &manifest, &cfg.client_id, &self.key);
                        manifest_wire = envelope::encode(Kind::Manifest, &signed);
                        publish_round(session, &cfg.fleet, &model_wire, &manifest_wire).await?;
                        continue;
                    }
                    tracing::warn!(round, accepted = book.accepted.len(), quorum = cfg.round.quorum, "below quorum at the deadline: skipping the round");
                    break "skipped";
                }
            };
            match ev {
                None => return Err(CoordinatorError::Broker("MQTT session ended".into())),
                Some(Incoming::Connected { .. }) => {
                    // The broker may have restarted and lost our retained messages.
                    publish_round(session, &cfg.fleet, &model_wire, &manifest_wire).await?;
                }
                Some(Incoming::Disconnected(e)) => {
                    tracing::warn!(error = %e, "broker connection lost; reconnecting")
                }
                Some(Incoming::AuthRefused { error, consecutive }) => {
                    tracing::error!(%error, consecutive, "cannot reconnect; retrying")
                }
                Some(Incoming::Publish(p)) => {
                    if let Some((client, upload_round, header, payload)) =
                        self.on_chunk(&p, &mut st, &mut book, session, &ctx).await?
                    {
                        self.on_upload(
                            &ctx,
                            session,
                            store,
                            &mut book,
                            client,
                            upload_round,
                            header,
                            payload,
                        )
                        .await?;
                    }
                    // Only now, with any accepted delta on disk, does the broker hear we have it.
                    session.ack(&p).await?;
                }
            }
        };
        st.headers.clear();
        st.reasm.retain(|k| k.1 > round);
        book.rejected = book.tally.counts();
        let peaks = st.reasm.peaks();
        phases.collect = t_collect.elapsed().as_millis() as u64;

        // 3. Aggregate.
        let t_agg = Instant::now();
        let strategy = build_strategy(&cfg.aggregation);
        let updates: Vec<Update> = book
            .accepted
            .iter()
            .map(|(c, a)| Update {
                client: c.clone(),
                samples: a.header.samples,
                delta: a.delta.clone(),
            })
            .collect();
        let mut aggregation = Aggregation {
            weights: Weights::default(),
            excluded: Vec::new(),
            norms: Vec::new(),
            clipped: Vec::new(),
        };
        let mut outcome = outcome.to_string();
        let mut merged = false;
        let mut reference = None;
        if outcome == "completed" && !updates.is_empty() {
            if strategy.needs_reference() {
                reference = Some(self.reference_delta(global, round).await?);
            }
            match strategy.aggregate_with_reference(global, &updates, reference.as_ref()) {
                Ok(a) => {
                    aggregation = a;
                    *global = std::mem::take(&mut aggregation.weights);
                    merged = true;
                }
                // Too few updates for the rule's guarantee (e.g. Multi-Krum needs 2f+3): keep
                // the model rather than merge unsafely, and say so in the report.
                Err(e @ crate::strategy::StrategyError::TooFew { .. }) => {
                    tracing::warn!(round, error = %e, "aggregation refused; the round is skipped");
                    outcome = format!("skipped: {e}");
                }
                Err(e) => return Err(e.into()),
            }
        }
        // 3a. Guard: the merged model is scored before anything builds on it (fusion, the next
        //     round's publish); a collapse keeps the round's base, as a skipped round would.
        let norms: Vec<(String, f64)> = updates
            .iter()
            .map(|u| (u.client.clone(), u.delta.l2_norm()))
            .collect();
        let flagged = crate::guard::flag_outliers(&norms, &cfg.guard);
        for f in &flagged {
            tracing::warn!(round, client = %f.client, norm = f.norm, z = f.z, "delta norm far outside the round's distribution");
        }
        let mut guard_report = None;
        if merged && cfg.guard.enabled {
            let g = crate::guard::check(
                &cfg.guard,
                inputs.guard.as_ref(),
                crate::guard::Candidate {
                    base: &round_base,
                    merged: global,
                    updates: &updates,
                    strategy: &cfg.aggregation,
                    reference: reference.as_ref(),
                    norms: &norms,
                    flagged: &flagged,
                },
            )
            .await?;
            if g.verdict == "rolled_back" {
                let named: Vec<&str> = g.offenders.iter().map(|o| o.client.as_str()).collect();
                tracing::error!(round, reason = g.reason.as_deref().unwrap_or(""), offenders = ?named, "merged model collapsed on held-out data: rolled back, the last good model stays published");
                outcome = "rolled_back".into();
                merged = false;
            }
            guard_report = Some(g);
        }
        if !merged {
            // Nothing merged: a skipped round leaves the model exactly as it was, not rounded
            // through the downlink codec.
            *global = undecoded;
        }
        // 3b. Coevolve: the teacher learns from the merged student and every client student.
        if let (Some(t), true) = (teacher, outcome == "completed" && !updates.is_empty()) {
            let mut members = vec![global.clone()];
            let picked = pick_ensemble(updates.len(), self.cfg.coevolution.ensemble_clients, round);
            for u in picked.iter().map(|&i| &updates[i]) {
                let mut w = round_base.clone();
                w.add_scaled(&u.delta, 1.0)?;
                members.push(w);
            }
            let outcome = on_teacher(t, move |tl| {
                let refs: Vec<&Weights> = members.iter().collect();
                tl.fuse_from(&refs, round)
            })
            .await?;
            tracing::info!(round, ?outcome, "fusion");
            if let Some(c) = coevolution.as_mut() {
                c.fusion = Some(outcome);
            }
        }
        phases.aggregate = t_agg.elapsed().as_millis() as u64;

        // 4. Evaluate, report, checkpoint.
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
                bytes_down: model_bytes.len() as u64,
                delta_norm: a.delta.l2_norm(),
            })
            .collect();
        let report = RoundReport {
            round,
            fleet: cfg.fleet.clone(),
            mode: match cfg.mode {
                Mode::Fedavg => "fedavg".into(),
                Mode::Coevolve => "coevolve".into(),
            },
            strategy: strategy.name().into(),
            outcome: outcome.clone(),
            accepted: book.accepted.len(),
            quorum: cfg.round.quorum,
            registered: inputs.registry.len(),
            rejected: book.rejected.clone(),
            extensions,
            model_digest: model_digest.to_string(),
            uplink_codec: cfg.transfer.uplink_codec.to_string(),
            downlink_codec: cfg.transfer.downlink_codec.to_string(),
            bytes_down: model_bytes.len() as u64 * inputs.registry.len() as u64,
            bytes_up: clients.iter().map(|c| c.bytes_up).sum(),
            duration_ms: t0.elapsed().as_millis() as u64,
            phase_ms: phases,
            excluded: aggregation
                .excluded
                .iter()
                .map(|x| Rejection {
                    client: x.client.clone(),
                    reason: x.reason.clone(),
                })
                .collect(),
            clipped: aggregation.clipped.clone(),
            student: ModelReport {
                test_accuracy: Some(eval.accuracy),
                test_loss: Some(eval.loss),
                per_class_accuracy: eval.per_class.clone(),
                params: Some(global.num_params()),
            },
            teacher: teacher_report,
            coevolution,
            clients,
            guard: guard_report,
            flagged,
            late: book.late.counts(),
            resent: book.resent,
            lost,
            reassembly: ReassemblyReport {
                peak_bytes: peaks.bytes as u64,
                peak_transfers: peaks.transfers as u64,
                peak_client_bytes: peaks.owner_bytes as u64,
                refused_busy: book.refused_busy,
            },
        };
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
        tracing::info!(
            round,
            accepted = report.accepted,
            rejected = report.rejected.len(),
            accuracy = eval.accuracy,
            "round {outcome}"
        );
        Ok((report, (model_digest, chunks.len() as u32)))
    }

    /// The coordinator's own training step from `base` on its labelled data, with the round's
    /// task (what an honest client would send if it held the server's data).
    async fn reference_delta(
        &self,
        base: &Weights,
        round: u64,
    ) -> Result<Weights, CoordinatorError> {
        let data = self
            .reference_data
            .lock()
            .ok()
            .and_then(|d| d.as_ref().map(Dataset::shallow_clone))
            .ok_or_else(|| CoordinatorError::Config("no server data for the reference".into()))?;
        let task = &self.cfg.task;
        let cfg = TrainConfig {
            epochs: task.epochs as usize,
            batch_size: task.batch_size as usize,
            lr: task.lr,
            momentum: task.momentum,
            prox_mu: task.prox_mu,
            seed: self.cfg.seed.wrapping_mul(7_919).wrapping_add(round),
        };
        let base = base.clone();
        tokio::task::spawn_blocking(move || -> Result<Weights, CoordinatorError> {
            let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let net = Student::new(&vs.root(), &data.shape);
            base.load_into(&mut vs)?;
            let start = Weights::from_var_store(&vs);
            train(&net, &vs, &data, &cfg)?;
            Ok(Weights::from_var_store(&vs).sub(&start)?)
        })
        .await
        .map_err(|e| CoordinatorError::Io(format!("reference training task: {e}")))?
    }

    /// Handles one delta chunk; returns a complete upload when its last chunk arrives. Nothing
    /// is held for a chunk [`admit`] turns away, and a flood costs one log line per client and
    /// reason per round.
    async fn on_chunk(
        &self,
        p: &Publish,
        st: &mut CollectState,
        book: &mut RoundBook,
        session: &Session,
        ctx: &RoundContext<'_>,
    ) -> Result<Option<(String, u64, Option<Signed>, Vec<u8>)>, CoordinatorError> {
        let round = ctx.round;
        let (client, t_round, t_index) = match Topic::parse(&self.cfg.fleet, &p.topic) {
            Ok(Topic::DeltaChunk {
                client,
                round,
                index,
            }) => (client, round, index),
            Ok(_) => return Ok(None),
            Err(e) => {
                tracing::debug!(topic = %p.topic, error = %e, "ignoring message");
                return Ok(None);
            }
        };
        let registered = ctx.registry.key(&client).is_some();
        let no_digest = Digest([0; 32]);
        match admit(
            t_round,
            round,
            registered,
            book.accepted.contains_key(&client),
        ) {
            Admission::Take => {}
            Admission::UnknownClient => {
                let r = RejectReason::UnknownClient;
                self.reject(session, book, &client, false, round, no_digest, r, false)
                    .await?;
                return Ok(None);
            }
            Admission::Future => {
                let r = RejectReason::WrongRound {
                    got: t_round,
                    current: round,
                };
                self.reject(session, book, &client, true, round, no_digest, r, false)
                    .await?;
                return Ok(None);
            }
            Admission::Late => {
                self.on_late(p, st, book, session, ctx, &client, t_round, t_index)
                    .await?;
                return Ok(None);
            }
            Admission::Resend => {
                self.on_resend(p, st, book, session, ctx, &client, t_index)
                    .await?;
                return Ok(None);
            }
        }
        let mut chunk: DeltaChunk =
            match envelope::decode(&p.payload, Kind::DeltaChunk, st.chunk_limit) {
                Ok(c) => c,
                Err(e) => {
                    let reason = RejectReason::Malformed(format!("delta chunk: {e}"));
                    self.reject_unsigned(session, book, &client, round, &p.payload, reason)
                        .await?;
                    return Ok(None);
                }
            };
        if chunk.client != client || chunk.round != t_round || chunk.index != t_index {
            let reason = RejectReason::Malformed("chunk does not match its topic".into());
            self.reject_unsigned(session, book, &client, round, &p.payload, reason)
                .await?;
            return Ok(None);
        }
        let key = (client.clone(), t_round);
        let header = if chunk.index == 0 {
            chunk.header.take()
        } else {
            None
        };
        let data = std::mem::take(&mut chunk.data);
        match st
            .reasm
            .insert_for(&client, key.clone(), chunk.index, chunk.total, data)
        {
            Ok(None) => {
                // Held only while its transfer is, so headers never outnumber transfers.
                if let Some(h) = header {
                    st.headers.insert(key, h);
                }
                Ok(None)
            }
            Ok(Some(payload)) => {
                let stored = st.headers.remove(&key);
                Ok(Some((client, t_round, header.or(stored), payload)))
            }
            Err(e) if e.is_capacity() => {
                // Not the sender's doing: no blame, no receipt; it re-sends on its backoff.
                book.refused_busy += 1;
                if book.refused_busy == 1 {
                    tracing::warn!(round, client = %client, error = %e, "reassembly is full; refusing chunks until uploads complete (counted in the report)");
                }
                Ok(None)
            }
            Err(e) => {
                st.headers.remove(&key);
                let reason = RejectReason::Malformed(format!("delta chunk: {e}"));
                self.reject_unsigned(session, book, &client, round, &p.payload, reason)
                    .await?;
                Ok(None)
            }
        }
    }

    /// A chunk for a closed round holds nothing. Chunk 0 of the previous round is checked so
    /// an honest retry (typically after a coordinator restart) gets its receipt again if the
    /// journal has it, or learns the round closed; everything else is only counted as late.
    #[allow(clippy::too_many_arguments)]
    async fn on_late(
        &self,
        p: &Publish,
        st: &CollectState,
        book: &mut RoundBook,
        session: &Session,
        ctx: &RoundContext<'_>,
        client: &str,
        t_round: u64,
        t_index: u32,
    ) -> Result<(), CoordinatorError> {
        let text = format!("late: a delta for round {t_round}, which had closed");
        let signed_header = (t_round + 1 == ctx.round && t_index == 0)
            .then(|| envelope::decode::<DeltaChunk>(&p.payload, Kind::DeltaChunk, st.chunk_limit))
            .and_then(Result::ok)
            .filter(|c| c.client == client && c.round == t_round)
            .and_then(|c| c.header)
            .and_then(|h| verify_signer(ctx.registry, client, &h).ok())
            .filter(|h| h.round == t_round);
        let Some(h) = signed_header else {
            if book.late.record(client, true, &text, false) {
                tracing::info!(
                    client,
                    round = t_round,
                    "ignoring chunks for a closed round (further ones are only counted)"
                );
            }
            return Ok(());
        };
        let acked = (client.to_string(), h.payload_digest.to_string());
        if st.previous_acks.contains(&acked) {
            book.resent += 1;
            return self
                .receipt(
                    session,
                    client,
                    t_round,
                    h.payload_digest,
                    ReceiptOutcome::Accepted,
                )
                .await;
        }
        if book.late.record(client, true, &text, true) {
            tracing::info!(
                client,
                round = t_round,
                "a delta arrived after its round closed"
            );
            self.receipt(
                session,
                client,
                t_round,
                h.payload_digest,
                ReceiptOutcome::Rejected(RejectReason::RoundClosed),
            )
            .await?;
        }
        Ok(())
    }

    /// A chunk from a client whose delta is already accepted this round. Chunk 0 carries the
    /// signed header: the same digest is a re-send (its receipt was lost) and gets the receipt
    /// again; another digest is a conflicting upload. Other chunks are parts of such a re-send
    /// and are dropped unread.
    #[allow(clippy::too_many_arguments)]
    async fn on_resend(
        &self,
        p: &Publish,
        st: &CollectState,
        book: &mut RoundBook,
        session: &Session,
        ctx: &RoundContext<'_>,
        client: &str,
        t_index: u32,
    ) -> Result<(), CoordinatorError> {
        if t_index != 0 {
            return Ok(());
        }
        let round = ctx.round;
        // Everything that fails before the signature check is rejected the same way: unsigned,
        // under the payload's digest.
        let checked =
            match envelope::decode::<DeltaChunk>(&p.payload, Kind::DeltaChunk, st.chunk_limit) {
                Ok(c) if c.client == client && c.round == round && c.index == 0 => c
                    .header
                    .ok_or_else(|| RejectReason::Malformed("chunk 0 without a header".into()))
                    .and_then(|header| verify_signer(ctx.registry, client, &header)),
                Ok(_) => Err(RejectReason::Malformed(
                    "chunk does not match its topic".into(),
                )),
                Err(e) => Err(RejectReason::Malformed(format!("delta chunk: {e}"))),
            };
        let h = match checked {
            Ok(h) => h,
            Err(reason) => {
                return self
                    .reject_unsigned(session, book, client, round, &p.payload, reason)
                    .await
            }
        };
        let accepted = book.accepted.get(client).map(|a| a.header.payload_digest);
        if h.round == round && accepted == Some(h.payload_digest) {
            book.resent += 1;
            return self
                .receipt(
                    session,
                    client,
                    round,
                    h.payload_digest,
                    ReceiptOutcome::Accepted,
                )
                .await;
        }
        let reason = if h.round == round {
            RejectReason::ConflictingUpload
        } else {
            RejectReason::WrongRound {
                got: h.round,
                current: round,
            }
        };
        self.reject(
            session,
            book,
            client,
            true,
            round,
            h.payload_digest,
            reason,
            true,
        )
        .await
    }

    /// Verifies a complete upload; persists and acknowledges it, or rejects it with a reason.
    #[allow(clippy::too_many_arguments)]
    async fn on_upload(
        &self,
        ctx: &RoundContext<'_>,
        session: &Session,
        store: &Store,
        book: &mut RoundBook,
        client: String,
        upload_round: u64,
        header: Option<Signed>,
        payload: Vec<u8>,
    ) -> Result<(), CoordinatorError> {
        let payload_digest = digest(&payload);
        // Whether the header is provably the client's: decides whether a rejection below is
        // signed (proven theirs) or could have been sent by anyone on their topic.
        let signer = header
            .as_ref()
            .and_then(|h| verify_signer(ctx.registry, &client, h).ok());
        if let Some(hd) = &signer {
            // A retry of an upload accepted this round (its receipt was lost): acknowledge
            // again, count once. (Normally caught chunk by chunk in `on_resend`.)
            if let Some(prev) = book.accepted.get(&client).filter(|_| hd.round == ctx.round) {
                if prev.header.payload_digest == payload_digest {
                    book.resent += 1;
                    return self
                        .receipt(
                            session,
                            &client,
                            hd.round,
                            payload_digest,
                            ReceiptOutcome::Accepted,
                        )
                        .await;
                }
                return self
                    .reject(
                        session,
                        book,
                        &client,
                        true,
                        hd.round,
                        payload_digest,
                        RejectReason::ConflictingUpload,
                        true,
                    )
                    .await;
            }
        }
        match verify_upload(ctx, &client, header.as_ref(), &payload) {
            Ok(v) => {
                let Some(h) = header.as_ref() else {
                    return Ok(());
                };
                // Durable before acknowledged: the delta, then its journal line (what a
                // restarted coordinator checks the deltas against), both fsync'd; a crash after
                // these lines loses nothing, and a lost file is named rather than forgotten.
                store.save_delta(ctx.round, &client, h, &payload)?;
                store.append_journal(&JournalEntry {
                    client: client.clone(),
                    round: ctx.round,
                    digest: payload_digest.to_string(),
                    file: Store::delta_file(&client),
                })?;
                book.accepted.insert(
                    client.clone(),
                    Accepted {
                        header: v.header,
                        delta: v.delta,
                        bytes: payload.len() as u64,
                    },
                );
                self.receipt(
                    session,
                    &client,
                    ctx.round,
                    payload_digest,
                    ReceiptOutcome::Accepted,
                )
                .await?;
                tracing::info!(round = ctx.round, client = %client, accepted = book.accepted.len(), "delta accepted");
                self.emit(RoundEvent::Accepted {
                    round: ctx.round,
                    client,
                    accepted: book.accepted.len(),
                });
                Ok(())
            }
            Err(reason) => {
                let signed = signer.is_some();
                self.reject(
                    session,
                    book,
                    &client,
                    true,
                    upload_round,
                    payload_digest,
                    reason,
                    signed,
                )
                .await
            }
        }
    }

    /// Rejects a delta chunk that failed before any signature check: unsigned (only the
    /// broker's topic ACLs vouch for the sender), under the digest of the bytes received.
    async fn reject_unsigned(
        &self,
        session: &Session,
        book: &mut RoundBook,
        client: &str,
        round: u64,
        payload: &[u8],
        reason: RejectReason,
    ) -> Result<(), CoordinatorError> {
        self.reject(
            session,
            book,
            client,
            true,
            round,
            digest(payload),
            reason,
            false,
        )
        .await
    }

    /// Counts a rejection against `client` (the topic's, i.e. the authenticated sender with
    /// the broker's ACLs) and tells the client, so it stops retrying. Rate-limited: the first
    /// of each (client, reason, signed) in a round is logged and emitted; later ones are only
    /// counted. A receipt goes out for every signed rejection (its client really sent it) but
    /// only for the first unsigned one, and never to an unregistered id.
    #[allow(clippy::too_many_arguments)]
    async fn reject(
        &self,
        session: &Session,
        book: &mut RoundBook,
        client: &str,
        registered: bool,
        round: u64,
        payload_digest: Digest,
        reason: RejectReason,
        signed: bool,
    ) -> Result<(), CoordinatorError> {
        let text = reason.to_string();
        let first = book.tally.record(client, registered, &text, signed);
        if first {
            tracing::warn!(client, round, reason = %text, signed, "delta rejected (more like it this round are only counted)");
            self.emit(RoundEvent::Rejected {
                round,
                client: client.to_string(),
                reason: text,
            });
        }
        if !registered || !(first || signed) {
            return Ok(());
        }
        self.receipt(
            session,
            client,
            round,
            payload_digest,
            ReceiptOutcome::Rejected(reason),
        )
        .await
    }

    async fn receipt(
        &self,
        session: &Session,
        client: &str,
        round: u64,
        payload_digest: Digest,
        outcome: ReceiptOutcome,
    ) -> Result<(), CoordinatorError> {
        if coevo_protocol::topic::validate_id(client).is_err() {
            return Ok(());
        }
        let r = Receipt {
            fleet: self.cfg.fleet.clone(),
            round,
            client: client.to_string(),
            payload_digest,
            outcome,
        };
        let signed = Signed::sign(Kind::Receipt, &r, &self.cfg.client_id, &self.key);
        session
            .publish(
                Topic::Receipt {
                    client: client.to_string(),
                }
                .path(&self.cfg.fleet),
                envelope::encode(Kind::Receipt, &signed),
                false,
            )
            .await?;
        Ok(())
    }
}

type SharedTeacher = Arc<Mutex<TeacherLoop>>;

/// Which `k` of `n` client students join the fusion ensemble in `round`: a seeded draw, so a
/// restarted coordinator fuses the same members, and different clients each round.
fn pick_ensemble(n: usize, k: usize, round: u64) -> Vec<usize> {
    use rand::seq::index::sample;
    use rand::SeedableRng;
    if k >= n {
        return (0..n).collect();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(round.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut picked = sample(&mut rng, n, k).into_vec();
    picked.sort_unstable();
    picked
}

/// Runs blocking teacher work off the async threads.
async fn on_teacher<T: Send + 'static>(
    t: &SharedTeacher,
    f: impl FnOnce(&mut TeacherLoop) -> Result<T, CoordinatorError> + Send + 'static,
) -> Result<T, CoordinatorError> {
    let t = t.clone();
    tokio::task::spawn_blocking(move || {
        let mut tl = t
            .lock()
            .map_err(|_| CoordinatorError::Io("teacher lock poisoned".into()))?;
        f(&mut tl)
    })
    .await
    .map_err(|e| CoordinatorError::Io(format!("teacher task: {e}")))?
}

impl Coordinator {
    /// The guard's yardstick: the server's validation set when there is one, else the test
    /// split every round is evaluated on; `None` (logged once) when neither has a sample or the
    /// guard is off.
    fn guard_evaluator(&self, test: &Dataset) -> Option<SharedGuardEvaluator> {
        if !self.cfg.guard.enabled {
            return None;
        }
        let validation = self
            .guard_data
            .lock()
            .ok()
            .and_then(|d| d.as_ref().map(Dataset::shallow_clone))
            .filter(|d| !d.is_empty());
        let ev = match validation {
            Some(v) => GuardEvaluator::new(v, "server-validation"),
            None if !test.is_empty() => GuardEvaluator::new(test.shallow_clone(), "test"),
            None => {
                tracing::warn!("the guard has no held-out data (no server validation set, empty test split): merged models are published unchecked");
                return None;
            }
        };
        Some(Arc::new(Mutex::new(ev)))
    }

    /// Builds the teacher loop: resumes the teacher of the last completed round, or pretrains
    /// one on the labelled set (and checkpoints it as round 0).
    async fn start_teacher(
        &self,
        store: &Store,
        completed: u64,
        shape: coevo_models::DataShape,
    ) -> Result<SharedTeacher, CoordinatorError> {
        let data = self
            .server_data
            .lock()
            .ok()
            .and_then(|mut d| d.take())
            .ok_or_else(|| {
                CoordinatorError::Config(
                    "coevolve mode needs server data (labelled, unlabelled, validation)".into(),
                )
            })?;
        let tl = Arc::new(Mutex::new(TeacherLoop::new(
            shape,
            data,
            self.cfg.coevolution.clone(),
        )?));
        let path = store.teacher_path(completed);
        if path.exists() {
            let bytes = std::fs::read(&path)
                .map_err(|e| CoordinatorError::Io(format!("{}: {e}", path.display())))?;
            on_teacher(&tl, move |t| {
                let cap = t.teacher_weights().num_params() * 4 + 65536;
                let w = Weights::decode(&bytes, coevo_models::WeightCodec::F32, cap)?;
                t.load_teacher(&w)
            })
            .await?;
        } else {
            let seed = self.cfg.seed;
            let eval = on_teacher(&tl, move |t| t.pretrain(seed)).await?;
            tracing::info!(
                validation_accuracy = eval.accuracy,
                "teacher pretrained on the labelled set"
            );
            let w = on_teacher(&tl, |t| Ok(t.teacher_weights())).await?;
            write_atomic(&path, &w.encode(coevo_models::WeightCodec::F32)?)?;
        }
        Ok(tl)
    }
}

struct RoundInputs {
    round: u64,
    arch: ModelArch,
    registry: FleetRegistry,
    /// The guard's yardstick; `None` when there is no data to check on (or the guard is off).
    guard: Option<SharedGuardEvaluator>,
}

async fn publish_round(
    session: &Session,
    fleet: &str,
    model: &[(String, Vec<u8>)],
    manifest: &[u8],
) -> Result<(), CoordinatorError> {
    // Model first, so a client that sees the manifest can already fetch every chunk.
    for (topic, bytes) in model {
        session.publish(topic.clone(), bytes.clone(), true).await?;
    }
    session
        .publish(Topic::RoundCurrent.path(fleet), manifest.to_vec(), true)
        .await?;
    Ok(())
}

async fn wait_connected(
    session: &mut Session,
    cfg: &CoordinatorConfig,
) -> Result<(), CoordinatorError> {
    let limit = Duration::from_secs(cfg.broker.connect_timeout_s);
    let mut last_error = String::from("no answer");
    let wait = async {
        while let Some(ev) = session.recv().await {
            match ev {
                Incoming::Connected { .. } => return Ok(true),
                Incoming::Disconnected(e) => last_error = e,
                // Retrying with the same credentials cannot help: say so at once.
                Incoming::AuthRefused { error, .. } => return Err(error),
                // Not ours to handle yet; the client re-sends until it has a receipt.
                Incoming::Publish(p) => {
                    let _ = session.ack(&p).await;
                }
            }
        }
        Ok(false)
    };
    match tokio::time::timeout(limit, wait).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Err(refused)) => Err(CoordinatorError::Mqtt(refused)),
        _ => Err(CoordinatorError::Broker(format!(
            "cannot connect to the broker at {}:{} within {}s: {last_error}",
            cfg.broker.host, cfg.broker.port, cfg.broker.connect_timeout_s
        ))),
    }
}
