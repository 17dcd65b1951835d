//! Writes the camera-like RGB dataset of [`coevo_models::camera`] (see `scripts/make-camera-dataset`).
//!
//! ```text
//! cargo run --release -p coevo-models --example make_camera_dataset -- \
//!     --source ../shared/data/femnist --out ../shared/data/camera [--seed 1] [--classes 43]
//!     [--cameras 100] [--sources-per-camera 13] [--frames 6] [--test-images 4000]
//! ```

use coevo_models::camera::{generate, CameraConfig};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut cfg = CameraConfig::default();
    let (mut source, mut out) = (PathBuf::from("../shared/data/femnist"), None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || -> Result<usize, Box<dyn std::error::Error>> {
            value
                .parse()
                .map_err(|e| format!("{flag} {value}: {e}").into())
        };
        match flag.as_str() {
            "--source" => source = PathBuf::from(&value),
            "--out" => out = Some(PathBuf::from(&value)),
            "--seed" => cfg.seed = num()? as u64,
            "--classes" => cfg.classes = num()?,
            "--cameras" => cfg.cameras = num()?,
            "--sources-per-camera" => cfg.sources_per_camera = num()?,
            "--frames" => cfg.frames = num()?,
            "--test-images" => cfg.test_images = num()?,
            "--test-cameras" => cfg.test_cameras = num()?,
            "--size" => cfg.size = num()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let out = out.ok_or("--out DIR is required")?;
    let src = coevo_models::data::load_dir(&source)?;
    let t = std::time::Instant::now();
    let stats = generate(&src.train, &src.test, &cfg, &out)?;
    println!(
        "{}: {} train frames ({} source images × {} frames) over {} cameras, {} test images, {} classes ({:.1} s)",
        out.display(),
        stats.train_images,
        stats.train_sources,
        cfg.frames,
        stats.cameras,
        stats.test_images,
        stats.classes,
        t.elapsed().as_secs_f64()
    );
    std::fs::write(
        out.join("camera-dataset.json"),
        serde_json::to_vec_pretty(
            &serde_json::json!({ "config": cfg, "stats": stats, "source": source }),
        )?,
    )?;
    Ok(())
}
