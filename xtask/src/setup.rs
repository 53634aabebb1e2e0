//! Idempotent installation of the toolchain and tools, each step checked first.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::exec;

/// Debian packages: (package, why).
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip and tc build the test and demo namespaces"),
    ("procps", "sysctl enables forwarding in the node namespace"),
    ("llvm-22-dev", "bpf-linker links the eBPF object with LLVM 22"),
    ("libpolly-22-dev", "LLVM 22's static libraries that bpf-linker links against"),
    ("iptables", "the benchmark reproduces kube-proxy's iptables mode (iptables-restore)"),
    ("nftables", "the benchmark reproduces kube-proxy's nftables mode (nft -f)"),
    ("fonts-dejavu-core", "the benchmark's chart labels (DejaVuSans.ttf)"),
];

/// A tool installed with `cargo install`.
struct CargoTool {
    name: &'static str,
    /// The version requirement (`^version`) and what `--version` must print.
    version: &'static str,
    why: &'static str,
    /// More `cargo install` arguments.
    args: &'static [&'static str],
    /// Put in front of PATH while it builds.
    path: Option<&'static str>,
}

const TOOLS: &[CargoTool] = &[
    CargoTool {
        name: "bpf-linker",
        version: "0.13",
        why: "links the eBPF object against LLVM 22; about a minute on 2 cores",
        args: &["--no-default-features", "--features", "llvm-22"],
        path: Some("/usr/lib/llvm-22/bin"),
    },
    CargoTool {
        name: "cargo-deny",
        version: "0.20",
        why: "checks the dependency graph against deny.toml; about 3 minutes on 2 cores",
        args: &["--locked"],
        path: None,
    },
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

impl CargoTool {
    fn present(&self) -> bool {
        Command::new(self.name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(self.version))
    }

    /// Installs the tool unless it is there; true when it installed.
    fn ensure(&self) -> Result<bool> {
        let (name, version) = (self.name, self.version);
        if self.present() {
            println!("setup: {name} {version} present");
            return Ok(false);
        }
        println!("setup: installing {name} {version} ({})", self.why);
        let mut cmd = Command::new("cargo");
        cmd.args(["install", name, "--version", &format!("^{version}")]).args(self.args);
        if let Some(dir) = self.path {
            cmd.env("PATH", format!("{dir}:{}", std::env::var("PATH").unwrap_or_default()));
        }
        exec(&mut cmd)?;
        if !self.present() {
            bail!("{name} was installed but is not on PATH: add ~/.cargo/bin to PATH");
        }
        Ok(true)
    }
}

fn nightly_rust_src() -> Result<bool> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup (is Rust installed through rustup?)")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "the nightly Rust toolchain is missing ({}): install it with `rustup toolchain install nightly` (the eBPF crate needs nightly for -Z build-std)",
            stderr.lines().next().unwrap_or_default().trim().trim_start_matches("error: ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("rust-src")))
}

/// Fails with the fix when something is missing, installing nothing.
pub fn check() -> Result<()> {
    let mut missing: Vec<String> =
        PACKAGES.iter().filter(|(p, _)| !installed(p)).map(|(p, _)| format!("Debian package {p}")).collect();
    match nightly_rust_src() {
        Ok(true) => {}
        Ok(false) => missing.push("rust-src for nightly".into()),
        Err(e) => missing.push(format!("{e:#}")),
    }
    missing.extend(TOOLS.iter().filter(|t| !t.present()).map(|t| format!("{} {}", t.name, t.version)));
    if !missing.is_empty() {
        bail!("missing: {}. Run `cargo xtask setup` (installs everything, idempotent).", missing.join(", "));
    }
    println!("setup: everything present (Debian packages, nightly rust-src, bpf-linker, cargo-deny)");
    Ok(())
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    let mut did = false;

    let missing: Vec<&(&str, &str)> = PACKAGES.iter().filter(|(p, _)| !installed(p)).collect();
    if missing.is_empty() {
        println!(
            "setup: Debian packages present ({})",
            PACKAGES.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(", ")
        );
    } else {
        for (package, why) in &missing {
            println!("setup: installing {package}: {why}");
        }
        exec(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(missing.iter().map(|(p, _)| *p))
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        did = true;
    }

    if nightly_rust_src()? {
        println!("setup: nightly rust-src present");
    } else {
        println!("setup: adding rust-src to nightly: -Z build-std=core compiles core for the BPF target");
        exec(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
        did = true;
    }

    for tool in TOOLS {
        did |= tool.ensure()?;
    }
    if did {
        println!("setup: done in {:.1?}", started.elapsed());
    }
    Ok(())
}
