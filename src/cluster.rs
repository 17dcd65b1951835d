//! A NATS cluster on this box, on what `coevo fleet export-nats` writes: the clustered broker
//! tier of DESIGN §7b for `coevo bench fleet --broker nats-cluster` and the cluster tests. Each
//! node is its own `nats-server` process (Debian's package, installed by `scripts/setup`),
//! killed when the [`NatsCluster`] is dropped; [`NatsCluster::kill`] takes one down mid-round.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to start.
pub struct ClusterSpec<'a> {
    pub fleet: &'a str,
    pub coordinator_id: &'a str,
    pub registry: &'a Path,
    pub credentials: &'a Path,
    pub nodes: usize,
}

/// One running node.
struct NodeProc {
    child: Option<Child>,
    mqtt: SocketAddr,
    monitor: SocketAddr,
    log: PathBuf,
}

/// Running NATS nodes, killed on drop.
pub struct NatsCluster {
    nodes: Vec<NodeProc>,
}

/// The `nats-server` binary: Debian's path, else `PATH`.
fn nats_bin() -> &'static str {
    if Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}

/// `n` distinct free loopback ports (held together while choosing, so they differ).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

impl NatsCluster {
    /// Exports the fleet into `dir` (as `coevo fleet export-nats` would, on free loopback
    /// ports) and starts every node; returns once each node reports healthy with JetStream up.
    pub fn start(spec: &ClusterSpec<'_>, dir: &Path) -> Result<NatsCluster> {
        let registry = coevo_coordinator::FleetRegistry::load(spec.registry)?;
        let creds = coevo_broker::Credentials::load(spec.credentials)?;
        let ports = free_ports(4 * spec.nodes)?;
        let nodes: Vec<coevo_cli::nats::Node> = (0..spec.nodes)
            .map(|i| coevo_cli::nats::Node {
                host: "127.0.0.1".into(),
                mqtt_port: ports[4 * i],
                client_port: ports[4 * i + 1],
                cluster_port: ports[4 * i + 2],
                monitor_port: ports[4 * i + 3],
            })
            .collect();
        let paths = coevo_cli::nats::export(
            &coevo_cli::nats::Export {
                fleet: spec.fleet,
                coordinator_id: spec.coordinator_id,
                registry: &registry,
                credentials: &creds,
                nodes: nodes.clone(),
                cluster_name: "coevo",
            },
            dir,
        )?;
        let mut cluster = NatsCluster { nodes: Vec::new() };
        for (i, (node, conf)) in nodes.iter().zip(&paths).enumerate() {
            let log = dir.join(format!("node-{}.log", i + 1));
            let file = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let child = Command::new(nats_bin())
                .arg("-c")
                .arg(conf)
                .stdout(file.try_clone()?)
                .stderr(file)
                .stdin(Stdio::null())
                .spawn()
                .context("starting nats-server (is it installed? scripts/setup)")?;
            cluster.nodes.push(NodeProc {
                child: Some(child),
                mqtt: SocketAddr::from(([127, 0, 0, 1], node.mqtt_port)),
                monitor: SocketAddr::from(([127, 0, 0, 1], node.monitor_port)),
                log,
            });
        }
        cluster.wait_healthy(Duration::from_secs(60))?;
        Ok(cluster)
    }

    /// MQTT listeners, node 1 first.
    pub fn mqtt_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.mqtt).collect()
    }

    /// MQTT listeners as (host, port), for [`coevo_mqtt::Settings::cluster`].
    pub fn mqtt_nodes(&self) -> Vec<(String, u16)> {
        self.nodes
            .iter()
            .map(|n| (n.mqtt.ip().to_string(), n.mqtt.port()))
            .collect()
    }

    /// PIDs of the live nodes (for memory sampling).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }

    /// SIGKILLs node `i` (0-based): the failure a cluster must ride out.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let node = self.nodes.get_mut(i).context("no such node")?;
        if let Some(mut c) = node.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// The last lines of every node's log.
    pub fn tail(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("== {}\n", n.log.display()));
            out.push_str(&lines[lines.len().saturating_sub(15)..].join("\n"));
            out.push('\n');
        }
        out
    }

    /// Waits until every live node answers `/healthz` with 200 (listeners up, JetStream
    /// current: MQTT sessions and retained messages live in JetStream).
    pub fn wait_healthy(&mut self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        for i in 0..self.nodes.len() {
            loop {
                let n = &mut self.nodes[i];
                let Some(child) = n.child.as_mut() else {
                    break;
                };
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "nats-server node {} exited ({status}):\n{}",
                        i + 1,
                        self.tail()
                    );
                }
                if healthz(n.monitor) {
                    break;
                }
                if t0.elapsed() > limit {
                    bail!(
                        "nats-server node {} not healthy within {limit:?}:\n{}",
                        i + 1,
                        self.tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

/// `GET /healthz` on a node's monitoring port: true on HTTP 200.
fn healthz(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match s.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    head[..got].starts_with(b"HTTP/1.0 200") || head[..got].starts_with(b"HTTP/1.1 200")
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
