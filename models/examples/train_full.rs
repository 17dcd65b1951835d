//! Trains the student on a whole dataset directory and prints test accuracy and timings.
//!
//! `cargo run -p coevo-models --example train_full -- [DIR] [EPOCHS]`
//! (DIR defaults to Debian's Fashion-MNIST, EPOCHS to 1). A smoke benchmark, not a test: it needs
//! the dataset on disk and takes tens of seconds.

use std::path::PathBuf;
use std::time::Instant;

use coevo_models::train::{evaluate, train, TrainConfig};
use coevo_models::{data, net, ModelError, Student};
use tch::{nn, Device};

fn main() -> Result<(), ModelError> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/usr/share/datasets/fashion-mnist".into()),
    );
    let epochs: usize = args.next().and_then(|e| e.parse().ok()).unwrap_or(1);

    let t0 = Instant::now();
    let split = data::load_dir(&dir)?;
    let load_s = t0.elapsed().as_secs_f64();
    println!(
        "loaded {} train / {} test, shape {:?} in {load_s:.2}s",
        split.train.len(),
        split.test.len(),
        split.train.shape
    );

    let vs = nn::VarStore::new(Device::Cpu);
    let model = Student::new(&vs.root(), &split.train.shape);
    println!("student params: {}", net::param_count(&vs));
    let cfg = TrainConfig {
        epochs,
        ..Default::default()
    };
    let t1 = Instant::now();
    let stats = train(&model, &vs, &split.train, &cfg)?;
    let train_s = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    let eval = evaluate(&model, &split.test, 1000);
    let eval_s = t2.elapsed().as_secs_f64();
    println!(
        "epochs {epochs}: train loss {:.4} acc {:.4} ({train_s:.1}s); test loss {:.4} acc {:.4} ({eval_s:.1}s)",
        stats.loss, stats.accuracy, eval.loss, eval.accuracy
    );
    Ok(())
}
