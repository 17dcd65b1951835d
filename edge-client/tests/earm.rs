//! The device binary as shipped to a camera: what it links, that it starts and reaches the broker
//! quickly, and (ignored by default: it needs scripts/build-edge-arm64's artefacts and qemu-user)
//! that the aarch64 build does the same under emulation.
//!
//! Start-up is checked against a plain TCP listener that reads the first MQTT packet: the point is
//! the moment the edge's CONNECT arrives, which a full broker would hide behind its own work. The
//! full round against the real broker and coordinator is scripts/edge-arm64-round (aarch64) and
//! the root crate's tests/cli.rs (x86).

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coevo_protocol::SigningKey;

/// Crates that are the coordinator's, the broker's, the benches' or the TLS-CA tooling's, and
/// must never end up in the device binary.
const SERVER_ONLY: &[&str] = &[
    "coevo",
    "coevo-coordinator",
    "coevo-broker",
    "rumqttd",
    "rcgen",
    "plotters",
    "indicatif",
    "criterion",
    "argon2",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("edge-client sits in the workspace")
        .to_path_buf()
}

#[test]
fn edge_links_no_server_side_code() {
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args([
            "tree",
            "-p",
            "coevo-edge",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
            "-f",
            "{p} [{f}]",
        ])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // Not vacuous: the tree holds what a device does need.
    for needed in ["coevo-edge", "coevo-models", "coevo-mqtt", "tch", "rumqttc"] {
        assert!(names.contains(&needed), "{needed} missing from\n{tree}");
    }
    for bad in SERVER_ONLY {
        assert!(!names.contains(bad), "{bad} is in the edge's tree:\n{tree}");
    }
    let models = tree
        .lines()
        .find(|l| l.starts_with("coevo-models "))
        .expect("coevo-models line");
    assert!(
        !models.contains("teacher"),
        "the edge builds coevo-models with the teacher: {models}"
    );
}

/// A camera's files: key, pinned coordinator key, a small IDX data set and the config, with the
/// broker at `port`.
fn device_dir(dir: &Path, port: u16) {
    let key = SigningKey::generate().expect("key");
    std::fs::write(dir.join("cam.pk8"), key.pkcs8()).expect("write key");
    let coordinator = SigningKey::generate().expect("key").public_key();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    for (prefix, n) in [("train", 200u32), ("t10k", 50)] {
        let mut img = Vec::new();
        img.extend_from_slice(&0x0000_0803u32.to_be_bytes());
        for d in [n, 28, 28] {
            img.extend_from_slice(&d.to_be_bytes());
        }
        img.extend((0..n * 28 * 28).map(|i| (i * 7 % 251) as u8));
        std::fs::write(data.join(format!("{prefix}-images-idx3-ubyte")), img).expect("write");
        let mut lab = Vec::new();
        lab.extend_from_slice(&0x0000_0801u32.to_be_bytes());
        lab.extend_from_slice(&n.to_be_bytes());
        lab.extend((0..n).map(|i| (i % 10) as u8));
        std::fs::write(data.join(format!("{prefix}-labels-idx1-ubyte")), lab).expect("write");
    }
    std::fs::write(
        dir.join("edge.toml"),
        format!(
            "fleet = \"city\"\nclient_id = \"cam-startup\"\nkey = \"cam.pk8\"\n\
             coordinator_key = \"{coordinator}\"\n[broker]\nhost = \"127.0.0.1\"\nport = {port}\n\
             password = \"unused\"\n[data]\npath = \"data\"\npartition = \"iid:2\"\npart = \"0\"\n"
        ),
    )
    .expect("write config");
}

/// Kills the edge when the test ends, however it ends.
struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` (the edge with `--config edge.toml` in a prepared device dir) and returns how
/// long it took until its MQTT CONNECT for `cam-startup` arrived on the listener.
fn time_to_connect(
    mut cmd: Command,
    dir: &Path,
    listener: TcpListener,
    limit: Duration,
) -> Duration {
    listener.set_nonblocking(true).expect("nonblocking");
    let t0 = Instant::now();
    cmd.arg("--config")
        .arg(dir.join("edge.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("edge.log")).expect("log"));
    let mut edge = Reap(cmd.spawn().expect("spawn the edge"));
    let log = || std::fs::read_to_string(dir.join("edge.log")).unwrap_or_default();
    let mut stream: TcpStream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if let Ok(Some(status)) = edge.0.try_wait() {
            panic!("edge exited ({status}) before connecting: {}", log());
        }
        assert!(
            t0.elapsed() < limit,
            "no connection in {limit:?}: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    stream.set_nonblocking(false).expect("blocking");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).expect("first byte");
    let elapsed = t0.elapsed();
    assert_eq!(
        first[0] >> 4,
        1,
        "first packet is not CONNECT: {:#x}",
        first[0]
    );
    // Remaining length (MQTT varint), then the variable header and payload.
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).expect("length");
        len |= ((b[0] & 0x7f) as usize) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).expect("CONNECT body");
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("MQTT"), "{body:?}");
    assert!(body.contains("cam-startup"), "client id missing: {body:?}");
    drop(edge);
    elapsed
}

/// The binary under test: `COEVO_EDGE_BIN` if set (scripts/edge-binary points it at the `edge`
/// profile's build to time that), else this package's own build.
fn edge_bin() -> PathBuf {
    std::env::var_os("COEVO_EDGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_coevo-edge")))
}

#[test]
fn edge_starts_and_connects_quickly() {
    let bin = edge_bin();
    // The first run pages libtorch in; later ones show the warm start a device sees on restart.
    let mut help_times = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let help = Command::new(&bin)
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        help_times.push(t0.elapsed());
        assert!(help.status.success());
        assert!(String::from_utf8_lossy(&help.stdout).contains("--config"));
    }
    let first = help_times[0];
    help_times.sort();
    let warm = help_times[2];
    // Generous bounds (a debug build on a loaded 2-core machine); BENCHMARKS.md has the figures.
    assert!(warm < Duration::from_secs(5), "--help took {warm:?}");

    let tmp = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    device_dir(tmp.path(), port);
    let connect = time_to_connect(
        Command::new(&bin),
        tmp.path(),
        listener,
        Duration::from_secs(30),
    );
    eprintln!(
        "{}: --help first {first:?}, median of 5 {warm:?}; first CONNECT after {connect:?}",
        bin.display()
    );
    assert!(connect < Duration::from_secs(30));
}

/// The cross-built device binary (scripts/build-edge-arm64) is an aarch64 ELF that, under
/// qemu-user, prints its help, loads libtorch and its data and sends its CONNECT.
#[test]
#[ignore = "needs scripts/build-edge-arm64's dist/ and qemu-user; run with --ignored"]
fn aarch64_edge_runs_under_qemu() {
    let bin = workspace_root().join("dist/coevo-edge-aarch64/bin/coevo-edge");
    let elf = std::fs::read(&bin)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/build-edge-arm64)", bin.display()));
    // ELF64, e_machine EM_AARCH64 (183) at offset 18.
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "not ELF64");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 183, "not aarch64");
    let qemu = |args: &[&str]| {
        let mut c = Command::new("qemu-aarch64");
        c.args(["-L", "/usr/aarch64-linux-gnu"])
            .arg(&bin)
            .args(args);
        c
    };
    let help = qemu(&["--help"])
        .output()
        .expect("qemu-aarch64 (apt install qemu-user)");
    assert!(
        help.status.success(),
        "{}",
        String::from_utf8_lossy(&help.stderr)
    );
    assert!(String::from_utf8_lossy(&help.stdout).contains("--config"));

    let tmp = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    device_dir(tmp.path(), port);
    let connect = time_to_connect(qemu(&[]), tmp.path(), listener, Duration::from_secs(300));
    eprintln!("aarch64 coevo-edge under qemu: first CONNECT after {connect:?}");
}
