//! Topic ACLs, client id = user name and live revocation, over real sockets: a real embedded
//! broker on 127.0.0.1 and rumqttc clients. Synchronisation is by MQTT events with timeouts;
//! the only sleeps are "nothing more arrives" windows after a positive control arrived.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use coevo_broker::{free_local_addr, start, BrokerConfig, BrokerHandle, Credentials};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Packet, QoS,
};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);
const F: &str = "coevo/v1/city";

struct Fleet {
    handle: BrokerHandle,
    creds_path: PathBuf,
    creds: Credentials,
    _dir: tempfile::TempDir,
}

/// A broker whose credential file knows the coordinator and `cameras` (password = id + "-pw").
fn fleet(cameras: &[&str]) -> Fleet {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds_path = dir.path().join("creds.toml");
    let mut creds = Credentials::default();
    for id in std::iter::once(&"coordinator").chain(cameras) {
        creds.set_password(id, &format!("{id}-pw")).expect("hash");
    }
    creds.save(&creds_path).expect("save");
    let handle = start(BrokerConfig {
        listen: free_local_addr().expect("free port"),
        credentials: Some(creds_path.clone()),
        ..BrokerConfig::default()
    })
    .expect("broker starts");
    Fleet {
        handle,
        creds_path,
        creds,
        _dir: dir,
    }
}

fn options(addr: std::net::SocketAddr, id: &str, user: &str, pw: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_credentials(user, pw);
    opts.set_keep_alive(Duration::from_secs(30));
    opts
}

fn login(f: &Fleet, id: &str) -> (AsyncClient, EventLoop) {
    AsyncClient::new(options(f.handle.addr, id, id, &format!("{id}-pw")), 64)
}

/// Polls until CONNACK: `Ok` when accepted. "Server unavailable" (CONNACK 3, admission
/// control on a box busy with parallel tests' password checks) means "try again": like a
/// camera, the client backs off and reconnects on the next poll.
async fn connected(el: &mut EventLoop) -> Result<(), ConnectionError> {
    timeout(WAIT, async {
        loop {
            let code = match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => ack.code,
                Ok(_) => continue,
                Err(ConnectionError::ConnectionRefused(code)) => code,
                Err(e) => return Err(e),
            };
            match code {
                ConnectReturnCode::Success => return Ok(()),
                ConnectReturnCode::ServiceUnavailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                code => return Err(ConnectionError::ConnectionRefused(code)),
            }
        }
    })
    .await
    .expect("connect outcome within timeout")
}

/// Waits (up to 10 s) for a counter to reach `want`, then asserts it: the client sees its
/// connection close while the front end's task may not have counted the refusal yet.
async fn settled(f: &Fleet, get: impl Fn(&coevo_broker::BrokerStats) -> u64, want: u64) {
    let t0 = std::time::Instant::now();
    while get(&f.handle.stats()) < want && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&f.handle.stats()), want);
}

/// A connected client whose events are collected by a background task: the publishes it
/// received (topic, payload), and whether the broker closed it.
struct Watched {
    client: AsyncClient,
    seen: tokio::sync::mpsc::UnboundedReceiver<Option<(String, Vec<u8>)>>,
}

async fn watched(f: &Fleet, id: &str) -> Watched {
    let (client, mut el) = login(f, id);
    connected(&mut el).await.expect("connects");
    let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(Some((p.topic.clone(), p.payload.to_vec())));
                }
                Ok(_) => {}
                Err(_) => {
                    // Closed by the broker: report once and stop (no reconnects).
                    let _ = tx.send(None);
                    return;
                }
            }
        }
    });
    Watched { client, seen }
}

impl Watched {
    /// Waits for a publish on `topic`; panics on close or timeout.
    async fn expect(&mut self, topic: &str) -> Vec<u8> {
        timeout(WAIT, async {
            loop {
                match self.seen.recv().await.flatten() {
                    Some((t, p)) if t == topic => return p,
                    Some(_) => {}
                    None => panic!("closed while waiting for {topic}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("nothing on {topic}"))
    }

    /// Waits until the broker closes the connection, returning what arrived before.
    async fn expect_closed(&mut self) -> Vec<(String, Vec<u8>)> {
        let mut got = Vec::new();
        timeout(WAIT, async {
            loop {
                match self.seen.recv().await {
                    Some(Some(m)) => got.push(m),
                    Some(None) | None => return,
                }
            }
        })
        .await
        .expect("the broker closes the connection");
        got
    }

    /// Everything that arrived so far (connection still open or not).
    fn drain(&mut self) -> Vec<(String, Vec<u8>)> {
        let mut got = Vec::new();
        while let Ok(Some(m)) = self.seen.try_recv() {
            got.push(m);
        }
        got
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_wildcards_are_refused_and_it_never_reads_another_cameras_delta() {
    let f = fleet(&["cam-1", "cam-2"]);
    let mut coord = watched(&f, "coordinator").await;
    coord
        .client
        .subscribe(format!("{F}/delta/+/+/+"), QoS::AtLeastOnce)
        .await
        .unwrap();

    for filter in [
        "#".to_string(),
        "+/#".into(),
        "$SYS/#".into(),
        "coevo/v1/#".into(),
        "coevo/v1/+/cam-2/#".into(),
        format!("{F}/delta/+/+/+"),
        format!("{F}/receipt/cam-2"),
        format!("{F}/report/1"),
    ] {
        let mut spy = watched(&f, "cam-1").await;
        spy.client
            .subscribe(&filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        spy.expect_closed().await;
    }
    settled(&f, |s| s.acl_refused_subscribe, 8).await;

    // Allowed filters: cam-1 stays connected, gets the round but not cam-2's delta.
    let mut cam1 = watched(&f, "cam-1").await;
    for filter in [
        format!("{F}/round/current"),
        format!("{F}/model/+/+"),
        format!("{F}/receipt/cam-1"),
    ] {
        cam1.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    let cam2 = watched(&f, "cam-2").await;
    let delta = format!("{F}/delta/cam-2/1/0");
    cam2.client
        .publish(&delta, QoS::AtLeastOnce, false, b"secret delta".to_vec())
        .await
        .unwrap();
    assert_eq!(coord.expect(&delta).await, b"secret delta");
    coord
        .client
        .publish(
            format!("{F}/round/current"),
            QoS::AtLeastOnce,
            true,
            b"m".to_vec(),
        )
        .await
        .unwrap();
    cam1.expect(&format!("{F}/round/current")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(cam1.drain().iter().all(|(t, _)| !t.contains("delta")));
    settled(&f, |s| s.acl_refused_subscribe, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_publishes_outside_its_topics_are_refused_retained_too() {
    let f = fleet(&["cam-1", "cam-2"]);
    let mut coord = watched(&f, "coordinator").await;
    coord
        .client
        .subscribe(format!("{F}/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    // The coordinator's retained manifest: nothing a camera does may replace it.
    let round = format!("{F}/round/current");
    coord
        .client
        .publish(&round, QoS::AtLeastOnce, true, b"signed manifest".to_vec())
        .await
        .unwrap();
    coord.expect(&round).await;

    let forbidden = [
        (format!("{F}/delta/cam-2/1/0"), false),
        (round.clone(), true),
        (format!("{F}/model/abc/0"), true),
        (format!("{F}/receipt/cam-2"), false),
        (format!("{F}/receipt/cam-1"), false),
        (format!("{F}/report/1"), true),
        (format!("{F}/status/cam-2"), true),
        ("elsewhere/topic".to_string(), false),
    ];
    for (topic, retain) in &forbidden {
        let mut cam = watched(&f, "cam-1").await;
        cam.client
            .publish(topic, QoS::AtLeastOnce, *retain, b"garbage".to_vec())
            .await
            .unwrap();
        cam.expect_closed().await;
    }
    settled(&f, |s| s.acl_refused_publish, forbidden.len() as u64).await;

    // Its own delta and status do get through (positive control, and the end of the window).
    let cam = watched(&f, "cam-1").await;
    let own = format!("{F}/delta/cam-1/1/0");
    cam.client
        .publish(&own, QoS::AtLeastOnce, false, b"mine".to_vec())
        .await
        .unwrap();
    assert_eq!(coord.expect(&own).await, b"mine");
    let seen = coord.drain();
    assert!(
        seen.iter().all(|(_, p)| p != b"garbage"),
        "a refused publish got through: {seen:?}"
    );

    // A late subscriber still gets the coordinator's retained manifest, not garbage.
    let mut late = watched(&f, "cam-2").await;
    late.client
        .subscribe(&round, QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(late.expect(&round).await, b"signed manifest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_cannot_take_the_coordinators_client_id_or_a_forbidden_will() {
    let f = fleet(&["cam-1"]);
    let mut coord = watched(&f, "coordinator").await;
    // cam-1's valid password under the coordinator's client id.
    let (_c, mut el) = AsyncClient::new(
        options(f.handle.addr, "coordinator", "cam-1", "cam-1-pw"),
        4,
    );
    match connected(&mut el).await {
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId)) => {}
        other => panic!("expected identifier rejected, got {other:?}"),
    }
    assert_eq!(f.handle.stats().client_id_mismatch, 1);

    // A last will on another camera's status topic is refused at CONNECT.
    let mut opts = options(f.handle.addr, "cam-1", "cam-1", "cam-1-pw");
    opts.set_last_will(LastWill::new(
        format!("{F}/status/cam-2"),
        b"offline".to_vec(),
        QoS::AtLeastOnce,
        true,
    ));
    let (_c, mut el) = AsyncClient::new(opts, 4);
    match connected(&mut el).await {
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)) => {}
        other => panic!("expected not authorised, got {other:?}"),
    }

    // The real coordinator was never kicked off: it still publishes and reads.
    coord
        .client
        .subscribe(format!("{F}/status/+"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let topic = format!("{F}/status/cam-9");
    coord
        .client
        .publish(&topic, QoS::AtLeastOnce, false, b"x".to_vec())
        .await
        .unwrap();
    coord.expect(&topic).await;
    assert!(coord.drain().is_empty());
}

/// rumqttd's own loopback port admits only the front end: a camera's (or the coordinator's)
/// valid password is refused there, so nobody can go around the ACLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_port_cannot_be_used_to_bypass_the_front_end() {
    let f = fleet(&["cam-1"]);
    for id in ["cam-1", "coordinator"] {
        let (_c, mut el) = AsyncClient::new(
            options(f.handle.router_addr(), id, id, &format!("{id}-pw")),
            4,
        );
        assert!(connected(&mut el).await.is_err(), "{id} got in directly");
    }
    let (_c, mut el) = login(&f, "cam-1");
    connected(&mut el)
        .await
        .expect("the front end still admits cam-1");
}

async fn wait_closed_within(w: &mut Watched, limit: Duration) -> Duration {
    let t0 = Instant::now();
    w.expect_closed().await;
    let took = t0.elapsed();
    assert!(took < limit, "closed only after {took:?}");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_closes_the_open_connection_and_refuses_reconnects() {
    let mut f = fleet(&["cam-1", "cam-2"]);
    let mut cam1 = watched(&f, "cam-1").await;
    let mut cam2 = watched(&f, "cam-2").await;
    assert!(f.creds.remove("cam-1"));
    f.creds.save(&f.creds_path).unwrap();
    let took = wait_closed_within(&mut cam1, Duration::from_secs(5)).await;
    eprintln!("revocation closed cam-1 after {took:?}");
    let (_c, mut el) = login(&f, "cam-1");
    assert!(matches!(
        connected(&mut el).await,
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword
        ))
    ));
    // cam-2 is untouched.
    cam2.client
        .subscribe(format!("{F}/round/current"), QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        matches!(
            cam2.seen.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty)
        ),
        "cam-2 was closed too"
    );
    let s = f.handle.stats();
    assert_eq!(s.revoked_disconnects, 1);
    assert_eq!(s.credential_reloads, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_change_closes_the_connection_and_only_the_new_password_works() {
    let mut f = fleet(&["cam-1"]);
    let mut cam1 = watched(&f, "cam-1").await;
    f.creds.set_password("cam-1", "brand-new").unwrap();
    f.creds.save(&f.creds_path).unwrap();
    let took = wait_closed_within(&mut cam1, Duration::from_secs(5)).await;
    eprintln!("password change closed cam-1 after {took:?}");
    // The old password was cached as verified; it must not count any more.
    let (_c, mut el) = login(&f, "cam-1");
    assert!(connected(&mut el).await.is_err());
    let (_c, mut el) = AsyncClient::new(options(f.handle.addr, "cam-1", "cam-1", "brand-new"), 4);
    connected(&mut el).await.expect("the new password works");

    // A broken credential file keeps the previous set in force.
    std::fs::write(&f.creds_path, "not toml [").unwrap();
    let t0 = Instant::now();
    while f.handle.stats().credential_reload_errors == 0 {
        assert!(t0.elapsed() < WAIT, "the broken file was never noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_c, mut el) = AsyncClient::new(options(f.handle.addr, "cam-1", "cam-1", "brand-new"), 4);
    connected(&mut el).await.expect("still admitted");
}

/// Resident set size of this process, in KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A raw MQTT 3.1.1 CONNECT without credentials.
fn raw_connect(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 120];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// Figures for BENCHMARKS.md (run with `--ignored --nocapture`): memory per idle camera
/// connection through the front end and rumqttd, and QoS 1 throughput of 256 KiB publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly"]
async fn measure_connection_cost_and_throughput() {
    use std::io::{Read, Write};
    let handle = start(BrokerConfig {
        listen: free_local_addr().expect("free port"),
        ..BrokerConfig::default()
    })
    .expect("broker starts");
    let n = 2000;
    let before = rss_kib();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = std::net::TcpStream::connect(handle.addr).expect("connect");
        s.write_all(&raw_connect(&format!("cam-{i}")))
            .expect("send");
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).expect("connack");
        assert_eq!(ack, [0x20, 2, 0, 0], "cam-{i} admitted");
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib();
    eprintln!(
        "{n} idle connections: RSS {before} KiB -> {after} KiB = {:.1} KiB per connection",
        (after.saturating_sub(before)) as f64 / n as f64
    );
    drop(conns);

    let mut opts = MqttOptions::new("coordinator", "127.0.0.1", handle.addr.port());
    opts.set_max_packet_size(2 << 20, 2 << 20);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 64);
    connected(&mut el).await.expect("connects");
    let topic = format!("{F}/model/x/0");
    client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    let payload = vec![7u8; 256 * 1024];
    let count = 200usize;
    let t0 = Instant::now();
    let mut received = 0;
    let mut sent = 0;
    timeout(Duration::from_secs(120), async {
        while received < count {
            match el.poll().await.expect("event loop") {
                Event::Incoming(Packet::SubAck(_)) | Event::Incoming(Packet::PubAck(_))
                    if sent < count =>
                {
                    client
                        .publish(&topic, QoS::AtLeastOnce, false, payload.clone())
                        .await
                        .unwrap();
                    sent += 1;
                }
                Event::Incoming(Packet::Publish(_)) => received += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("all publishes come back");
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{count} x 256 KiB QoS 1 publish+receive through the front end: {secs:.2} s, {:.0} MiB/s each way",
        count as f64 * 0.25 / secs
    );
}

/// Reads until the broker closes the socket (or `WAIT` passes: then panics).
fn read_until_closed(s: &mut std::net::TcpStream) {
    use std::io::Read;
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("socket still open: {e}"),
        }
    }
}

/// Without credentials the claimed client id is still the ACL identity; non-MQTT bytes and
/// oversized packets close the connection and are counted.
#[test]
fn open_broker_still_enforces_acls_and_counts_protocol_violations() {
    use std::io::{Read, Write};
    let handle = start(BrokerConfig {
        listen: free_local_addr().expect("free port"),
        ..BrokerConfig::default()
    })
    .expect("broker starts");
    let connect = |id: &str| {
        let mut s = std::net::TcpStream::connect(handle.addr).unwrap();
        s.write_all(&raw_connect(id)).unwrap();
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).unwrap();
        assert_eq!(ack, [0x20, 2, 0, 0]);
        s
    };

    let mut http = std::net::TcpStream::connect(handle.addr).unwrap();
    http.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    read_until_closed(&mut http);
    assert_eq!(handle.stats().protocol_violations, 1, "not MQTT");

    // A PUBLISH header announcing 16 MiB, over the 1 MiB + 64 KiB packet limit.
    let mut big = connect("cam-1");
    big.write_all(&[0x30, 0x80, 0x80, 0x80, 0x08]).unwrap();
    read_until_closed(&mut big);
    assert_eq!(handle.stats().protocol_violations, 2, "oversized");

    // SUBSCRIBE "#" (packet id 1, QoS 1) by a claimed camera id.
    let mut spy = connect("cam-1");
    spy.write_all(&[0x82, 6, 0, 1, 0, 1, b'#', 1]).unwrap();
    read_until_closed(&mut spy);

    let s = handle.stats();
    assert_eq!(s.protocol_violations, 2, "{s:?}");
    assert_eq!(s.acl_refused_subscribe, 1, "{s:?}");
    assert_eq!(s.connections_accepted, 2, "{s:?}");
}
