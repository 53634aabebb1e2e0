//! Per-packet cost of each program path through BPF_PROG_TEST_RUN: the
//! agent's real object, maps programmed by its own reconcile path, one run per
//! freshly built frame (with `repeat > 1` the kernel would reuse the skb the
//! first run already rewrote). Every output is checked, so a path that
//! silently stopped translating fails the benchmark instead of looking fast.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunOptions};
use mcs_agent::{
    datapath::{Datapath, Sizes},
    desired::Policy,
    model::Origin,
    plan::{Applied, Capacity},
    reconcile::Reconciler,
    source::manifests::parse_documents,
};
use mcs_common::{PROG_EGRESS, PROG_INGRESS};
use mcs_tests::packet::{Ipv4Spec, TCP_ACK, TCP_SYN, tcp, view};
use serde::Serialize;

use crate::lab::{self, ENDPOINTS};

const TC_NEXT: i32 = -1;

#[derive(Clone, Debug, Serialize)]
pub struct PacketCost {
    pub path: &'static str,
    pub runs: u64,
    pub distinct_flows: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub mean_ns: f64,
}

fn client(flow: u32) -> (Ipv4Addr, u16) {
    // 50,000 ports per client address, as many addresses as needed: every flow distinct.
    (Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + flow / 50_000), 10_000 + (flow % 50_000) as u16)
}

struct Runner {
    dp: Datapath,
    out: Vec<u8>,
}

impl Runner {
    fn run(&mut self, program: &'static str, frame: &[u8]) -> Result<(i32, u64)> {
        self.out.resize(frame.len() + 128, 0);
        let prog = self.dp.program_mut(program)?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut self.out),
                repeat: 1,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        self.out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, result.duration.as_nanos() as u64))
    }
}

impl Runner {
    /// `runs` samples of one path; `sample` runs flow `n` and says whether the
    /// output was right. A wrong output stops the benchmark.
    fn path(
        &mut self,
        name: &'static str,
        program: &'static str,
        runs: u32,
        mut sample: impl FnMut(u32, &mut Runner) -> Result<(bool, u64)>,
    ) -> Result<PacketCost> {
        let mut ns = Vec::with_capacity(runs as usize);
        for flow in 0..runs {
            let (ok, took) = sample(flow, self)?;
            if !ok {
                bail!("per-packet {name} ({program}): flow {flow} was not handled as expected");
            }
            ns.push(took);
        }
        Ok(summarize(name, ns, u64::from(runs)))
    }
}

fn summarize(path: &'static str, mut ns: Vec<u64>, distinct_flows: u64) -> PacketCost {
    ns.sort_unstable();
    let runs = ns.len() as u64;
    let mean_ns = ns.iter().sum::<u64>() as f64 / runs.max(1) as f64;
    PacketCost {
        path,
        runs,
        distinct_flows,
        p50_ns: ns[ns.len() / 2],
        p99_ns: ns[(ns.len() * 99 / 100).min(ns.len() - 1)],
        mean_ns,
    }
}

/// `runs` runs of each path; new flows are all distinct 5-tuples.
pub fn measure(runs: u32) -> Result<Vec<PacketCost>> {
    let started = Instant::now();
    let pods: Vec<Ipv4Addr> = (1..=ENDPOINTS as u8).map(|k| Ipv4Addr::new(10, 10, 0, k)).collect();
    let services = lab::services(1, 0, &pods);
    let refs: Vec<&_> = services.iter().collect();
    let yaml = lab::service_manifest(&refs, &pods);
    let (snapshot, errors) = parse_documents(&Origin("bench".into()), &yaml);
    if !errors.is_empty() {
        bail!("the benchmark's own manifest is invalid: {errors:?}");
    }
    // Room for every flow in conntrack: an evicted entry would turn an
    // "established" sample into a new flow.
    let conntrack = (runs * 2).next_power_of_two().max(1024);
    let capacity = Capacity { services: 64, backends: 64, slots: 1 << 16 };
    let mut dp = Datapath::load(Sizes { capacity, conntrack, ..Sizes::default() }, None)
        .context("loading the eBPF programs (needs root: CAP_BPF and CAP_NET_ADMIN)")?;
    Reconciler::new(Applied::new(capacity), Policy::default())
        .apply_snapshot(&snapshot, vec![], &mut dp)
        .context("programming the benchmark service")?;
    let mut runner = Runner { dp, out: Vec::new() };
    let vip = lab::vip(0);
    let mut results = Vec::new();

    // Miss: traffic to a pod address, not a service.
    results.push(runner.path("miss (not a service)", PROG_INGRESS, runs, |flow, runner| {
        let (ip, port) = client(flow);
        let frame = tcp(&Ipv4Spec::new(ip, pods[0]), port, lab::TCP_TARGET, TCP_ACK, b"");
        let (verdict, took) = runner.run(PROG_INGRESS, &frame)?;
        Ok((verdict == TC_NEXT && runner.out == frame, took))
    })?);

    // New flows: a SYN per distinct 5-tuple; remember which backend each got.
    let mut chosen = Vec::with_capacity(runs as usize);
    results.push(runner.path("new flow (SYN, conntrack insert)", PROG_INGRESS, runs, |flow, runner| {
        let (ip, port) = client(flow);
        let frame = tcp(&Ipv4Spec::new(ip, vip), port, lab::TCP_PORT, TCP_SYN, b"");
        let (verdict, took) = runner.run(PROG_INGRESS, &frame)?;
        let v = view(&runner.out);
        chosen.push(v.dst);
        let ok = verdict == TC_NEXT
            && pods.contains(&v.dst)
            && v.dport == lab::TCP_TARGET
            && v.ip_checksum_ok
            && v.l4_checksum_ok == Some(true);
        Ok((ok, took))
    })?);

    // Established: the next packet of every flow, in the same order.
    results.push(runner.path("established flow", PROG_INGRESS, runs, |flow, runner| {
        let (ip, port) = client(flow);
        let frame = tcp(&Ipv4Spec::new(ip, vip), port, lab::TCP_PORT, TCP_ACK, b"");
        let (verdict, took) = runner.run(PROG_INGRESS, &frame)?;
        let v = view(&runner.out);
        Ok((verdict == TC_NEXT && v.dst == chosen[flow as usize] && v.l4_checksum_ok == Some(true), took))
    })?);

    // Reverse NAT: every backend's reply, back to the ClusterSetIP.
    results.push(runner.path("reverse NAT (reply)", PROG_EGRESS, runs, |flow, runner| {
        let (ip, port) = client(flow);
        let frame = tcp(&Ipv4Spec::new(chosen[flow as usize], ip), lab::TCP_TARGET, port, TCP_ACK, b"");
        let (verdict, took) = runner.run(PROG_EGRESS, &frame)?;
        let v = view(&runner.out);
        Ok((verdict == TC_NEXT && v.src == vip && v.sport == lab::TCP_PORT && v.l4_checksum_ok == Some(true), took))
    })?);
    eprintln!("bench: per-packet, {runs} runs per path, in {:.1?}", started.elapsed());
    Ok(results)
}
