//! Developer tasks: `cargo xtask setup | build-ebpf | test | demo`.

mod demo;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "mcs-agent's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing need, skipping what is already there.
    ///
    /// Debian packages (iproute2, procps, llvm-22-dev, libpolly-22-dev), the
    /// nightly toolchain's rust-src, and bpf-linker built against LLVM 22.
    /// Safe to run again: every step checks first and says what it does.
    Setup,
    /// Build the eBPF object (mcs-ebpf) for bpfel-unknown-none.
    ///
    /// The agent's build script builds the same object and embeds it; this
    /// task builds it on its own and says where it is, for inspection.
    BuildEbpf,
    /// Install what is missing, build everything and run every test (as root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build a small clusterset in network namespaces, run the agent on
    /// deploy/examples and send real traffic to the ClusterSetIP (as root).
    Demo {
        /// TCP requests to send in each round.
        #[arg(long, default_value_t = 300)]
        requests: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).context("entering the workspace")?;
    match cli.task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => {
            setup::check()?;
            build_ebpf().map(|_| ())
        }
        Task::Test { args } => test(&args),
        Task::Demo { requests } => {
            require_root("the demo creates network namespaces and loads BPF programs")?;
            setup::run()?;
            let agent = build_agent()?;
            demo::run(&agent, requests)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn require_root(why: &str) -> Result<()> {
    if !nix_is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs a command, streaming its output, and fails with what it was.
pub fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn build_ebpf() -> Result<PathBuf> {
    let started = Instant::now();
    println!("building the eBPF object (nightly, bpfel-unknown-none, -Z build-std=core)");
    exec(Command::new("rustup").args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "mcs-ebpf",
        "--bins",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]))?;
    let object = PathBuf::from("target/bpfel-unknown-none/release/mcs-ebpf");
    let size = std::fs::metadata(&object).with_context(|| format!("{} was not produced", object.display()))?.len();
    println!("eBPF object: {} ({size} bytes) in {:.1?}", object.display(), started.elapsed());
    Ok(object)
}

/// Builds the agent (its build script builds and embeds the eBPF object).
fn build_agent() -> Result<PathBuf> {
    let started = Instant::now();
    println!("building mcs-agent (and, through its build script, the eBPF object it embeds)");
    exec(Command::new("cargo").args(["build", "--package", "mcs-agent"]))?;
    println!("built in {:.1?}", started.elapsed());
    Ok(workspace_root().join("target/debug/mcs-agent"))
}

fn test(args: &[String]) -> Result<()> {
    require_root("the tests load BPF programs into the kernel and build network namespaces")?;
    let started = Instant::now();
    setup::run()?;
    build_ebpf()?;
    let agent = build_agent()?;
    println!("running every test (unit, BPF_PROG_TEST_RUN fixtures, netns traffic)");
    exec(Command::new("cargo").arg("test").args(args).env("MCS_AGENT_BIN", &agent))?;
    println!("all tests passed in {:.1?}", started.elapsed());
    Ok(())
}
