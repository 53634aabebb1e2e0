//! Per-packet cost of each program path through BPF_PROG_TEST_RUN: the
//! agent's real object, maps programmed by its own reconcile path, one run per
//! freshly built frame (with `repeat > 1` the kernel would reuse the skb the
//! first run already rewrote). Every output is checked, so a path that
//! silently stopped translating fails the benchmark instead of looking fast.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

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
use mcs_common::{CT_PAIR_CHECK_NS, PROG_EGRESS, PROG_INGRESS};
use mcs_tests::{
    frame,
    packet::{Ipv4Spec, TCP_ACK, TCP_SYN, checksum, tcp, view},
};
use serde::Serialize;

use crate::lab::{self, ENDPOINTS};

const TC_NEXT: i32 = -1;

/// Flows of the warm-cache row.
pub const WARM_FLOWS: u32 = 1_024;

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
    let yaml = format!("{}---\n{}", lab::service_manifest(&refs, &pods), manifest6());
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

    let new_flows_done = Instant::now();

    // Established: the next packet of every flow, in the same order.
    let established = |flow: u32, runner: &mut Runner| -> Result<(bool, u64)> {
        let (ip, port) = client(flow);
        let frame = tcp(&Ipv4Spec::new(ip, vip), port, lab::TCP_PORT, TCP_ACK, b"");
        let (verdict, took) = runner.run(PROG_INGRESS, &frame)?;
        let v = view(&runner.out);
        Ok((verdict == TC_NEXT && v.dst == chosen[flow as usize] && v.l4_checksum_ok == Some(true), took))
    };
    results.push(runner.path("established flow", PROG_INGRESS, runs, established)?);

    // The same path over a few flows, cycled: their entries stay in the CPU
    // caches. Set beside the row above, it splits the established cost into
    // the program's own work and what a million flows' cache misses add.
    let warm = WARM_FLOWS.min(runs);
    let mut cost = runner.path("warm established flow (1,024 flows cycled)", PROG_INGRESS, runs, |flow, runner| {
        established(flow % warm, runner)
    })?;
    cost.distinct_flows = u64::from(warm);
    results.push(cost);

    // Once per CT_PAIR_CHECK_NS an entry's packet also confirms its sibling
    // (one more lookup). The rows above come sooner after each flow's SYN;
    // this one waits until every flow's check is due.
    let due = new_flows_done + Duration::from_nanos(CT_PAIR_CHECK_NS) + Duration::from_secs(1);
    std::thread::sleep(due.saturating_duration_since(Instant::now()));
    results.push(runner.path("established flow, pair check due", PROG_INGRESS, runs, established)?);

    // Reverse NAT: every backend's reply, back to the ClusterSetIP.
    results.push(runner.path("reverse NAT (reply)", PROG_EGRESS, runs, |flow, runner| {
        let (ip, port) = client(flow);
        let frame = tcp(&Ipv4Spec::new(chosen[flow as usize], ip), lab::TCP_TARGET, port, TCP_ACK, b"");
        let (verdict, took) = runner.run(PROG_EGRESS, &frame)?;
        let v = view(&runner.out);
        Ok((verdict == TC_NEXT && v.src == vip && v.sport == lab::TCP_PORT && v.l4_checksum_ok == Some(true), took))
    })?);
    results.extend(measure6(&mut runner, runs)?);
    eprintln!("bench: per-packet, {runs} runs per path, in {:.1?}", started.elapsed());
    Ok(results)
}

const VIP6: &str = "fd00:96::1";

fn pod6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 10, 0, 0, 0, 0, 0, k as u16)
}

/// The same service in IPv6: one VIP, ten IPv6 endpoints.
fn manifest6() -> String {
    let endpoints: Vec<String> = (1..=ENDPOINTS).map(|k| format!(r#"{{addresses: ["{}"]}}"#, pod6(k))).collect();
    format!(
        r#"apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {{name: bench6, namespace: bench}}
spec: {{type: ClusterSetIP, ips: ["{VIP6}"], ipFamilies: [IPv6], ports: [{{name: http, port: {}, protocol: TCP}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench6
  namespace: bench
  labels: {{multicluster.kubernetes.io/service-name: bench6, multicluster.kubernetes.io/source-cluster: bench}}
addressType: IPv6
ports: [{{name: http, port: {}, protocol: TCP}}]
endpoints: [{}]
"#,
        lab::TCP_PORT,
        lab::TCP_TARGET,
        endpoints.join(", ")
    )
}

fn client6(flow: u32) -> (IpAddr, u16) {
    let (ip, port) = client(flow);
    let [_, b, c, d] = ip.octets();
    (Ipv6Addr::new(0xfd00, 64, b.into(), 0, 0, 0, c.into(), d.into()).into(), port)
}

/// An IPv6 TCP frame's source, destination and ports, if its TCP checksum
/// verifies from scratch.
fn view6(out: &[u8]) -> Option<(IpAddr, IpAddr, u16, u16)> {
    if out.len() < 14 + 40 + 20 || out[12..14] != [0x86, 0xdd] {
        return None;
    }
    let ip = |at: usize| IpAddr::from(<[u8; 16]>::try_from(&out[at..at + 16]).unwrap());
    let (src, dst) = (ip(22), ip(38));
    let l4 = &out[54..];
    let ok = checksum(&[&frame::pseudo(src, dst, frame::TCP, l4.len()), l4]) == 0;
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    ok.then(|| (src, dst, port(0), port(2)))
}

/// The IPv6 paths, beside IPv4's.
fn measure6(runner: &mut Runner, runs: u32) -> Result<Vec<PacketCost>> {
    let vip: IpAddr = VIP6.parse().expect("literal");
    let pods: Vec<IpAddr> = (1..=ENDPOINTS).map(|k| IpAddr::V6(pod6(k))).collect();
    let segment = |src, dst, sport, dport, flags| {
        frame::packet(src, dst, frame::TCP, &frame::tcp(src, dst, sport, dport, flags, b""))
    };
    let mut results = Vec::new();
    results.push(runner.path("IPv6 miss (not a service)", PROG_INGRESS, runs, |flow, runner| {
        let (ip, port) = client6(flow);
        let input = segment(ip, pods[0], port, lab::TCP_TARGET, TCP_ACK);
        let (verdict, took) = runner.run(PROG_INGRESS, &input)?;
        Ok((verdict == TC_NEXT && runner.out == input, took))
    })?);
    let mut chosen = Vec::with_capacity(runs as usize);
    results.push(runner.path("IPv6 new flow (SYN, conntrack insert)", PROG_INGRESS, runs, |flow, runner| {
        let (ip, port) = client6(flow);
        let (verdict, took) = runner.run(PROG_INGRESS, &segment(ip, vip, port, lab::TCP_PORT, TCP_SYN))?;
        let seen = view6(&runner.out);
        chosen.push(seen.map_or(vip, |(_, dst, _, _)| dst));
        let ok = seen.is_some_and(|(_, dst, _, dport)| pods.contains(&dst) && dport == lab::TCP_TARGET);
        Ok((verdict == TC_NEXT && ok, took))
    })?);
    results.push(runner.path("IPv6 established flow", PROG_INGRESS, runs, |flow, runner| {
        let (ip, port) = client6(flow);
        let (verdict, took) = runner.run(PROG_INGRESS, &segment(ip, vip, port, lab::TCP_PORT, TCP_ACK))?;
        let ok = view6(&runner.out).is_some_and(|(_, dst, _, _)| dst == chosen[flow as usize]);
        Ok((verdict == TC_NEXT && ok, took))
    })?);
    results.push(runner.path("IPv6 reverse NAT (reply)", PROG_EGRESS, runs, |flow, runner| {
        let (ip, port) = client6(flow);
        let input = segment(chosen[flow as usize], ip, lab::TCP_TARGET, port, TCP_ACK);
        let (verdict, took) = runner.run(PROG_EGRESS, &input)?;
        let ok = view6(&runner.out).is_some_and(|(src, _, sport, _)| src == vip && sport == lab::TCP_PORT);
        Ok((verdict == TC_NEXT && ok, took))
    })?);
    Ok(results)
}
