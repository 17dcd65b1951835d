//! Camera-class edge (issue 17, Musts 1–3): a real `coevo edge` process reading its own folder
//! of PNG frames (no shared dataset, no partition), decoding them per batch because they
//! exceed `[data] max_memory_mb`, training with the configured thread count, and completing a
//! round against the real coordinator over the embedded broker.

mod common;

use coevo_models::data::synthetic;
use common::*;
use std::path::Path;
use std::time::Duration;

/// Writes `data`'s images as `dir/<label>/<i>.png` (8-bit grey), undoing the normalisation.
fn write_frames(dir: &Path, data: &coevo_models::Dataset) {
    let n = data.len();
    let (h, w) = (data.shape.height as u32, data.shape.width as u32);
    let pixels: Vec<f32> = Vec::<f32>::try_from(
        ((data.images.flatten(0, -1) * 0.5 + 0.5) * 255.0)
            .clamp(0.0, 255.0)
            .round(),
    )
    .unwrap();
    let labels = data.labels_vec();
    let frame = (h * w) as usize;
    for i in 0..n {
        let class = dir.join(labels[i].to_string());
        std::fs::create_dir_all(&class).unwrap();
        let bytes: Vec<u8> = pixels[i * frame..(i + 1) * frame]
            .iter()
            .map(|&p| p as u8)
            .collect();
        image::GrayImage::from_raw(w, h, bytes)
            .unwrap()
            .save(class.join(format!("{i:05}.png")))
            .unwrap();
    }
}

/// The log without terminal colour codes (`ESC [ … m`), so fields read `key=value`.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_trains_on_its_own_frames_decoded_per_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fleet = fleet(&dir.join("fleet"), 1);
    let broker = start_broker(&fleet);
    let data = synthetic(240, 100, SHAPE, 17);
    // The camera's frames: 240 grey 28×28 PNGs in class folders (188 KB decoded, over the
    // 0 MiB budget below, so every batch is decoded from disk).
    write_frames(&dir.join("frames"), &data.train);
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(dir.join("keys/cam-0.pk8"), fleet.clients[0].1.pkcs8()).unwrap();
    std::fs::write(
        dir.join("edge.toml"),
        format!(
            "fleet = \"{FLEET}\"\nclient_id = \"cam-0\"\nkey = \"keys/cam-0.pk8\"\n\
             coordinator_key = \"{}\"\nmax_rounds = 1\n\
             [broker]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"{}\"\n\
             [data]\npath = \"frames\"\nmax_memory_mb = 0\n\
             [threads]\ntrain = 1\nruntime = 1\n",
            fleet.coordinator_key.public_key(),
            broker.addr.port(),
            fleet.clients[0].2,
        ),
    )
    .unwrap();

    let out = dir.join("out");
    let cfg = coordinator_config(&fleet, broker.addr, out.clone(), 1);
    let (coordinator, _events) = spawn_coordinator(cfg, &fleet, &data.test);
    let edge_dir = dir.to_path_buf();
    let edge = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_coevo"))
            .args(["edge", "--config", "edge.toml"])
            .current_dir(&edge_dir)
            .env("RUST_LOG", "info,rumqttc=warn")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run coevo edge")
    });
    let output = tokio::time::timeout(Duration::from_secs(120), edge)
        .await
        .expect("edge finishes its round in time")
        .unwrap();
    let log = strip_ansi(&format!(
        "{}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    ));
    assert!(output.status.success(), "{log}");
    assert!(
        log.contains("own frames opened") && log.contains("frames=240"),
        "{log}"
    );
    assert!(log.contains("lazy=true"), "{log}");
    assert!(
        log.contains("local training done") && log.contains("threads=1"),
        "{log}"
    );
    let reports = tokio::time::timeout(Duration::from_secs(60), coordinator)
        .await
        .expect("coordinator ends after its round")
        .unwrap()
        .expect("coordinator runs");
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].accepted, 1, "{:?}", reports[0]);
    assert_eq!(reports[0].outcome, "completed", "{:?}", reports[0].outcome);
    let report = read_report(&out, 1);
    assert_eq!(report.clients.len(), 1);
}
