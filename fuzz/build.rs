//! Gives our binaries and tests an rpath to libtorch: cargo overrides LD_LIBRARY_PATH for
//! `cargo run`/`cargo test`, so the dynamic loader must find `libtorch_cpu.so` on its own.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
