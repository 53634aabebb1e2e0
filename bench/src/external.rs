//! Clients outside the node (`--external-interface`): new connections per
//! second from outside through the agent's XDP program against kube-proxy's
//! nftables DNAT and masquerade, on one topology, in alternating slices; and
//! the XDP program's cost per packet against the TC program's for the same
//! kind of translation.
//!
//! ```text
//!  outside ns: client 192.168.254.2, router ── cluster ns: 10 pods 10.10.0.k
//!  eth0 ─── up0 node ns 192.168.254.1 (XDP)
//! ```
//! The client is outside kube-proxy's cluster CIDR (10.0.0.0/8), so its
//! rules masquerade as the agent's source NAT does. On veth, XDP works on
//! an skb the driver converts: the packet-rate advantage of a NIC's driver
//! cannot show here. The targets for a NIC (at least 2× nftables, 1.5× the
//! TC path) are stated on paper; what veth shows is reported, not judged.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use mcs_agent::datapath::Xnat;
use mcs_common::PROG_INGRESS;
use mcs_tests::{
    agent::Agent,
    ethtool,
    frame::{TCP, packet, tcp, turned},
    netns::{Netns, veth},
    peer::{XdpPass, xdp_pass},
    testrun::{programmed, run_repeat, run_xdp_repeat},
};
use serde::Serialize;

use crate::{
    kubeproxy,
    lab::{self, ENDPOINTS, TCP_PORT, TCP_TARGET, UDP_TARGET, feed},
    load::{self, Servers, Workload},
    stats::{MedianInterval, median_interval},
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 254, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 254, 2);
/// The client the per-packet frames come from (no namespace: frames only).
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 254, 3);

pub struct Options<'a> {
    pub agent: &'a std::path::Path,
    pub agent_args: &'a [&'a str],
    pub pairs: usize,
    pub slice: Duration,
    pub clients: usize,
    pub packet_runs: u32,
}

/// New connections from outside, XDP ÷ nftables, for one client count.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub clients: usize,
    pub xdp_per_s: f64,
    pub nftables_per_s: f64,
    pub ratio: MedianInterval,
}

/// Mean in-kernel time of one program run, per path.
#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    pub path: &'static str,
    pub runs: u32,
    pub mean_ns: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct External {
    pub ratios: Vec<Ratio>,
    pub packet: Vec<Cost>,
}

struct Lab {
    node: Netns,
    outside: Netns,
    _cluster: Netns,
    _servers: Servers,
    _peer: XdpPass,
    pods: Vec<Ipv4Addr>,
}

impl Lab {
    fn new() -> Result<Self> {
        let node = Netns::new("mcs-bxnode");
        let outside = Netns::new("mcs-bxout");
        let cluster = Netns::new("mcs-bxcl");
        for ns in [&node, &outside] {
            ns.sysctl("net.ipv4.ip_forward", "1");
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0");
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0");
        }
        outside.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
        outside.sysctl("net.ipv4.tcp_tw_reuse", "1");
        cluster.sysctl("net.core.somaxconn", "4096");
        veth(&node, "up0", &outside, "eth0");
        node.ip(&["addr", "add", &format!("{NODE}/24"), "dev", "up0"]);
        outside.ip(&["addr", "add", &format!("{OUTSIDE}/24"), "dev", "eth0"]);
        // A NIC's frames carry complete checksums (see the XDP tests).
        ethtool::set_tx_checksum(&outside, "eth0", false);
        veth(&outside, "ca", &cluster, "eth0");
        outside.ip(&["addr", "add", "10.253.0.1/24", "dev", "ca"]);
        cluster.ip(&["addr", "add", "10.253.0.2/24", "dev", "eth0"]);
        cluster.ip(&["route", "add", "default", "via", "10.253.0.1"]);
        outside.ip(&["route", "add", "10.10.0.0/16", "via", "10.253.0.2"]);
        outside.ip(&["route", "add", "10.96.0.0/16", "via", &NODE.to_string()]);
        node.ip(&["route", "add", "10.10.0.0/16", "via", &OUTSIDE.to_string()]);
        let pods: Vec<Ipv4Addr> = (1..=ENDPOINTS as u8).map(|k| Ipv4Addr::new(10, 10, 0, k)).collect();
        for pod in &pods {
            cluster.ip(&["addr", "add", &format!("{pod}/32"), "dev", "eth0"]);
        }
        let servers = Servers::start(&cluster, &pods, TCP_TARGET, UDP_TARGET).context("starting backend servers")?;
        let peer = xdp_pass(&outside, "eth0");
        Ok(Self { node, outside, _cluster: cluster, _servers: servers, _peer: peer, pods })
    }
}

/// What the node runs in one slice; removed on drop.
enum State {
    Xdp { _agent: Agent, _manifests: tempfile::TempDir },
    Nftables { node: String },
}

impl Drop for State {
    fn drop(&mut self) {
        if let State::Nftables { node } = self {
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", node, "nft", "delete", "table", "ip", "kube-proxy"])
                .output();
        }
    }
}

fn install(lab: &Lab, xdp: bool, services: &[kubeproxy::ServicePort], opts: &Options<'_>) -> Result<State> {
    if xdp {
        let dir = tempfile::tempdir().context("manifest directory")?;
        lab::write_manifests(dir.path(), services);
        let mut args = vec!["--no-pin", "--external-interface", "up0", "--xdp-mode", "native"];
        args.extend_from_slice(opts.agent_args);
        let agent = Agent::start_binary(opts.agent, &lab.node, dir.path(), &[], &args);
        return Ok(State::Xdp { _agent: agent, _manifests: dir });
    }
    feed(&lab.node, &["nft", "-f", "-"], &kubeproxy::nftables(services))?;
    Ok(State::Nftables { node: lab.node.name().to_owned() })
}

pub fn measure(opts: &Options<'_>) -> Result<External> {
    let lab = Lab::new()?;
    let services = lab::services(1, 0, &lab.pods);
    let target = SocketAddr::new(IpAddr::V4(lab::vip(0)), TCP_PORT);
    let mut ratios = Vec::new();
    for clients in [1, opts.clients] {
        let outside: Vec<&Netns> = std::iter::repeat_n(&lab.outside, clients).collect();
        let (mut pairs, mut rates) = (Vec::new(), [Vec::new(), Vec::new()]);
        for pair in 0..opts.pairs {
            let mut rate = [0.0; 2];
            // A B, then B A: drift of the machine lands on both alike.
            let order = if pair % 2 == 0 { [true, false] } else { [false, true] };
            for xdp in order {
                let state = install(&lab, xdp, &services, opts)?;
                // Not recorded: neighbours, server threads and caches warm up.
                load::run(Workload::TcpCrr, &outside, target, Duration::from_millis(300));
                let run = load::run(Workload::TcpCrr, &outside, target, opts.slice);
                drop(state);
                let name = if xdp { "XDP" } else { "nftables" };
                if run.transactions == 0 {
                    bail!("new connections from outside through {name}: none completed ({} errors)", run.errors);
                }
                if run.transactions >= 100 && run.backends < 2 {
                    bail!("new connections from outside through {name}: every one reached the same backend");
                }
                rate[usize::from(!xdp)] = run.rate;
            }
            pairs.push(rate[0] / rate[1]);
            rates[0].push(rate[0]);
            rates[1].push(rate[1]);
            eprintln!(
                "bench: outside x{clients}, pair {}/{}: XDP {:.0}/s, nftables {:.0}/s",
                pair + 1,
                opts.pairs,
                rate[0],
                rate[1]
            );
        }
        let median = |v: &[f64]| median_interval(v).median;
        ratios.push(Ratio {
            clients,
            xdp_per_s: median(&rates[0]),
            nftables_per_s: median(&rates[1]),
            ratio: median_interval(&pairs),
        });
    }
    let packet = per_packet(&lab, opts.packet_runs)?;
    Ok(External { ratios, packet })
}

/// The in-kernel time of one run of `mcs_xdp` (a flow from outside: DNAT
/// and source NAT) and of `mcs_ingress` (a pod's flow: DNAT) for a new
/// flow's first packet and an established flow's, and of `mcs_xdp` for a
/// backend's reply. Run in the lab's node namespace, whose routes the XDP
/// program's route lookups read (a neighbour entry makes them succeed
/// without traffic).
fn per_packet(lab: &Lab, runs: u32) -> Result<Vec<Cost>> {
    // The next hop toward the backends and the measured client: resolved,
    // as after traffic (an unresolved one sends a frame to the stack).
    for ip in [OUTSIDE, CLIENT] {
        let ip = ip.to_string();
        lab.node.ip(&["neigh", "replace", &ip, "lladdr", "02:00:00:00:00:02", "dev", "up0", "nud", "permanent"]);
    }
    let service = lab::services(1, 0, &lab.pods[..1]);
    let ports: Vec<&kubeproxy::ServicePort> = service.iter().collect();
    let manifests = lab::service_manifest(&ports, &lab.pods[..1]);
    let frontends = ports.len();
    let news = runs.clamp(1, 20_000);
    lab.node.run(move || -> Result<Vec<Cost>> {
        let ifindex = nix::net::if_::if_nametoindex("up0").context("up0 in the node namespace")?;
        let mut dp = programmed(&manifests, 1 << 16, frontends);
        // The widest range: every measured new flow must find a port.
        dp.set_xnat(&Xnat { addr4: Some(NODE), addr6: None, ports: (1024, 65_535), sources: Vec::new() })?;
        let (vip, backend) = (IpAddr::V4(lab::vip(0)), IpAddr::V4(Ipv4Addr::new(10, 10, 0, 1)));
        let (outside, pod) = (IpAddr::V4(CLIENT), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        let syn = |client, port: u16| turned(packet(client, vip, TCP, &tcp(client, vip, port, TCP_PORT, 0x02, b"")));
        let ack = |client| turned(packet(client, vip, TCP, &tcp(client, vip, 40_000, TCP_PORT, 0x10, b"x")));
        let mut costs = Vec::new();
        // New flows: each SYN from a port of its own, once.
        let (mut xdp_ns, mut tc_ns) = (0u128, 0u128);
        for k in 0..news {
            let port = 1024 + (k % 60_000) as u16;
            let ((verdict, _), ns) = run_xdp_repeat(&mut dp, ifindex, &syn(outside, port), 1);
            if verdict != 3 {
                bail!("new flow {k} from outside was not translated (XDP verdict {verdict})");
            }
            xdp_ns += ns;
            tc_ns += run_repeat(&mut dp, PROG_INGRESS, &syn(pod, port), 1).1;
        }
        costs.push(Cost {
            path: "XDP, new flow (DNAT + source NAT, route lookup)",
            runs: news,
            mean_ns: xdp_ns as f64 / f64::from(news),
        });
        costs.push(Cost { path: "TC ingress, new flow (DNAT)", runs: news, mean_ns: tc_ns as f64 / f64::from(news) });
        // Established: the flow opened, then one segment repeated. The
        // source NAT port it got, from the frame XDP sent.
        let ((verdict, opened), _) = run_xdp_repeat(&mut dp, ifindex, &syn(outside, 40_000), 1);
        if verdict != 3 {
            bail!("a new flow from outside was not translated (XDP verdict {verdict})");
        }
        let Some(port) = opened.get(34..36).map(|p| u16::from_be_bytes([p[0], p[1]])) else {
            bail!("the XDP program sent no frame for a new flow");
        };
        run_repeat(&mut dp, PROG_INGRESS, &syn(pod, 40_000), 1);
        // One run per fresh frame: a repeated run sees the frame the last
        // one rewrote.
        let (mut xdp, mut tc, mut back) = (0u128, 0u128, 0u128);
        let reply = turned(packet(
            backend,
            IpAddr::V4(NODE),
            TCP,
            &tcp(backend, IpAddr::V4(NODE), TCP_TARGET, port, 0x10, b"y"),
        ));
        for _ in 0..news {
            xdp += run_xdp_repeat(&mut dp, ifindex, &ack(outside), 1).1;
            tc += run_repeat(&mut dp, PROG_INGRESS, &ack(pod), 1).1;
            // The backend's reply to the node's port, translated back to the client.
            let ((verdict, _), ns) = run_xdp_repeat(&mut dp, ifindex, &reply, 1);
            if verdict != 3 {
                bail!("the reply to the node's port was not translated (XDP verdict {verdict})");
            }
            back += ns;
        }
        let mean = |total: u128| total as f64 / f64::from(news);
        costs.push(Cost { path: "XDP, established flow", runs: news, mean_ns: mean(xdp) });
        costs.push(Cost { path: "TC ingress, established flow", runs: news, mean_ns: mean(tc) });
        costs.push(Cost { path: "XDP, reply (reverse NAT, route lookup)", runs: news, mean_ns: mean(back) });
        Ok(costs)
    })
}
