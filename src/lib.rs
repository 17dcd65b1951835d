//! The `coevo` command: thin wiring of the workspace crates into subcommands, plus the pieces
//! that assemble a whole fleet on one machine (`coevo demo`, end-to-end tests).
//!
//! # Layout
//! - [`byom`]: `coevo models --student/--teacher`, checks of TorchScript models (issue #16).
//! - [`provision`]: keys, fleet registry and broker credentials for a fleet, written to a folder.
//! - [`fleet_import`]: bulk provisioning (`coevo fleet import`, `fleet add ID...`), O(N).
//! - [`demo`]: embedded broker + coordinator + N edge agents over real MQTT on 127.0.0.1.
//! - [`mosquitto`]: export a fleet's passwords and per-client ACLs for Mosquitto.
//! - [`status`]: `coevo status`, the live round of a running coordinator (its `status.json`).
//! - [`table`]: the round table printed by `coevo report`.
//! - [`report_cmd`]: `coevo report` (table, JSON, `--html`, `--csv`, alerts).
//! - [`tls`]: a fleet CA and the broker's TLS certificate (`coevo keys tls`).

pub mod bench;
pub mod byom;
pub mod demo;
pub mod fleet_import;
pub mod mosquitto;
pub mod provision;
pub mod report_cmd;
pub mod status;
pub mod table;
pub mod tls;
