//! Models for coevo: datasets, client partitions, the student network, training/evaluation and a
//! pure-Rust state dict with its wire codecs.
//!
//! This crate is the only place (besides the binaries' wiring) that talks to libtorch via `tch`;
//! everything that crosses the network is first turned into a [`Weights`] value so aggregation
//! code in the coordinator can stay plain Rust.
//!
//! # Layout
//!
//! - [`error`]: [`ModelError`], the single error type.
//! - [`data`]: [`Dataset`] / [`DataSplit`] loading from IDX directories or image folders, plus a
//!   tiny synthetic dataset for unit tests.
//! - [`camera`]: a camera-like RGB image-folder dataset generated from a grey one (issue #12).
//! - [`local`]: a camera's own frames read within a memory budget ([`local::LocalSet`]).
//! - [`partition`]: [`partition::PartitionSpec`] and the natural / IID / Dirichlet / shards
//!   partitioners that split a training set across clients.
//! - [`net`]: the [`Student`] and [`Teacher`] CNNs, built from a [`DataShape`], and their costs.
//! - [`script`]: a user's TorchScript module standing in for either (issue #16), and
//!   [`arch`]: [`Arch`] (built-in or TorchScript) and the [`Net`] it builds, which every
//!   training, distillation and evaluation path takes.
//! - `distill` (feature `teacher`, on by default; the edge builds without it): knowledge distillation both ways (teacher → student KD, student ensemble →
//!   teacher fusion) and the validation guard that accepts or rolls back an update.
//! - [`noise`]: the unlabelled-frame convention and the simulator's label corruption
//!   (fraction labelled, symmetric or pair-flip noise), issue #18.
//! - [`semi`]: the edge's pseudo-labelling (FixMatch-style) and label cleaning (confident
//!   relabelling, small-loss selection, a noise estimate), issue #18.
//! - [`train`]: SGD (optionally FedProx) training and evaluation loops.
//! - [`weights`]: [`Weights`] (named `f32` tensors), arithmetic used by aggregation, and the
//!   bounded [`WeightCodec`] encoders/decoders.

pub mod arch;
pub mod camera;
pub mod data;
#[cfg(feature = "teacher")]
pub mod distill;
pub mod error;
pub mod local;
pub mod net;
pub mod noise;
pub mod partition;
pub mod script;
pub mod semi;
pub mod train;
pub mod weights;

pub use arch::{Arch, Net};
pub use data::{DataShape, DataSplit, Dataset};
pub use error::ModelError;
#[cfg(feature = "teacher")]
pub use net::Teacher;
pub use net::{NetKind, Student};
pub use script::ScriptModule;
pub use weights::{ParamTensor, WeightCodec, Weights};
