//! `coevo`: the lean entry point. It runs the commands that need no libtorch (`keys`, `fleet`,
//! `broker` and its front processes, `status`, `report`; see [`coevo_cli::commands`]) in this
//! process, and `exec`s its sibling `coevo-ml` — the full command line, linked with libtorch —
//! for everything else (coordinator, edge, demo, bench, models, `--help`, `--version`).
//!
//! Why two binaries: a binary linked with libtorch has the dynamic loader map and relocate
//! libtorch's shared libraries before `main`, ~0.3 s and ~115 MB RSS on every start (release
//! build; BENCHMARKS.md "CLI start-up"), even for `coevo keys --help` — and a broker with front
//! processes starts one such process per front. This binary only uses crates without tch
//! (coevo-cli, coevo-ops, coevo-broker), so libtorch is not in its `DT_NEEDED`
//! (tests/lean_cli.rs checks).

use anyhow::{anyhow, Result};
use clap::Parser;
use std::os::unix::process::CommandExt;

/// The full binary, expected in the same directory as this one.
const ML_BIN: &str = "coevo-ml";

fn main() -> Result<()> {
    match std::env::args_os().nth(1) {
        Some(first) if coevo_cli::is_lean(&first) => coevo_cli::LeanCli::parse().command.run(),
        _ => Err(exec_ml()),
    }
}

/// Replaces this process with `coevo-ml` from this binary's directory, with the same argv
/// (argv[0] included, so its usage lines still say `coevo`) and environment. Returns only on
/// failure.
fn exec_ml() -> anyhow::Error {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return anyhow!("cannot locate this executable to find {ML_BIN} beside it: {e}"),
    };
    let ml = exe.with_file_name(ML_BIN);
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "coevo".into());
    let err = std::process::Command::new(&ml).arg0(arg0).args(args).exec();
    if err.kind() == std::io::ErrorKind::NotFound {
        anyhow!(
            "{} not found. `coevo` runs keys, fleet, broker, status and report itself; every \
             other command (coordinator, edge, demo, bench, models, --help) is in `{ML_BIN}`, \
             which must be installed in the same directory: `cargo build --release` builds both \
             (target/release/coevo and target/release/{ML_BIN}); copy or install them side by \
             side (`cargo install --path .` does).",
            ml.display()
        )
    } else {
        anyhow!("cannot run {}: {err}", ml.display())
    }
}
