//! Builds the eBPF object with the nightly toolchain and embeds it, so a plain
//! `cargo build` can never ship an object older than its sources.
//!
//! The nested build's output is kept, not relayed: cargo would show every
//! line of it as a warning (dozens on a first build). One line says what was
//! built; the whole output is shown only when the build fails.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, exit},
    time::Instant,
};

const PACKAGE: &str = "mcs-ebpf";
const TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ebpf_dir = manifest_dir.join("../mcs-ebpf");
    // The build-dependency on mcs-ebpf covers its library; its binary and the
    // shared layout are named here so a change to either rebuilds the object.
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!("cargo:rerun-if-changed={}", manifest_dir.join("../mcs-common/src").display());

    preflight();
    let started = Instant::now();
    let target_dir = out_dir.join("ebpf-target");
    let output = nested_build(&target_dir).output().unwrap_or_else(|e| fail(&format!("cannot start rustup: {e}")));
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        fail(&format!(
            "building the eBPF object ({PACKAGE}, nightly, {TARGET}) failed ({}); its output is above",
            output.status
        ));
    }
    let built = target_dir.join(TARGET).join("release").join(PACKAGE);
    let embedded = out_dir.join(PACKAGE);
    if let Err(e) = std::fs::copy(&built, &embedded) {
        fail(&format!("copying {} to {}: {e}", built.display(), embedded.display()));
    }
    let size = std::fs::metadata(&embedded).map(|m| m.len()).unwrap_or_default();
    // Cargo shows this line again on later builds that reuse the object, so
    // it says what is embedded rather than that a build just ran.
    println!(
        "cargo:warning=embedding the eBPF object {PACKAGE} ({size} bytes; built with nightly for {TARGET} in {:.1?})",
        started.elapsed()
    );
}

/// `rustup run nightly cargo build` of the eBPF crate into a target directory
/// of its own (sharing the outer one would deadlock on cargo's lock).
fn nested_build(target_dir: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--package", PACKAGE, "--bins", "--release", "--target", TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(target_dir);
    // aya-ebpf reads bpf_target_arch; BTF lets the loader relocate and
    // bpftool show the programs' types.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let rustflags = [format!("--cfg=bpf_target_arch=\"{arch}\""), "-Cdebuginfo=2".into(), "-Clink-arg=--btf".into()];
    cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"));
    // The outer build's compiler and wrappers are the stable toolchain's.
    for key in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTUP_TOOLCHAIN"] {
        cmd.env_remove(key);
    }
    cmd
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    exit(1);
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
        fail(&format!(
            "cannot build the eBPF object: missing {}. Run `cargo xtask setup` (installs everything, idempotent).",
            missing.join(", ")
        ));
    }
}
