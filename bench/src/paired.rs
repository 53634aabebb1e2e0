//! Paired comparisons precise enough for 1–3 % targets.
//!
//! The data-path tables build a fresh lab per cell and compare medians of a
//! few short cells: drift of the machine and differences between labs make
//! those ratios vary by ±10 % or more on a small machine. Here each
//! comparison is made in one lab, between two states that alternate in
//! short slices (A B, B A, A B, … so neither state always goes first), and
//! each adjacent pair gives one ratio. Slow drift hits both halves of a
//! pair alike and cancels; the median of the pair ratios, with a
//! distribution-free 95 % interval (see [`crate::stats::median_interval`]),
//! is the result. A target is met only when the whole interval clears it.
//!
//! Clients, servers and their softirq work all run on one CPU (the agent on
//! the others): on a small machine, whether a client and its server share a
//! CPU or wake each other across two makes the same path's rate bimodal
//! (13,000 or 18,000 new connections/s, slice to slice), which swamps a
//! 1 % difference. On one CPU the rate is the inverse of the CPU time a
//! transaction costs, which is what the agent adds to.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};
use serde::Serialize;

use crate::{
    lab::{self, Installed, Lab, Path4},
    load::{self, Workload},
    stats::{MedianInterval, median_interval},
};

/// What one comparison sets against what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Comparison {
    /// The VIP through the TC programs (no socket LB) ÷ a pod's address, one
    /// agent running: what translation costs.
    TcPath,
    /// The VIP translated at connect() ÷ a pod's address, one agent with
    /// socket LB running.
    SocketLb,
    /// A pod's address with the agent running as by default (TC programs
    /// and socket LB) ÷ the same address with no agent: what the agent
    /// costs traffic that is not to a ClusterSetIP. The agent is started
    /// and stopped between the halves of each pair.
    Attached,
}

impl Comparison {
    pub fn label(self) -> &'static str {
        match self {
            Comparison::TcPath => "VIP through the TC programs ÷ pod address, same agent",
            Comparison::SocketLb => "VIP through socket LB ÷ pod address, same agent",
            Comparison::Attached => "pod address with the agent attached ÷ no agent",
        }
    }

    /// The target the issue sets for each workload, if any.
    pub fn target(self, workload: Workload) -> Option<f64> {
        match (self, workload) {
            (Comparison::TcPath, Workload::TcpCrr) => Some(0.97),
            (Comparison::SocketLb, Workload::TcpCrr) => Some(0.99),
            (Comparison::Attached, _) => Some(0.99),
            _ => None,
        }
    }
}

/// The workloads of every comparison: new connections from one client and
/// from several, kept-alive requests and UDP requests from several.
fn workloads(clients: usize) -> [(Workload, usize); 4] {
    [(Workload::TcpCrr, 1), (Workload::TcpCrr, clients), (Workload::TcpRr, clients), (Workload::UdpRr, clients)]
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub comparison: Comparison,
    pub services: usize,
    pub workload: Workload,
    pub clients: usize,
    /// Transactions per second of each half, pair by pair.
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    /// A ÷ B per pair, summarised.
    pub ratio: MedianInterval,
    pub slice_seconds: f64,
    pub target: Option<f64>,
}

impl Row {
    /// Met only when the whole interval clears the target; no verdict
    /// from an interval that covers less than 95 % (too few pairs).
    pub fn met(&self) -> Option<bool> {
        self.target.filter(|_| self.judges()).map(|t| self.ratio.low >= t)
    }

    pub fn judges(&self) -> bool {
        self.ratio.coverage >= 0.95
    }
}

/// One state's BPF programs, profiled in one extra slice of new
/// connections from one client after the pairs (not counted in them).
#[derive(Clone, Debug, Serialize)]
pub struct StateProfile {
    pub comparison: Comparison,
    pub services: usize,
    /// "A" or "B", as in the comparison's ratio.
    pub half: &'static str,
    #[serde(flatten)]
    pub cost: crate::profile::Cost,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Paired {
    pub rows: Vec<Row>,
    pub profiles: Vec<StateProfile>,
}

pub struct Options<'a> {
    pub agent_args: &'a [&'a str],
    pub sock_cgroup: &'a str,
    pub clients: usize,
    pub pairs: usize,
    pub slice: Duration,
    /// Service counts the TC path is compared at (the others use the first).
    pub services: &'a [usize],
    pub comparisons: &'a [Comparison],
}

pub fn measure(opts: &Options<'_>) -> Result<Paired> {
    let mut out = Paired::default();
    let first = *opts.services.first().context("no service count")?;
    for &comparison in opts.comparisons {
        let counts = if comparison == Comparison::TcPath { opts.services } else { &[first][..] };
        for &count in counts {
            let (rows, profiles) = compare(opts, comparison, count)?;
            out.rows.extend(rows);
            out.profiles.extend(profiles);
        }
    }
    Ok(out)
}

/// The CPU the load runs on, the rest (for the agent), and all the
/// calling thread may use now (to put back).
fn cpus() -> Result<(CpuSet, CpuSet, CpuSet)> {
    let all = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    let allowed: Vec<usize> = (0..CpuSet::count()).filter(|&c| all.is_set(c).unwrap_or(false)).collect();
    let (&load_cpu, rest) = allowed.split_first().context("no CPU allowed")?;
    let mut load = CpuSet::new();
    load.set(load_cpu)?;
    let mut others = CpuSet::new();
    for &c in if rest.is_empty() { &allowed[..] } else { rest } {
        others.set(c)?;
    }
    Ok((load, others, all))
}

/// Pins this thread (and every thread or process it starts from now on,
/// which inherit it) to `set`.
fn pin(set: &CpuSet) -> Result<()> {
    sched_setaffinity(Pid::from_raw(0), set).context("sched_setaffinity")
}

/// Puts the calling thread's CPUs back when dropped.
struct Pinned(CpuSet);

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = pin(&self.0);
    }
}

fn compare(opts: &Options<'_>, comparison: Comparison, count: usize) -> Result<(Vec<Row>, Vec<StateProfile>)> {
    let started = Instant::now();
    let (load_cpu, agent_cpus, all) = cpus()?;
    let _restore = Pinned(all);
    // The servers' threads start here and stay on the load's CPU.
    pin(&load_cpu)?;
    let lab = Lab::new(opts.clients)?;
    let measured = count - 1;
    let services = lab::services(count, measured, &lab.pods);
    // Agents start on the other CPUs; the clients, started by each run, on the load's.
    let install = |path: Path4| -> Result<(Installed, SocketAddr, SocketAddr)> {
        pin(&agent_cpus)?;
        let installed =
            lab::install(&lab, path, &services, measured, opts.agent_args, "iptables-restore", Some(opts.sock_cgroup))
                .with_context(|| format!("installing {} for {count} services", path.label()));
        pin(&load_cpu)?;
        let (installed, tcp, udp) = installed?;
        Ok((installed, tcp.into(), udp.into()))
    };
    // The pod addresses, all of them, as the VIP spreads over them.
    let spread = |port| -> Vec<SocketAddr> { lab.pods.iter().map(|&p| SocketAddr::new(p.into(), port)).collect() };
    let pod = (spread(lab::TCP_TARGET), spread(lab::UDP_TARGET));
    // The agent of the VIP comparisons runs throughout; the attached
    // comparison starts it for each A half and stops it after.
    let (running, vip) = match comparison {
        Comparison::TcPath | Comparison::SocketLb => {
            let path = if comparison == Comparison::TcPath { Path4::McsAgent } else { Path4::SocketLb };
            let (installed, tcp, udp) = install(path)?;
            (Some(installed), (vec![tcp], vec![udp]))
        }
        Comparison::Attached => (None, pod.clone()),
    };
    // The attached comparison's A half: an agent of its own, settled.
    let attach = |is_a: bool| -> Result<Option<Installed>> {
        if comparison != Comparison::Attached || !is_a {
            return Ok(None);
        }
        let (agent, _, _) = install(Path4::Attached)?;
        // A fresh agent's first moments (its first passes, the collector's
        // first walk) are not what it costs in steady state.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Some(agent))
    };
    let setup = started.elapsed();
    let work = workloads(opts.clients);
    let mut a = vec![Vec::new(); work.len()];
    let mut b = vec![Vec::new(); work.len()];
    let mut toggles = Duration::ZERO;
    for pair in 0..opts.pairs {
        let order = if pair % 2 == 0 { [true, false] } else { [false, true] };
        for is_a in order {
            let t = Instant::now();
            let attached = attach(is_a)?;
            toggles += t.elapsed();
            let (tcp, udp) = if is_a { (&vip.0, &vip.1) } else { (&pod.0, &pod.1) };
            // Not recorded: caches, neighbours and server threads warm up after a switch.
            load::run_spread(Workload::TcpCrr, &lab.clients(opts.clients), tcp, Duration::from_millis(100));
            for (i, &(workload, n)) in work.iter().enumerate() {
                let target = if workload == Workload::UdpRr { udp } else { tcp };
                let run = load::run_spread(workload, &lab.clients(n), target, opts.slice);
                if run.transactions == 0 {
                    bail!(
                        "{} ({count} services), {workload:?} from {n} client(s): no transaction completed ({} errors)",
                        comparison.label(),
                        run.errors
                    );
                }
                if is_a { a[i].push(run.rate) } else { b[i].push(run.rate) }
            }
            drop(attached);
        }
    }
    // Where each state's BPF time goes, in extra slices; the rates above are
    // measured without the statistics, which cost every program run two clock reads.
    let mut profiles = Vec::new();
    for (half, is_a) in [("A", true), ("B", false)] {
        let attached = attach(is_a)?;
        if running.is_none() && attached.is_none() {
            continue;
        }
        let tcp = if is_a { &vip.0 } else { &pod.0 };
        load::run_spread(Workload::TcpCrr, &lab.clients(1), tcp, Duration::from_millis(100));
        match crate::profile::measure(|| load::run_spread(Workload::TcpCrr, &lab.clients(1), tcp, opts.slice)) {
            Ok(cost) => profiles.push(StateProfile { comparison, services: count, half, cost }),
            Err(e) => eprintln!("bench: warning: no profile of {} ({half}): {e:#}", comparison.label()),
        }
        drop(attached);
    }
    drop(running);
    eprintln!(
        "bench: paired {} ({count} services): {} pairs of {:.2?} slices in {:.1?} (setup {setup:.1?}, switching {toggles:.1?})",
        comparison.label(),
        opts.pairs,
        opts.slice,
        started.elapsed()
    );
    let rows = work
        .iter()
        .enumerate()
        .map(|(i, &(workload, clients))| {
            let ratios: Vec<f64> = a[i].iter().zip(&b[i]).map(|(x, y)| x / y).collect();
            Row {
                comparison,
                services: count,
                workload,
                clients,
                a: a[i].clone(),
                b: b[i].clone(),
                ratio: median_interval(&ratios),
                slice_seconds: opts.slice.as_secs_f64(),
                target: comparison.target(workload),
            }
        })
        .collect();
    Ok((rows, profiles))
}
