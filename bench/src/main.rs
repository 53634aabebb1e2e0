//! `mcs-bench`: the numbers behind `cargo xtask bench`. See BENCHMARKS.md.

mod control;
use clap::ValueEnum as _;

mod disruption;
mod external;
mod family;
mod kubeproxy;
mod lab;
mod load;
mod memory;
mod packet;
mod paired;
mod profile;
mod report;
mod stats;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use serde::Serialize;

use crate::{
    lab::{Lab, Path4, Position},
    load::{Run, Workload},
};

#[derive(Debug, Parser)]
#[command(
    name = "mcs-bench",
    about = "Measure mcs-agent against direct pod traffic and kube-proxy's iptables and nftables modes",
    long_about = "Measure mcs-agent against direct pod traffic and kube-proxy's iptables and nftables modes, \
side by side in one run on one netns topology, and write a markdown table, JSON and a PNG chart.\n\n\
Run it through `cargo xtask bench` (which installs what is missing and builds release binaries). \
Needs root: it creates network namespaces, loads BPF programs and installs netfilter rules, \
all inside namespaces it creates and deletes."
)]
struct Args {
    /// The mcs-agent binary to measure (a release build).
    #[arg(long)]
    agent: PathBuf,
    /// Where to write results.md, results.json and new-connections.png.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Two to three minutes: 1 round, short runs, the measured service last only, fewer samples.
    #[arg(long)]
    quick: bool,
    /// Service counts (10 endpoints each). Default: 1,1000,10000.
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<usize>>,
    /// Interleaved rounds; tables report the median and the spread. Default: 3 (quick: 1).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per workload run. Default: 0.6 (quick: 0.25).
    #[arg(long)]
    seconds: Option<f64>,
    /// Concurrent clients for the "several clients" runs, each its own pod namespace.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// BPF_PROG_TEST_RUN runs per program path. Default: 1000000 (quick: 100000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    packet_runs: Option<u32>,
    /// Services for the control-plane measurements. Default: 10000 (quick: 1000).
    #[arg(long)]
    control_services: Option<usize>,
    /// Services for the large control-plane run (mcs-agent only: kube-proxy
    /// does not load that many in bounded time). Default: 100000 (quick: none); 0 skips it.
    #[arg(long)]
    control_large: Option<usize>,
    /// Endpoint changes timed from manifest to map. Default: 200 (quick: 20).
    #[arg(long)]
    changes: Option<usize>,
    /// The iptables-restore that stands for kube-proxy's iptables mode
    /// (e.g. iptables-legacy-restore). Default: the system's.
    #[arg(long, default_value = "iptables-restore")]
    iptables_restore: String,
    /// Extra mcs-agent flags, for every agent the benchmark starts.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Also write BENCHMARKS.md and docs/bench/ (the recorded latest run).
    #[arg(long)]
    record: bool,
    /// Write the generated kube-proxy rule sets (iptables-restore and nft -f
    /// input) for the largest service count into this directory, and exit.
    #[arg(long)]
    dump_rules: Option<PathBuf>,
    /// Write the manifests the control-plane part feeds the agent
    /// (`--control-services` services, one file each) into this directory, and exit.
    #[arg(long)]
    dump_manifests: Option<PathBuf>,
    /// Parts to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "packet,control,datapath,paired,disruption,family,memory,external"
    )]
    only: Vec<Part>,
    /// Pairs of slices per paired comparison (`paired`). Default: 12 (quick: 4, a smoke run).
    #[arg(long)]
    pairs: Option<usize>,
    /// Seconds per slice of a paired comparison. Default: 1.0 (quick: 0.2).
    #[arg(long, value_parser = positive_seconds)]
    slice_seconds: Option<f64>,
    /// Which paired comparisons to make (`paired`).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tc-path,socket-lb,attached")]
    comparisons: Vec<paired::Comparison>,
    /// Services programmed during the disruption measurement. Default: 1000 (quick: 100).
    #[arg(long)]
    disruption_services: Option<usize>,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && (0.01..=3600.0).contains(&x) => Ok(x),
        _ => Err(format!("{s:?}: seconds between 0.01 and 3600")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Packet,
    Control,
    Datapath,
    /// Ratios precise to about 1 %: two states of one lab (VIP and pod
    /// address; agent and no agent) in alternating slices, a ratio per pair,
    /// their median with a 95 % interval.
    Paired,
    /// Restarts under load: mcs-agent's four kinds, kube-proxy's resync.
    Disruption,
    /// IPv6 beside IPv4: new connections per second, direct and through a dual-stack VIP.
    Family,
    /// The agent's control-plane structures built in-process with a counting
    /// allocator: live heap bytes per service by structure.
    Memory,
    /// Clients outside the node: new connections through the agent's XDP
    /// program against nftables DNAT and masquerade (paired slices), and
    /// XDP's cost per packet against the TC program's.
    External,
}

/// Everything one configuration measured in one round.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Key {
    pub path: Path4,
    pub services: usize,
    pub position: Position,
    pub workload: Workload,
    pub clients: usize,
}

#[derive(Debug, Serialize)]
pub struct Conditions {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub iptables: String,
    pub nft: String,
    pub agent: String,
    pub agent_flags: Vec<String>,
    pub quick: bool,
    pub rounds: usize,
    pub seconds_per_run: f64,
    pub clients: usize,
    pub endpoints_per_service: usize,
}

fn command_line(args: &[&str]) -> String {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "run as root (or through `sudo cargo xtask bench`): the benchmark builds network namespaces and loads BPF programs"
        );
    }
    if !args.agent.exists() {
        bail!("--agent {}: no such file (build it: `cargo build --release -p mcs-agent`)", args.agent.display());
    }
    let quick = args.quick;
    let rounds = args.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let seconds = args.seconds.unwrap_or(if quick { 0.25 } else { 0.6 });
    let counts = args.services.clone().unwrap_or_else(|| vec![1, 1000, 10_000]);
    if counts.contains(&0) {
        bail!("--services: every count must be at least 1");
    }
    let clients = args.clients.max(2);
    if let Some(dir) = &args.dump_rules {
        let count = counts.iter().copied().max().unwrap_or(1);
        let pods: Vec<std::net::Ipv4Addr> =
            (1..=lab::ENDPOINTS as u8).map(|k| std::net::Ipv4Addr::new(10, 10, 0, k)).collect();
        let services = lab::services(count, count - 1, &pods);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("iptables.rules"), kubeproxy::iptables(&services))?;
        std::fs::write(dir.join("nftables.nft"), kubeproxy::nftables(&services))?;
        eprintln!("bench: kube-proxy rule sets for {count} services in {}", dir.display());
        return Ok(());
    }
    if let Some(dir) = &args.dump_manifests {
        let count = args.control_services.unwrap_or(10_000);
        let pods: Vec<std::net::Ipv4Addr> =
            (1..=lab::ENDPOINTS as u8).map(|k| std::net::Ipv4Addr::new(10, 10, 0, k)).collect();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        lab::write_manifests(dir, &lab::services(count, count / 2, &pods));
        eprintln!("bench: {count} services' manifests in {}", dir.display());
        return Ok(());
    }
    // Default flags: the slot budget sizes Maglev tables for the scale.
    let agent_args = args.agent_args.clone();
    let started = Instant::now();

    let conditions = Conditions {
        date: command_line(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]),
        kernel: command_line(&["uname", "-r"]),
        cpu: std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
            })
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        iptables: command_line(&[&args.iptables_restore, "--version"]),
        nft: command_line(&["nft", "--version"]),
        agent: command_line(&[&args.agent.display().to_string(), "--version"]),
        agent_flags: agent_args.clone(),
        quick,
        rounds,
        seconds_per_run: seconds,
        clients,
        endpoints_per_service: lab::ENDPOINTS,
    };
    eprintln!(
        "bench: {} on {} ({} CPUs), kernel {}, {rounds} round(s) of {seconds} s runs, services {counts:?}",
        if quick { "quick run" } else { "full run" },
        conditions.cpu,
        conditions.cpus,
        conditions.kernel
    );

    let packet = if args.only.contains(&Part::Packet) {
        packet::measure(args.packet_runs.unwrap_or(if quick { 100_000 } else { 1_000_000 }))?
    } else {
        Vec::new()
    };

    let control = if args.only.contains(&Part::Control) {
        let opts = control::Options {
            agent: &args.agent,
            agent_args: &agent_args,
            services: args.control_services.unwrap_or(if quick { 1000 } else { 10_000 }),
            cold_starts: if quick { 1 } else { 3 },
            changes: args.changes.unwrap_or(if quick { 20 } else { 200 }),
            rule_loads: if quick { 1 } else { 3 },
            iptables_restore: &args.iptables_restore,
        };
        Some(control::measure(&opts)?)
    } else {
        None
    };
    let large = args.control_large.unwrap_or(if quick { 0 } else { 100_000 });
    let control_large = if args.only.contains(&Part::Control) && large > 0 {
        // A million backends and 100,000 frontends are past the maps' first
        // sizes: with default flags the agent grows them before it is ready.
        let opts = control::Options {
            agent: &args.agent,
            agent_args: &agent_args,
            services: large,
            cold_starts: 1,
            changes: args.changes.unwrap_or(200),
            rule_loads: 0,
            iptables_restore: &args.iptables_restore,
        };
        Some(control::measure(&opts)?)
    } else {
        None
    };
    let control_kube = if args.only.contains(&Part::Control) {
        let count = args.control_services.unwrap_or(if quick { 1000 } else { 10_000 });
        let changes = args.changes.unwrap_or(if quick { 20 } else { 200 });
        Some(control::measure_kube(&args.agent, &agent_args, count, changes)?)
    } else {
        None
    };
    let memory = if args.only.contains(&Part::Memory) {
        let small = args.control_services.unwrap_or(if quick { 1000 } else { 10_000 });
        let mut out = Vec::new();
        for count in [small, large].into_iter().filter(|&n| n > 0) {
            let pods: Vec<std::net::Ipv4Addr> =
                (1..=lab::ENDPOINTS as u8).map(|k| std::net::Ipv4Addr::new(10, 10, 0, k)).collect();
            let dir = tempfile::tempdir().context("manifest directory")?;
            lab::write_manifests(dir.path(), &lab::services(count, count / 2, &pods));
            out.push(memory::measure(dir.path(), count, lab::ENDPOINTS)?);
        }
        out
    } else {
        Vec::new()
    };

    let agent_flag_refs: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    // The client threads are this process's: socket-level load balancing
    // sees them only if the process is in the cgroup it is attached to.
    // A cgroup of our own (never the root), left when the process ends;
    // made only when a part that uses socket LB runs.
    let cgroup = (args.only.contains(&Part::Datapath) || args.only.contains(&Part::Paired))
        .then(|| mcs_tests::cgroup::TestCgroup::new("mcs-bench"));
    let _member = cgroup.as_ref().map(|c| c.join_self());
    let sock_cgroup = cgroup.as_ref().map(|c| c.agent_path()).unwrap_or_default();
    let mut runs: BTreeMap<Key, Vec<Run>> = BTreeMap::new();
    let mut profiles = Vec::new();
    if args.only.contains(&Part::Datapath) {
        for round in 0..rounds {
            for &count in &counts {
                let positions: &[Position] =
                    if count == 1 || quick { &[Position::Last] } else { &[Position::Last, Position::Middle] };
                let mut configs = vec![(Path4::Direct, Position::Last), (Path4::Attached, Position::Last)];
                for path in [Path4::McsAgent, Path4::SocketLb, Path4::Iptables, Path4::Nftables] {
                    for &position in positions {
                        configs.push((path, position));
                    }
                }
                // Rotate the order each round so slow drift of the machine does not
                // always land on the same path.
                let shift = round % configs.len();
                configs.rotate_left(shift);
                for (path, position) in configs {
                    let measured = position.index(count);
                    let t = Instant::now();
                    let lab = Lab::new(clients)?;
                    let services = lab::services(count, measured, &lab.pods);
                    let (installed, tcp, udp) = lab::install(
                        &lab,
                        path,
                        &services,
                        measured,
                        &agent_flag_refs,
                        &args.iptables_restore,
                        Some(&sock_cgroup),
                    )
                    .with_context(|| format!("installing {} for {count} services", path.label()))?;
                    let setup = t.elapsed();
                    // Not recorded: neighbour entries, server threads and caches warm up.
                    load::run(Workload::TcpCrr, &lab.clients(clients), tcp.into(), Duration::from_millis(100));
                    let mut line = Vec::new();
                    for workload in Workload::ALL {
                        for n in [1, clients] {
                            let target = if workload == Workload::UdpRr { udp } else { tcp };
                            let run =
                                load::run(workload, &lab.clients(n), target.into(), Duration::from_secs_f64(seconds));
                            check(path, count, workload, n, &run)?;
                            line.push(format!("{workload:?}x{n} {:.0}/s", run.rate));
                            let key = Key { path, services: count, position, workload, clients: n };
                            runs.entry(key.clone()).or_default().push(run);
                            // The first round also profiles the agent's paths.
                            if round == 0 && matches!(path, Path4::McsAgent | Path4::SocketLb | Path4::Attached) {
                                let clients = lab.clients(n);
                                let seconds = Duration::from_secs_f64(seconds);
                                match profile::profile(key, || load::run(workload, &clients, target.into(), seconds)) {
                                    Ok(profile) => profiles.push(profile),
                                    Err(e) => eprintln!("bench: warning: no profile of {}: {e:#}", path.label()),
                                }
                            }
                        }
                    }
                    drop(installed);
                    drop(lab);
                    eprintln!(
                        "bench: [{}/{rounds}] {count} services, {}, {position:?} (setup {:.1?}): {}",
                        round + 1,
                        path.label(),
                        setup,
                        line.join(", ")
                    );
                }
            }
        }
    }

    let paired = if args.only.contains(&Part::Paired) {
        // The TC path at the fewest and the most services; the rest at the fewest.
        let mut services = vec![counts.iter().copied().min().unwrap_or(1)];
        services.extend(counts.iter().copied().max().filter(|&m| m != services[0]));
        paired::measure(&paired::Options {
            agent_args: &agent_flag_refs,
            sock_cgroup: &sock_cgroup,
            clients,
            pairs: args.pairs.unwrap_or(if quick { 4 } else { 12 }).clamp(2, 1000),
            slice: Duration::from_secs_f64(args.slice_seconds.unwrap_or(if quick { 0.2 } else { 1.0 })),
            services: if quick { &services[..1] } else { &services },
            comparisons: &args.comparisons,
        })?
    } else {
        paired::Paired::default()
    };

    let disruption = if args.only.contains(&Part::Disruption) {
        let services = args.disruption_services.unwrap_or(if quick { 100 } else { 1000 }).max(1);
        let rows = disruption::measure(&args.agent, &agent_args, services, &args.iptables_restore)?;
        for r in &rows {
            eprintln!(
                "bench: disruption {} / {}: tcp {} failed (longest gap {:.0} ms), udp {} failed (longest gap {:.0} ms)",
                r.path, r.restart, r.tcp_failed, r.tcp_longest_gap_ms, r.udp_failed, r.udp_longest_gap_ms
            );
        }
        rows
    } else {
        Vec::new()
    };

    let families = if args.only.contains(&Part::Family) {
        let (rounds, seconds) = if quick { (1, 0.5) } else { (5, 2.0) };
        family::measure(&args.agent, rounds, seconds)?
    } else {
        Vec::new()
    };

    let external = if args.only.contains(&Part::External) {
        Some(external::measure(&external::Options {
            agent: &args.agent,
            agent_args: &agent_flag_refs,
            pairs: args.pairs.unwrap_or(if quick { 4 } else { 12 }).clamp(2, 1000),
            slice: Duration::from_secs_f64(args.slice_seconds.unwrap_or(if quick { 0.2 } else { 1.0 })),
            clients,
            packet_runs: args.packet_runs.unwrap_or(if quick { 100_000 } else { 1_000_000 }),
        })?)
    } else {
        None
    };

    let results = report::Results {
        conditions,
        packet,
        control,
        control_large,
        control_kube,
        datapath: report::datapath(&runs),
        paired,
        profiles,
        disruption,
        families,
        memory,
        external,
    };
    report::write(&args.out, &results)?;
    // A partial run (`--only`) is not the latest run: it would replace the
    // recorded results with a fraction of them.
    let all_parts = Part::value_variants().iter().all(|p| args.only.contains(p));
    if args.record && !all_parts {
        eprintln!("bench: not recording BENCHMARKS.md: only {:?} ran", args.only);
    } else if args.record {
        report::record(&results, &args.out)?;
    }
    eprintln!("bench: done in {:.1?}; results in {}", started.elapsed(), args.out.display());
    Ok(())
}

/// A run that moved no traffic, or a translated path that reached only one
/// of ten backends, means the setup is broken: stop rather than print it.
fn check(path: Path4, services: usize, workload: Workload, clients: usize, run: &Run) -> Result<()> {
    let what = format!("{} with {services} services, {workload:?} from {clients} client(s)", path.label());
    if run.transactions == 0 {
        bail!("{what}: no transaction completed ({} errors)", run.errors);
    }
    let balanced = !matches!(path, Path4::Direct | Path4::Attached);
    if balanced && workload == Workload::TcpCrr && run.transactions >= 100 && run.backends < 2 {
        bail!("{what}: every connection reached the same backend; the service is not load-balanced");
    }
    // Traffic to a pod address is the agent's to leave alone.
    if path == Path4::Attached && run.backends > 1 {
        bail!("{what}: {} pods answered connections made to one pod's address", run.backends);
    }
    if run.errors * 100 > run.transactions {
        eprintln!("bench: warning: {what}: {} errors in {} transactions", run.errors, run.transactions);
    }
    Ok(())
}
