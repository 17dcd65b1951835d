//! `coevo models --student FILE --teacher FILE --data DIR` (issue #16): checks a user's
//! TorchScript student and teacher against a dataset before a fleet is started with them —
//! input and output shapes, parameters (and which are trained), MACs when the net is a
//! built-in one (a TorchScript graph does not expose its layers to libtorch's C++ API here;
//! `scripts/export-model.py` prints the MACs of an export), and one SGD step on real samples.

use anyhow::{Context, Result};
use coevo_models::net::{flops_per_image, NetKind};
use coevo_models::train::{train, TrainConfig};
use coevo_models::{Arch, DataShape, Dataset, ScriptModule, Weights};
use std::path::Path;
use std::time::Instant;

/// One row of the table.
#[derive(Debug)]
pub struct ModelCheck {
    pub role: &'static str,
    /// `built-in` or the file's path.
    pub source: String,
    pub params: usize,
    pub trainable: usize,
    pub macs: Option<u64>,
    /// Mean cross-entropy of the training step's batch, and after the step.
    pub loss_before: f64,
    pub loss_after: f64,
    /// L2 norm of the step's change to the weights (> 0: the step trained something).
    pub step_norm: f64,
    pub step_ms: u128,
}

/// Builds `arch` for `shape` and runs one SGD step on the first `batch` samples of `data`.
pub fn check_arch(
    role: &'static str,
    source: String,
    arch: &Arch,
    data: &Dataset,
    batch: usize,
) -> Result<ModelCheck> {
    let shape = data.shape;
    arch.check(&shape)
        .with_context(|| format!("{role} {source}"))?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = arch.build(&vs.root(), &shape)?;
    let n = batch.min(data.len()).max(1);
    let sample = data.subset(&(0..n).collect::<Vec<_>>());
    let before = Weights::from_var_store(&vs);
    let loss_before = coevo_models::train::evaluate(&net, &sample, n).loss;
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: n,
        ..TrainConfig::default()
    };
    let t0 = Instant::now();
    train(&net, &vs, &sample, &cfg).with_context(|| format!("{role}: training step"))?;
    let step_ms = t0.elapsed().as_millis();
    let after = Weights::from_var_store(&vs);
    let step_norm = after.sub(&before)?.l2_norm();
    let loss_after = coevo_models::train::evaluate(&net, &sample, n).loss;
    // Reload the weights into a fresh copy: what a checkpoint or a camera does.
    let mut fresh = tch::nn::VarStore::new(tch::Device::Cpu);
    let _copy = arch.build(&fresh.root(), &shape)?;
    after
        .load_into(&mut fresh)
        .with_context(|| format!("{role}: weights reload"))?;
    let params = coevo_models::net::param_count(&vs);
    let trainable = vs
        .trainable_variables()
        .iter()
        .map(tch::Tensor::numel)
        .sum();
    let macs = match arch {
        Arch::Builtin(kind) => Some(flops_per_image(*kind, &shape)),
        Arch::Script(_) => None,
    };
    Ok(ModelCheck {
        role,
        source,
        params,
        trainable,
        macs,
        loss_before,
        loss_after,
        step_norm,
        step_ms,
    })
}

fn arch_of(path: Option<&Path>, kind: NetKind) -> Result<(Arch, String)> {
    match path {
        None => Ok((Arch::Builtin(kind), "built-in".into())),
        Some(p) => Ok((
            Arch::Script(ScriptModule::read(p).with_context(|| format!("{}", p.display()))?),
            p.display().to_string(),
        )),
    }
}

fn describe(shape: &DataShape) -> String {
    format!(
        "{}x{}x{} images, {} classes",
        shape.channels, shape.height, shape.width, shape.classes
    )
}

/// The command: loads the data, checks both models, prints the table.
pub fn models_command(data: &Path, student: Option<&Path>, teacher: Option<&Path>) -> Result<()> {
    let split = coevo_models::data::load_dir(data)
        .with_context(|| format!("loading {}", data.display()))?;
    println!("data {}: {}", data.display(), describe(&split.train.shape));
    tch::manual_seed(0);
    let mut rows = Vec::new();
    for (role, path, kind) in [
        ("student", student, NetKind::Student),
        ("teacher", teacher, NetKind::Teacher),
    ] {
        let (arch, source) = arch_of(path, kind)?;
        rows.push(check_arch(role, source, &arch, &split.train, 32)?);
    }
    println!(
        "{:<8} {:>11} {:>11} {:>14} {:>11} {:>11} {:>8}  source",
        "model", "parameters", "trainable", "MACs/image", "loss", "after step", "step ms"
    );
    for r in &rows {
        println!(
            "{:<8} {:>11} {:>11} {:>14} {:>11.4} {:>11.4} {:>8}  {}",
            r.role,
            r.params,
            r.trainable,
            r.macs.map_or("n/a".to_string(), |m| m.to_string()),
            r.loss_before,
            r.loss_after,
            r.step_ms,
            r.source
        );
    }
    let (s, t) = (&rows[0], &rows[1]);
    println!(
        "teacher/student: {:.1}x parameters; one SGD step (lr 0.05, 32 samples) moved the student by {:.4} and the teacher by {:.4} (L2)",
        t.params as f64 / s.params.max(1) as f64,
        s.step_norm,
        t.step_norm
    );
    if rows.iter().any(|r| r.macs.is_none()) {
        println!(
            "MACs of a TorchScript file: printed by scripts/export-model.py when it exports it"
        );
    }
    Ok(())
}
