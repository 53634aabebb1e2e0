//! Builds the eBPF object with the nightly toolchain and embeds it, so a plain
//! `cargo build` can never ship an object older than its sources.

use std::{path::Path, process::Command};

fn main() -> aya_build::Result<()> {
    preflight();
    let manifest_dir = env!("CARGO_MANIFEST_DIR");
    let ebpf_dir = Path::new(manifest_dir).join("../mcs-ebpf");
    let common_dir = Path::new(manifest_dir).join("../mcs-common/src");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let root = ebpf_dir.to_str().expect("workspace path is UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package { name: "mcs-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}

/// Fails early with the fix instead of a linker error deep in a nested build.
fn preflight() {
    let mut missing = Vec::new();
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !matches!(linker, Ok(ref out) if out.status.success()) {
        missing.push("bpf-linker (built against LLVM 22)");
    }
    let sysroot = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output();
    match sysroot {
        Ok(out) if out.status.success() => {
            let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !Path::new(&sysroot).join("lib/rustlib/src/rust/library/core").exists() {
                missing.push("rust-src for the nightly toolchain");
            }
        }
        _ => missing.push("the nightly Rust toolchain"),
    }
    if !missing.is_empty() {
        panic!(
            "cannot build the eBPF object: missing {}. Run `cargo xtask setup` (installs everything, idempotent).",
            missing.join(", ")
        );
    }
}
