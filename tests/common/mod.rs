//! Shared pieces of the end-to-end and fault tests: a provisioned fleet, in-process agents and
//! coordinators, waiting on files and events, and the merge-consistency check.
#![allow(dead_code)]

use coevo::provision::{provision, Fleet};
use coevo_coordinator::config::{BelowQuorum, BrokerEndpoint, CoordinatorConfig, RoundPolicy};
use coevo_coordinator::store::Store;
use coevo_coordinator::strategy::{FedAvg, Strategy, Update};
use coevo_edge::{Agent, AgentOptions, AgentSummary};
use coevo_models::{Dataset, WeightCodec as ModelCodec, Weights};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

pub const FLEET: &str = "fault";

/// 28×28 grey images, 10 classes: the shape of the synthetic data most tests use.
pub const SHAPE: coevo_models::DataShape = coevo_models::DataShape {
    channels: 1,
    height: 28,
    width: 28,
    classes: 10,
};

/// Logs to the test output when RUST_LOG is set (e.g. `RUST_LOG=info cargo test -- --nocapture`).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("cam-{i}")).collect()
}

pub fn fleet(dir: &Path, n: usize) -> Fleet {
    init_logs();
    provision(dir, "coordinator", &ids(n)).expect("provision fleet")
}

/// Starts the embedded broker on a free loopback port with the fleet's credentials.
pub fn start_broker(fleet: &Fleet) -> coevo_broker::BrokerHandle {
    start_broker_with(fleet, coevo_broker::BrokerConfig::default())
}

/// Like [`start_broker`], from `base` (its listen address and credentials are replaced).
pub fn start_broker_with(
    fleet: &Fleet,
    base: coevo_broker::BrokerConfig,
) -> coevo_broker::BrokerHandle {
    // A port found free can be taken before the broker binds it (tests run in parallel, and
    // a broker picks its internal ports the same way): try another one.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match coevo_broker::start(coevo_broker::BrokerConfig {
            listen: coevo_broker::free_local_addr().expect("free port"),
            credentials: Some(fleet.credentials_path.clone()),
            ..base.clone()
        }) {
            Ok(handle) => return handle,
            Err(e) if attempt < 5 && e.to_string().contains("Address already in use") => {
                eprintln!("broker start: {e}; trying another port");
            }
            Err(e) => panic!("broker starts: {e:?}"),
        }
    }
}

/// A fleet CA and a broker certificate for 127.0.0.1/localhost in `dir`, made by the function
/// behind `coevo keys tls`.
pub fn fleet_tls(dir: &Path) -> coevo::tls::FleetTlsFiles {
    coevo::tls::write_fleet_tls(dir, &coevo::tls::FleetTlsOptions::new(FLEET)).expect("TLS files")
}

/// Like [`start_broker`], serving TLS only, with the broker certificate in `tls`.
pub fn start_tls_broker(
    fleet: &Fleet,
    tls: &coevo::tls::FleetTlsFiles,
) -> coevo_broker::BrokerHandle {
    start_broker_with(
        fleet,
        coevo_broker::BrokerConfig {
            tls: Some(coevo_broker::TlsConfig {
                cert: tls.broker_cert.clone(),
                key: tls.broker_key.clone(),
            }),
            ..coevo_broker::BrokerConfig::default()
        },
    )
}

/// A coordinator config for `fleet` on `addr`, writing under `out`.
pub fn coordinator_config(
    fleet: &Fleet,
    addr: SocketAddr,
    out: PathBuf,
    rounds: u64,
) -> CoordinatorConfig {
    CoordinatorConfig {
        fleet: FLEET.into(),
        key: fleet.dir.join("keys/coordinator.pk8"),
        registry: fleet.registry_path.clone(),
        out,
        rounds,
        broker: BrokerEndpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            password: Some(fleet.coordinator_password.clone()),
            connect_timeout_s: 30,
            ..Default::default()
        },
        round: RoundPolicy {
            quorum: 1,
            timeout_s: 120,
            below_quorum: BelowQuorum::Skip,
            max_extensions: 0,
        },
        mode: coevo_coordinator::coevolve::Mode::Fedavg,
        ..CoordinatorConfig::default()
    }
}

/// Starts client `i` of `fleet` as an in-process agent with `data`; it stops when `stop` flips.
pub fn spawn_agent(
    fleet: &Fleet,
    i: usize,
    addr: SocketAddr,
    data: Dataset,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> JoinHandle<Result<AgentSummary, coevo_edge::EdgeError>> {
    spawn_agent_for(fleet, i, addr, data, stop, None)
}

/// Like [`spawn_agent`], but the agent also ends by itself once it has finished `rounds`
/// rounds (with their receipts): tests that assert on receipts wait for that instead of
/// racing the stop signal against the last receipt.
pub fn spawn_agent_for(
    fleet: &Fleet,
    i: usize,
    addr: SocketAddr,
    data: Dataset,
    stop: &tokio::sync::watch::Receiver<bool>,
    rounds: Option<u64>,
) -> JoinHandle<Result<AgentSummary, coevo_edge::EdgeError>> {
    spawn_agent_with(fleet, i, addr, data, stop, rounds, None)
}

/// Like [`spawn_agent_for`], connecting over TLS and trusting only the CA in `ca_cert`.
pub fn spawn_tls_agent(
    fleet: &Fleet,
    i: usize,
    addr: SocketAddr,
    data: Dataset,
    stop: &tokio::sync::watch::Receiver<bool>,
    rounds: Option<u64>,
    ca_cert: &Path,
) -> JoinHandle<Result<AgentSummary, coevo_edge::EdgeError>> {
    spawn_agent_with(fleet, i, addr, data, stop, rounds, Some(ca_cert))
}

fn spawn_agent_with(
    fleet: &Fleet,
    i: usize,
    addr: SocketAddr,
    data: Dataset,
    stop: &tokio::sync::watch::Receiver<bool>,
    rounds: Option<u64>,
    ca_cert: Option<&Path>,
) -> JoinHandle<Result<AgentSummary, coevo_edge::EdgeError>> {
    spawn_agent_custom(fleet, i, addr, data, stop, |o| {
        o.max_rounds = rounds;
        o.ca_cert = ca_cert.map(Path::to_path_buf);
    })
}

/// Like [`spawn_agent`], with `configure` applied to the agent's options last.
pub fn spawn_agent_custom(
    fleet: &Fleet,
    i: usize,
    addr: SocketAddr,
    data: Dataset,
    stop: &tokio::sync::watch::Receiver<bool>,
    configure: impl FnOnce(&mut AgentOptions),
) -> JoinHandle<Result<AgentSummary, coevo_edge::EdgeError>> {
    let (id, key, pw) = fleet.clients[i].clone();
    let mut o = AgentOptions::new(
        FLEET,
        &id,
        "coordinator",
        fleet.coordinator_key.public_key(),
    );
    o.broker_host = addr.ip().to_string();
    o.broker_port = addr.port();
    o.password = Some(pw);
    o.retry_wait = Duration::from_secs(2);
    o.max_retry_wait = Duration::from_secs(4);
    o.seed = i as u64;
    configure(&mut o);
    let agent = Agent::new(o, key, data).expect("agent");
    let mut rx = stop.clone();
    tokio::spawn(agent.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }))
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn count_deltas(out: &Path, round: u64) -> usize {
    std::fs::read_dir(Store::new(out).delta_dir(round))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "bin"))
                .count()
        })
        .unwrap_or(0)
}

fn read_weights(path: &Path) -> Weights {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Weights::decode(&bytes, ModelCodec::F32, 1 << 30).expect("checkpoint decodes")
}

/// The merged model of `round` must be exactly base + FedAvg(accepted deltas on disk): every
/// accepted delta is in it and none twice. Returns the clients whose deltas are in it.
pub fn assert_merge_consistent(out: &Path, round: u64) -> Vec<String> {
    let store = Store::new(out);
    // Deltas are merged onto the model as clients decoded it (the round's downlink codec).
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.report_path(round)).expect("round report"))
            .expect("report parses");
    let downlink: coevo_protocol::DownlinkCodec = report["downlink_codec"]
        .as_str()
        .expect("downlink codec in the report")
        .parse()
        .expect("known downlink codec");
    let stored = read_weights(&store.checkpoint_path(round - 1));
    let base = Weights::decode_model(
        &stored.encode_model(downlink).expect("encodes"),
        downlink,
        &stored,
    )
    .expect("decodes");
    let merged = read_weights(&store.checkpoint_path(round));
    let records = store.load_deltas(round, 1 << 30).expect("deltas readable");
    let mut updates = Vec::new();
    for rec in &records {
        let header = rec.header.as_ref().expect("stored header");
        // The header is signed; here we only need its samples and codec, which the coordinator
        // verified before storing.
        let h: coevo_protocol::DeltaHeader =
            coevo_protocol::envelope::decode(&header.body, coevo_protocol::Kind::DeltaHeader, 4096)
                .expect("header decodes");
        let codec = h.codec;
        updates.push(Update {
            client: rec.client.clone(),
            samples: h.samples,
            delta: Weights::decode_delta(&rec.data, codec, &base).expect("delta decodes"),
        });
    }
    // The default rule (norm clipping at 2 × the median) is FedAvg exactly when it clipped
    // nobody, which is what honest fleets in these tests do; anything else is its own rule.
    let strategy = match report["strategy"].as_str() {
        Some("fedavg") => Box::new(FedAvg) as Box<dyn Strategy>,
        _ => coevo_coordinator::strategy::build(&coevo_coordinator::config::default_aggregation()),
    };
    let expected = strategy
        .aggregate(&base, &updates)
        .expect("aggregate")
        .weights;
    let mut max_diff = 0f32;
    for (name, t) in &expected.tensors {
        let m = &merged.tensors[name];
        for (a, b) in t.data.iter().zip(&m.data) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    assert!(
        max_diff < 1e-5,
        "round {round}: merged model differs from base + FedAvg(accepted deltas) by {max_diff}"
    );
    records.into_iter().map(|r| r.client).collect()
}

/// Starts a coordinator task for `cfg` and returns it with its event stream.
pub fn spawn_coordinator(
    cfg: CoordinatorConfig,
    fleet: &Fleet,
    test: &Dataset,
) -> (
    JoinHandle<Result<Vec<coevo_coordinator::RoundReport>, coevo_coordinator::CoordinatorError>>,
    tokio::sync::mpsc::UnboundedReceiver<coevo_coordinator::RoundEvent>,
) {
    let coordinator = coevo_coordinator::Coordinator::new(
        cfg,
        fleet.coordinator_key.clone(),
        test.shallow_clone(),
    )
    .expect("coordinator config is valid");
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    (
        tokio::spawn(coordinator.with_events(tx).run(std::future::pending())),
        events,
    )
}

pub fn read_report(out: &Path, round: u64) -> coevo_coordinator::RoundReport {
    let p = Store::new(out).report_path(round);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .expect("report parses")
}

/// Writes a dataset as an IDX directory (so a coordinator *process* can load it).
pub fn write_idx(dir: &std::path::Path, data: &coevo_models::DataSplit) {
    std::fs::create_dir_all(dir).unwrap();
    for (prefix, set) in [("train", &data.train), ("t10k", &data.test)] {
        let n = set.len();
        let (h, w) = (set.shape.height, set.shape.width);
        // Undo the loader's normalisation: x = (p/255 - 0.5)/0.5.
        let pixels: Vec<f32> = Vec::<f32>::try_from(
            ((set.images.flatten(0, -1) * 0.5 + 0.5) * 255.0)
                .clamp(0.0, 255.0)
                .round(),
        )
        .unwrap();
        let mut img = Vec::with_capacity(16 + pixels.len());
        img.extend_from_slice(&0x0000_0803u32.to_be_bytes());
        for d in [n, h, w] {
            img.extend_from_slice(&(d as u32).to_be_bytes());
        }
        img.extend(pixels.iter().map(|&p| p as u8));
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
        let mut lab = Vec::with_capacity(8 + n);
        lab.extend_from_slice(&0x0000_0801u32.to_be_bytes());
        lab.extend_from_slice(&(n as u32).to_be_bytes());
        lab.extend(set.labels_vec().iter().map(|&l| l as u8));
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
    }
}

/// Debian's Mosquitto, started on a configuration `coevo fleet export-mosquitto` wrote; killed
/// when dropped.
pub struct Mosquitto {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl Mosquitto {
    /// Everything Mosquitto logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes what `coevo fleet export-mosquitto` writes for `fleet` (fleet id [`FLEET`], listener
/// `addr`) into `mdir`. `user: None` is the operator's case on Debian: started as root, Mosquitto
/// drops to the `mosquitto` user.
pub fn export_mosquitto(fleet: &Fleet, addr: SocketAddr, mdir: &Path, user: Option<&str>) {
    let registry = coevo_coordinator::FleetRegistry::load(&fleet.registry_path).unwrap();
    let creds = coevo_broker::Credentials::load(&fleet.credentials_path).unwrap();
    coevo::mosquitto::export(
        &coevo::mosquitto::Export {
            fleet: FLEET,
            coordinator_id: "coordinator",
            registry: &registry,
            credentials: &creds,
            listen_host: "127.0.0.1",
            listen_port: addr.port(),
            user,
        },
        mdir,
    )
    .unwrap();
}

/// Starts `mosquitto -v -c mdir/mosquitto.conf` logging to `log`, and waits until it listens on
/// `addr`; panics with its log if it never does.
pub async fn start_mosquitto(mdir: &Path, addr: SocketAddr, log: PathBuf) -> Mosquitto {
    let file = std::fs::File::create(&log).unwrap();
    let bin = if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    };
    let child = std::process::Command::new(bin)
        .arg("-v")
        .arg("-c")
        .arg(mdir.join("mosquitto.conf"))
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto is installed (scripts/setup)");
    let m = Mosquitto { child, addr, log };
    let t0 = Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "mosquitto did not start listening on {addr}:\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m
}

/// `train` split IID (seed 5) over `n` clients named by [`ids`], as fleet runs take them.
pub fn iid_clients(
    train: &coevo_models::Dataset,
    n: usize,
) -> Vec<(String, coevo_models::Dataset)> {
    let parts = coevo_models::partition::partition(
        &train.labels_vec(),
        None,
        &coevo_models::partition::PartitionSpec::Iid { clients: n },
        5,
    )
    .expect("partition");
    ids(n)
        .into_iter()
        .zip(&parts)
        .map(|(id, (_, idx))| (id, train.subset(idx)))
        .collect()
}
