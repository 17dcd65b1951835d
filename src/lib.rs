//! The `coevo` command: thin wiring of the workspace crates into subcommands, plus the pieces
//! that assemble a whole fleet on one machine (`coevo demo`, end-to-end tests).
//!
//! Two binaries: `coevo` (src/main.rs, lean, no libtorch) runs the commands of [`coevo_cli`]
//! and `exec`s `coevo-ml` (src/bin/coevo-ml.rs, the full command line) for the rest.
//!
//! # Layout
//! - [`byom`]: `coevo models --student/--teacher`, checks of TorchScript models (issue #16).
//! - [`demo`]: embedded broker + coordinator + N edge agents over real MQTT on 127.0.0.1.
//! - [`bench`]: `coevo bench`.
//! - Re-exported from [`coevo_cli`] (no libtorch, shared with the lean binary): [`provision`],
//!   [`fleet_import`], [`mosquitto`], [`status`], [`table`], [`report_cmd`], [`tls`].

pub mod bench;
pub mod byom;
pub mod cluster;
pub mod demo;

pub use coevo_cli::{fleet_import, mosquitto, provision, report_cmd, status, table, tls};
