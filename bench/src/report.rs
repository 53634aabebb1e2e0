//! Results as a markdown table with ratios, JSON for tools, and a PNG chart.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    Conditions, Key,
    control::ControlPlane,
    lab::{Path4, Position},
    load::{Run, Workload},
    packet::PacketCost,
    paired::Comparison,
    stats::{Summary, summarize},
};

#[derive(Debug, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub key: Key,
    pub rounds: usize,
    /// Transactions per second.
    pub rate: Summary,
    pub p50_us: Summary,
    pub p99_us: Summary,
    pub errors: u64,
    pub backends: usize,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub conditions: Conditions,
    pub packet: Vec<PacketCost>,
    pub control: Option<ControlPlane>,
    /// The same at 100,000 services, mcs-agent only.
    pub control_large: Option<ControlPlane>,
    /// The agent in Kubernetes mode, against a list/watch API server of our own.
    pub control_kube: Option<crate::control::KubeControl>,
    pub datapath: Vec<Row>,
    /// Paired comparisons: the ratios the 1–3 % targets are judged by.
    pub paired: crate::paired::Paired,
    /// The agent's programs' run time per transaction (first round).
    pub profiles: Vec<crate::profile::Profile>,
    pub disruption: Vec<crate::disruption::Row>,
    pub families: Vec<crate::family::Row>,
    /// The control plane's heap by structure, per service count.
    pub memory: Vec<crate::memory::Breakdown>,
    /// Clients outside the node: XDP against nftables, XDP against TC per packet.
    pub external: Option<crate::external::External>,
}

pub fn datapath(runs: &BTreeMap<Key, Vec<Run>>) -> Vec<Row> {
    runs.iter()
        .map(|(key, runs)| {
            let pick = |f: fn(&Run) -> f64| summarize(&runs.iter().map(f).collect::<Vec<_>>());
            Row {
                key: key.clone(),
                rounds: runs.len(),
                rate: pick(|r| r.rate),
                p50_us: pick(|r| r.p50_us),
                p99_us: pick(|r| r.p99_us),
                errors: runs.iter().map(|r| r.errors).sum(),
                backends: runs.iter().map(|r| r.backends).max().unwrap_or(0),
            }
        })
        .collect()
}

fn find(
    rows: &[Row],
    path: Path4,
    services: usize,
    position: Position,
    workload: Workload,
    clients: usize,
) -> Option<&Row> {
    // Direct does not depend on where the service sits: it has no services
    // (nor the attached agent's pod-to-pod traffic, measured once).
    let position = if matches!(path, Path4::Direct | Path4::Attached) { Position::Last } else { position };
    rows.iter().find(|r| r.key == Key { path, services, position, workload, clients })
}

fn num(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    if x >= 100.0 {
        let s = format!("{x:.0}");
        // Thousands separators make 5-digit rates readable at a glance.
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// Counts are integers: 1, 1,000, 10,000.
fn count(n: usize) -> String {
    if n >= 100 { num(n as f64) } else { n.to_string() }
}

fn cell(s: &Summary) -> String {
    if s.n > 1 { format!("{} ({}–{})", num(s.median), num(s.min), num(s.max)) } else { num(s.median) }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

const PATHS: [Path4; 6] = Path4::ALL;

/// The rows of one workload's table; `metric` picks rate or a latency.
fn workload_table(out: &mut String, rows: &[Row], workload: Workload, title: &str, metric: fn(&Row) -> &Summary) {
    let mut keys: Vec<(usize, Position, usize)> = rows
        .iter()
        .filter(|r| r.key.workload == workload && !matches!(r.key.path, Path4::Direct | Path4::Attached))
        .map(|r| (r.key.services, r.key.position, r.key.clients))
        .collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n#### {title}\n");
    let _ = writeln!(
        out,
        "| services | measured service | clients | direct | mcs-agent | mcs-agent socket LB | kube-proxy iptables | kube-proxy nftables | pod to pod, agent attached | mcs-agent ÷ direct | socket LB ÷ direct | attached ÷ direct | mcs-agent ÷ iptables | mcs-agent ÷ nftables |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (services, position, clients) in keys {
        let get = |p| find(rows, p, services, position, workload, clients);
        let cells: Vec<String> = PATHS.iter().map(|&p| get(p).map(|r| cell(metric(r))).unwrap_or("–".into())).collect();
        let median = |p| get(p).map(|r| metric(r).median);
        let _ = writeln!(
            out,
            "| {} | {} | {clients} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            count(services),
            match position {
                Position::Last => "last",
                Position::Middle => "middle",
            },
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            ratio(median(Path4::McsAgent), median(Path4::Direct)),
            ratio(median(Path4::SocketLb), median(Path4::Direct)),
            ratio(median(Path4::Attached), median(Path4::Direct)),
            ratio(median(Path4::McsAgent), median(Path4::Iptables)),
            ratio(median(Path4::McsAgent), median(Path4::Nftables)),
        );
    }
}

/// The agent's programs' time per transaction beside what the transaction
/// cost over direct: what the programs explain of the gap, and what not.
fn profile_table(out: &mut String, rows: &[Row], profiles: &[crate::profile::Profile]) {
    if profiles.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n#### Where the time goes (kernel run-time statistics of each program, a profiled run after the measured ones)\n\n\
         Each program as runs per transaction × ns per run. \"Over direct\" is what a transaction cost beyond direct in the measured runs (1/rate − 1/direct's rate, medians, per client); BPF's share of it is the programs' time.\n\n\
         | services | measured service | path | workload | clients | programs (runs/op × ns/run) | BPF ns/op | over direct, ns/op |\n|---:|---|---|---|---:|---|---:|---:|"
    );
    for p in profiles {
        let k = &p.key;
        let programs = programs_cell(&p.cost.programs);
        let rate = |path| find(rows, path, k.services, k.position, k.workload, k.clients).map(|r| r.rate.median);
        // Per client: each client's transactions are back to back.
        let over = match (rate(k.path), rate(Path4::Direct)) {
            (Some(r), Some(d)) if r > 0.0 && d > 0.0 => (1e9 / r - 1e9 / d) * k.clients as f64,
            _ => f64::NAN,
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:?} | {} | {} | {:.0} | {} |",
            count(k.services),
            match k.position {
                Position::Last => "last",
                Position::Middle => "middle",
            },
            k.path.label(),
            k.workload,
            k.clients,
            programs,
            p.cost.bpf_ns_per_op,
            if over.is_finite() { format!("{over:.0}") } else { "–".into() }
        );
    }
}

/// The goal of the target `comparison` sets for `workload`, judged `how`.
fn goal(comparison: Comparison, workload: Workload, how: &str) -> String {
    use Comparison::*;
    let what = match (comparison, workload) {
        (TcPath, _) => "VIP new connections through the TC programs ≥ 0.97× pod address",
        (SocketLb, _) => "VIP new connections through socket LB ≥ 0.99× pod address",
        (Attached, Workload::TcpCrr) => "pod to pod with the agent attached: new connections ≥ 0.99× no agent",
        (Attached, Workload::TcpRr) => "pod to pod with the agent attached: kept-alive requests ≥ 0.99× no agent",
        (Attached, Workload::UdpRr) => "pod to pod with the agent attached: UDP requests ≥ 0.99× no agent",
    };
    format!("{what} ({how})")
}

/// Each program as `name runs×ns`.
fn programs_cell(programs: &[crate::profile::ProgramCost]) -> String {
    let each: Vec<String> = programs
        .iter()
        .map(|c| format!("{} {:.2}×{:.0}", c.program.trim_start_matches("mcs_"), c.runs_per_op, c.ns_per_run))
        .collect();
    each.join(", ")
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "–",
    }
}

fn median(v: &[f64]) -> f64 {
    summarize(v).median
}

/// A paired ratio: median (interval).
fn interval(m: &crate::stats::MedianInterval) -> String {
    let judged = if m.coverage >= 0.95 {
        String::new()
    } else {
        format!(", {:.1} %: too few pairs to judge", m.coverage * 100.0)
    };
    format!("{:.3}× ({:.3}–{:.3}{judged})", m.median, m.low, m.high)
}

fn paired_table(out: &mut String, rows: &[crate::paired::Row]) {
    let Some(first) = rows.first() else { return };
    let _ = writeln!(
        out,
        "\n### Paired comparisons (one lab per comparison; the two states alternate in {:.2} s slices, A B then B A; one ratio per adjacent pair; clients, servers and their softirq work on one CPU, the agent on the other)\n\nThe ratio is the median of the pair ratios; the interval is a distribution-free confidence interval of that median ({} coverage; order statistics, sign test). A target is met only when the whole interval clears it.\n\n| comparison | services | workload | clients | pairs | A median /s | B median /s | A ÷ B (interval) | target | met |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        first.slice_seconds,
        {
            let low = rows.iter().map(|r| r.ratio.coverage).fold(f64::INFINITY, f64::min) * 100.0;
            let high = rows.iter().map(|r| r.ratio.coverage).fold(0.0, f64::max) * 100.0;
            if (high - low).abs() < 0.05 { format!("{low:.1} %") } else { format!("{low:.1}–{high:.1} %") }
        },
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:?} | {} | {} | {} | {} | {} | {} | {} |",
            r.comparison.label(),
            count(r.services),
            r.workload,
            r.clients,
            r.ratio.n,
            num(median(&r.a)),
            num(median(&r.b)),
            interval(&r.ratio),
            r.target.map_or("–".into(), |t| format!("≥ {t:.2}×")),
            verdict(r.met())
        );
    }
}

fn paired_profiles(out: &mut String, paired: &crate::paired::Paired) {
    if paired.profiles.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n#### Where each state's time goes (new connections from one client; kernel run-time statistics in an extra slice)\n\n\
         Programs as runs per connection × ns per run (the statistics add two clock reads to each run). \"A − B\" is what a connection cost beyond B in the paired slices (1/rate, medians); BPF's share of it is the A programs' time less B's.\n\n\
         | comparison | services | half | programs (runs/op × ns/run) | BPF ns/op | A − B, ns/op |\n|---|---:|---|---|---:|---:|"
    );
    for p in &paired.profiles {
        let programs = programs_cell(&p.cost.programs);
        let row = paired.rows.iter().find(|r| {
            r.comparison == p.comparison && r.services == p.services && r.workload == Workload::TcpCrr && r.clients == 1
        });
        let extra = row.map_or(f64::NAN, |r| 1e9 / median(&r.a) - 1e9 / median(&r.b));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {} |",
            p.comparison.label(),
            count(p.services),
            p.half,
            programs,
            p.cost.bpf_ns_per_op,
            if p.half == "A" && extra.is_finite() { format!("{extra:.0}") } else { "–".into() }
        );
    }
}

struct Target {
    goal: String,
    measured: String,
    met: Option<bool>,
}

fn targets(results: &Results) -> Vec<Target> {
    let rows = &results.datapath;
    let mut out = Vec::new();
    for r in &results.paired.rows {
        if r.target.is_some() {
            out.push(Target {
                goal: goal(r.comparison, r.workload, "paired, the whole interval"),
                measured: format!(
                    "{} service{}, {} client{}: {}",
                    count(r.services),
                    if r.services == 1 { "" } else { "s" },
                    r.clients,
                    if r.clients == 1 { "" } else { "s" },
                    interval(&r.ratio)
                ),
                met: r.met(),
            });
        }
    }
    // Where a paired comparison judges a target, the same target from
    // separate cells only indicates.
    let paired = |c, w| results.paired.rows.iter().any(|r| r.comparison == c && r.workload == w && r.target.is_some());
    let judged = |c, w, met: bool| if paired(c, w) { None } else { Some(met) };
    let crr = |p, s, c| find(rows, p, s, Position::Last, Workload::TcpCrr, c).map(|r| r.rate.median);
    let counts: Vec<usize> = {
        let mut v: Vec<usize> = rows.iter().map(|r| r.key.services).collect();
        v.dedup();
        v
    };
    let clients: Vec<usize> = {
        let mut v: Vec<usize> = rows.iter().map(|r| r.key.clients).collect();
        v.sort();
        v.dedup();
        v
    };
    if let (Some(&min), Some(&max)) = (counts.iter().min(), counts.iter().max()) {
        let mut worst: Option<f64> = None;
        for &s in &counts {
            for &c in &clients {
                if let (Some(a), Some(d)) = (crr(Path4::McsAgent, s, c), crr(Path4::Direct, s, c)) {
                    worst = Some(worst.map_or(a / d, |w: f64| w.min(a / d)));
                }
            }
        }
        if let Some(w) = worst {
            out.push(Target {
                goal: "VIP new connections ≥ 0.97× direct (worst case over counts and clients; separate cells)".into(),
                measured: format!("{w:.2}×"),
                met: judged(Comparison::TcPath, Workload::TcpCrr, w >= 0.97),
            });
        }
        // Socket LB: new connections and kept-alive latency within 1 % of direct.
        let rr = |p, s, c| find(rows, p, s, Position::Last, Workload::TcpRr, c).map(|r| r.p50_us.median);
        let (mut worst_crr, mut worst_rr): (Option<f64>, Option<f64>) = (None, None);
        for &s in &counts {
            for &c in &clients {
                if let (Some(a), Some(d)) = (crr(Path4::SocketLb, s, c), crr(Path4::Direct, s, c)) {
                    worst_crr = Some(worst_crr.map_or(a / d, |w: f64| w.min(a / d)));
                }
                // Latency: direct ÷ socket LB, so higher is better here too.
                if let (Some(a), Some(d)) = (rr(Path4::SocketLb, s, c), rr(Path4::Direct, s, c)) {
                    worst_rr = Some(worst_rr.map_or(d / a, |w: f64| w.min(d / a)));
                }
            }
        }
        if let Some(w) = worst_crr {
            out.push(Target {
                goal: "socket LB new connections ≥ 0.99× direct (worst over counts and clients; separate cells)".into(),
                measured: format!("{w:.2}×"),
                met: judged(Comparison::SocketLb, Workload::TcpCrr, w >= 0.99),
            });
        }
        if let Some(w) = worst_rr {
            out.push(Target {
                goal: "socket LB request/response latency p50 within 1 % of direct (direct ÷ socket LB, worst; separate cells)".into(),
                measured: format!("{w:.2}×"),
                met: Some(w >= 0.99),
            });
        }
        // What the agent costs traffic that is not to a ClusterSetIP.
        let rate = |p, w, s, c| find(rows, p, s, Position::Last, w, c).map(|r| r.rate.median);
        for workload in [Workload::TcpCrr, Workload::TcpRr, Workload::UdpRr] {
            let mut worst: Option<f64> = None;
            for &s in &counts {
                for &c in &clients {
                    if let (Some(a), Some(d)) =
                        (rate(Path4::Attached, workload, s, c), rate(Path4::Direct, workload, s, c))
                    {
                        worst = Some(worst.map_or(a / d, |w: f64| w.min(a / d)));
                    }
                }
            }
            if let Some(w) = worst {
                out.push(Target {
                    goal: goal(Comparison::Attached, workload, "worst; separate cells"),
                    measured: format!("{w:.2}×"),
                    met: judged(Comparison::Attached, workload, w >= 0.99),
                });
            }
        }
        for &c in &clients {
            if let (Some(a), Some(b)) = (crr(Path4::McsAgent, max, c), crr(Path4::McsAgent, min, c)) {
                out.push(Target {
                    goal: "VIP new connections flat from fewest to most services (±3 %)".into(),
                    measured: format!("{} → {} services, {c} client(s): {:.2}×", count(min), count(max), a / b),
                    met: Some((a / b - 1.0).abs() <= 0.03),
                });
            }
        }
        for (path, goal, want) in [
            (Path4::Iptables, "≥ 3× kube-proxy iptables at the most services", 3.0),
            (Path4::Nftables, "≥ 1.1× kube-proxy nftables at the most services", 1.1),
        ] {
            for &c in &clients {
                if let (Some(a), Some(b)) = (crr(Path4::McsAgent, max, c), crr(path, max, c)) {
                    out.push(Target {
                        goal: goal.into(),
                        measured: format!("{} services, {c} client(s): {:.2}×", count(max), a / b),
                        met: Some(a / b >= want),
                    });
                }
            }
        }
    }
    for p in &results.packet {
        let limit = if p.path == "established flow" {
            Some(("per packet ≤ 100 ns, established flow (p50)", 100))
        } else if p.path.starts_with("new flow") {
            Some(("per packet ≤ 500 ns, new flow (p50)", 500))
        } else {
            None
        };
        if let Some((goal, ns)) = limit {
            // What bounds it: the harness's own floor (a miss), and the same
            // path with its entries in cache (the warm rows).
            let row = |name: &str| results.packet.iter().find(|q| q.path.starts_with(name));
            let p50 = |name: &str| row(name).map(|q| q.p50_ns);
            let mut measured = format!("p50 {} ns, mean {:.0} ns", p.p50_ns, p.mean_ns);
            let warm_row = if p.path == "established flow" { "warm established" } else { "warm new flow" };
            if let Some(warm) = row(warm_row) {
                measured +=
                    &format!("; {} ns over {} flows in cache", warm.p50_ns, count(warm.distinct_flows as usize));
            }
            if p.path == "established flow"
                && let Some(due) = p50("established flow, pair check due")
            {
                let every = mcs_common::CT_PAIR_CHECK_NS / 1_000_000_000;
                measured += &format!("; {due} ns on the packet that checks its pair (once per {every} s per entry)");
            }
            if let Some(floor) = p50("miss") {
                measured += &format!("; harness floor (miss) {floor} ns");
            }
            out.push(Target { goal: goal.into(), measured, met: Some(p.p50_ns <= ns) });
        }
    }
    // Issue 24's per-packet targets: beyond the miss row (the issue's
    // "harness floor"; it includes the ingress program's parse and one
    // lookup, so the figure is the path's cost beyond a miss), with the
    // flows in cache (about 1,000, as the issue sets them), the same path at
    // a million flows beside it; and IPv6 beside IPv4.
    let p50 = |name: &str| results.packet.iter().find(|q| q.path == name).map(|q| q.p50_ns as f64);
    if let Some(floor) = p50("miss (not a service)") {
        for (goal, row, cold, limit) in [
            (
                "per packet beyond a miss (the harness floor): established flow, 1,024 flows in cache ≤ 100 ns (p50)",
                "warm established flow (1,024 flows cycled)",
                "established flow",
                100.0,
            ),
            (
                "per packet beyond a miss (the harness floor): new flow, 1,024 flows in cache ≤ 400 ns (p50)",
                "warm new flow (SYN, 1,024 flows cycled)",
                "new flow (SYN, conntrack insert)",
                400.0,
            ),
        ] {
            if let Some(ns) = p50(row) {
                let mut measured = format!("{:.0} ns ({ns:.0} − the miss row's {floor:.0})", ns - floor);
                if let Some(cold) = results.packet.iter().find(|q| q.path == cold) {
                    measured += &format!(
                        "; {:.0} ns at {} flows, out of cache",
                        cold.p50_ns as f64 - floor,
                        count(cold.distinct_flows as usize)
                    );
                }
                out.push(Target { goal: goal.into(), measured, met: Some(ns - floor <= limit) });
            }
        }
    }
    // IPv6 beside IPv4: each pair of rows is measured interleaved and judged
    // by the whole interval of its ratio.
    let families: Vec<(&str, crate::stats::MedianInterval)> =
        results.packet.iter().filter_map(|v6| Some((v6.path.strip_prefix("IPv6 ")?, v6.over_ipv4?))).collect();
    if !families.is_empty() {
        let each: Vec<String> = families.iter().map(|(name, r)| format!("{name}: {}", interval(r))).collect();
        let judged = families.iter().all(|(_, r)| r.coverage >= 0.95);
        out.push(Target {
            goal: "per packet, IPv6 within 10 % of IPv4 (each row in 24 blocks alternating with its IPv4 twin's; the median of the blocks' ratios, its whole interval within this run)".into(),
            measured: each.join(", "),
            met: judged.then(|| families.iter().all(|(_, r)| r.high <= 1.10)),
        });
    }
    for (c, rss_goal, rss_limit) in
        results.control.iter().map(|c| (c, "agent RSS < 64 MiB at 10k services (the agent's own memory)", 64.0)).chain(
            results
                .control_large
                .iter()
                .map(|c| (c, "agent RSS < 400 MiB at 100k services (the agent's own memory)", 400.0)),
        )
    {
        let programmed =
            c.cold_load_ms.median + c.cold_read_ms.median + c.cold_compute_ms.median + c.cold_apply_ms.median;
        let small = c.services <= 10_000;
        out.push(Target {
            goal: if small {
                "10k services programmed from cold < 300 ms (goal 50 ms)"
            } else {
                "100k services programmed from cold < 3 s"
            }
            .into(),
            measured: format!(
                "{} services: process start → ready {} ms; of which load {} + read {} + compute {} + write maps {} = {} ms",
                count(c.services),
                num(c.cold_start_ms.median),
                num(c.cold_load_ms.median),
                num(c.cold_read_ms.median),
                num(c.cold_compute_ms.median),
                num(c.cold_apply_ms.median),
                num(programmed)
            ),
            met: Some(c.cold_start_ms.median < if small { 300.0 } else { 3000.0 }),
        });
        if !small {
            // The run fails unless every frontend is programmed.
            out.push(Target {
                goal: "100k × 10 (a million distinct endpoints) all programmed with default flags, no sizing".into(),
                measured: format!(
                    "{} frontends programmed; the maps grew {} time(s) before ready",
                    count(c.services),
                    c.growths
                ),
                met: Some(c.cold_start_ms.n > 0),
            });
        }
        out.push(Target {
            goal: if small {
                "one change to datapath p99 < 5 ms at 10k services"
            } else {
                "one change to datapath p99 < 5 ms at 100k services"
            }
            .into(),
            measured: format!(
                "p50 {} ms, p99 {} ms ({} changes)",
                num(c.change_ms.median),
                num(c.change_ms.p99),
                c.change_ms.n
            ),
            met: Some(c.change_ms.p99 < 5.0),
        });
        out.push(Target {
            goal: rss_goal.into(),
            measured: format!(
                "{} MiB own ({} MiB RSS with {} MiB of mmapped BPF maps; {} MiB peak) at {} services",
                num(c.rss_anon_mib),
                num(c.rss_mib),
                num(c.rss_maps_mib),
                num(c.peak_rss_mib),
                count(c.services)
            ),
            met: Some(c.rss_anon_mib < rss_limit),
        });
    }

    if let Some(k) = &results.control_kube {
        let at = count(k.services);
        out.push(Target {
            goal: "Kubernetes mode: ready from cold as in manifests mode (< 300 ms at 10k services)".into(),
            measured: format!("{} ms at {at} services", num(k.ready_ms)),
            met: Some(k.ready_ms < 300.0),
        });
        out.push(Target {
            goal: "Kubernetes mode: one EndpointSlice change within the debounce window + 5 ms (105 ms)".into(),
            measured: format!(
                "p50 {} ms, p99 {} ms ({} changes) at {at} services",
                num(k.change_ms.median),
                num(k.change_ms.p99),
                k.change_ms.n
            ),
            met: Some(k.change_ms.p99 <= 105.0),
        });
        out.push(Target {
            goal: "Kubernetes mode: agent's own memory < 64 MiB at 10k services".into(),
            measured: format!(
                "{} MiB own ({} MiB RSS with {} MiB of mmapped BPF maps) at {at} services",
                num(k.rss_anon_mib),
                num(k.rss_mib),
                num(k.rss_maps_mib)
            ),
            met: Some(k.rss_anon_mib < 64.0),
        });
    }
    for m in &results.memory {
        let per = m.retained as f64 / m.services as f64;
        out.push(Target {
            goal: "control-plane heap ≤ 4 KiB per 10-endpoint service (what its facts take)".into(),
            measured: format!(
                "{:.1} KiB per service retained at {} services (largest: {})",
                per / 1024.0,
                count(m.services),
                m.parts.iter().max_by_key(|p| p.bytes).map_or("-", |p| p.structure)
            ),
            met: Some(per <= 4096.0),
        });
    }

    let agent: Vec<&crate::disruption::Row> = results.disruption.iter().filter(|r| r.path == "mcs-agent").collect();
    if !agent.is_empty() {
        let failed: u64 = agent.iter().map(|r| r.tcp_failed + r.udp_failed).sum();
        let hurt: usize = agent.iter().map(|r| r.long_lived_hurt).sum();
        out.push(Target {
            goal: "no failed connection because of an agent restart (4 kinds)".into(),
            measured: format!("{failed} failed connections/requests, {hurt} long-lived connections broken or moved"),
            met: Some(failed == 0 && hurt == 0),
        });
    }
    out
}

pub fn markdown(results: &Results) -> String {
    let c = &results.conditions;
    let mut out = String::new();
    let _ = writeln!(out, "### Conditions\n");
    let _ = writeln!(
        out,
        "{} · {} ({} CPUs) · kernel {} · {} · {} · agent `{}` with `{}` · {} round(s) of {} s per run, interleaved · several clients = {} · {} endpoints per service · {}\n",
        c.date,
        c.cpu,
        c.cpus,
        c.kernel,
        c.iptables,
        c.nft,
        c.agent,
        c.agent_flags.join(" "),
        c.rounds,
        c.seconds_per_run,
        c.clients,
        c.endpoints_per_service,
        if c.quick { "**quick run**" } else { "full run" }
    );
    out.push_str("Cells: median of the rounds (min–max across rounds). Ratios divide medians; for rates above 1× favours mcs-agent, for latencies below 1× does.\n");

    let targets = targets(results);
    if !targets.is_empty() {
        let _ = writeln!(out, "\n### Targets\n\n| target | measured | met |\n|---|---|---|");
        for t in &targets {
            let _ = writeln!(out, "| {} | {} | {} |", t.goal, t.measured, verdict(t.met));
        }
    }

    if !results.datapath.is_empty() {
        let _ = writeln!(out, "\n### Data path (netns: client pods → node → backend pods, real sockets)");
        let rows = &results.datapath;
        workload_table(
            &mut out,
            rows,
            Workload::TcpCrr,
            "New TCP connections per second (connect, request, response, close)",
            |r| &r.rate,
        );
        workload_table(&mut out, rows, Workload::TcpRr, "Kept-alive TCP request/response latency p50 (µs)", |r| {
            &r.p50_us
        });
        workload_table(&mut out, rows, Workload::TcpRr, "Kept-alive TCP request/response latency p99 (µs)", |r| {
            &r.p99_us
        });
        workload_table(&mut out, rows, Workload::TcpRr, "Kept-alive TCP requests per second", |r| &r.rate);
        workload_table(&mut out, rows, Workload::UdpRr, "UDP requests per second (request/response)", |r| &r.rate);
        let errors: u64 = rows.iter().map(|r| r.errors).sum();
        let _ = writeln!(out, "\nFailed transactions over all runs: {errors}.");
        profile_table(&mut out, rows, &results.profiles);
    }
    paired_table(&mut out, &results.paired.rows);
    paired_profiles(&mut out, &results.paired);

    if !results.families.is_empty() {
        let _ = writeln!(
            out,
            "\n### IPv6 beside IPv4 (new TCP connections per second, one client back to back, a dual-stack import, median of {} rounds)\n\n| family | path | connections/s | ÷ direct, same family |\n|---|---|---:|---:|",
            results.families[0].rounds
        );
        for r in &results.families {
            let direct = results
                .families
                .iter()
                .find(|d| d.family == r.family && d.path == "direct")
                .map_or(f64::NAN, |d| d.connections_per_sec);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2}× |",
                r.family,
                r.path,
                num(r.connections_per_sec),
                r.connections_per_sec / direct
            );
        }
    }

    if !results.disruption.is_empty() {
        let _ = writeln!(
            out,
            "\n### Disruption (restarts under continuous load: short TCP connections and UDP requests back to back, {} long-lived connections asking every 50 ms)\n\n| path | restart | TCP ok | TCP failed | TCP longest gap ms | UDP ok | UDP failed | UDP longest gap ms | long-lived broken or moved |\n|---|---|---:|---:|---:|---:|---:|---:|---:|",
            results.disruption[0].long_lived
        );
        for r in &results.disruption {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.0} | {} | {} | {:.0} | {} |",
                r.path,
                r.restart,
                num(r.tcp_ok as f64),
                r.tcp_failed,
                r.tcp_longest_gap_ms,
                num(r.udp_ok as f64),
                r.udp_failed,
                r.udp_longest_gap_ms,
                r.long_lived_hurt
            );
        }
        let _ = writeln!(
            out,
            "\nmcs-agent's long-lived connections span all four restarts (counted on the last row). A gap is the longest time between two completed requests of one client; it includes ordinary scheduling jitter on this 2-core machine."
        );
    }

    if !results.packet.is_empty() {
        let _ = writeln!(
            out,
            "\n### Per packet (BPF_PROG_TEST_RUN, one run per fresh frame, in-kernel timer)\n\n| path | runs | distinct flows | p50 ns | p99 ns | mean ns |\n|---|---:|---:|---:|---:|---:|"
        );
        for p in &results.packet {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} |",
                p.path,
                num(p.runs as f64),
                num(p.distinct_flows as f64),
                p.p50_ns,
                p.p99_ns,
                p.mean_ns
            );
        }
    }

    if let Some(c) = &results.control {
        let _ = writeln!(
            out,
            "\n### Control plane ({} services × {} endpoints)\n\n| what | mcs-agent | kube-proxy iptables (`iptables-restore`) | kube-proxy nftables (`nft -f`) |\n|---|---:|---:|---:|",
            count(c.services),
            c.endpoints_per_service
        );
        let ms = |s: &Summary| format!("{} ms (p99 {}, n={})", num(s.median), num(s.p99), s.n);
        let _ = writeln!(
            out,
            "| cold start to fully programmed | {} (load {} + read {} + compute {} + maps {}) | {} | {} |",
            ms(&c.cold_start_ms),
            num(c.cold_load_ms.median),
            num(c.cold_read_ms.median),
            num(c.cold_compute_ms.median),
            num(c.cold_apply_ms.median),
            ms(&c.iptables_restore_full_ms),
            ms(&c.nft_full_ms)
        );
        let _ = writeln!(
            out,
            "| one endpoint change (agent: manifest renamed → kernel map; kube-proxy: its partial sync) | {} | {} | {} |",
            ms(&c.change_ms),
            ms(&c.iptables_restore_change_ms),
            ms(&c.nft_change_ms)
        );
        let _ = writeln!(
            out,
            "| agent RSS after programming | {} MiB own + {} MiB mmapped maps (peak {} MiB) | – | – |",
            num(c.rss_anon_mib),
            num(c.rss_maps_mib),
            num(c.peak_rss_mib)
        );
    }
    if let Some(c) = &results.control_large {
        let ms = |s: &Summary| format!("{} ms (p99 {}, n={})", num(s.median), num(s.p99), s.n);
        let _ = writeln!(
            out,
            "\n### Control plane ({} services × {} endpoints, mcs-agent only)\n\nkube-proxy is not run at this scale: one nft transaction of 10,000 services already takes minutes (above), and `iptables-restore` grows faster than linearly. The agent runs with default flags: its maps start at 65,536 frontends and 262,144 backends and grew {} time(s) before it was ready (the load counts both datapaths).\n\n| what | mcs-agent |\n|---|---:|\n| cold start to fully programmed | {} (load {} + read {} + compute {} + maps {}) |\n| one endpoint change (manifest renamed → kernel map) | {} |\n| agent RSS after programming | {} MiB own + {} MiB mmapped maps (peak {} MiB) |",
            count(c.services),
            c.endpoints_per_service,
            c.growths,
            ms(&c.cold_start_ms),
            num(c.cold_load_ms.median),
            num(c.cold_read_ms.median),
            num(c.cold_compute_ms.median),
            num(c.cold_apply_ms.median),
            ms(&c.change_ms),
            num(c.rss_anon_mib),
            num(c.rss_maps_mib),
            num(c.peak_rss_mib)
        );
    }
    if let Some(k) = &results.control_kube {
        let _ = writeln!(
            out,
            "\n### Control plane in Kubernetes mode ({} services × {} endpoints, mcs-agent only)\n\nThe same ServiceImports and EndpointSlices served by a list/watch API server of our own (`mcs_tests::fakeapi`, pages of 500) on loopback in the node's namespace.\n\n| what | mcs-agent |\n|---|---:|\n| process start → ready (listed, programmed, attached) | {} ms |\n| one EndpointSlice change (written to the API → kernel map) | {} ms (p99 {}, n={}) |\n| agent RSS after programming | {} MiB own + {} MiB mmapped maps |",
            count(k.services),
            k.endpoints_per_service,
            num(k.ready_ms),
            num(k.change_ms.median),
            num(k.change_ms.p99),
            k.change_ms.n,
            num(k.rss_anon_mib),
            num(k.rss_maps_mib)
        );
    }
    if !results.memory.is_empty() {
        memory_table(&mut out, &results.memory);
    }
    if let Some(external) = &results.external {
        external_table(&mut out, external);
    }
    out
}

/// The control plane's heap by structure, a column pair per service count.
fn external_table(out: &mut String, external: &crate::external::External) {
    let _ = writeln!(
        out,
        "\n### Clients outside the node (XDP on the uplink, source NAT; netns, veth)\n\n\
An outside client (192.168.254.2, outside kube-proxy's cluster CIDR) opens connections to a ClusterSetIP routed to the node; ten backends sit in a cluster behind the outside router. The agent's XDP program (`--external-interface`, native mode) and kube-proxy's nftables rules (DNAT and masquerade) alternate in slices, A B then B A, in one lab; one ratio per pair, its median with a distribution-free interval. On veth the driver converts each skb for XDP, so a NIC's packet-rate advantage cannot show: the targets for a NIC, XDP at least 2× nftables and 1.5× the TC path in packets per second, are stated on paper and not judged here.\n\n\
| clients | pairs | XDP median /s | nftables median /s | XDP ÷ nftables (interval) |\n|---:|---:|---:|---:|---:|"
    );
    for r in &external.ratios {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.clients,
            r.ratio.n,
            num(r.xdp_per_s),
            num(r.nftables_per_s),
            interval(&r.ratio)
        );
    }
    let _ = writeln!(
        out,
        "\n#### Per packet, XDP beside TC (BPF_PROG_TEST_RUN in the node's namespace, in-kernel timer; new flows: one run per fresh SYN)\n\n| path | runs | mean ns |\n|---|---:|---:|"
    );
    for c in &external.packet {
        let _ = writeln!(out, "| {} | {} | {:.0} |", c.path, c.runs, c.mean_ns);
    }
}

fn memory_table(out: &mut String, memory: &[crate::memory::Breakdown]) {
    let kb = |bytes: usize, services: usize| format!("{:.1}", bytes as f64 / services as f64 / 1024.0);
    let mib = |bytes: usize| format!("{:.1}", bytes as f64 / (1024.0 * 1024.0));
    let heads: Vec<String> =
        memory.iter().map(|m| format!("{} services: KiB/service | MiB", count(m.services))).collect();
    let _ = writeln!(
        out,
        "\n### Control-plane memory by structure (live heap after the first pass, counting allocator; {} endpoints per service)\n\nThe agent's structures built in the benchmark's process from the same manifests, against maps that keep nothing. The agent's RSS (above) adds allocator retention and the mmapped maps.\n\n| structure | what it holds | {} |\n|---|---|{}",
        memory[0].endpoints_per_service,
        heads.join(" | "),
        "---:|---:|".repeat(memory.len())
    );
    for (i, part) in memory[0].parts.iter().enumerate() {
        let cells: Vec<String> = memory
            .iter()
            .map(|m| format!("{} | {}", kb(m.parts[i].bytes, m.services), mib(m.parts[i].bytes)))
            .collect();
        let _ = writeln!(out, "| {} | {} | {} |", part.structure, part.what, cells.join(" | "));
    }
    let row = |out: &mut String, name: &str, what: &str, get: fn(&crate::memory::Breakdown) -> usize| {
        let cells: Vec<String> =
            memory.iter().map(|m| format!("{} | {}", kb(get(m), m.services), mib(get(m)))).collect();
        let _ = writeln!(out, "| **{name}** | {what} | {} |", cells.join(" | "));
    };
    row(out, "retained", "all of the above", |m| m.retained);
    row(out, "first pass peak", "the most held at once while the first pass ran", |m| m.first_pass_peak);
    row(
        out,
        "inventory",
        "built for one `inspect` answer, then dropped (a `/metrics` scrape builds one frontend at a time)",
        |m| m.inventory,
    );
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn chart(results: &Results, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let rows = &results.datapath;
    let clients = results.conditions.clients;
    let series: Vec<(Path4, Vec<(f64, f64)>)> = Path4::ALL
        .iter()
        .map(|&p| {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| {
                    r.key.path == p
                        && r.key.workload == Workload::TcpCrr
                        && r.key.clients == clients
                        && r.key.position == Position::Last
                })
                .map(|r| (r.key.services as f64, r.rate.median))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (p, points)
        })
        .collect();
    let max_x = series.iter().flat_map(|(_, v)| v.iter().map(|p| p.0)).fold(10.0, f64::max) * 2.0;
    let max_y = series.iter().flat_map(|(_, v)| v.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.15;

    static REGISTER: std::sync::Once = std::sync::Once::new();
    let mut font_error = None;
    REGISTER.call_once(|| match fs::read(FONT) {
        Ok(bytes) => {
            if plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
                .is_err()
            {
                font_error = Some(format!("{FONT} is not a usable font"));
            }
        }
        Err(e) => font_error = Some(format!("{FONT}: {e} (install fonts-dejavu-core: `cargo xtask setup`)")),
    });
    if let Some(e) = font_error {
        anyhow::bail!("chart: {e}");
    }

    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("New TCP connections/s vs. services ({clients} clients, measured service last)"),
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d((0.5f64..max_x).log_scale(), 0f64..max_y)?;
        chart
            .configure_mesh()
            .x_desc("services (10 endpoints each, log scale)")
            .y_desc("connections per second")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        // One per path (Okabe-Ito): with fewer, `zip` left the last paths out.
        let colours = [
            BLACK,
            RGBColor(0, 114, 178),
            RGBColor(213, 94, 0),
            RGBColor(0, 158, 115),
            RGBColor(204, 121, 167),
            RGBColor(230, 159, 0),
        ];
        for ((p, points), colour) in series.iter().zip(colours) {
            if points.is_empty() {
                continue;
            }
            let style = colour.stroke_width(3);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), style))?
                .label(p.label())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3)));
            chart.draw_series(points.iter().map(|&pt| Circle::new(pt, 5, colour.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerLeft)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

pub fn write(out: &Path, results: &Results) -> Result<()> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let md = markdown(results);
    fs::write(out.join("results.md"), &md)?;
    fs::write(out.join("results.json"), serde_json::to_string_pretty(results)?)?;
    if !results.datapath.is_empty() {
        chart(results, &out.join("new-connections.png"))?;
    }
    println!("{md}");
    Ok(())
}

/// BENCHMARKS.md and docs/bench/: the latest full run, committed with the code.
pub fn record(results: &Results, out: &Path) -> Result<()> {
    let docs = Path::new("docs/bench");
    fs::create_dir_all(docs)?;
    fs::copy(out.join("results.json"), docs.join("latest.json"))?;
    if out.join("new-connections.png").exists() {
        fs::copy(out.join("new-connections.png"), docs.join("new-connections.png"))?;
    }
    let template = fs::read_to_string("BENCHMARKS.md").unwrap_or_default();
    let marker = "<!-- latest run: written by `cargo xtask bench`, everything below is replaced -->";
    let head = template.split(marker).next().unwrap_or_default().trim_end();
    let text = format!(
        "{head}\n\n{marker}\n\n## Latest run\n\n![new connections vs services](docs/bench/new-connections.png)\n\n{}",
        markdown(results)
    );
    fs::write("BENCHMARKS.md", text)?;
    Ok(())
}
