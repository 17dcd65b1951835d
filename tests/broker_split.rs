//! The embedded broker with its front end in child processes (`front_processes`): the same
//! authentication and topic ACLs as in-process, over real sockets, and front processes that
//! never outlive the broker process.

mod common;

use coevo_mqtt::{Incoming, Session, Settings};
use coevo_protocol::Topic;
use common::*;
use std::time::{Duration, Instant};

/// The outcome of one connection attempt: `Ok` on CONNACK, `Err` with why otherwise.
async fn try_connect(addr: std::net::SocketAddr, id: &str, pw: &str) -> Result<Session, String> {
    let mut s = Settings::new(addr.ip().to_string(), addr.port(), id);
    s.password = Some(pw.to_owned());
    let mut session = Session::start(&s, vec![]);
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match session.recv().await {
                Some(Incoming::Connected { .. }) => return Ok(()),
                Some(Incoming::AuthRefused { error, .. }) => return Err(error.to_string()),
                Some(Incoming::Disconnected(e)) => return Err(e),
                Some(_) => {}
                None => return Err("session ended".into()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no answer in 20 s".into()));
    outcome.map(|()| session)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_processes_enforce_passwords_and_topic_acls() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 2);
    let broker = start_broker_with(
        &fleet,
        coevo_broker::BrokerConfig {
            front_processes: 2,
            front_program: Some(env!("CARGO_BIN_EXE_coevo").into()),
            ..Default::default()
        },
    );
    assert!(broker.is_running());
    let (id0, _, pw0) = fleet.clients[0].clone();
    let (id1, _, _) = fleet.clients[1].clone();

    // A wrong password and an unknown client are refused, several times over (whichever
    // front process the kernel picks).
    for _ in 0..4 {
        let e = try_connect(broker.addr, &id0, "not-the-password")
            .await
            .err()
            .expect("a wrong password is refused");
        assert!(e.contains("refused"), "{e}");
        assert!(try_connect(broker.addr, "cam-intruder", &pw0)
            .await
            .is_err());
    }

    // The right password connects, and the camera's own topics work end to end through
    // rumqttd: what it publishes on its status topic comes back to a subscriber of it.
    let mut watcher = try_connect(broker.addr, "coordinator", &fleet.coordinator_password)
        .await
        .expect("the coordinator connects");
    let status = Topic::Status {
        client: id0.clone(),
    }
    .path(FLEET);
    watcher.subscribe(&status).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cam = try_connect(broker.addr, &id0, &pw0)
        .await
        .expect("the right password connects");
    cam.publish(status.clone(), b"online".to_vec(), false)
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(Incoming::Publish(p)) = watcher.recv().await {
                return p;
            }
        }
    })
    .await
    .expect("the status publish is routed");
    assert_eq!(got.topic, status);

    // Publishing on another camera's topic closes the connection (ACL), as in-process.
    let foreign = Topic::Status { client: id1 }.path(FLEET);
    let mut cam = cam;
    cam.publish(foreign, b"spoof".to_vec(), false)
        .await
        .unwrap();
    let dropped = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match cam.recv().await {
                Some(Incoming::Disconnected(_)) | None => return true,
                Some(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(
        dropped,
        "a publish outside the camera's topics closes its connection"
    );
    assert!(
        broker.is_running(),
        "the broker and its front processes stay up"
    );

    // The children report their counters to the broker process (once a second): its stats
    // (and /metrics) count what every front process refused and admitted.
    let t0 = std::time::Instant::now();
    let stats = loop {
        let s = broker.stats();
        if s.acl_refused_publish >= 1 && s.auth_refused >= 8
            || t0.elapsed() > Duration::from_secs(10)
        {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stats.auth_bad_password, 4, "{stats:?}");
    assert_eq!(stats.auth_unknown_client, 4, "{stats:?}");
    assert_eq!(stats.auth_refused, 8, "{stats:?}");
    assert_eq!(stats.acl_refused_publish, 1, "{stats:?}");
    assert!(stats.connections_accepted >= 2, "{stats:?}");
    assert!(stats.bytes_in > 0 && stats.bytes_out > 0, "{stats:?}");
}

/// PIDs of `pid`'s child processes.
/// Children of `pid` spawned from any of its threads (`/proc/PID/task/TID/children` lists only
/// those spawned by thread TID, and the broker spawns its front processes from tokio workers).
fn children(pid: u32) -> Vec<u32> {
    let mut kids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| t.ok())
                .flat_map(|t| {
                    std::fs::read_to_string(t.path().join("children"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|c| c.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect()
        })
        .unwrap_or_default();
    kids.sort_unstable();
    kids.dedup();
    kids
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by init) has no memory left: count it as gone.
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

/// Whether a TCP socket listens on `port` (IPv4 or IPv6), from `/proc/net/tcp{,6}`.
fn listening(port: u16) -> bool {
    let port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                // local_address is column 1, state column 3 (0A = LISTEN).
                cols.len() > 3 && cols[1].ends_with(&port) && cols[3] == "0A"
            })
    })
}

#[test]
fn front_processes_exit_when_the_broker_process_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 1);
    let addr = coevo_broker::free_local_addr().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{addr}\"\ncredentials = \"{}\"\nfront_processes = 2\n",
            fleet.credentials_path.display()
        ),
    )
    .unwrap();
    let mut broker = std::process::Command::new(env!("CARGO_BIN_EXE_coevo"))
        .args(["broker", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let fronts = loop {
        let c = children(broker.id());
        if c.len() == 2 && std::net::TcpStream::connect(addr).is_ok() {
            break c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "two front processes listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // SIGKILL: no chance to clean up. The children see their stdin close and exit.
    broker.kill().unwrap();
    broker.wait().unwrap();
    let t0 = Instant::now();
    while fronts.iter().any(|&p| alive(p)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "front processes {fronts:?} outlived the broker process"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A front's main thread shows as a zombie while its other threads are still tearing down
    // and holding the socket, so the listener may outlive it by a moment: poll.
    // Asked of the kernel, not by connecting: a connect to a free loopback port can succeed
    // by connecting to itself (TCP simultaneous open) when the port is in the ephemeral range.
    let t0 = Instant::now();
    while listening(addr.port()) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nothing listens on {addr} any more"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
