//! The session's incoming bound against a real broker (Debian's Mosquitto, installed by
//! `scripts/setup`): an owner that stops reading holds at most `max_incoming_bytes`, the rest
//! is acknowledged and dropped (counted), and the connection stays alive meanwhile.

use coevo_mqtt::{Incoming, Session, Settings};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

struct Mosquitto(std::process::Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_mosquitto(dir: &Path) -> (Mosquitto, SocketAddr) {
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000\n",
            addr.port()
        ),
    )
    .expect("write conf");
    let bin = if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    };
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto is installed (scripts/setup)");
    let m = Mosquitto(child);
    let t0 = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "mosquitto did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (m, addr)
}

async fn connected(s: &mut Session) {
    let t0 = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.recv()).await {
            Ok(Some(Incoming::Connected { .. })) => return,
            Ok(Some(_)) => {}
            other => panic!("not connected after {:?}: {other:?}", t0.elapsed()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_stops_reading_holds_a_bounded_amount_and_stays_connected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, addr) = start_mosquitto(dir.path());
    let port = addr.port();

    let mut rs = Settings::new("127.0.0.1", port, "owner");
    rs.manual_acks = true;
    rs.clean_session = false;
    rs.max_incoming_bytes = Some(20_000);
    let mut owner = Session::start(&rs, vec!["t/#".into()]);
    connected(&mut owner).await;
    // The subscription is sent by the poller on CONNACK; give the broker a moment to take it.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut sender = Session::start(&Settings::new("127.0.0.1", port, "sender"), vec![]);
    connected(&mut sender).await;
    const N: usize = 40;
    const LEN: usize = 4096;
    for i in 0..N {
        sender
            .publish(format!("t/{i}"), vec![i as u8; LEN], false)
            .await
            .expect("publish");
    }
    // The owner reads nothing for a while, then everything it has, acknowledging in order;
    // again until all N are in. While it does not read, it holds at most the bound.
    let (mut got, mut shed) = (Vec::new(), 0u64);
    let t0 = Instant::now();
    while got.len() + (shed as usize) < N {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "only {} received, {shed} shed",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(owner.held_bytes() <= 20_000, "held {}", owner.held_bytes());
        while let Some(ev) = owner.try_recv() {
            match ev {
                Incoming::Publish(p) => {
                    owner.ack(&p).await.expect("ack");
                    got.push(p.topic.clone());
                }
                // Handed over without payload so the owner acknowledges it in order.
                Incoming::Shed(p) => {
                    assert!(p.payload.is_empty());
                    owner.ack(&p).await.expect("ack");
                    shed += 1;
                }
                _ => {}
            }
        }
    }
    assert_eq!(owner.held_bytes(), 0);
    assert_eq!(shed, owner.shed());
    assert!(
        shed > 0,
        "a burst of {N} x {LEN} B against a 20,000 B bound sheds"
    );
    assert!(got.len() >= 20_000 / LEN, "{got:?}");
    assert_eq!(got.len() + owner.shed() as usize, N);

    // Still connected and reading: the next publish arrives, and nothing shed comes back
    // (the owner acknowledged it, so the broker forgot it).
    sender
        .publish("t/after".into(), b"x".to_vec(), false)
        .await
        .expect("publish");
    let p = loop {
        match tokio::time::timeout(Duration::from_secs(10), owner.recv()).await {
            Ok(Some(Incoming::Publish(p))) => break p,
            Ok(Some(Incoming::Disconnected(e))) => panic!("owner lost its connection: {e}"),
            Ok(Some(_)) => {}
            other => panic!("nothing after shedding: {other:?}"),
        }
    };
    assert_eq!(p.topic, "t/after");
    owner.ack(&p).await.expect("ack");
    sender.close().await;
    owner.close().await;
}
