//! Connect storm against the real embedded broker: 2,000 clients with generated device
//! secrets connect at once, each with exactly one CONNECT (issue #13: argon2 per CONNECT and
//! 5 s client timeouts made storms collapse). Bigger storms: `broker/examples/storm.rs`.

mod common;

use std::time::Duration;

use coevo_broker::{free_local_addr, generate_password, start, BrokerConfig, Credentials};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_connect_with_one_connect_each() {
    const N: usize = 2_000;
    coevo_broker::raise_fd_limit(4 * N as u64 + 1024).expect("fd limit");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("creds.toml");
    let mut creds = Credentials::default();
    let clients: Vec<(String, String)> = (0..N)
        .map(|i| (format!("cam-{i:05}"), generate_password()))
        .collect();
    for (id, pw) in &clients {
        creds.set_device_secret(id, pw).expect("hash");
    }
    creds.save(&path).expect("save");
    let handle = start(BrokerConfig {
        listen: free_local_addr().expect("port"),
        credentials: Some(path),
        ..BrokerConfig::default()
    })
    .expect("broker");

    let r = common::storm::storm(
        &handle.addr.ip().to_string(),
        handle.addr.port(),
        &clients,
        Duration::from_secs(60),
    )
    .await;
    let stats = handle.stats();
    eprintln!(
        "storm of {N}: all connected in {:?} (p50 {:?}, p99 {:?}); {} failed attempts; {stats:?}",
        r.all_connected, r.p50, r.p99, r.failed_attempts
    );
    assert_eq!(r.connected, N, "every client connected");
    assert_eq!(r.retried, 0, "no client needed a second CONNECT");
    assert_eq!(stats.connections_accepted, N as u64);
    assert_eq!(stats.connects_busy, 0);
    assert_eq!(stats.auth_refused, 0);
    assert_eq!(stats.connections_over_limit, 0);
    assert!(
        r.all_connected < Duration::from_secs(20),
        "{:?}",
        r.all_connected
    );
    for s in r.sessions {
        drop(s);
    }
}

/// Admission control: argon2 passwords (~tens of ms each) through one verification slot with
/// a 500 ms wait must be answered "server unavailable" (CONNACK 3, counted as busy), never
/// "bad credentials"; the clients back off with jitter and all get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_answered_busy_and_clients_back_off_and_get_in() {
    const N: usize = 60;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("creds.toml");
    let mut creds = Credentials::default();
    let clients: Vec<(String, String)> = (0..N)
        .map(|i| (format!("cam-{i:05}"), format!("chosen-{i}")))
        .collect();
    for (id, pw) in &clients {
        creds.set_password(id, pw).expect("hash");
    }
    creds.save(&path).expect("save");
    let handle = start(BrokerConfig {
        listen: free_local_addr().expect("port"),
        credentials: Some(path),
        max_pending_connects: 1,
        connection_timeout_ms: 500,
        ..BrokerConfig::default()
    })
    .expect("broker");
    let r = common::storm::storm(
        &handle.addr.ip().to_string(),
        handle.addr.port(),
        &clients,
        Duration::from_secs(60),
    )
    .await;
    let stats = handle.stats();
    eprintln!(
        "overloaded storm of {N}: connected {} retried {} failed attempts {}; {stats:?}",
        r.connected, r.retried, r.failed_attempts
    );
    assert_eq!(r.connected, N, "backoff gets everyone in");
    assert!(stats.connects_busy > 0, "{stats:?}");
    assert!(r.retried > 0);
    assert_eq!(
        stats.auth_refused, 0,
        "busy is never reported as bad credentials"
    );
    assert_eq!(stats.connections_accepted, N as u64);
}
