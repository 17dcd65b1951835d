//! The commands of `coevo` that need no libtorch, shared by the two binaries of the `coevo`
//! package: the lean `coevo` (runs these in-process and hands everything else to its sibling)
//! and the full `coevo-ml`. This crate must never depend on tch, directly or through another
//! crate (coevo-models, coevo-coordinator, coevo-edge): linking it would put libtorch back into
//! the lean binary's start-up (tests/lean_cli.rs checks the binary's `DT_NEEDED`).
//!
//! # Layout
//! - [`commands`]: clap definitions and handlers of `keys`, `fleet`, `broker`, `status`,
//!   `report`.
//! - [`provision`]: keys, fleet registry and broker credentials for a fleet, written to a folder.
//! - [`fleet_import`]: bulk provisioning (`coevo fleet import`, `fleet add ID...`), O(N).
//! - [`mosquitto`]: export a fleet's passwords and per-client ACLs for Mosquitto.
//! - [`nats`]: the same for a clustered NATS server (MQTT gateway + JetStream).
//! - [`status`]: `coevo status`, the live round of a running coordinator (its `status.json`).
//! - [`table`]: the round table printed by `coevo report`.
//! - [`report_cmd`]: `coevo report` (table, JSON, `--html`, `--csv`, alerts).
//! - [`tls`]: a fleet CA and the broker's TLS certificate (`coevo keys tls`).

pub mod commands;
pub mod fleet_import;
pub mod mosquitto;
pub mod nats;
pub mod provision;
pub mod report_cmd;
pub mod status;
pub mod table;
pub mod tls;

pub use commands::{is_lean, LeanCli, LeanCommand};
