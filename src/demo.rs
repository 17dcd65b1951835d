//! `coevo demo`: a whole fleet on one machine. An embedded rumqttd broker with password auth,
//! the coordinator and N edge agents, each agent its own MQTT connection over 127.0.0.1 with its
//! own key; the dataset is split over the agents (Dirichlet by label by default).

use crate::provision::provision;
use anyhow::{bail, Context, Result};
use coevo_broker::BrokerConfig;
use coevo_coordinator::config::{BelowQuorum, CoordinatorConfig};
use coevo_coordinator::{Coordinator, RoundEvent, RoundReport};
use coevo_edge::{Agent, AgentOptions};
use coevo_models::partition::{partition, PartitionSpec};
use coevo_models::Dataset;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Demo settings (the `coevo demo` flags).
#[derive(Clone, Debug, clap::Args)]
pub struct DemoOptions {
    /// Rounds to run.
    #[arg(long, default_value_t = 5)]
    pub rounds: u64,
    /// Edge clients (each a real MQTT connection).
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// How the training set is split over clients: `dirichlet:ALPHA`, `iid`, `shards:K`, or
    /// `natural` (the dataset's clients file; --clients is then ignored).
    #[arg(long, default_value = "dirichlet:0.5")]
    pub split: String,
    /// Dataset directory (IDX or image folder).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    pub data: PathBuf,
    /// Output directory: reports, checkpoints, keys, registry (default: a new
    /// out/demo-<unix time>). Must not hold a previous run.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Local epochs per round.
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    /// Local learning rate (SGD with momentum 0.9).
    #[arg(long, default_value_t = 0.02)]
    pub lr: f64,
    /// Local batch size.
    #[arg(long, default_value_t = 32)]
    pub batch: u32,
    /// Seed for the split and the initial model.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// `coevolve` (a teacher on the server, trained on its 5 % labelled share, distils into the
    /// student each round and learns back from the clients) or `fedavg` (student only, the
    /// classic baseline, about 3x faster).
    #[arg(long, default_value = "coevolve", value_parser = ["fedavg", "coevolve"])]
    pub mode: String,
    /// Round deadline in seconds (rounds close earlier once every client is in).
    #[arg(long, default_value_t = 600)]
    pub round_timeout: u64,
    /// Serve the coordinator's Prometheus metrics here, e.g. 127.0.0.1:9464 (what
    /// deploy/prometheus.yml scrapes). `coevo status OUT` works either way.
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Few and noisy labels per camera (issue #18), seeded with --seed.
    #[command(flatten)]
    pub labels: crate::bench::labels::LabelArgs,
}

impl DemoOptions {
    /// `--split` names the kind without the client count, which comes from `--clients`.
    fn partition_spec(&self) -> Result<PartitionSpec> {
        let n = self.clients;
        let full = match self.split.split_once(':') {
            _ if self.split == "natural" => self.split.clone(),
            None => format!("{}:{n}", self.split),
            Some((kind, rest)) => format!("{kind}:{n}:{rest}"),
        };
        Ok(full.parse()?)
    }

    /// The output directory: `--out`, or a new `out/demo-<unix time>`.
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            PathBuf::from(format!("out/demo-{secs}"))
        })
    }
}

/// Runs the demo; `on_event` sees every coordinator event (the CLI prints progress from it).
pub async fn run(
    opts: &DemoOptions,
    out: &Path,
    mut on_event: impl FnMut(&RoundEvent),
) -> Result<Vec<RoundReport>> {
    let spec = opts.partition_spec()?;
    let t0 = Instant::now();
    let split = coevo_models::data::load_dir(&opts.data)
        .with_context(|| format!("loading {} (run scripts/setup?)", opts.data.display()))?;
    let coevolve = opts.mode == "coevolve";
    // In coevolve mode the server keeps its share of the training set (labelled, unlabelled,
    // validation) and the clients split the rest.
    let (server, train) = if coevolve {
        let roles = coevo_coordinator::config::ServerDataConfig::default();
        let (server, rest) =
            coevo_coordinator::coevolve::split_server_data(&split.train, &roles, opts.seed)?;
        (Some(server), split.train.subset(&rest))
    } else {
        (None, split.train.shallow_clone())
    };
    let parts = partition(
        &train.labels_vec(),
        train.clients.as_deref(),
        &spec,
        opts.seed,
    )?;
    tracing::info!(
        train = split.train.len(),
        test = split.test.len(),
        clients = parts.len(),
        secs = t0.elapsed().as_secs_f64(),
        "data loaded"
    );
    let clients: Vec<(String, Dataset)> = parts
        .iter()
        .map(|(name, idx)| (name.clone(), train.subset(idx)))
        .collect();
    // The clean labels stay here: the agents only ever see the corrupted ones.
    let (clients, injected) =
        crate::bench::labels::corrupt_clients(clients, &opts.labels.corruption(opts.seed))?;
    if !injected.is_empty() {
        let (l, u, f) = injected.values().fold((0, 0, 0), |(l, u, f), i| {
            (l + i.labelled, u + i.unlabelled, f + i.flipped)
        });
        println!(
            "labels: {l} labelled ({f} of them wrong, {}), {u} unlabelled over {} cameras",
            opts.labels.noise_kind,
            injected.len()
        );
    }
    let semi = opts
        .labels
        .clean_labels
        .then(coevo_models::semi::SemiConfig::default);
    let quorum = (clients.len() as u32).div_ceil(2);
    let run = FleetRun {
        fleet: "demo",
        out,
        clients,
        test: split.test,
        seed: opts.seed,
    };
    run_fleet_with(
        run,
        |cfg| {
            cfg.rounds = opts.rounds;
            cfg.metrics.listen = opts.metrics;
            cfg.round = coevo_coordinator::config::RoundPolicy {
                quorum,
                timeout_s: opts.round_timeout,
                below_quorum: BelowQuorum::Extend,
                max_extensions: 1,
            };
            if coevolve {
                cfg.mode = coevo_coordinator::coevolve::Mode::Coevolve;
                cfg.coevolution.pretrain_epochs = 10;
            }
            cfg.task = coevo_coordinator::config::TaskConfig {
                epochs: opts.epochs,
                batch_size: opts.batch,
                lr: opts.lr,
                momentum: 0.9,
                prox_mu: 0.0,
            };
        },
        |c| match server {
            Some(s) => c.with_server_data(s),
            None => c,
        },
        |o| o.labels = semi.clone(),
        &mut on_event,
    )
    .await
}

/// A whole fleet to run on this machine.
pub struct FleetRun<'a> {
    /// Fleet name (topic namespace).
    pub fleet: &'a str,
    /// Output directory (keys, registry, reports, checkpoints); must not hold a previous run.
    pub out: &'a Path,
    /// One (client id, local data) per edge agent.
    pub clients: Vec<(String, Dataset)>,
    /// The coordinator's test set.
    pub test: Dataset,
    pub seed: u64,
}

/// Provisions keys and credentials, starts the embedded broker, the coordinator (configured
/// by `configure`, then `prepare`d, e.g. with server data) and one agent per client, each a
/// real MQTT connection over 127.0.0.1; returns the round reports once every round is done.
pub async fn run_fleet(
    run: FleetRun<'_>,
    configure: impl FnOnce(&mut CoordinatorConfig),
    prepare: impl FnOnce(Coordinator) -> Coordinator,
    on_event: &mut impl FnMut(&RoundEvent),
) -> Result<Vec<RoundReport>> {
    run_fleet_with(run, configure, prepare, |_| {}, on_event).await
}

/// [`run_fleet`], with `agent` adjusting each agent's options (its `client_id` says which)
/// before the agent starts: how the robustness bench makes some clients Byzantine.
pub async fn run_fleet_with(
    run: FleetRun<'_>,
    configure: impl FnOnce(&mut CoordinatorConfig),
    prepare: impl FnOnce(Coordinator) -> Coordinator,
    mut agent: impl FnMut(&mut AgentOptions),
    on_event: &mut impl FnMut(&RoundEvent),
) -> Result<Vec<RoundReport>> {
    let FleetRun {
        fleet: fleet_name,
        out,
        clients,
        test,
        seed,
    } = run;
    if out.join("state.json").exists() {
        bail!(
            "{} already holds a run; choose another --out or delete it",
            out.display()
        );
    }
    let ids: Vec<String> = clients.iter().map(|(name, _)| name.clone()).collect();
    let fleet = provision(out, "coordinator", &ids)?;
    let broker = coevo_broker::start(BrokerConfig {
        listen: coevo_broker::free_local_addr()?,
        credentials: Some(fleet.credentials_path.clone()),
        ..BrokerConfig::default()
    })?;
    let addr = broker.addr;
    let mut cfg = CoordinatorConfig {
        fleet: fleet_name.into(),
        client_id: fleet.coordinator_id.clone(),
        registry: fleet.registry_path.clone(),
        out: out.to_path_buf(),
        seed,
        broker: coevo_coordinator::config::BrokerEndpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            password: Some(fleet.coordinator_password.clone()),
            connect_timeout_s: 30,
            ..Default::default()
        },
        // Co-evolution needs server data, which only `prepare` can hand over: callers opt in.
        mode: coevo_coordinator::coevolve::Mode::Fedavg,
        ..CoordinatorConfig::default()
    };
    configure(&mut cfg);
    let coordinator = prepare(Coordinator::new(cfg, fleet.coordinator_key.clone(), test)?);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut agents = Vec::new();
    let coordinator_public = fleet.coordinator_key.public_key();
    // One training at a time per core: the agents share this machine's CPUs.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    ));
    for ((id, key, password), (_, data)) in fleet.clients.into_iter().zip(clients) {
        let mut o = AgentOptions::new(fleet_name, &id, &fleet.coordinator_id, coordinator_public);
        o.broker_host = addr.ip().to_string();
        o.broker_port = addr.port();
        o.password = Some(password);
        o.seed = seed;
        o.train_slots = Some(slots.clone());
        agent(&mut o);
        let a = Agent::new(o, key, data)?;
        let mut rx = stop_rx.clone();
        agents.push(tokio::spawn(a.run(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        })));
    }

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let coord = tokio::spawn(coordinator.with_events(tx).run(std::future::pending()));
    while let Some(ev) = rx.recv().await {
        on_event(&ev);
    }
    let reports = coord.await.context("coordinator task")??;
    let _ = stop_tx.send(true);
    for a in agents {
        match tokio::time::timeout(Duration::from_secs(10), a).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "edge agent ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "edge agent task failed"),
            Err(_) => tracing::warn!("edge agent did not stop in time"),
        }
    }
    Ok(reports)
}
