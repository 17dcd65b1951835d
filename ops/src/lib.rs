//! What an operator's tools read and write about a fleet, with no libtorch: the fleet registry,
//! the round reports and their alerts, the coordinator's live status file, and the HTML and
//! CSV renderings of a run.
//!
//! The coordinator writes all of these (and re-exports these modules, so
//! `coevo_coordinator::report` etc. are the same types); they live here so that the lean
//! `coevo` binary (`coevo fleet`, `coevo report`, `coevo status`) can read them without linking
//! tch, whose shared libraries cost ~0.7 s and ~100 MB RSS at every start (issue #13).

pub mod alerts;
pub mod export;
pub mod fs;
pub mod html;
pub mod registry;
pub mod report;
pub mod status;

pub use fs::write_atomic;
pub use registry::FleetRegistry;
pub use report::RoundReport;

/// Errors of loading, validating and writing these records.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A file's content or a setting is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Reading or writing a file failed.
    #[error("I/O: {0}")]
    Io(String),
}
