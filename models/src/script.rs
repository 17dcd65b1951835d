//! A user's own PyTorch model, exported to TorchScript (`scripts/export-model.py`), standing in
//! for the built-in [`crate::Student`] or [`crate::Teacher`] (issue #16).
//!
//! [`tch::TrainableCModule`] loads the module and registers its parameters in a
//! [`tch::nn::VarStore`] as ordinary variables that *share storage* with the module, so
//! everything written for the built-in nets — SGD on `vs.trainable_variables()`, FedProx
//! anchors, [`crate::Weights::from_var_store`] / [`crate::Weights::load_into`], deltas, codecs,
//! safetensors checkpoints, robust aggregation — works on a TorchScript module unchanged.
//! Variable names are the module's `named_parameters()` with `.` replaced by `_` (a `VarStore`
//! path cannot contain `.`): `features.0.weight` becomes `features_0_weight`.
//!
//! # Buffers (BatchNorm running statistics): averaged, through the state dict
//!
//! libtorch's `named_parameters()` does not list buffers, so a plain export would leave each
//! process with the file's initial statistics (mean 0, variance 1): the coordinator would then
//! evaluate, guard and distil a merged model whose weights were trained under other statistics,
//! and a camera joining later would run inference with them. `scripts/export-model.py`
//! therefore turns every BatchNorm's `running_mean` / `running_var` into a **non-trainable
//! parameter** before exporting (the BatchNorm code reads them by attribute and updates them in
//! place either way). They then sit in the `VarStore` as non-trainable variables: the
//! optimiser and the FedProx term never touch them, but they travel in [`crate::Weights`] like
//! the weights, so a client's delta carries how its statistics moved, the coordinator merges
//! them with the round's rule (sample-weighted for FedAvg) and evaluates with the merged
//! statistics, and checkpoints hold them. Averaging per-client means and variances ignores the
//! spread *between* clients' means, a small bias the next round's training corrects; the
//! alternative, keeping statistics local (FedBN), would leave the coordinator's evaluation and
//! its guard with statistics that belong to no model. `num_batches_tracked` stays a buffer: it
//! only matters with `momentum=None`, which the export script refuses. A module exported by
//! other means keeps its buffers local to each loaded copy (say so in its documentation).
//!
//! # Train and eval mode
//!
//! `tch`'s own `ModuleT` impl for `TrainableCModule` ignores the `train` flag, so BatchNorm and
//! dropout would behave the same in training and evaluation. [`ScriptNet`] switches the
//! module's mode (`train()` / `eval()`) whenever the flag changes. A *traced* module has its
//! mode baked in at trace time; `export-model.py` scripts by default and warns when tracing.

use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use coevo_protocol::{digest, Digest};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor, TrainableCModule};

/// Runs TorchScript graphs in libtorch's plain interpreter: no profiling runs and no graph
/// optimisation (process-wide, set once). Why: every round a camera loads a fresh copy of the
/// module and trains it for a few hundred small steps; the profiling executor would profile and
/// re-optimise each copy, and on CPU its fusions gain nothing for small CNNs. Measured with
/// `coevo bench byom` on FEMNIST (BENCHMARKS.md): the TorchScript student's rounds took 1.29×
/// the built-in student's with the default executor.
fn plain_interpreter() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tch::jit::f_set_graph_executor_optimize(false);
        let _ = tch::jit::f_set_profiling_mode(false);
    });
}

use crate::{DataShape, ModelError};

/// Largest TorchScript file we load (a student for a camera is a few MB; this guards memory
/// against a hostile or mistaken file, not against a large teacher).
pub const MAX_MODULE_BYTES: usize = 256 * 1024 * 1024;

/// The bytes of a TorchScript module and their SHA-256: what the manifest names and cameras
/// cache. Cloning is cheap (the bytes are shared).
#[derive(Clone)]
pub struct ScriptModule {
    bytes: Arc<[u8]>,
    digest: Digest,
}

impl std::fmt::Debug for ScriptModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptModule")
            .field("digest", &self.digest.short())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl PartialEq for ScriptModule {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl ScriptModule {
    /// Wraps `bytes` after checking that libtorch can load them as a TorchScript module.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<ScriptModule, ModelError> {
        if bytes.len() > MAX_MODULE_BYTES {
            return Err(ModelError::Limit(format!(
                "TorchScript module of {} bytes (limit {MAX_MODULE_BYTES})",
                bytes.len()
            )));
        }
        tch::CModule::load_data_on_device(&mut Cursor::new(&bytes), Device::Cpu)
            .map_err(|e| ModelError::Script(format!("not a loadable TorchScript module: {e}")))?;
        let digest = digest(&bytes);
        Ok(ScriptModule {
            bytes: bytes.into(),
            digest,
        })
    }

    /// Reads and checks a `.pt` file written by `torch.jit.save` (e.g. by
    /// `scripts/export-model.py`).
    pub fn read(path: &Path) -> Result<ScriptModule, ModelError> {
        let len = std::fs::metadata(path)
            .map_err(|e| ModelError::Script(format!("{}: {e}", path.display())))?
            .len();
        if len > MAX_MODULE_BYTES as u64 {
            return Err(ModelError::Limit(format!(
                "{}: {len} bytes (limit {MAX_MODULE_BYTES})",
                path.display()
            )));
        }
        let bytes = std::fs::read(path)
            .map_err(|e| ModelError::Script(format!("{}: {e}", path.display())))?;
        ScriptModule::from_bytes(bytes)
            .map_err(|e| ModelError::Script(format!("{}: {e}", path.display())))
    }

    /// SHA-256 of the file's bytes.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The file's bytes, as published to the fleet.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Loads a fresh copy of the module and registers its parameters under `p`.
    pub fn load(&self, p: &nn::Path) -> Result<ScriptNet, ModelError> {
        plain_interpreter();
        let mut module = TrainableCModule::load_data(&mut Cursor::new(&*self.bytes), p.clone())
            .map_err(|e| ModelError::Script(format!("loading module {}: {e}", self.digest)))?;
        module.f_set_eval()?;
        Ok(ScriptNet {
            inner: Mutex::new(Mode {
                module,
                train: false,
            }),
        })
    }

    /// Loads the module on a scratch `VarStore` and checks it fits `shape`: a forward pass of
    /// two zero images `[2, C, H, W]` must give finite `[2, classes]` logits in both modes.
    /// This is what refuses, at start-up and with the numbers, a module exported for another
    /// dataset (wrong class count or input size).
    pub fn check(&self, shape: &DataShape) -> Result<ModuleInfo, ModelError> {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = self.load(&vs.root())?;
        let x = Tensor::f_zeros(
            [
                2,
                shape.channels as i64,
                shape.height as i64,
                shape.width as i64,
            ],
            (Kind::Float, Device::Cpu),
        )?;
        for train in [false, true] {
            let out = tch::no_grad(|| net.f_forward_t(&x, train)).map_err(|e| {
                ModelError::Script(format!(
                    "module {} does not run on the data's input [N, {}, {}, {}]: {e}",
                    self.digest.short(),
                    shape.channels,
                    shape.height,
                    shape.width
                ))
            })?;
            let size = out.size();
            if size != [2, shape.classes as i64] {
                return Err(ModelError::Script(format!(
                    "module {} outputs {size:?} for 2 images of [{}, {}, {}], but the data has {} classes: expected [2, {}] (export the model with the dataset's class count)",
                    self.digest.short(),
                    shape.channels,
                    shape.height,
                    shape.width,
                    shape.classes,
                    shape.classes
                )));
            }
        }
        let vars = vs.variables();
        let trainable: usize = vs.trainable_variables().iter().map(Tensor::numel).sum();
        let params: usize = vars.values().map(Tensor::numel).sum();
        Ok(ModuleInfo {
            digest: self.digest,
            bytes: self.bytes.len(),
            params,
            trainable,
            tensors: vars.len(),
        })
    }
}

/// What [`ScriptModule::check`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleInfo {
    pub digest: Digest,
    /// File size.
    pub bytes: usize,
    /// Scalars in the state dict that travels (parameters and exported BatchNorm statistics).
    pub params: usize,
    /// Of which trained by the optimiser.
    pub trainable: usize,
    /// Named tensors.
    pub tensors: usize,
}

struct Mode {
    module: TrainableCModule,
    /// The mode the module is in.
    train: bool,
}

/// A loaded TorchScript module that honours [`ModuleT`]'s `train` flag (see the module docs).
/// The module sits behind a mutex because switching its mode needs `&mut` while `forward_t`
/// has `&self`; it also makes the net `Sync` like the built-in ones.
pub struct ScriptNet {
    inner: Mutex<Mode>,
}

impl std::fmt::Debug for ScriptNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScriptNet")
    }
}

impl ScriptNet {
    fn lock(&self) -> MutexGuard<'_, Mode> {
        // A panic inside libtorch (caught by the training loop's guard) poisons the lock; the
        // module itself is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the module with its current parameters (e.g. weights loaded from a checkpoint)
    /// as a TorchScript file that [`ScriptModule::read`] and PyTorch's `torch.jit.load` read.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        self.lock()
            .module
            .save(path)
            .map_err(|e| ModelError::Script(format!("saving {}: {e}", path.display())))
    }

    /// The forward pass in the given mode, with libtorch's errors as errors.
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, ModelError> {
        let mut m = self.lock();
        if m.train != train {
            if train {
                m.module.f_set_train()?;
            } else {
                m.module.f_set_eval()?;
            }
            m.train = train;
        }
        Ok(m.module.forward_ts(&[xs])?)
    }
}

impl ModuleT for ScriptNet {
    /// Panics on a libtorch error like every `tch` module does; the training, evaluation and
    /// distillation loops turn such a panic into a [`ModelError::Shape`].
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self.f_forward_t(xs, train) {
            Ok(t) => t,
            Err(e) => panic!("TorchScript forward: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::train::{evaluate, train, TrainConfig};
    use crate::{Arch, Weights};

    const SHAPE: DataShape = DataShape {
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };

    fn fixture(name: &str) -> ScriptModule {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/models")
            .join(name);
        ScriptModule::read(&p).expect("examples/models fixture")
    }

    fn student() -> ScriptModule {
        fixture("student.pt")
    }

    #[test]
    fn fixture_fits_its_data_and_refuses_other_class_counts() {
        let m = student();
        let info = m.check(&SHAPE).unwrap();
        assert_eq!((info.params, info.trainable), (9610, 9034));
        let other = DataShape {
            classes: 62,
            ..SHAPE
        };
        let err = m.check(&other).unwrap_err().to_string();
        assert!(
            err.contains("[2, 10]") && err.contains("62 classes"),
            "{err}"
        );
        let rgb = DataShape {
            channels: 3,
            ..SHAPE
        };
        assert!(matches!(m.check(&rgb), Err(ModelError::Script(_))));
        assert!(matches!(
            ScriptModule::from_bytes(b"PK\x03\x04 not a module".to_vec()),
            Err(ModelError::Script(_))
        ));
    }

    /// BatchNorm statistics exported as non-trainable parameters: the optimiser leaves them
    /// alone, training mode updates them, they are in `Weights`, and loading `Weights` into a
    /// fresh copy reproduces the trained model's eval outputs exactly. (The teacher fixture:
    /// the student's global average pooling cannot tell the synthetic data's position-coded
    /// classes apart.)
    #[test]
    fn trains_and_batchnorm_statistics_travel_with_the_weights() {
        let arch = Arch::Script(fixture("teacher.pt"));
        let split = synthetic(256, 64, SHAPE, 3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = arch.build(&vs.root(), &SHAPE).unwrap();
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert!(
            names.iter().any(|n| n.ends_with("running_var")),
            "{names:?}"
        );
        let w0 = Weights::from_var_store(&vs);
        let before = evaluate(&net, &split.test, 64);
        let stats = train(
            &net,
            &vs,
            &split.train,
            &TrainConfig {
                epochs: 2,
                ..TrainConfig::default()
            },
        )
        .unwrap();
        assert!(stats.loss.is_finite());
        let after = evaluate(&net, &split.test, 64);
        assert!(
            after.loss < before.loss && after.accuracy > 0.5,
            "{before:?} → {after:?}"
        );
        let w1 = Weights::from_var_store(&vs);
        let moved = |suffix: &str| {
            w1.tensors
                .iter()
                .filter(|(k, _)| k.ends_with(suffix))
                .any(|(k, t)| t != &w0.tensors[k])
        };
        assert!(moved("running_mean") && moved("running_var"));
        // Eval (running statistics) and train (batch statistics) differ: the mode is honoured.
        let x = split.test.images.narrow(0, 0, 8);
        let eval_out = tch::no_grad(|| net.forward_t(&x, false));
        let train_out = tch::no_grad(|| net.forward_t(&x, true));
        assert!(!eval_out.allclose(&train_out, 1e-5, 1e-5, false));
        // A fresh copy with the trained weights (a camera, a checkpoint) answers the same.
        let mut fresh_vs = nn::VarStore::new(Device::Cpu);
        let fresh = arch.build(&fresh_vs.root(), &SHAPE).unwrap();
        w1.load_into(&mut fresh_vs).unwrap();
        let again = tch::no_grad(|| fresh.forward_t(&x, false));
        assert!(again.allclose(&eval_out, 1e-6, 1e-6, false));
        // Two copies of one module are independent: a train-mode forward of the copy (which
        // updates its running statistics) leaves the original's as they were.
        let original = Weights::from_var_store(&vs);
        let _ = tch::no_grad(|| fresh.forward_t(&x, true));
        assert!(Weights::from_var_store(&vs) == original);
        assert!(Weights::from_var_store(&fresh_vs) != w1);
    }
}
