//! Developer tasks: `cargo xtask setup | build-ebpf | test | demo | bench`.
//!
//! xtask depends on none of the project's crates: it must build on a bare
//! machine, where the agent cannot (its build script needs bpf-linker and the
//! nightly toolchain that `setup` installs). The demo and the benchmark are
//! binaries of their own crates, built and run by a second cargo invocation.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
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
    /// Debian packages (iproute2, procps, llvm-22-dev, libpolly-22-dev; for the
    /// benchmark iptables, nftables, fonts-dejavu-core), the nightly
    /// toolchain's rust-src, and bpf-linker built against LLVM 22.
    /// cargo-deny for the dependency check. Safe to run again: every step
    /// checks first and says what it does.
    Setup {
        /// Install nothing: list what is missing and exit non-zero if anything is.
        #[arg(long)]
        check: bool,
    },
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
    /// Measure mcs-agent against direct pod traffic and kube-proxy's iptables
    /// and nftables modes, side by side in one run (as root).
    ///
    /// Installs what is missing, builds release binaries and runs mcs-bench:
    /// data path (new connections/s, kept-alive latency, UDP rate at 1, 1,000
    /// and 10,000 services), paired comparisons precise to about 1 % (VIP and
    /// pod address, agent and no agent), per-packet cost (BPF_PROG_TEST_RUN),
    /// control plane (cold start, one change, RSS, iptables-restore and nft -f).
    /// Writes target/bench/results.{md,json} and new-connections.png; a full
    /// run also records BENCHMARKS.md and docs/bench/. About 25 minutes;
    /// --quick two to three.
    Bench {
        /// A smoke run of two to three minutes: 1 and 1,000 services, one round, short runs.
        #[arg(long)]
        quick: bool,
        /// More mcs-bench arguments (see `cargo xtask bench -- --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes, without a backtrace: every error here says what to do.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root).context("entering the workspace")?;
    match cli.task {
        Task::Setup { check: true } => setup::check(),
        Task::Setup { check: false } => setup::run(),
        Task::BuildEbpf => {
            setup::check()?;
            build_ebpf().map(|_| ())
        }
        Task::Test { args } => test(&args),
        Task::Demo { requests } => {
            require_root("the demo creates network namespaces and loads BPF programs")?;
            setup::run()?;
            let agent = build_agent()?;
            exec(Command::new("cargo").args(["build", "--quiet", "--package", "mcs-tests", "--bin", "mcs-demo"]))?;
            exec(
                Command::new(root.join("target/debug/mcs-demo"))
                    .arg("--agent")
                    .arg(&agent)
                    .args(["--requests", &requests.to_string()]),
            )
        }
        Task::Bench { quick, args } => bench(quick, &args),
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

fn bench(quick: bool, args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        exec(Command::new("cargo").args(["run", "--quiet", "--release", "--package", "mcs-bench", "--"]).args(args))?;
        return Ok(());
    }
    require_root("the benchmark creates network namespaces, loads BPF programs and installs netfilter rules in them")?;
    setup::run()?;
    let started = Instant::now();
    println!("building release binaries: mcs-agent (with its eBPF object) and mcs-bench");
    exec(Command::new("cargo").args(["build", "--release", "--package", "mcs-agent", "--package", "mcs-bench"]))?;
    println!("built in {:.1?}", started.elapsed());
    let root = workspace_root();
    let mut cmd = Command::new(root.join("target/release/mcs-bench"));
    cmd.arg("--agent").arg(root.join("target/release/mcs-agent"));
    if quick {
        cmd.args(["--quick", "--services", "1,1000"]);
    } else {
        cmd.arg("--record");
    }
    exec(cmd.args(args))
}

fn test(args: &[String]) -> Result<()> {
    require_root("the tests load BPF programs into the kernel and build network namespaces")?;
    let started = Instant::now();
    setup::run()?;
    // One build for the tests and the agent they start: `cargo build -p
    // mcs-agent` would resolve features apart from the test build and so
    // build (and its build script build the eBPF object) a second time.
    let built = Instant::now();
    println!("building every crate and test (the agent's build script builds the eBPF object it embeds)");
    exec(Command::new("cargo").args(["test", "--no-run", "--quiet"]).args(args))?;
    let agent = workspace_root().join("target/debug/mcs-agent");
    if !agent.exists() {
        bail!("the test build did not produce {}", agent.display());
    }
    println!("built in {:.1?}", built.elapsed());
    println!("running every test (unit, BPF_PROG_TEST_RUN fixtures, netns traffic)");
    exec(Command::new("cargo").arg("test").args(args).env("MCS_AGENT_BIN", &agent))?;
    println!("all tests passed in {:.1?}", started.elapsed());
    Ok(())
}
