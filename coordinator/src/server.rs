//! The round loop: the only part of the coordinator that does I/O (MQTT, disk, the clock).

mod aggregate;
mod analyst;
mod collect;
mod evolve;
mod publish;
mod report;

use crate::coevolve::{CoevolutionReport, Mode, ServerData, TeacherLoop};
use crate::collect::RejectionTally;
use crate::config::CoordinatorConfig;
use crate::guard::{GuardEvaluator, SharedGuardEvaluator};
use crate::ingest::{AcceptedMeta, RoundSpec};
use crate::metrics::{phase, CoordinatorMetrics};
use crate::registry::FleetRegistry;
use crate::report::{PhaseTimings, RejectionCount, RoundReport};
use crate::store::{write_atomic, Store};
use crate::CoordinatorError;
use coevo_models::{Dataset, Net, Weights};
use coevo_mqtt::{Incoming, Session, Settings};
use coevo_protocol::{Digest, ModelArch, SigningKey, Topic};
use report::Finished;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Smallest incoming MQTT packet limit of the coordinator's session (see `run_rounds`).
const MAX_INCOMING_PACKET: usize = 4 << 20;

/// Architecture name clients must build for the weights in a manifest.
pub const STUDENT_ARCH: &str = "student-cnn-v1";
/// Architecture name of a manifest whose student is the TorchScript module it names.
pub const SCRIPT_ARCH: &str = "torchscript";

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
    net: Net,
    test: Dataset,
}

// SAFETY-free note: tch tensors are Send; the mutex serialises all access.
type SharedEvaluator = Arc<Mutex<Evaluator>>;

/// Per-round bookkeeping.
#[derive(Default)]
struct RoundBook {
    /// Accepted deltas' metadata; the deltas themselves are on disk (see `crate::ingest`).
    accepted: BTreeMap<String, AcceptedMeta>,
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
    /// Metrics and live status, updated by every stage (see `crate::metrics`).
    metrics: Arc<CoordinatorMetrics>,
    /// Whether `[metrics] listen` was already started by [`Coordinator::start_metrics_server`].
    metrics_served: bool,
    /// The report history behind alerts and `OUT/report.html` (`server/analyst.rs`), read
    /// from disk at the first round so a restarted coordinator keeps its alerts' memory.
    history: Mutex<Option<crate::html::History>>,
    /// Student and teacher architectures (`[model]`), checked against the data in `new`.
    archs: crate::byom::Archs,
}

pub(crate) fn now_ms() -> u64 {
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
        let metrics = Arc::new(CoordinatorMetrics::new(
            &cfg.fleet,
            cfg.rounds,
            cfg.metrics.status_interval_ms,
        ));
        // At start-up, before anything is trained or published: a module that does not fit
        // the dataset is a configuration error, with the shapes in the message.
        let archs = cfg.model.load(&test.shape)?;
        Ok(Coordinator {
            archs,
            metrics,
            metrics_served: false,
            cfg,
            key,
            test: Mutex::new(Some(test)),
            server_data: Mutex::new(None),
            reference_data: Mutex::new(None),
            guard_data: Mutex::new(None),
            events: None,
            history: Mutex::new(None),
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

    /// The metrics and live status this coordinator keeps (also what `/metrics` serves).
    pub fn metrics(&self) -> Arc<CoordinatorMetrics> {
        self.metrics.clone()
    }

    /// Starts the `[metrics] listen` endpoint now (`None` when it is not configured) and hands
    /// it to the caller, who decides how long it serves: dropping it stops it. Without this
    /// call [`Self::run`] starts it and stops it when it returns; call this first to keep
    /// serving the final numbers after the last round (tests, a process embedding the
    /// coordinator).
    pub fn start_metrics_server(
        &mut self,
    ) -> Result<Option<coevo_telemetry::MetricsServer>, CoordinatorError> {
        self.metrics_served = true;
        let Some(listen) = self.cfg.metrics.listen else {
            return Ok(None);
        };
        let metrics = self.metrics.clone();
        let server = coevo_telemetry::MetricsServer::start(
            listen,
            "coordinator",
            Arc::new(move || metrics.render()),
        )?;
        Ok(Some(server))
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
        let _server = if self.metrics_served {
            None
        } else {
            self.start_metrics_server()?
        };
        let status = crate::status::spawn_writer(
            self.metrics.clone(),
            out.clone(),
            self.cfg.metrics.status_interval_ms,
        );
        let result = tokio::select! {
            r = self.run_rounds() => r.map(|()| crate::status::state::FINISHED),
            _ = shutdown => {
                tracing::info!("coordinator shutting down");
                Ok(crate::status::state::STOPPED)
            }
        };
        match &result {
            Ok(s) => self.metrics.set_state(s, None),
            Err(e) => self
                .metrics
                .set_state(crate::status::state::FAILED, Some(e.to_string())),
        }
        if let Some(writer) = status {
            writer.finish().await;
        }
        result?;
        Ok(crate::report::load_reports(&out)?)
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
        let net = self.archs.student.build(&vs.root(), &shape)?;
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
        let guard = self.guard_evaluator(&test)?;
        let evaluator: SharedEvaluator = Arc::new(Mutex::new(Evaluator { vs, net, test }));
        let module = self.archs.student.module();
        let arch = ModelArch {
            name: if module.is_some() {
                SCRIPT_ARCH.into()
            } else {
                STUDENT_ARCH.into()
            },
            channels: shape.channels as u32,
            height: shape.height as u32,
            width: shape.width as u32,
            classes: shape.classes as u32,
            module: module.map(|m| crate::byom::module_ref(m, cfg.transfer.chunk_size as usize)),
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
        // The coordinator tries `host` first, then the other nodes in turn.
        settings.cluster = cfg.broker.cluster_nodes()?;
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
        settings.max_incoming_bytes = Some(cfg.transfer.incoming_bytes.max(1) as usize);
        // Client statuses (retained, last will offline) count the connected clients, on any
        // broker; only registered ones count, and they are never trusted for anything else.
        let filters = vec![
            Topic::all_deltas_filter(&cfg.fleet),
            Topic::all_status_filter(&cfg.fleet),
        ];
        let mut session = Session::start(&settings, filters);
        wait_connected(&mut session, &cfg).await?;

        let mut previous_model: Option<(Digest, u32)> = None;
        for round in state.completed_round + 1..=cfg.rounds {
            let registry = FleetRegistry::load(&cfg.registry)?;
            self.metrics
                .round_started(round, &registry, cfg.round.quorum);
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

    /// One round, stage by stage: distil (coevolve), publish, collect, aggregate (+ guard),
    /// fuse (coevolve), report. Each stage is a method in `server/`, handing its result on.
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
        let mut coevolution = teacher.map(|_| CoevolutionReport {
            distillation: None,
            fusion: None,
            fusion_members: Vec::new(),
        });

        if teacher.is_some() {
            self.metrics.set_phase(phase::DISTILL);
        }
        self.distill_stage(round, teacher, store, global, &mut coevolution)
            .await?;

        self.metrics.set_phase(phase::PUBLISH);
        let mut published = self
            .publish_stage(inputs, session, global, previous_model)
            .await?;
        phases.publish = t0.elapsed().as_millis() as u64;
        self.metrics.set_phase(phase::COLLECT);
        self.metrics.published(
            published.model_bytes,
            inputs.registry.len(),
            published.manifest.deadline_unix_ms,
        );
        self.emit(RoundEvent::Started {
            round,
            registered: inputs.registry.len(),
            model_bytes: published.model_bytes,
        });
        tracing::info!(round, model = %published.model_digest.short(), bytes = published.model_bytes, clients = inputs.registry.len(), "round published");

        let t_collect = Instant::now();
        let spec = Arc::new(RoundSpec {
            fleet: cfg.fleet.clone(),
            round,
            base_digest: published.model_digest,
            uplink_codec: cfg.transfer.uplink_codec,
            max_delta_bytes: cfg.transfer.max_delta_bytes,
            layout: published.round_base.clone(),
            registry: inputs.registry.clone(),
        });
        let collected = self
            .collect_stage(inputs, session, store, spec, &mut published)
            .await?;
        phases.collect = t_collect.elapsed().as_millis() as u64;

        let t_agg = Instant::now();
        self.metrics.set_phase(phase::AGGREGATE);
        let aggregated = self
            .aggregate_stage(inputs, store, global, &published, &collected)
            .await?;
        if !aggregated.merged {
            // Nothing merged: a skipped round leaves the model exactly as it was, not rounded
            // through the downlink codec.
            *global = std::mem::take(&mut published.undecoded);
        }
        if teacher.is_some() {
            self.metrics.set_phase(phase::FUSE);
        }
        self.fuse_stage(
            round,
            teacher,
            global,
            &published.round_base,
            &aggregated,
            &mut coevolution,
        )
        .await?;
        phases.aggregate = t_agg.elapsed().as_millis() as u64;

        let model = (published.model_digest, published.chunks);
        self.metrics.set_phase(phase::EVALUATE);
        let report = self
            .report_stage(
                inputs,
                session,
                store,
                global,
                evaluator,
                teacher,
                Finished {
                    published,
                    collected,
                    aggregated,
                    coevolution,
                    phases,
                    started: t0,
                },
            )
            .await?;
        self.metrics.round_finished(&report);
        Ok((report, model))
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
    fn guard_evaluator(
        &self,
        test: &Dataset,
    ) -> Result<Option<SharedGuardEvaluator>, CoordinatorError> {
        if !self.cfg.guard.enabled {
            return Ok(None);
        }
        let arch = &self.archs.student;
        let validation = self
            .guard_data
            .lock()
            .ok()
            .and_then(|d| d.as_ref().map(Dataset::shallow_clone))
            .filter(|d| !d.is_empty());
        let ev = match validation {
            Some(v) => GuardEvaluator::with_arch(arch, v, "server-validation")?,
            None if !test.is_empty() => {
                GuardEvaluator::with_arch(arch, test.shallow_clone(), "test")?
            }
            None => {
                tracing::warn!("the guard has no held-out data (no server validation set, empty test split): merged models are published unchecked");
                return Ok(None);
            }
        };
        Ok(Some(Arc::new(Mutex::new(ev))))
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
        let tl = Arc::new(Mutex::new(TeacherLoop::with_archs(
            shape,
            data,
            self.cfg.coevolution.clone(),
            self.archs.student.clone(),
            self.archs.teacher.clone(),
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
                Incoming::Publish(p) | Incoming::Shed(p) => {
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
