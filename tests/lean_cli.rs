//! The lean `coevo` binary (issue #13 Must 6): it must not link libtorch — the dynamic loader
//! would map and relocate it before `main`, ~0.7 s and ~100 MB on every `coevo keys …` and
//! every broker front process — and it must still answer every command: the lean ones itself,
//! the rest by `exec`ing `coevo-ml` from its own directory.
//!
//! Start-up time is measured in BENCHMARKS.md, not asserted here (a timed test would be flaky
//! on a shared machine); what makes it fast — no libtorch in `DT_NEEDED` — is asserted.

use std::path::Path;
use std::process::{Command, Output};

/// The `NEEDED` entries of an ELF file's dynamic section, read with binutils' `readelf -d`.
fn needed(binary: &Path) -> Vec<String> {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(binary)
        .output()
        .expect("run readelf (binutils) to read the binary's dynamic section");
    assert!(out.status.success(), "readelf -d {}", binary.display());
    // ` 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]`
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            let (_, rest) = l.split_once('[')?;
            Some(rest.trim_end_matches(']').to_string())
        })
        .collect()
}

fn is_torch(lib: &str) -> bool {
    lib.contains("torch") || lib.starts_with("libc10")
}

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {bin} {args:?}: {e}"))
}

#[test]
fn lean_binary_does_not_link_libtorch() {
    let lean = needed(Path::new(env!("CARGO_BIN_EXE_coevo")));
    assert!(
        lean.iter().any(|l| l.starts_with("libc.so")),
        "no NEEDED entries parsed: {lean:?}"
    );
    assert!(
        !lean.iter().any(|l| is_torch(l)),
        "the lean coevo binary links libtorch: {lean:?}"
    );
    // The check can tell: the full binary does link it.
    let ml = needed(Path::new(env!("CARGO_BIN_EXE_coevo-ml")));
    assert!(ml.iter().any(|l| is_torch(l)), "coevo-ml: {ml:?}");
}

#[test]
fn lean_binary_answers_lean_and_heavy_commands() {
    let coevo = env!("CARGO_BIN_EXE_coevo");
    // In-process.
    let keys = run(coevo, &["keys", "--help"]);
    assert!(keys.status.success(), "{keys:?}");
    let text = String::from_utf8_lossy(&keys.stdout);
    assert!(
        text.contains("Usage: coevo keys") && text.contains("gen"),
        "{text}"
    );
    // Through coevo-ml, with argv[0] kept: its usage still says `coevo`.
    let bench = run(coevo, &["bench", "--help"]);
    assert!(bench.status.success(), "{bench:?}");
    let text = String::from_utf8_lossy(&bench.stdout);
    assert!(
        text.contains("Usage: coevo bench") && text.contains("fleet"),
        "{text}"
    );
    // The top-level help is the full one: lean and heavy commands alike.
    let help = run(coevo, &["--help"]);
    assert!(help.status.success(), "{help:?}");
    let text = String::from_utf8_lossy(&help.stdout);
    for cmd in [
        "keys",
        "fleet",
        "broker",
        "status",
        "report",
        "coordinator",
        "demo",
    ] {
        assert!(
            text.contains(&format!("  {cmd} ")),
            "{cmd} missing from:\n{text}"
        );
    }
}

#[test]
fn lone_lean_binary_runs_lean_commands_and_names_the_missing_sibling() {
    let dir = tempfile::tempdir().unwrap();
    let lone = dir.path().join("coevo");
    std::fs::copy(env!("CARGO_BIN_EXE_coevo"), &lone).unwrap();
    let lone = lone.to_str().unwrap();
    let keys = run(lone, &["keys", "--help"]);
    assert!(keys.status.success(), "{keys:?}");
    let demo = run(lone, &["demo", "--help"]);
    assert!(!demo.status.success());
    let err = String::from_utf8_lossy(&demo.stderr);
    let expected = dir.path().join("coevo-ml");
    assert!(
        err.contains(&expected.display().to_string()) && err.contains("same directory"),
        "{err}"
    );
}
