//! Per-packet cost of each program path through BPF_PROG_TEST_RUN: the
//! agent's real object, maps programmed by its own reconcile path, one run per
//! freshly built frame (with `repeat > 1` the kernel would reuse the skb the
//! first run already rewrote). Every output is checked, so a path that
//! silently stopped translating fails the benchmark instead of looking fast.

use std::{
    cell::RefCell,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
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

use crate::{
    lab::{self, ENDPOINTS},
    stats::{MedianInterval, median_interval},
};

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
    /// An IPv6 row over its IPv4 twin, the two measured in alternating
    /// blocks (see [`Twins`]): the median of the blocks' ratios, with its
    /// distribution-free interval (within this run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub over_ipv4: Option<MedianInterval>,
}

/// Blocks a pair of interleaved rows is cut into, each giving one ratio:
/// 24 give a 95 % interval between the 7th and 18th of them.
const TWIN_BLOCKS: usize = 24;

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
            ns.push(checked(name, program, flow, sample(flow, self)?)?);
        }
        Ok(summarize(name, ns, u64::from(runs)))
    }
}

/// An IPv4 path and its IPv6 twin, sampled in alternating blocks of flows
/// (each family a block in turn, the first one alternating), so that both
/// see the same minutes of the machine: rows measured one after the other
/// differed by ±10 % from run to run, as much as the target they were to
/// judge. The IPv6 row carries its ratio to the IPv4 one.
struct Twins {
    names: [&'static str; 2],
    program: &'static str,
    ns: [Vec<u64>; 2],
}

impl Twins {
    fn new(names: [&'static str; 2], program: &'static str) -> Self {
        Self { names, program, ns: [Vec::new(), Vec::new()] }
    }

    /// One family's path (0: IPv4, 1: IPv6) for `flows`.
    fn sample(&mut self, runner: &mut Runner, family: usize, flows: Range<u32>, sample: Sample<'_>) -> Result<()> {
        for flow in flows {
            self.ns[family].push(checked(self.names[family], self.program, flow, sample(flow, runner)?)?);
        }
        Ok(())
    }

    /// The two rows. The ratio is the median of the blocks' ratios, with its
    /// distribution-free interval; a block's figure is the mean of its middle
    /// half (its p50 alone moves in whole nanoseconds, steps of up to 1 %).
    fn finish(self) -> [PacketCost; 2] {
        let mid_mean = |v: &[u64]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            let middle = &v[v.len() / 4..v.len() - v.len() / 4];
            (!middle.is_empty()).then(|| middle.iter().sum::<u64>() as f64 / middle.len() as f64)
        };
        let n = self.ns[0].len().min(self.ns[1].len());
        let ratios: Vec<f64> = (0..TWIN_BLOCKS)
            .filter_map(|b| {
                let block = b * n / TWIN_BLOCKS..(b + 1) * n / TWIN_BLOCKS;
                Some(mid_mean(&self.ns[1][block.clone()])? / mid_mean(&self.ns[0][block])?)
            })
            .collect();
        let [ns4, ns6] = self.ns;
        let (runs4, runs6) = (ns4.len() as u64, ns6.len() as u64);
        let mut v6 = summarize(self.names[1], ns6, runs6);
        v6.over_ipv4 = Some(median_interval(&ratios));
        [summarize(self.names[0], ns4, runs4), v6]
    }
}

/// One path's run of flow `n`: whether the output was right, and the time.
type Sample<'a> = &'a mut dyn FnMut(u32, &mut Runner) -> Result<(bool, u64)>;

/// `0..runs` in [`TWIN_BLOCKS`] blocks, with the family that goes first in
/// each (alternating).
fn blocks(runs: u32) -> impl Iterator<Item = (Range<u32>, [usize; 2])> {
    let n = TWIN_BLOCKS as u64;
    (0..n).map(move |b| {
        let flows = (b * u64::from(runs) / n) as u32..((b + 1) * u64::from(runs) / n) as u32;
        (flows, if b % 2 == 0 { [0, 1] } else { [1, 0] })
    })
}

/// A sample's time, or the error of a wrong output.
fn checked(name: &str, program: &str, flow: u32, (ok, took): (bool, u64)) -> Result<u64> {
    if !ok {
        bail!("per-packet {name} ({program}): flow {flow} was not handled as expected");
    }
    Ok(took)
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
        over_ipv4: None,
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
    let vip6: IpAddr = VIP6.parse().expect("literal");
    let pods6: Vec<IpAddr> = (1..=ENDPOINTS).map(|k| IpAddr::V6(pod6(k))).collect();
    let segment6 = |src, dst, sport, dport, flags| {
        frame::packet(src, dst, frame::TCP, &frame::tcp(src, dst, sport, dport, flags, b""))
    };
    let mut results = Vec::new();

    // Miss: traffic to a pod address, not a service.
    let mut miss = Twins::new(["miss (not a service)", "IPv6 miss (not a service)"], PROG_INGRESS);
    let mut miss4 = |flow, runner: &mut Runner| {
        let (ip, port) = client(flow);
        let frame = tcp(&Ipv4Spec::new(ip, pods[0]), port, lab::TCP_TARGET, TCP_ACK, b"");
        let (verdict, took) = runner.run(PROG_INGRESS, &frame)?;
        Ok((verdict == TC_NEXT && runner.out == frame, took))
    };
    let mut miss6 = |flow, runner: &mut Runner| {
        let (ip, port) = client6(flow);
        let input = segment6(ip, pods6[0], port, lab::TCP_TARGET, TCP_ACK);
        let (verdict, took) = runner.run(PROG_INGRESS, &input)?;
        Ok((verdict == TC_NEXT && runner.out == input, took))
    };
    for (flows, order) in blocks(runs) {
        for family in order {
            let sample: Sample<'_> = if family == 0 { &mut miss4 } else { &mut miss6 };
            miss.sample(&mut runner, family, flows.clone(), sample)?;
        }
    }
    results.extend(miss.finish());

    // New flows: a SYN per distinct 5-tuple; remember which backend each got.
    let chosen = RefCell::new(Vec::with_capacity(runs as usize));
    let chosen6 = RefCell::new(Vec::with_capacity(runs as usize));
    // A SYN of flow `n`: whether it was translated right, the time, and the
    // backend it went to.
    let syn4 = |flow, runner: &mut Runner| -> Result<(bool, u64, Ipv4Addr)> {
        let (ip, port) = client(flow);
        let frame = tcp(&Ipv4Spec::new(ip, vip), port, lab::TCP_PORT, TCP_SYN, b"");
        let (verdict, took) = runner.run(PROG_INGRESS, &frame)?;
        let v = view(&runner.out);
        let ok = verdict == TC_NEXT
            && pods.contains(&v.dst)
            && v.dport == lab::TCP_TARGET
            && v.ip_checksum_ok
            && v.l4_checksum_ok == Some(true);
        Ok((ok, took, v.dst))
    };
    let syn6 = |flow, runner: &mut Runner| -> Result<(bool, u64, IpAddr)> {
        let (ip, port) = client6(flow);
        let (verdict, took) = runner.run(PROG_INGRESS, &segment6(ip, vip6, port, lab::TCP_PORT, TCP_SYN))?;
        let seen = view6(&runner.out);
        let ok = seen.is_some_and(|(_, dst, _, dport)| pods6.contains(&dst) && dport == lab::TCP_TARGET);
        Ok((verdict == TC_NEXT && ok, took, seen.map_or(vip6, |(_, dst, _, _)| dst)))
    };
    let mut new4 = |flow, runner: &mut Runner| {
        let (ok, took, dst) = syn4(flow, runner)?;
        chosen.borrow_mut().push(dst);
        Ok((ok, took))
    };
    let mut new6 = |flow, runner: &mut Runner| {
        let (ok, took, dst) = syn6(flow, runner)?;
        chosen6.borrow_mut().push(dst);
        Ok((ok, took))
    };
    // Established: the next packet of every flow.
    let established = |flow: u32, runner: &mut Runner| -> Result<(bool, u64)> {
        let (ip, port) = client(flow);
        let frame = tcp(&Ipv4Spec::new(ip, vip), port, lab::TCP_PORT, TCP_ACK, b"");
        let (verdict, took) = runner.run(PROG_INGRESS, &frame)?;
        let v = view(&runner.out);
        Ok((verdict == TC_NEXT && v.dst == chosen.borrow()[flow as usize] && v.l4_checksum_ok == Some(true), took))
    };
    let mut established6 = |flow, runner: &mut Runner| {
        let (ip, port) = client6(flow);
        let (verdict, took) = runner.run(PROG_INGRESS, &segment6(ip, vip6, port, lab::TCP_PORT, TCP_ACK))?;
        let ok = view6(&runner.out).is_some_and(|(_, dst, _, _)| dst == chosen6.borrow()[flow as usize]);
        Ok((verdict == TC_NEXT && ok, took))
    };
    // Reverse NAT: every backend's reply, back to the ClusterSetIP.
    let mut reverse4 = |flow, runner: &mut Runner| {
        let (ip, port) = client(flow);
        let frame = tcp(&Ipv4Spec::new(chosen.borrow()[flow as usize], ip), lab::TCP_TARGET, port, TCP_ACK, b"");
        let (verdict, took) = runner.run(PROG_EGRESS, &frame)?;
        let v = view(&runner.out);
        Ok((verdict == TC_NEXT && v.src == vip && v.sport == lab::TCP_PORT && v.l4_checksum_ok == Some(true), took))
    };
    let mut reverse6 = |flow, runner: &mut Runner| {
        let (ip, port) = client6(flow);
        let input = segment6(chosen6.borrow()[flow as usize], ip, lab::TCP_TARGET, port, TCP_ACK);
        let (verdict, took) = runner.run(PROG_EGRESS, &input)?;
        let ok = view6(&runner.out).is_some_and(|(src, _, sport, _)| src == vip6 && sport == lab::TCP_PORT);
        Ok((verdict == TC_NEXT && ok, took))
    };
    let mut new =
        Twins::new(["new flow (SYN, conntrack insert)", "IPv6 new flow (SYN, conntrack insert)"], PROG_INGRESS);
    let mut est = Twins::new(["established flow", "IPv6 established flow"], PROG_INGRESS);
    let mut rev = Twins::new(["reverse NAT (reply)", "IPv6 reverse NAT (reply)"], PROG_EGRESS);
    // A block of flows of one family goes through its SYN, next packet and
    // reply before the other family's block: each flow's later packets come
    // within a second of its SYN, as in a connection, long before its pair
    // check is due.
    let mut established4 = established;
    for (flows, order) in blocks(runs) {
        for family in order {
            if family == 0 {
                new.sample(&mut runner, 0, flows.clone(), &mut new4)?;
                est.sample(&mut runner, 0, flows.clone(), &mut established4)?;
                rev.sample(&mut runner, 0, flows.clone(), &mut reverse4)?;
            } else {
                new.sample(&mut runner, 1, flows.clone(), &mut new6)?;
                est.sample(&mut runner, 1, flows.clone(), &mut established6)?;
                rev.sample(&mut runner, 1, flows.clone(), &mut reverse6)?;
            }
        }
    }
    let new_flows_done = Instant::now();
    results.extend(new.finish());
    results.extend(est.finish());
    results.extend(rev.finish());

    // Once per CT_PAIR_CHECK_NS an entry's packet also confirms its sibling
    // (one more lookup). The rows above come sooner after each flow's SYN;
    // this one waits until every flow's check is due. Before the warm rows:
    // their SYNs write their flows' entries anew, and with them the time of
    // the check.
    let due = new_flows_done + Duration::from_nanos(CT_PAIR_CHECK_NS) + Duration::from_secs(1);
    std::thread::sleep(due.saturating_duration_since(Instant::now()));
    results.push(runner.path("established flow, pair check due", PROG_INGRESS, runs, established)?);
    // The same paths over a few flows, cycled: their entries stay in the CPU
    // caches (the issue's "flows in cache, about 1,000"). Set beside the rows
    // above, they split each cost into the program's own work and what cache
    // misses add at a million flows, where every new flow's two entries go
    // into cold buckets and cold elements, and a block of flows (about
    // 40,000 at 1,000,000 runs) came between a flow's SYN and its next
    // packet. A warm SYN opens its flow afresh (a reused client port): it is
    // balanced again, to the same backend, and both entries are written anew
    // over the flow's earlier ones, which the map frees.
    let warm = WARM_FLOWS.min(runs);
    let mut cached_new = Twins::new(
        ["warm new flow (SYN, 1,024 flows cycled)", "IPv6 warm new flow (SYN, 1,024 flows cycled)"],
        PROG_INGRESS,
    );
    let mut cached = Twins::new(
        ["warm established flow (1,024 flows cycled)", "IPv6 warm established flow (1,024 flows cycled)"],
        PROG_INGRESS,
    );
    let mut warm_new4 = |flow: u32, runner: &mut Runner| {
        let (ok, took, dst) = syn4(flow % warm, runner)?;
        Ok((ok && dst == chosen.borrow()[(flow % warm) as usize], took))
    };
    let mut warm_new6 = |flow: u32, runner: &mut Runner| {
        let (ok, took, dst) = syn6(flow % warm, runner)?;
        Ok((ok && dst == chosen6.borrow()[(flow % warm) as usize], took))
    };
    for (flows, order) in blocks(runs) {
        for family in order {
            let (syn, next): (Sample<'_>, Sample<'_>) = if family == 0 {
                (&mut warm_new4, &mut |flow, runner| established(flow % warm, runner))
            } else {
                (&mut warm_new6, &mut |flow, runner| established6(flow % warm, runner))
            };
            cached_new.sample(&mut runner, family, flows.clone(), syn)?;
            cached.sample(&mut runner, family, flows.clone(), next)?;
        }
    }
    for mut cost in cached_new.finish().into_iter().chain(cached.finish()) {
        cost.distinct_flows = u64::from(warm);
        results.push(cost);
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_every_flow_once_and_alternate_the_first_family() {
        for runs in [0, 1, 23, 24, 100_000, 1_000_001] {
            let all: Vec<_> = blocks(runs).collect();
            assert_eq!(all.len(), TWIN_BLOCKS);
            let flows: Vec<u32> = all.iter().flat_map(|(f, _)| f.clone()).collect();
            assert_eq!(flows, (0..runs).collect::<Vec<_>>(), "{runs} runs");
            for (b, (_, order)) in all.iter().enumerate() {
                assert_eq!(order[0], b % 2, "block {b}");
                assert_eq!(order[0] + order[1], 1);
            }
        }
    }

    #[test]
    fn twins_give_the_ipv6_row_its_ratio_to_the_ipv4_row() {
        let mut t = Twins::new(["a", "IPv6 a"], "p");
        t.ns = [vec![100; 2400], (0..2400).map(|i| 110 + (i % 3)).collect()];
        let [v4, v6] = t.finish();
        assert_eq!((v4.p50_ns, v6.p50_ns), (100, 111));
        assert!(v4.over_ipv4.is_none());
        let r = v6.over_ipv4.expect("the IPv6 row's ratio");
        assert_eq!(r.n, TWIN_BLOCKS);
        assert!((r.median - 1.11).abs() < 1e-3 && r.coverage >= 0.95, "{r:?}");
    }
}
