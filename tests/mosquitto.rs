//! Interop: a full round through Debian's Mosquitto, configured by
//! `coevo fleet export-mosquitto` (password file + per-client ACLs), instead of the embedded
//! broker. Also shows the ACL at work: a client's publish to another client's delta topic never
//! reaches the coordinator.

mod common;

use coevo_coordinator::RoundEvent;
use coevo_models::data::synthetic;
use coevo_models::partition::{partition, PartitionSpec};
use common::*;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_round_through_mosquitto_with_exported_acls() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(dir.path(), 3);
    let addr = coevo_broker::free_local_addr().unwrap();
    let mdir = dir.path().join("mosquitto");
    // Mosquitto must stay the user that owns the 0600 password file (root in CI).
    let whoami = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    export_mosquitto(&fleet, addr, &mdir, Some(&whoami));
    let acl = std::fs::read_to_string(mdir.join("acl")).unwrap();
    assert!(acl.contains(&format!("topic write coevo/v1/{FLEET}/delta/cam-1/#")));
    let mosquitto = start_mosquitto(&mdir, addr, dir.path().join("mosquitto.log")).await;

    let shape = SHAPE;
    let data = synthetic(600, 200, shape, 21);
    let parts = partition(
        &data.train.labels_vec(),
        None,
        &PartitionSpec::Iid { clients: 3 },
        5,
    )
    .unwrap();
    let out = dir.path().join("out");
    let cfg = coordinator_config(&fleet, addr, out.clone(), 1);
    let (coord, mut events) = spawn_coordinator(cfg, &fleet, &data.test);

    // cam-0's own connection, used to try writing where the ACL forbids and where it allows.
    let (id, _, pw) = fleet.clients[0].clone();
    let mut s = coevo_mqtt::Settings::new("127.0.0.1", addr.port(), id);
    s.password = Some(pw);
    let mut cam0 = coevo_mqtt::Session::start(&s, vec![]);
    wait_until_connected(&mut cam0).await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut agents = Vec::new();
    let mut report = None;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
        match ev {
            RoundEvent::Started { round: 1, .. } => {
                let garbage = b"not a coevo message".to_vec();
                let other = coevo_protocol::Topic::DeltaChunk {
                    client: "cam-1".into(),
                    round: 1,
                    index: 0,
                };
                let own = coevo_protocol::Topic::DeltaChunk {
                    client: "cam-0".into(),
                    round: 1,
                    index: 0,
                };
                cam0.publish(other.path(FLEET), garbage.clone(), false)
                    .await
                    .unwrap();
                cam0.publish(own.path(FLEET), garbage, false).await.unwrap();
                for (i, (_, idx)) in parts.iter().enumerate() {
                    agents.push(spawn_agent_for(
                        &fleet,
                        i,
                        addr,
                        data.train.subset(idx),
                        &stop_rx,
                        Some(1),
                    ));
                }
            }
            RoundEvent::Finished(r) => report = Some(*r),
            _ => {}
        }
    }
    coord.await.unwrap().unwrap();
    // Each agent ends by itself once it holds its receipt (max_rounds = 1).
    for a in agents {
        let s = tokio::time::timeout(Duration::from_secs(30), a)
            .await
            .unwrap();
        assert_eq!(s.unwrap().unwrap().accepted_rounds, vec![1]);
    }
    drop(stop_tx);
    drop(mosquitto);
    let r = report.expect("round finished");
    assert_eq!(r.outcome, "completed");
    assert_eq!(r.accepted, 3);
    assert_merge_consistent(&out, 1);
    // The write to cam-0's own topic got through (and was rejected as malformed); the write
    // to cam-1's topic was stopped by Mosquitto's ACL and never reached the coordinator.
    assert!(
        r.rejected
            .iter()
            .any(|x| x.client == "cam-0" && x.reason.starts_with("malformed")),
        "{:?}",
        r.rejected
    );
    assert!(
        !r.rejected.iter().any(|x| x.client == "cam-1"),
        "{:?}",
        r.rejected
    );
}

async fn wait_until_connected(s: &mut coevo_mqtt::Session) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ev) = s.recv().await {
            if let coevo_mqtt::Incoming::Connected { .. } = ev {
                return;
            }
        }
    })
    .await
    .expect("connected to mosquitto");
}

/// A raw MQTT 3.1.1 CONNECT (clean session, keep-alive 30 s) with a user name that need not
/// equal the client id — what a hostile camera sends; rumqttc-based sessions cannot.
fn raw_connect(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let field = |b: &[u8]| {
        let mut v = (b.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    };
    let mut body = field(b"MQTT");
    body.extend_from_slice(&[4, 0xc2, 0, 30]);
    for f in [client_id, user, password] {
        body.extend(field(f.as_bytes()));
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// The exported config as an operator runs it on Debian: `mosquitto -c` as root, no `user`
/// (Mosquitto drops to `mosquitto` and must still read the 0600 password file). A camera's
/// password under the coordinator's client id is then mapped to the camera's own id
/// (`use_username_as_clientid`): the coordinator is not kicked off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_config_starts_as_root_and_no_camera_takes_the_coordinators_id() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    // The `mosquitto` user must be able to reach the export, whatever the umask.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let fleet = fleet(dir.path(), 1);
    let addr = coevo_broker::free_local_addr().unwrap();
    let mdir = dir.path().join("mosquitto");
    export_mosquitto(&fleet, addr, &mdir, None);
    let conf = std::fs::read_to_string(mdir.join("mosquitto.conf")).unwrap();
    assert!(conf.contains("use_username_as_clientid true"), "{conf}");
    let acl = std::fs::read_to_string(mdir.join("acl")).unwrap();
    assert!(!acl.contains("report"), "cameras read no reports: {acl}");
    let mosquitto = start_mosquitto(&mdir, addr, dir.path().join("mosquitto.log")).await;

    let mut s = coevo_mqtt::Settings::new("127.0.0.1", addr.port(), "coordinator");
    s.password = Some(fleet.coordinator_password.clone());
    let mut coord = coevo_mqtt::Session::start(&s, vec![]);
    wait_until_connected(&mut coord).await;

    // cam-0's login under the coordinator's client id.
    let (_, _, cam_pw) = fleet.clients[0].clone();
    let mut raw = std::net::TcpStream::connect(addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(&raw_connect("coordinator", "cam-0", &cam_pw))
        .unwrap();
    let mut connack = [0u8; 4];
    raw.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "accepted, as cam-0");
    // The real coordinator keeps its connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Some(ev) = coord.try_recv() {
        assert!(
            !matches!(ev, coevo_mqtt::Incoming::Disconnected(_)),
            "the coordinator was kicked off: {ev:?}"
        );
    }
    drop(raw);
    drop(mosquitto);
}
