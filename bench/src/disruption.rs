//! What a client notices while the node's service proxy restarts: failed
//! connections and requests and the longest wait between two completed
//! ones, under continuous load (`mcs_tests::disruption::Load`).
//!
//! mcs-agent: SIGKILL and restart, SIGTERM and restart, another binary,
//! and an upgrade across a (simulated) layout version. kube-proxy keeps its
//! rules in the kernel while it is down; its restart is the full resync it
//! does at start, measured for both modes.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result};
use mcs_tests::{
    agent::Agent,
    bpffs::ScratchBpffs,
    disruption::{Load, Phase},
};
use serde::Serialize;

use crate::lab::{self, Lab, Path4, feed};

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub path: String,
    pub restart: String,
    pub tcp_ok: u64,
    pub tcp_failed: u64,
    pub tcp_longest_gap_ms: f64,
    pub udp_ok: u64,
    pub udp_failed: u64,
    pub udp_longest_gap_ms: f64,
    /// Long-lived connections (request every 50 ms) that broke or changed backend, of all.
    pub long_lived_hurt: usize,
    pub long_lived: usize,
}

const LONG_LIVED: usize = 8;
const SETTLE: Duration = Duration::from_millis(800);

fn row(path: &str, restart: &str, phase: &Phase, hurt: usize) -> Row {
    Row {
        path: path.into(),
        restart: restart.into(),
        tcp_ok: phase.tcp.ok,
        tcp_failed: phase.tcp.failed,
        tcp_longest_gap_ms: phase.tcp.longest_gap.as_secs_f64() * 1e3,
        udp_ok: phase.udp.ok,
        udp_failed: phase.udp.failed,
        udp_longest_gap_ms: phase.udp.longest_gap.as_secs_f64() * 1e3,
        long_lived_hurt: hurt,
        long_lived: LONG_LIVED,
    }
}

/// `services` services of which the middle one is measured.
pub fn measure(
    agent_binary: &Path,
    agent_args: &[String],
    services: usize,
    iptables_restore: &str,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    rows.extend(mcs_agent(agent_binary, agent_args, services)?);
    for path in [Path4::Iptables, Path4::Nftables] {
        rows.extend(kube_proxy(path, services, iptables_restore)?);
    }
    Ok(rows)
}

fn mcs_agent(binary: &Path, agent_args: &[String], count: usize) -> Result<Vec<Row>> {
    let lab = Lab::new(1)?;
    let measured = count / 2;
    let services = lab::services(count, measured, &lab.pods);
    let manifests = tempfile::tempdir().context("manifest directory")?;
    lab::write_manifests(manifests.path(), &services);
    let bpffs = ScratchBpffs::new();
    let other_build = tempfile::tempdir().context("scratch directory")?;
    let next = other_build.path().join("mcs-agent-next");
    std::fs::copy(binary, &next).context("copying the agent binary")?;
    let start = |binary: &Path, extra: &[&str]| {
        let mut args: Vec<&str> = vec!["--bpffs", bpffs.path().to_str().expect("utf-8 path")];
        args.extend(agent_args.iter().map(String::as_str));
        args.extend_from_slice(extra);
        Agent::start_binary(binary, lab.node(), manifests.path(), &lab.set.client_ifaces(), &args)
    };
    let mut agent = start(binary, &[]);
    let vip = lab::vip(measured);
    let load = Load::start(
        lab.clients(1)[0],
        std::net::SocketAddrV4::new(vip, lab::TCP_PORT),
        std::net::SocketAddrV4::new(vip, lab::UDP_PORT),
        LONG_LIVED,
    );
    std::thread::sleep(SETTLE);
    load.mark();
    let mut phases = Vec::new();

    agent.crash();
    std::thread::sleep(SETTLE);
    agent = start(binary, &[]);
    std::thread::sleep(SETTLE);
    phases.push(("SIGKILL, restart 0.8 s later", load.mark()));

    agent.stop();
    std::thread::sleep(SETTLE);
    agent = start(binary, &[]);
    std::thread::sleep(SETTLE);
    phases.push(("SIGTERM, restart 0.8 s later", load.mark()));

    agent.stop();
    agent = start(&next, &[]);
    std::thread::sleep(SETTLE);
    phases.push(("SIGTERM, another binary at once", load.mark()));

    agent.stop();
    let bump = (mcs_common::LAYOUT_VERSION + 1).to_string();
    agent = start(&next, &["--layout-version", &bump]);
    std::thread::sleep(SETTLE);
    phases.push(("SIGTERM, layout version bump", load.mark()));

    let (_, fates) = load.finish();
    let hurt = fates.iter().filter(|f| f.broken.is_some() || f.moved_to.is_some()).count();
    agent.stop();
    lab.node().exec(&[&binary.display().to_string(), "uninstall", "--bpffs", bpffs.path().to_str().expect("utf-8")]);
    // Long-lived connections span all four restarts: report them on the last row.
    let last = phases.len() - 1;
    Ok(phases
        .iter()
        .enumerate()
        .map(|(i, (restart, phase))| row("mcs-agent", restart, phase, if i == last { hurt } else { 0 }))
        .collect())
}

fn kube_proxy(path: Path4, count: usize, iptables_restore: &str) -> Result<Vec<Row>> {
    let lab = Lab::new(1)?;
    let measured = count / 2;
    let services = lab::services(count, measured, &lab.pods);
    let (installed, tcp, udp) = lab::install(&lab, path, &services, measured, &[], iptables_restore, None)?;
    let load = Load::start(lab.clients(1)[0], tcp, udp, LONG_LIVED);
    std::thread::sleep(SETTLE);
    load.mark();
    // At start kube-proxy rewrites all of its rules in one transaction.
    match path {
        Path4::Iptables => feed(lab.node(), &[iptables_restore], &crate::kubeproxy::iptables(&services))?,
        _ => feed(lab.node(), &["nft", "-f", "-"], &crate::kubeproxy::nftables(&services))?,
    };
    std::thread::sleep(SETTLE);
    let phase = load.mark();
    let (_, fates) = load.finish();
    drop(installed);
    let hurt = fates.iter().filter(|f| f.broken.is_some() || f.moved_to.is_some()).count();
    Ok(vec![row(path.label(), "restart (full resync of its rules)", &phase, hurt)])
}
