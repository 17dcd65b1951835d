//! `coevo bench fleet`: a city-sized fleet on one box (issue #13).
//!
//! The real broker (`coevo broker`, or Debian's Mosquitto on what `coevo fleet export-mosquitto`
//! writes) and the real coordinator (`coevo coordinator`) run as **separate processes** of this
//! binary, so their peak resident memory is theirs alone (sampled from `/proc/PID/status`). The
//! fleet is synthetic and lives in this process: every client has its own id, broker password,
//! Ed25519 key and MQTT session (`coevo_mqtt`, as the edge agent uses), verifies the signed
//! manifest and the model's digest, and uploads a signed delta compressed with the round's
//! uplink codec ([`coevo_edge::agent::signed_upload`], the edge's own message builder), re-sending
//! after 10 s without a receipt as the edge does. Nothing trains: the deltas are small random
//! ones, so the bench measures the transport, the broker and the coordinator, not libtorch.
//!
//! The model is the student the coordinator builds for its dataset. The bench writes a tiny
//! synthetic IDX dataset (a few dozen images, so evaluation doesn't dominate the round) whose
//! image size gives the student ≈ `--params` parameters: 28×28 grey with 10 classes is exactly
//! the Fashion-MNIST student (114,314); the student's first linear layer grows with the image
//! (`32·⌊H/4⌋·⌊W/4⌋ × 64`), which is the least invasive way to reach a given size.
//!
//! Order of a run: broker → all clients connect at once (the connect storm, timed) →
//! coordinator → `--rounds` rounds → `DIR/n-N/summary.json`. `--sweep 100,1000,3000` runs one
//! fleet per size and plots time and memory against N in `DIR/fleet.svg`.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use coevo_coordinator::config::{BelowQuorum, BrokerEndpoint, RoundPolicy};
use coevo_coordinator::CoordinatorConfig;
use coevo_models::{DataShape, Student, Weights};
use coevo_mqtt::{Incoming, Session, Settings};
use coevo_protocol::envelope::{self, Kind};
use coevo_protocol::{
    digest, Digest, ErrorFeedback, LocalMetrics, ModelChunk, PublicKey, Receipt, ReceiptOutcome,
    RoundManifest, Signed, SigningKey, Topic, UplinkCodec,
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The embedded broker's commit-log segment (its default, 16 MiB); the bench sizes the count.
const SEGMENT_BYTES: usize = 16 << 20;
/// Fleet id of the bench's fleets.
const FLEET: &str = "bench";
/// Largest manifest or receipt a client decodes (the edge's bound).
const MAX_CONTROL_BYTES: usize = 64 * 1024;
/// First wait for a receipt before re-sending and its cap, as `coevo-edge`'s defaults
/// (`retry_wait`, `max_retry_wait`); the waits in between are the edge's own
/// ([`coevo_edge::agent::resend_wait`]: doubling, spread per client).
const RESEND_AFTER: Duration = Duration::from_secs(10);
const RESEND_MAX: Duration = Duration::from_secs(60);
/// Wait for the model's chunks before subscribing again to the missing ones (the edge's
/// fetch window timeout).
const FETCH_RETRY: Duration = Duration::from_secs(10);
/// Reconnect backoff cap of clients on a NATS cluster (README "Clustered broker": a fleet that
/// retries every few seconds keeps a small cluster's JetStream saturated).
const CLUSTER_RECONNECT_MAX: Duration = Duration::from_secs(60);
/// Distinct random deltas the fleet sends (client `i` sends number `i % POOL`): encoding one
/// per client would cost the load generator more CPU than the coordinator spends on it.
const DELTA_POOL: usize = 32;
/// Test images in the synthetic dataset (the coordinator evaluates on all of them).
const TEST_IMAGES: usize = 64;
/// Parameters of the student outside its first linear layer (28×28 grey, 10 classes):
/// conv1 416 + conv2 12,832 + fc1 bias 64 + fc2 650.
const STUDENT_FIXED_PARAMS: usize = 13_962;
/// Its first linear layer's weights per 4×4 block of the image: 32 channels × 64 outputs.
const STUDENT_PARAMS_PER_BLOCK: usize = 2_048;

/// Which broker the fleet talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerKind {
    /// `coevo broker` (rumqttd behind the ACL front end).
    Embedded,
    /// Debian's `mosquitto` on `coevo fleet export-mosquitto`'s files.
    Mosquitto,
    /// A 3-node cluster of Debian's `nats-server` (MQTT gateway + JetStream) on
    /// `coevo fleet export-nats`'s files; the fleet spreads over the nodes by client id.
    NatsCluster,
}

impl BrokerKind {
    fn label(self) -> &'static str {
        match self {
            BrokerKind::Embedded => "embedded",
            BrokerKind::Mosquitto => "mosquitto",
            BrokerKind::NatsCluster => "nats-cluster",
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct FleetArgs {
    /// Clients in the fleet (ignored with --sweep).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Fleet sizes to run one after the other, e.g. 100,1000,3000,10000 (plots vs N).
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<usize>,
    #[arg(long, value_enum, default_value_t = BrokerKind::Embedded)]
    pub broker: BrokerKind,
    /// Embedded broker only: run its front end in this many child processes
    /// (`front_processes` in the broker config; 0 = in the broker process). Needed past
    /// ~6,600 clients where the hard open-file limit is 20,000.
    #[arg(long, default_value_t = 0)]
    pub front_processes: usize,
    /// nats-cluster only: SIGKILL node 1 (the coordinator's first node, and a third of the
    /// fleet's) once this fraction of the fleet holds its round-1 receipt, e.g. 0.5. Its
    /// clients and the coordinator must fail over to the other nodes and lose nothing.
    #[arg(long)]
    pub kill_node_at: Option<f64>,
    /// Parameters of the student (≈; the image size is chosen to fit). Default: the
    /// Fashion-MNIST student, 114,314.
    #[arg(long)]
    pub params: Option<usize>,
    /// Uplink codec the coordinator signs into the manifest (f32, int8, top-k:ρ).
    #[arg(long, default_value = "int8")]
    pub uplink: UplinkCodec,
    /// Rounds to run.
    #[arg(long, default_value_t = 1)]
    pub rounds: u64,
    /// Aggregation rule, as `[aggregation] kind` in the coordinator config.
    #[arg(long, default_value = "fedavg")]
    pub aggregation: String,
    /// Seconds from a round's publication to its deadline; clients without a receipt by then
    /// (plus 30 s) are counted as lost.
    #[arg(long, default_value_t = 900)]
    pub round_timeout_s: u64,
    /// Seconds to wait for every client's first CONNACK before starting the coordinator
    /// anyway (clients still connecting keep trying).
    #[arg(long, default_value_t = 600)]
    pub connect_timeout_s: u64,
    /// Start at most this many clients per second (0: all at once, the connect storm). A
    /// cluster whose connects cost a replicated JetStream read (NATS) is measured at the rate
    /// it sustains; `connect_s` then includes the ramp.
    #[arg(long, default_value_t = 0)]
    pub connect_rate: u64,
    /// Simulated local training: each client uploads after a wait spread evenly over
    /// [0, S) seconds once it has the model (0: all upload at once, the worst case). Real
    /// cameras finish training over minutes, which spreads the uplink the broker must store.
    #[arg(long, default_value_t = 0.0)]
    pub train_spread_s: f64,
    /// Output directory: DIR/n-N/{fleet,data,coordinator,…} per fleet size, DIR/summary.json,
    /// DIR/fleet.svg.
    #[arg(long)]
    pub out: PathBuf,
}

/// One fleet size's figures (`DIR/n-N/summary.json`, and one entry of `DIR/summary.json`).
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub clients: usize,
    pub broker: BrokerKind,
    /// The embedded broker's front processes (0: front end in the broker process).
    pub front_processes: usize,
    /// Parameters of the coordinator's student.
    pub params: usize,
    /// Input images of the synthetic dataset the student is sized for (channels×H×W).
    pub image: String,
    pub uplink: String,
    pub aggregation: String,
    pub rounds: u64,
    /// Accepted deltas summed over rounds (from the coordinator's reports).
    pub accepted: usize,
    /// Per round: the report's `accepted`.
    pub accepted_per_round: Vec<usize>,
    /// Client-rounds that ended without a receipt (the client never heard back).
    pub lost: usize,
    /// Rejections of honest clients: every entry of the reports' `rejected` (all clients are
    /// honest here) plus rejected receipts.
    pub honest_rejections: u64,
    /// The reports' `late` entries (counted, not blamed).
    pub late: u64,
    /// Clients that had a CONNACK before the coordinator was started.
    pub connected_before_round: usize,
    /// First CONNECT → every client connected (`None`: not all of them did in time).
    pub connect_s: Option<f64>,
    /// CONNECT attempts per client (a successful one counts too: 1 is ideal).
    pub connect_attempts_max: u64,
    pub connect_attempts_total: u64,
    /// CONNECTs refused as bad credentials (all credentials are good: an overloaded broker).
    pub auth_refusals: u64,
    /// Clients that stopped on an error (unverifiable manifest, model or receipt, session
    /// ended), and the first such error.
    pub failed_clients: usize,
    pub first_failure: Option<String>,
    /// Per round: the manifest seen by the first client → the round's report written.
    pub publish_to_close_ms: Vec<Option<u64>>,
    /// Per round: the coordinator's `phase_ms`, as reported.
    pub phase_ms: Vec<serde_json::Value>,
    /// Per round: the aggregate phase per accepted client × parameter.
    pub aggregate_ns_per_param: Vec<Option<f64>>,
    /// Round 1's accepted deltas per second of publish → close.
    pub deltas_per_s: Option<f64>,
    /// Deltas re-sent after 10 s without a receipt (or after a reconnect), all clients.
    pub resends: u64,
    pub resends_max: u64,
    /// Peak resident memory (VmHWM, sampled every 100 ms) of each process, MB.
    pub coordinator_peak_rss_mb: f64,
    /// The broker tier: one process (with its front processes), or the sum of the cluster
    /// nodes' peaks.
    pub broker_peak_rss_mb: f64,
    /// nats-cluster: each node's peak, MB.
    pub broker_node_peak_rss_mb: Vec<f64>,
    /// nats-cluster with --kill-node-at: ms after the first manifest when node 1 was killed.
    pub node_killed_ms: Option<u64>,
    /// `--connect-rate` (0: all clients at once).
    pub connect_rate: u64,
    /// `--train-spread-s` (0: every client uploads as soon as it has the model).
    pub train_spread_s: f64,
    /// This process (the whole synthetic fleet), MB.
    pub bench_peak_rss_mb: f64,
    /// Per round: the report's outcome.
    pub outcomes: Vec<String>,
    /// Provisioning (keys, registry, credentials) of the fleet, s.
    pub provision_s: f64,
    /// Whole run, s.
    pub wall_s: f64,
}

#[derive(Debug, Serialize)]
struct Summary {
    command: String,
    runs: Vec<RunSummary>,
}

/// Runs the bench; writes `DIR/summary.json` and `DIR/fleet.svg`.
pub fn run(rt: &tokio::runtime::Runtime, a: &FleetArgs) -> Result<()> {
    raise_nofile()?;
    let sizes = if a.sweep.is_empty() {
        vec![a.clients]
    } else {
        a.sweep.clone()
    };
    if sizes.contains(&0) {
        bail!("a fleet needs at least one client");
    }
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if let Some(at) = a.kill_node_at {
        if a.broker != BrokerKind::NatsCluster {
            bail!("--kill-node-at needs --broker nats-cluster (the other brokers are one node)");
        }
        if !(0.0..=1.0).contains(&at) {
            bail!("--kill-node-at is a fraction of the fleet, 0 to 1 (got {at})");
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    // Absolute: the configs written for the coordinator resolve relative paths against their
    // own folder, so a relative --out would point them at DIR/…/DIR/….
    let a = &FleetArgs {
        out: a
            .out
            .canonicalize()
            .with_context(|| format!("resolving {}", a.out.display()))?,
        ..a.clone()
    };
    let mut summary = Summary {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        runs: Vec::new(),
    };
    for n in sizes {
        let dir = a.out.join(format!("n-{n}"));
        // Interrupted, the run's future is dropped, and with it the guards that kill the
        // broker and coordinator processes.
        let r = rt.block_on(async {
            tokio::select! {
                r = run_one(a, n, &dir) => r,
                _ = interrupted() => bail!("interrupted; {} is incomplete", dir.display()),
            }
        })?;
        eprintln!(
            "[fleet {n}] accepted {}/{} lost {} rejected {} connect {} publish→close {} coordinator {:.0} MB broker {:.0} MB",
            r.accepted,
            n as u64 * a.rounds,
            r.lost,
            r.honest_rejections,
            r.connect_s
                .map_or("incomplete".into(), |s| format!("{s:.1} s")),
            r.publish_to_close_ms
                .first()
                .copied()
                .flatten()
                .map_or("-".into(), |ms| format!("{:.1} s", ms as f64 / 1e3)),
            r.coordinator_peak_rss_mb,
            r.broker_peak_rss_mb
        );
        super::write_json(&dir.join("summary.json"), &r)?;
        summary.runs.push(r);
        super::write_json(&a.out.join("summary.json"), &summary)?;
        std::fs::write(a.out.join("fleet.svg"), chart_svg(&summary.runs)?)
            .with_context(|| format!("writing {}", a.out.join("fleet.svg").display()))?;
    }
    println!(
        "summary in {}, plot in {}",
        a.out.join("summary.json").display(),
        a.out.join("fleet.svg").display()
    );
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Every client holds a socket, and so does the broker for each: the default soft limit
/// (1,024) stops a fleet at about a thousand. Raised to the hard limit here, before the broker
/// and coordinator are spawned, so they inherit it too.
fn raise_nofile() -> Result<()> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")?;
    tracing::info!(limit, "open-file limit");
    Ok(())
}

/// The image size whose student has about `params` parameters: the first linear layer has
/// 2,048 weights per 4×4 block of the image, the rest is fixed (28×28 → 114,314 exactly).
pub fn shape_for_params(params: Option<usize>) -> DataShape {
    let blocks = match params {
        None => 49,
        Some(p) => {
            (p.saturating_sub(STUDENT_FIXED_PARAMS) as f64 / STUDENT_PARAMS_PER_BLOCK as f64)
                .round()
                .max(1.0) as usize
        }
    };
    let h = (blocks as f64).sqrt().floor().max(1.0) as usize;
    let w = (blocks as f64 / h as f64).round().max(1.0) as usize;
    DataShape {
        channels: 1,
        height: 4 * h,
        width: 4 * w,
        classes: 10,
    }
}

/// Writes a tiny random IDX dataset of `shape` (uncompressed; the coordinator evaluates on the
/// test split and reads nothing else of it in `fedavg` mode).
fn write_dataset(dir: &Path, shape: &DataShape) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for prefix in ["train", "t10k"] {
        let n = TEST_IMAGES;
        let mut img = Vec::with_capacity(16 + n * shape.height * shape.width);
        img.extend_from_slice(&0x0000_0803u32.to_be_bytes());
        for d in [n, shape.height, shape.width] {
            img.extend_from_slice(&(d as u32).to_be_bytes());
        }
        img.extend((0..n * shape.height * shape.width).map(|_| rng.gen::<u8>()));
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img)?;
        let mut lab = Vec::with_capacity(8 + n);
        lab.extend_from_slice(&0x0000_0801u32.to_be_bytes());
        lab.extend_from_slice(&(n as u32).to_be_bytes());
        lab.extend((0..n).map(|i| (i % shape.classes) as u8));
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab)?;
    }
    Ok(())
}

/// A spawned process, killed (and reaped) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        Ok(Proc { name, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, for an error message.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/PID/status` field in kB (`VmHWM`, `VmRSS`); `None` once the process is gone.
fn proc_status_kb(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident kB of `pid`'s child processes now (0 when it has none or they are unknown).
fn children_rss_kb(pid: &str) -> u64 {
    let list =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    list.split_whitespace()
        .filter_map(|c| proc_status_kb(c, "VmRSS"))
        .sum()
}

/// Samples the peak RSS of child processes (with their own children) every 100 ms until dropped: a process's VmHWM is
/// gone with it, so the highest value seen while it ran is kept.
struct RssMonitor {
    peaks: Arc<Vec<(u32, AtomicU64)>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssMonitor {
    fn start(pids: &[u32]) -> RssMonitor {
        let peaks: Arc<Vec<(u32, AtomicU64)>> =
            Arc::new(pids.iter().map(|&p| (p, AtomicU64::new(0))).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peaks.clone(), stop.clone());
        let thread = std::thread::spawn(move || loop {
            for (pid, peak) in p.iter() {
                let pid = pid.to_string();
                let kb = proc_status_kb(&pid, "VmHWM").or_else(|| proc_status_kb(&pid, "VmRSS"));
                if let Some(kb) = kb {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                // A broker with front processes: the whole tree, sampled together.
                let children = children_rss_kb(&pid);
                if children > 0 {
                    let now = proc_status_kb(&pid, "VmRSS").unwrap_or(0) + children;
                    peak.fetch_max(now, Ordering::Relaxed);
                }
            }
            if s.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        });
        RssMonitor {
            peaks,
            stop,
            thread: Some(thread),
        }
    }

    /// Peak of `pid` in MB so far.
    fn peak_mb(&self, pid: u32) -> f64 {
        self.peaks
            .iter()
            .find(|(p, _)| *p == pid)
            .map_or(0.0, |(_, kb)| kb.load(Ordering::Relaxed) as f64 / 1024.0)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RssMonitor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The lean `coevo` binary beside this one (`coevo-ml`), so the broker and its front processes
/// run without libtorch, as an installed broker does, and the broker RSS measured is the real
/// one; this executable (same `broker` command, but with libtorch mapped) when it is absent.
fn lean_exe() -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("locating the coevo binary")?;
    let lean = exe.with_file_name("coevo");
    Ok(if lean.is_file() { lean } else { exe })
}

/// The broker tier of a run: one process, or a NATS cluster.
enum BrokerTier {
    One(Proc),
    Cluster(crate::cluster::NatsCluster),
}

impl BrokerTier {
    /// Processes to sample for memory (a cluster: every node).
    fn pids(&self) -> Vec<u32> {
        match self {
            BrokerTier::One(p) => vec![p.pid()],
            BrokerTier::Cluster(c) => c.pids(),
        }
    }

    /// MQTT listeners as (host, port), node 1 first.
    fn nodes(&self, addr: SocketAddr) -> Vec<(String, u16)> {
        match self {
            BrokerTier::One(_) => vec![(addr.ip().to_string(), addr.port())],
            BrokerTier::Cluster(c) => c.mqtt_nodes(),
        }
    }
}

/// Starts the broker for `fleet` on `addr` as its own process (a cluster: on free ports).
fn start_broker(
    kind: BrokerKind,
    fleet: &crate::provision::Fleet,
    dir: &Path,
    addr: SocketAddr,
    clients: usize,
    front_processes: usize,
    round_uplink: usize,
) -> Result<BrokerTier> {
    let exe = lean_exe()?;
    let proc = match kind {
        BrokerKind::NatsCluster => {
            let cluster = crate::cluster::NatsCluster::start(
                &crate::cluster::ClusterSpec {
                    fleet: FLEET,
                    coordinator_id: &fleet.coordinator_id,
                    registry: &fleet.registry_path,
                    credentials: &fleet.credentials_path,
                    nodes: 3,
                },
                &dir.join("nats"),
            )?;
            return Ok(BrokerTier::Cluster(cluster));
        }
        BrokerKind::Embedded => {
            // As the sample config tells an operator: the deltas filter's in-memory log holds
            // a whole round's uplink, so a coordinator that is seconds behind a fleet uploading
            // at once loses nothing (rumqttd drops the oldest past it, even at QoS 1).
            let segments = round_uplink
                .div_ceil(SEGMENT_BYTES)
                .saturating_add(2)
                .max(10);
            let cfg = format!(
                "listen = \"{addr}\"\ncredentials = \"{}\"\n# the fleet, the coordinator and room for reconnects\nmax_connections = {}\nfront_processes = {front_processes}\nmax_segment_size = {SEGMENT_BYTES}\nmax_segment_count = {segments}\n",
                fleet.credentials_path.display(),
                clients + 64
            );
            let path = dir.join("broker.toml");
            std::fs::write(&path, cfg)?;
            let mut cmd = Command::new(exe);
            cmd.arg("broker").arg("--config").arg(&path);
            if std::env::var_os("RUST_LOG").is_none() {
                // Quiet, but say when each front process is up.
                cmd.env("RUST_LOG", "warn,rumqttd=error,coevo_broker::split=info");
            }
            Proc::spawn("broker", cmd, dir.join("broker.log"))?
        }
        BrokerKind::Mosquitto => {
            let mdir = dir.join("mosquitto");
            let registry = coevo_coordinator::FleetRegistry::load(&fleet.registry_path)?;
            let creds = coevo_broker::Credentials::load(&fleet.credentials_path)?;
            crate::mosquitto::export(
                &crate::mosquitto::Export {
                    fleet: FLEET,
                    coordinator_id: &fleet.coordinator_id,
                    registry: &registry,
                    credentials: &creds,
                    listen_host: "127.0.0.1",
                    listen_port: addr.port(),
                    user: None,
                },
                &mdir,
            )?;
            let bin = if Path::new("/usr/sbin/mosquitto").exists() {
                "/usr/sbin/mosquitto"
            } else {
                "mosquitto"
            };
            let mut cmd = Command::new(bin);
            cmd.arg("-c").arg(mdir.join("mosquitto.conf"));
            Proc::spawn("broker", cmd, dir.join("mosquitto.log"))
                .context("is mosquitto installed? (scripts/setup)")?
        }
    };
    let t0 = Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!(
                "the {} did not listen on {addr} within 30 s:\n{}",
                proc.name,
                proc.tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(BrokerTier::One(proc))
}

/// What the synthetic clients share.
struct FleetCtx {
    /// Clients started per second (0: all at once).
    connect_rate: u64,
    /// Uploads spread over this long after the model arrives (`--train-spread-s`).
    train_spread: Duration,
    /// The broker's MQTT listeners (one, or a cluster's nodes).
    nodes: Vec<(String, u16)>,
    coordinator_id: String,
    coordinator_key: PublicKey,
    rounds: u64,
    /// The student's layout: a model must decode to it.
    layout: Weights,
    /// Encoded random deltas (uplink codec), client `i` sends `payloads[i % len]`.
    payloads: Vec<Vec<u8>>,
    /// Give-up time per round: the round's signed deadline plus this.
    grace: Duration,
    t0: Instant,
    connected: AtomicUsize,
    receipts: AtomicUsize,
    /// Per round: ms since `t0` when the first client saw its manifest.
    first_manifest_ms: Vec<AtomicU64>,
    /// Model digests already decoded and checked against `layout` (once per model).
    checked_models: std::sync::Mutex<Vec<Digest>>,
}

/// What one synthetic client did.
#[derive(Debug, Default)]
struct ClientResult {
    attempts: u64,
    first_connected_ms: Option<u64>,
    /// Per round: the receipt's outcome (`None`: none came).
    receipts: Vec<Option<ReceiptOutcome>>,
    resends: u64,
    /// CONNECTs the broker answered "bad user name or password" (an overloaded broker may).
    auth_refusals: u64,
    error: Option<String>,
}

/// One client's MQTT session and counters while it runs.
struct Client {
    id: String,
    key: SigningKey,
    samples: u64,
    session: Session,
    connected: bool,
    r: ClientResult,
}

enum Ev {
    Manifest(Box<RoundManifest>),
    Chunk(u32, ModelChunk),
    Receipt(Receipt),
    Connected,
    Other,
}

impl Client {
    /// Next event, with connection bookkeeping: every CONNACK, refused or failed connection
    /// attempt counts as one CONNECT.
    async fn next(&mut self, ctx: &FleetCtx) -> Result<Ev> {
        let ev = self
            .session
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("MQTT session ended"))?;
        match ev {
            Incoming::Connected { .. } => {
                self.r.attempts += 1;
                self.connected = true;
                if self.r.first_connected_ms.is_none() {
                    self.r.first_connected_ms = Some(ctx.t0.elapsed().as_millis() as u64);
                    ctx.connected.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ev::Connected)
            }
            Incoming::Disconnected(_) => {
                // A drop of a live connection is not an attempt; a failed attempt is.
                if !self.connected {
                    self.r.attempts += 1;
                }
                self.connected = false;
                Ok(Ev::Other)
            }
            // Counted, not fatal (the edge gives up after `max_auth_refusals`): a broker whose
            // auth queue overflows in a connect storm refuses good credentials, and the bench
            // is there to measure that, not to lose the client. The session retries.
            Incoming::AuthRefused { .. } => {
                self.r.attempts += 1;
                self.r.auth_refusals += 1;
                self.connected = false;
                Ok(Ev::Other)
            }
            // Only sessions with an incoming bound shed; these have none.
            Incoming::Shed(_) => Ok(Ev::Other),
            Incoming::Publish(p) => {
                if p.payload.is_empty() {
                    return Ok(Ev::Other);
                }
                Ok(match Topic::parse(FLEET, &p.topic) {
                    Ok(Topic::RoundCurrent) => {
                        match envelope::decode::<Signed>(
                            &p.payload,
                            Kind::Manifest,
                            MAX_CONTROL_BYTES,
                        )
                        .and_then(|s| {
                            s.verify_from::<RoundManifest>(
                                Kind::Manifest,
                                &ctx.coordinator_id,
                                &ctx.coordinator_key,
                                MAX_CONTROL_BYTES,
                            )
                        }) {
                            Ok(m) if m.fleet == FLEET => Ev::Manifest(Box::new(m)),
                            Ok(_) => Ev::Other,
                            Err(e) => bail!("{}: unverifiable manifest: {e}", self.id),
                        }
                    }
                    Ok(Topic::ModelChunk { index, .. }) => {
                        match envelope::decode::<ModelChunk>(
                            &p.payload,
                            Kind::ModelChunk,
                            4 * 1024 * 1024,
                        ) {
                            Ok(c) => Ev::Chunk(index, c),
                            Err(e) => bail!("{}: malformed model chunk: {e}", self.id),
                        }
                    }
                    Ok(Topic::Receipt { .. }) => {
                        match envelope::decode::<Signed>(
                            &p.payload,
                            Kind::Receipt,
                            MAX_CONTROL_BYTES,
                        )
                        .and_then(|s| {
                            s.verify_from::<Receipt>(
                                Kind::Receipt,
                                &ctx.coordinator_id,
                                &ctx.coordinator_key,
                                MAX_CONTROL_BYTES,
                            )
                        }) {
                            Ok(r) if r.client == self.id && r.fleet == FLEET => Ev::Receipt(r),
                            Ok(_) => Ev::Other,
                            Err(e) => bail!("{}: unverifiable receipt: {e}", self.id),
                        }
                    }
                    _ => Ev::Other,
                })
            }
        }
    }

    /// Subscribes to the model's chunk topics and reassembles them; checks the digest the
    /// manifest signed (and, once per model, that it decodes to the student's layout).
    async fn fetch(&mut self, ctx: &FleetCtx, m: &RoundManifest) -> Result<Option<Vec<u8>>> {
        let total = m.model.chunks.max(1);
        let size = usize::try_from(m.model.size).context("model size")?;
        let mut reasm: coevo_protocol::Reassembler<Digest> =
            coevo_protocol::Reassembler::new(1, size, total);
        let mut have = std::collections::BTreeSet::new();
        let give_up = deadline_instant(m.deadline_unix_ms) + ctx.grace;
        loop {
            let topics: Vec<String> = (0..total)
                .filter(|i| !have.contains(i))
                .map(|index| {
                    Topic::ModelChunk {
                        digest: m.model.digest,
                        index,
                    }
                    .path(FLEET)
                })
                .collect();
            for t in &topics {
                self.session.subscribe(t).await?;
            }
            let until = tokio::time::Instant::now() + FETCH_RETRY;
            let bytes = loop {
                let ev = tokio::select! {
                    ev = self.next(ctx) => ev?,
                    _ = tokio::time::sleep_until(until) => break None,
                };
                if let Ev::Chunk(index, c) = ev {
                    if c.digest != m.model.digest || c.index != index || c.total != total {
                        continue;
                    }
                    match reasm.insert(c.digest, index, c.total, c.data) {
                        Ok(Some(bytes)) => break Some(bytes),
                        Ok(None) => {
                            have.insert(index);
                        }
                        Err(e) => bail!("{}: model chunk {index}: {e}", self.id),
                    }
                }
            };
            for t in &topics {
                self.session.unsubscribe(t).await?;
            }
            if let Some(bytes) = bytes {
                if bytes.len() != size || digest(&bytes) != m.model.digest {
                    bail!("{}: the model does not match the signed digest", self.id);
                }
                check_model_once(ctx, m, &bytes)?;
                return Ok(Some(bytes));
            }
            if tokio::time::Instant::now() >= give_up {
                return Ok(None);
            }
        }
    }
}

/// Decodes the first copy of each model against the student's layout: proves the coordinator
/// serves the model the deltas are built for, without every client paying for the decode.
fn check_model_once(ctx: &FleetCtx, m: &RoundManifest, bytes: &[u8]) -> Result<()> {
    let mut checked = ctx
        .checked_models
        .lock()
        .map_err(|_| anyhow::anyhow!("model check lock poisoned"))?;
    if checked.contains(&m.model.digest) {
        return Ok(());
    }
    Weights::decode_model(bytes, m.model.codec, &ctx.layout)
        .context("the round's model is not the student the fleet was sized for")?;
    checked.push(m.model.digest);
    Ok(())
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn deadline_instant(unix_ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(unix_ms.saturating_sub(now_unix_ms()))
}

/// One synthetic client: every round, the manifest, the model, a signed delta, its receipt.
async fn client_task(
    ctx: Arc<FleetCtx>,
    i: usize,
    id: String,
    key: SigningKey,
    password: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> ClientResult {
    if ctx.connect_rate > 0 {
        tokio::time::sleep(Duration::from_secs_f64(i as f64 / ctx.connect_rate as f64)).await;
    }
    let mut settings = Settings::new(&ctx.nodes[0].0, ctx.nodes[0].1, id.as_str());
    if ctx.nodes.len() > 1 {
        // As a camera on a cluster is configured (README "Clustered broker").
        settings.spread_over(&ctx.nodes);
        settings.qos0_subscriptions = true;
        settings.max_backoff = CLUSTER_RECONNECT_MAX;
    }
    settings.password = Some(password);
    let filters = vec![
        Topic::RoundCurrent.path(FLEET),
        Topic::Receipt { client: id.clone() }.path(FLEET),
    ];
    let session = Session::start(&settings, filters);
    let mut c = Client {
        id,
        key,
        samples: 50 + (i as u64 * 7919) % 101,
        session,
        connected: false,
        r: ClientResult::default(),
    };
    let result = rounds(&ctx, i, &mut c).await;
    if let Err(e) = result {
        c.r.error = Some(format!("{e:#}"));
    }
    // Stay connected until the whole fleet is done, as cameras would.
    let _ = stop.wait_for(|s| *s).await;
    let mut r = std::mem::take(&mut c.r);
    r.receipts.resize(ctx.rounds as usize, None);
    c.session.close().await;
    r
}

async fn rounds(ctx: &FleetCtx, i: usize, c: &mut Client) -> Result<()> {
    let mut last_round = 0u64;
    while (c.r.receipts.len() as u64) < ctx.rounds {
        let m = loop {
            if let Ev::Manifest(m) = c.next(ctx).await? {
                if m.round > last_round && m.deadline_unix_ms > now_unix_ms() {
                    break m;
                }
            }
        };
        let slot = c.r.receipts.len();
        if let Some(first) = ctx.first_manifest_ms.get(slot) {
            first.fetch_min(ctx.t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        last_round = m.round;
        if c.fetch(ctx, &m).await?.is_none() {
            c.r.receipts.push(None);
            continue;
        }
        if !ctx.train_spread.is_zero() {
            // Client i of n waits (i·φ mod 1)·S: evenly spread, not in id order.
            let frac = (i as f64 * 0.618_033_988_749_895).fract();
            tokio::time::sleep(ctx.train_spread.mul_f64(frac)).await;
        }
        let payload = &ctx.payloads[i % ctx.payloads.len()];
        let upload = coevo_edge::agent::signed_upload(
            FLEET,
            &c.id,
            &c.key,
            &m,
            payload,
            c.samples,
            LocalMetrics::default(),
        );
        let give_up = deadline_instant(m.deadline_unix_ms) + ctx.grace;
        let mut outcome = None;
        let mut attempt = 0u32;
        'send: loop {
            for (topic, bytes) in &upload.messages {
                c.session
                    .publish(topic.clone(), bytes.clone(), false)
                    .await?;
            }
            let wait = coevo_edge::agent::resend_wait(
                &c.id,
                upload.round,
                attempt,
                RESEND_AFTER,
                RESEND_MAX,
            );
            attempt = attempt.saturating_add(1);
            let until = (tokio::time::Instant::now() + wait).min(give_up);
            loop {
                let ev = tokio::select! {
                    ev = c.next(ctx) => ev?,
                    _ = tokio::time::sleep_until(until) => break,
                };
                match ev {
                    Ev::Receipt(r)
                        if r.round == upload.round && r.payload_digest == upload.payload_digest =>
                    {
                        outcome = Some(r.outcome);
                        break 'send;
                    }
                    // After a reconnect the broker may have lost our in-flight chunks.
                    Ev::Connected => break,
                    _ => {}
                }
            }
            if tokio::time::Instant::now() >= give_up {
                break;
            }
            c.r.resends += 1;
        }
        if outcome.is_some() {
            ctx.receipts.fetch_add(1, Ordering::Relaxed);
        }
        c.r.receipts.push(outcome);
    }
    Ok(())
}

/// `DELTA_POOL` seeded random deltas of the student's layout (uniform ±0.005: an ordinary
/// one-round step), compressed as a camera does (error feedback from zero).
fn delta_pool(layout: &Weights, codec: UplinkCodec) -> Result<Vec<Vec<u8>>> {
    (0..DELTA_POOL)
        .map(|k| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + k as u64);
            let mut d = layout.zeros_like();
            for t in d.tensors.values_mut() {
                t.data
                    .iter_mut()
                    .for_each(|v| *v = rng.gen_range(-0.005f32..0.005));
            }
            let (payload, _) = ErrorFeedback::new().compress(&d.to_named(), codec)?;
            Ok(payload)
        })
        .collect()
}

async fn run_one(a: &FleetArgs, n: usize, dir: &Path) -> Result<RunSummary> {
    let wall = Instant::now();
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let shape = shape_for_params(a.params);
    let layout = {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _net = Student::new(&vs.root(), &shape);
        Weights::from_var_store(&vs)
    };
    let params = layout.num_params();
    write_dataset(&dir.join("data"), &shape)?;
    let ids: Vec<String> = (0..n).map(|i| format!("cam-{i:05}")).collect();
    let t_prov = Instant::now();
    let fleet = tokio::task::block_in_place(|| {
        crate::provision::provision(&dir.join("fleet"), "coordinator", &ids)
    })?;
    let provision_s = t_prov.elapsed().as_secs_f64();
    let addr = coevo_broker::free_local_addr()?;
    let payloads = delta_pool(&layout, a.uplink)?;
    let round_uplink = payloads.iter().map(Vec::len).max().unwrap_or(0) * n;
    let mut broker = start_broker(
        a.broker,
        &fleet,
        dir,
        addr,
        n,
        a.front_processes,
        round_uplink,
    )?;

    // The fleet connects first (the storm), then the coordinator opens the round.
    let t0 = Instant::now();
    let nodes = broker.nodes(addr);
    if !(a.train_spread_s >= 0.0 && a.train_spread_s.is_finite()) {
        bail!("--train-spread-s must be a number of seconds ≥ 0");
    }
    let ctx = Arc::new(FleetCtx {
        connect_rate: a.connect_rate,
        train_spread: Duration::from_secs_f64(a.train_spread_s),
        nodes: nodes.clone(),
        coordinator_id: fleet.coordinator_id.clone(),
        coordinator_key: fleet.coordinator_key.public_key(),
        rounds: a.rounds,
        payloads,
        layout,
        grace: Duration::from_secs(30),
        t0,
        connected: AtomicUsize::new(0),
        receipts: AtomicUsize::new(0),
        first_manifest_ms: (0..a.rounds).map(|_| AtomicU64::new(u64::MAX)).collect(),
        checked_models: std::sync::Mutex::new(Vec::new()),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = fleet
        .clients
        .iter()
        .enumerate()
        .map(|(i, (id, key, pw))| {
            tokio::spawn(client_task(
                ctx.clone(),
                i,
                id.clone(),
                key.clone(),
                pw.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "[fleet {n} {}] {{msg}} {{elapsed}}",
            a.broker.label()
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let connect_limit = Duration::from_secs(a.connect_timeout_s);
    loop {
        let c = ctx.connected.load(Ordering::Relaxed);
        bar.set_message(format!("connected {c}/{n}"));
        if c >= n || t0.elapsed() > connect_limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connected_before_round = ctx.connected.load(Ordering::Relaxed);

    let out = dir.join("coordinator");
    let cfg = CoordinatorConfig {
        fleet: FLEET.into(),
        client_id: fleet.coordinator_id.clone(),
        key: fleet.dir.join("keys/coordinator.pk8"),
        registry: fleet.registry_path.clone(),
        out: out.clone(),
        rounds: a.rounds,
        broker: BrokerEndpoint {
            host: nodes[0].0.clone(),
            port: nodes[0].1,
            cluster: nodes[1..].iter().map(|(h, p)| format!("{h}:{p}")).collect(),
            password: Some(fleet.coordinator_password.clone()),
            connect_timeout_s: 60,
            ..Default::default()
        },
        data: coevo_coordinator::config::DataConfig {
            path: dir.join("data"),
            test_limit: 0,
        },
        round: RoundPolicy {
            quorum: 1,
            timeout_s: a.round_timeout_s,
            below_quorum: BelowQuorum::Skip,
            max_extensions: 0,
        },
        aggregation: toml::from_str(&format!("kind = {:?}", a.aggregation))
            .with_context(|| format!("--aggregation {}", a.aggregation))?,
        mode: coevo_coordinator::coevolve::Mode::Fedavg,
        ..CoordinatorConfig::default()
    };
    let mut cfg = cfg;
    cfg.transfer.uplink_codec = a.uplink;
    let cfg_path = dir.join("coordinator.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg)?)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("coordinator").arg("--config").arg(&cfg_path);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    let mut coordinator = Proc::spawn("coordinator", cmd, dir.join("coordinator.log"))?;
    let broker_pids = broker.pids();
    let mut rss = RssMonitor::start(
        &std::iter::once(coordinator.pid())
            .chain(broker_pids.iter().copied())
            .collect::<Vec<_>>(),
    );
    let mut node_killed_ms = None;

    // Until every round's report is written (or the coordinator exits).
    let mut report_ms: Vec<Option<u64>> = vec![None; a.rounds as usize];
    let limit = t0.elapsed() + Duration::from_secs((a.round_timeout_s + 120) * a.rounds);
    loop {
        for (k, slot) in report_ms.iter_mut().enumerate() {
            if slot.is_none() && report_path(&out, k as u64 + 1).exists() {
                *slot = Some(t0.elapsed().as_millis() as u64);
            }
        }
        bar.set_message(format!(
            "connected {}/{n}, receipts {}/{}, reports {}/{}",
            ctx.connected.load(Ordering::Relaxed),
            ctx.receipts.load(Ordering::Relaxed),
            n as u64 * a.rounds,
            report_ms.iter().flatten().count(),
            a.rounds
        ));
        if report_ms.iter().all(Option::is_some) {
            break;
        }
        if let (Some(at), BrokerTier::Cluster(c), None) =
            (a.kill_node_at, &mut broker, node_killed_ms)
        {
            if ctx.receipts.load(Ordering::Relaxed) as f64 >= at * n as f64 {
                c.kill(0)?;
                let first = ctx.first_manifest_ms[0].load(Ordering::Relaxed);
                let ms = (t0.elapsed().as_millis() as u64).saturating_sub(first);
                node_killed_ms = Some(ms);
                bar.println(format!(
                    "killed NATS node 1 at {:.1} s, {} receipts",
                    ms as f64 / 1e3,
                    ctx.receipts.load(Ordering::Relaxed)
                ));
            }
        }
        if let Some(status) = coordinator.child.try_wait()? {
            if !report_ms.iter().all(Option::is_some) {
                bail!(
                    "the coordinator exited ({status}) before its last report:\n{}",
                    coordinator.tail()
                );
            }
        }
        if t0.elapsed() > limit {
            bail!(
                "no report for every round after {} s; coordinator log:\n{}",
                limit.as_secs(),
                coordinator.tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The coordinator exits after its last round: wait for it (its peak is behind it), then
    // release the fleet.
    let exit_by = Instant::now() + Duration::from_secs(30);
    while coordinator.child.try_wait()?.is_none() && Instant::now() < exit_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        results.push(t.await.context("a client task panicked")?);
    }
    bar.finish_and_clear();
    rss.stop();
    let coordinator_peak_rss_mb = rss.peak_mb(coordinator.pid());
    let broker_node_peak_rss_mb: Vec<f64> = broker_pids.iter().map(|&p| rss.peak_mb(p)).collect();
    let broker_peak_rss_mb = broker_node_peak_rss_mb.iter().sum();
    drop(broker);
    drop(coordinator);
    if let Some(e) = results.iter().find_map(|r| r.error.as_ref()) {
        tracing::warn!(error = %e, "a synthetic client failed");
    }

    let reports: Vec<serde_json::Value> = (1..=a.rounds)
        .map(|k| -> Result<serde_json::Value> {
            let p = report_path(&out, k);
            Ok(serde_json::from_slice(
                &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            )?)
        })
        .collect::<Result<_>>()?;
    let count = |r: &serde_json::Value, field: &str| -> u64 {
        r[field].as_array().map_or(0, |v| {
            v.iter().map(|e| e["count"].as_u64().unwrap_or(1)).sum()
        })
    };
    let accepted_per_round: Vec<usize> = reports
        .iter()
        .map(|r| r["accepted"].as_u64().unwrap_or(0) as usize)
        .collect();
    let rejected_receipts = results
        .iter()
        .flat_map(|r| &r.receipts)
        .filter(|o| matches!(o, Some(ReceiptOutcome::Rejected(_))))
        .count() as u64;
    let publish_to_close_ms: Vec<Option<u64>> = report_ms
        .iter()
        .zip(&ctx.first_manifest_ms)
        .map(|(done, first)| {
            let first = first.load(Ordering::Relaxed);
            done.filter(|_| first != u64::MAX)
                .map(|d| d.saturating_sub(first))
        })
        .collect();
    let phase_ms: Vec<serde_json::Value> = reports.iter().map(|r| r["phase_ms"].clone()).collect();
    let aggregate_ns_per_param = phase_ms
        .iter()
        .zip(&accepted_per_round)
        .map(|(p, &acc)| {
            let ms = p["aggregate"].as_f64()?;
            (acc > 0).then(|| ms * 1e6 / (acc as f64 * params as f64))
        })
        .collect();
    let deltas_per_s = publish_to_close_ms
        .first()
        .copied()
        .flatten()
        .filter(|&ms| ms > 0)
        .map(|ms| accepted_per_round.first().copied().unwrap_or(0) as f64 / (ms as f64 / 1e3));
    let connects: Vec<u64> = results
        .iter()
        .filter_map(|r| r.first_connected_ms)
        .collect();
    let connect_s =
        (connects.len() == n).then(|| connects.iter().copied().max().unwrap_or(0) as f64 / 1e3);
    Ok(RunSummary {
        clients: n,
        broker: a.broker,
        front_processes: a.front_processes,
        params,
        image: format!("{}x{}x{}", shape.channels, shape.height, shape.width),
        uplink: a.uplink.to_string(),
        aggregation: a.aggregation.clone(),
        rounds: a.rounds,
        accepted: accepted_per_round.iter().sum(),
        accepted_per_round,
        lost: results
            .iter()
            .flat_map(|r| &r.receipts)
            .filter(|o| o.is_none())
            .count(),
        honest_rejections: reports.iter().map(|r| count(r, "rejected")).sum::<u64>()
            + rejected_receipts,
        late: reports.iter().map(|r| count(r, "late")).sum(),
        connected_before_round,
        connect_s,
        connect_attempts_max: results.iter().map(|r| r.attempts).max().unwrap_or(0),
        connect_attempts_total: results.iter().map(|r| r.attempts).sum(),
        auth_refusals: results.iter().map(|r| r.auth_refusals).sum(),
        failed_clients: results.iter().filter(|r| r.error.is_some()).count(),
        first_failure: results.iter().find_map(|r| r.error.clone()),
        publish_to_close_ms,
        phase_ms,
        aggregate_ns_per_param,
        deltas_per_s,
        resends: results.iter().map(|r| r.resends).sum(),
        resends_max: results.iter().map(|r| r.resends).max().unwrap_or(0),
        coordinator_peak_rss_mb,
        broker_peak_rss_mb,
        broker_node_peak_rss_mb: if matches!(a.broker, BrokerKind::NatsCluster) {
            broker_node_peak_rss_mb
        } else {
            Vec::new()
        },
        node_killed_ms,
        connect_rate: a.connect_rate,
        train_spread_s: a.train_spread_s,
        bench_peak_rss_mb: proc_status_kb("self", "VmHWM").unwrap_or(0) as f64 / 1024.0,
        outcomes: reports
            .iter()
            .map(|r| r["outcome"].as_str().unwrap_or("?").to_string())
            .collect(),
        provision_s,
        wall_s: wall.elapsed().as_secs_f64(),
    })
}

fn report_path(out: &Path, round: u64) -> PathBuf {
    out.join("reports").join(format!("round-{round:04}.json"))
}

/// `DIR/fleet.svg`: connect time and round-1 publish → close (s, left) and the coordinator's
/// and broker's peak RSS (MB, right) against the number of clients, one panel each.
pub fn chart_svg(runs: &[RunSummary]) -> Result<String> {
    use plotters::prelude::*;
    /// A legend label, its colour and its (clients, value) points.
    type Series = (&'static str, RGBColor, Vec<(f64, f64)>);
    let xs: Vec<f64> = runs.iter().map(|r| r.clients as f64).collect();
    let x_hi = xs.iter().copied().fold(1.0, f64::max) * 1.1;
    let time: [Series; 2] = [
        (
            "connect (s)",
            BLUE,
            runs.iter()
                .filter_map(|r| Some((r.clients as f64, r.connect_s?)))
                .collect(),
        ),
        (
            "publish → close, round 1 (s)",
            RED,
            runs.iter()
                .filter_map(|r| {
                    Some((
                        r.clients as f64,
                        (*r.publish_to_close_ms.first()?)? as f64 / 1e3,
                    ))
                })
                .collect(),
        ),
    ];
    let memory: [Series; 2] = [
        (
            "coordinator peak RSS (MB)",
            BLUE,
            runs.iter()
                .map(|r| (r.clients as f64, r.coordinator_peak_rss_mb))
                .collect(),
        ),
        (
            "broker peak RSS (MB)",
            RED,
            runs.iter()
                .map(|r| (r.clients as f64, r.broker_peak_rss_mb))
                .collect(),
        ),
    ];
    let top = |series: &[Series]| {
        series
            .iter()
            .flat_map(|s| s.2.iter().map(|p| p.1))
            .fold(1.0, f64::max)
            * 1.15
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((1, 2));
        for (area, (title, series)) in panels
            .iter()
            .zip([("time vs clients", &time), ("memory vs clients", &memory)])
        {
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!(
                        "{title} ({}, {} params)",
                        runs.first().map_or("", |r| match r.broker {
                            BrokerKind::Embedded => "embedded broker",
                            BrokerKind::Mosquitto => "Mosquitto",
                            BrokerKind::NatsCluster => "3-node NATS cluster",
                        }),
                        runs.first().map_or(0, |r| r.params)
                    ),
                    ("sans-serif", 18),
                )
                .margin(15)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..x_hi, 0.0..top(series.as_slice()))?;
            chart
                .configure_mesh()
                .x_desc("clients")
                .y_desc(if title.starts_with("time") { "s" } else { "MB" })
                .draw()?;
            for (label, color, points) in series.iter() {
                let color = *color;
                chart
                    .draw_series(LineSeries::new(points.clone(), color))?
                    .label(*label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default is exactly the Fashion-MNIST student; other sizes land within one 4×4
    /// block's worth of weights (2,048) of the request, and the formula matches the network.
    #[test]
    fn params_pick_the_student_size() {
        let count = |shape: &DataShape| {
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let _net = Student::new(&vs.root(), shape);
            Weights::from_var_store(&vs).num_params()
        };
        let fmnist = shape_for_params(None);
        assert_eq!((fmnist.height, fmnist.width), (28, 28));
        assert_eq!(count(&fmnist), 114_314);
        for want in [28_000usize, 1_000_000] {
            let got = count(&shape_for_params(Some(want)));
            assert!(
                got.abs_diff(want) <= want / 20 + STUDENT_FIXED_PARAMS,
                "{want} params asked, {got} built"
            );
        }
    }

    #[test]
    fn proc_status_reads_own_peak() {
        let kb = proc_status_kb("self", "VmHWM").expect("VmHWM on Linux");
        assert!(kb > 1024, "{kb} kB");
    }
}
