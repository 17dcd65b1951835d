//! Connect-storm measurement for BENCHMARKS.md: N clients with generated device secrets
//! connect at once (real `coevo_mqtt` sessions, one process) to the embedded broker running in
//! a child process of its own, so its RSS is the broker's alone.
//!
//! ```sh
//! cargo run -p coevo-broker --example storm -- 10000 [DEADLINE_S, default 120]
//! ```
//!
//! Prints one Markdown table row: clients, connected, clients that needed a second CONNECT,
//! time until all were connected, p50/p99 time to CONNACK, the broker's busy answers and auth
//! refusals, and its RSS idle and holding N connections.

#[path = "../tests/common/storm.rs"]
mod storm;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use coevo_broker::{free_local_addr, generate_password, BrokerConfig, Credentials};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        return serve(args.get(2).ok_or("serve CONFIG")?);
    }
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(2_000);
    let deadline_s: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(120);
    coevo_broker::raise_fd_limit(2 * n as u64 + 1024)?;
    let dir = tempfile::tempdir()?;
    let creds_path = dir.path().join("credentials.toml");
    let clients: Vec<(String, String)> = (0..n)
        .map(|i| (format!("cam-{i:05}"), generate_password()))
        .collect();
    let mut creds = Credentials::default();
    for (id, pw) in &clients {
        creds.set_device_secret(id, pw)?;
    }
    creds.save(&creds_path)?;
    let config = BrokerConfig {
        listen: free_local_addr()?,
        credentials: Some(creds_path),
        ..BrokerConfig::default()
    };
    let config_path = dir.path().join("broker.toml");
    std::fs::write(&config_path, config.to_toml_string()?)?;

    let mut child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut to_child = child.stdin.take().ok_or("child stdin")?;
    let mut from_child = BufReader::new(child.stdout.take().ok_or("child stdout")?);
    let mut line = String::new();
    from_child.read_line(&mut line)?;
    let addr: std::net::SocketAddr = line.trim().parse()?;
    let idle_rss = rss_kib(child.id());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(storm::storm(
        &addr.ip().to_string(),
        addr.port(),
        &clients,
        Duration::from_secs(deadline_s),
    ));
    // Let the broker settle with every connection open, then measure it.
    std::thread::sleep(Duration::from_secs(2));
    let loaded_rss = rss_kib(child.id());
    writeln!(to_child, "stats")?;
    line.clear();
    from_child.read_line(&mut line)?;
    let stats = line.trim().to_owned();
    println!("| clients | connected | needed > 1 CONNECT | all connected | p50 | p99 | broker RSS idle → loaded | per connection |");
    println!(
        "| {n} | {} | {} | {:.2} s | {:.2} s | {:.2} s | {:.0} → {:.0} MiB | {:.1} KiB |",
        r.connected,
        r.retried,
        r.all_connected.as_secs_f64(),
        r.p50.as_secs_f64(),
        r.p99.as_secs_f64(),
        idle_rss as f64 / 1024.0,
        loaded_rss as f64 / 1024.0,
        loaded_rss.saturating_sub(idle_rss) as f64 / n.max(1) as f64,
    );
    println!("broker: {stats} (of {} clients)", r.clients);
    if !r.reasons.is_empty() {
        println!("failed attempts: {:?}", r.reasons);
    }
    drop(r.sessions);
    drop(rt);
    drop(to_child);
    let _ = child.wait();
    Ok(())
}

/// The child: the broker, until stdin closes; "stats" prints its counters.
fn serve(config: &str) -> Result<(), Box<dyn std::error::Error>> {
    let config = BrokerConfig::from_toml_file(std::path::Path::new(config))?;
    let handle = coevo_broker::start(config)?;
    println!("{}", handle.addr);
    eprintln!(
        "broker serves at most {} connections",
        handle.connection_capacity()
    );
    std::io::stdout().flush()?;
    for line in std::io::stdin().lock().lines() {
        if line?.trim() == "stats" {
            println!("{:?}", handle.stats());
            std::io::stdout().flush()?;
        }
    }
    Ok(())
}

/// VmRSS of a process in KiB (0 if unreadable).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
