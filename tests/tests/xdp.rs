//! Clients outside the node (`--external-interface`): ClusterSetIP traffic
//! that arrives on the node's uplink, translated by XDP with source NAT.
//!
//! ```text
//!  outside ns (client, and the router to the other clusters)     node ns (agent)
//!  eth0 10.254.0.2 ─────────────────────────────────────── up0 10.254.0.1 (XDP, native)
//!  ca 10.253.0.1 ── cluster-a ns eth0 10.253.0.2                pod0 10.0.0.1 ── local pod 10.0.0.2
//!                   pods 10.10.0.1, 10.10.0.2
//! ```
//! A backend in cluster-a is reached back out of the uplink (`XDP_TX`); the
//! local pod through the stack (`mcs_uplink`), and its reply is translated
//! back at its pod interface. Every address has its IPv6 twin
//! (`topology::v6`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use mcs_agent::{
    datapath::{Datapath, Sizes, XdpAttach},
    plan::Capacity,
};
use mcs_tests::{
    agent::{Agent, probe},
    ethtool, manifests,
    netns::{Netns, veth},
    topology::v6,
    traffic::{Server, tcp_request, udp_request},
};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 2);
const REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const REMOTE_PODS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 10, 0, 1), Ipv4Addr::new(10, 10, 0, 2)];
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

fn add(ns: &Netns, addr: Ipv4Addr, len: u8, dev: &str) {
    ns.ip(&["addr", "add", &format!("{addr}/{len}"), "dev", dev]);
    let len6 = if len == 32 { 128 } else { 64 };
    ns.ip(&["-6", "addr", "add", &format!("{}/{len6}", v6(addr)), "dev", dev, "nodad"]);
}

fn route(ns: &Netns, to: Ipv4Addr, len: u8, via: Ipv4Addr) {
    ns.ip(&["route", "add", &format!("{to}/{len}"), "via", &via.to_string()]);
    let len6 = if len == 0 { 0 } else { 32 + u32::from(len) / 2 };
    ns.ip(&["-6", "route", "add", &format!("{}/{len6}", v6(to)), "via", &v6(via).to_string()]);
}

fn forwarding(ns: &Netns) {
    ns.sysctl("net.ipv4.ip_forward", "1");
    ns.sysctl("net.ipv4.conf.all.rp_filter", "0");
    ns.sysctl("net.ipv4.conf.default.rp_filter", "0");
    ns.sysctl("net.ipv6.conf.all.forwarding", "1");
}

fn import(name: &str, vip: Ipv4Addr) -> String {
    format!(
        r#"apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {{name: {name}, namespace: demo}}
spec:
  type: ClusterSetIP
  ips: ["{vip}", "{}"]
  ipFamilies: [IPv4, IPv6]
  ports: [{{name: http, port: 80, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]
"#,
        v6(vip)
    )
}

fn slice(name: &str, service: &str, cluster: &str, family: &str, ips: &[IpAddr]) -> String {
    let endpoints: Vec<String> = ips.iter().map(|ip| format!(r#"{{addresses: ["{ip}"]}}"#)).collect();
    format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: demo
  labels: {{multicluster.kubernetes.io/service-name: {service}, multicluster.kubernetes.io/source-cluster: {cluster}}}
addressType: {family}
ports: [{{name: http, port: {TCP_PORT}, protocol: TCP}}, {{name: dns, port: {UDP_PORT}, protocol: UDP}}]
endpoints: [{}]
"#,
        endpoints.join(", ")
    )
}

struct Lab {
    node: Netns,
    outside: Netns,
    _cluster: Netns,
    _pod: Netns,
    _servers: Vec<Server>,
    dir: tempfile::TempDir,
    /// An XDP program on the outside's end of the uplink, which passes
    /// everything: a veth takes `XDP_TX` frames from its peer only while
    /// it runs NAPI, which an XDP program of its own turns on (GRO did not
    /// on this kernel). A NIC's wire needs nothing of the sort.
    /// Dropped, the thread holding that program ends and it detaches.
    _peer_xdp: std::sync::mpsc::Sender<()>,
}

fn lab() -> Lab {
    let node = Netns::new("mcs-xnode");
    let outside = Netns::new("mcs-xout");
    let cluster = Netns::new("mcs-xcl");
    let pod = Netns::new("mcs-xpod");
    forwarding(&node);
    forwarding(&outside);
    veth(&node, "up0", &outside, "eth0");
    add(&node, NODE, 24, "up0");
    add(&outside, OUTSIDE, 24, "eth0");
    // What a NIC's wire gives: complete checksums on what reaches the
    // uplink (a veth would pass the sender's partial one along).
    ethtool::set_tx_checksum(&outside, "eth0", false);
    // The clusterset beyond the outside router.
    veth(&outside, "ca", &cluster, "eth0");
    add(&outside, Ipv4Addr::new(10, 253, 0, 1), 24, "ca");
    add(&cluster, Ipv4Addr::new(10, 253, 0, 2), 24, "eth0");
    route(&cluster, Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(10, 253, 0, 1));
    route(&outside, Ipv4Addr::new(10, 10, 0, 0), 16, Ipv4Addr::new(10, 253, 0, 2));
    route(&node, Ipv4Addr::new(10, 10, 0, 0), 16, OUTSIDE);
    // The outside routes the ClusterSetIP range to the node.
    route(&outside, Ipv4Addr::new(10, 96, 0, 0), 16, NODE);
    // A pod on the node.
    veth(&node, "pod0", &pod, "eth0");
    add(&node, Ipv4Addr::new(10, 0, 0, 1), 24, "pod0");
    add(&pod, LOCAL_POD, 24, "eth0");
    route(&pod, Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(10, 0, 0, 1));

    let mut servers = Vec::new();
    for (k, ip) in REMOTE_PODS.iter().enumerate() {
        cluster.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        cluster.ip(&["-6", "addr", "add", &format!("{}/128", v6(*ip)), "dev", "eth0", "nodad"]);
        let id = format!("cluster-a/pod-{}", k + 1);
        for addr in [IpAddr::V4(*ip), IpAddr::V6(v6(*ip))] {
            servers.push(Server::tcp(&cluster, addr, TCP_PORT, &id));
            servers.push(Server::udp(&cluster, addr, UDP_PORT, &id));
        }
    }
    for addr in [IpAddr::V4(LOCAL_POD), IpAddr::V6(v6(LOCAL_POD))] {
        servers.push(Server::tcp(&pod, addr, TCP_PORT, "local/pod"));
        servers.push(Server::udp(&pod, addr, UDP_PORT, "local/pod"));
    }

    let dir = tempfile::tempdir().unwrap();
    let remote4: Vec<IpAddr> = REMOTE_PODS.iter().map(|ip| IpAddr::V4(*ip)).collect();
    let remote6: Vec<IpAddr> = REMOTE_PODS.iter().map(|ip| IpAddr::V6(v6(*ip))).collect();
    manifests::write(dir.path(), "remote.yaml", &import("remote", REMOTE_VIP));
    manifests::write(dir.path(), "remote-4.yaml", &slice("remote-a4", "remote", "cluster-a", "IPv4", &remote4));
    manifests::write(dir.path(), "remote-6.yaml", &slice("remote-a6", "remote", "cluster-a", "IPv6", &remote6));
    manifests::write(dir.path(), "local.yaml", &import("local", LOCAL_VIP));
    let local4 = [IpAddr::V4(LOCAL_POD)];
    let local6 = [IpAddr::V6(v6(LOCAL_POD))];
    manifests::write(dir.path(), "local-4.yaml", &slice("local-4", "local", "cluster-b", "IPv4", &local4));
    manifests::write(dir.path(), "local-6.yaml", &slice("local-6", "local", "cluster-b", "IPv6", &local6));
    let (peer_xdp, done) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
    outside.spawn(move || {
        let capacity = Capacity { services: 8, backends: 8, slots: 64 };
        let mut dp = Datapath::load(Sizes { capacity, conntrack: 64, ..Sizes::default() }, None)
            .expect("loading the programs for the outside's XDP pass");
        // No source NAT address set: the program passes every packet.
        dp.attach_external("eth0", XdpAttach::Native).expect("XDP on the outside's eth0");
        ready_tx.send(()).expect("the lab waits");
        let _ = done.recv();
        drop(dp);
    });
    ready.recv().expect("the outside's XDP pass attached");
    Lab { node, outside, _cluster: cluster, _pod: pod, _servers: servers, dir, _peer_xdp: peer_xdp }
}

fn start(lab: &Lab, extra: &[&str]) -> Agent {
    let mut args = vec!["--external-interface", "up0", "--xdp-mode", "native"];
    args.extend_from_slice(extra);
    Agent::start(&lab.node, lab.dir.path(), &["pod0".to_owned()], &args)
}

/// `mcs_agent_datapath_events{event=...}`, or 0.
fn event(metrics: &str, name: &str) -> f64 {
    let prefix = format!("mcs_agent_datapath_events_total{{event=\"{name}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The XDP path's counters, for a failure's message.
fn events(lab: &Lab) -> String {
    let m = metrics(lab);
    m.lines()
        .filter(|l| l.contains("datapath_events") && !l.ends_with(" 0") && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join(", ")
}

fn metrics(lab: &Lab) -> String {
    probe(&lab.node, "/metrics").expect("/metrics answers").1
}

fn families() -> [(IpAddr, IpAddr, IpAddr, IpAddr); 2] {
    [
        (REMOTE_VIP.into(), LOCAL_VIP.into(), NODE.into(), LOCAL_POD.into()),
        (v6(REMOTE_VIP).into(), v6(LOCAL_VIP).into(), v6(NODE).into(), v6(LOCAL_POD).into()),
    ]
}

#[test]
fn outside_clients_reach_remote_and_local_backends_through_xdp_with_source_nat() {
    let lab = lab();
    let _agent = start(&lab, &[]);
    let m = metrics(&lab);
    assert!(
        m.contains("mcs_agent_xdp_attached{interface=\"up0\",mode=\"native\"} 1"),
        "XDP attached natively on up0:\n{}",
        m.lines().filter(|l| l.contains("xdp")).collect::<Vec<_>>().join("\n")
    );
    let snat = 61000..=65535u16;
    for (remote, local, node, _) in families() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..12 {
            for (reply, port) in [
                (tcp_request(&lab.outside, SocketAddr::new(remote, 80)), 80),
                (udp_request(&lab.outside, SocketAddr::new(remote, 53)), 53),
            ] {
                let reply = reply.unwrap_or_else(|e| panic!("{remote}:{port} from outside: {e}; {}", events(&lab)));
                assert!(reply.identity.starts_with("cluster-a/pod-"), "{reply:?}");
                // The client talks to the VIP; the backend sees the node.
                assert_eq!(reply.reply_from, SocketAddr::new(remote, port), "{reply:?}");
                assert_eq!(reply.peer_seen.ip(), node, "the backend sees the node's address: {reply:?}");
                assert!(snat.contains(&reply.peer_seen.port()), "a port of the source NAT range: {reply:?}");
                seen.insert(reply.identity);
            }
        }
        assert_eq!(seen.len(), 2, "both remote pods answer over 24 flows ({remote}): {seen:?}");
        // The local pod: delivered through the stack, answered through its interface.
        for (reply, port) in [
            (tcp_request(&lab.outside, SocketAddr::new(local, 80)), 80),
            (udp_request(&lab.outside, SocketAddr::new(local, 53)), 53),
        ] {
            let reply = reply.unwrap_or_else(|e| panic!("{local}:{port} from outside: {e}"));
            assert_eq!(reply.identity, "local/pod");
            assert_eq!(reply.reply_from, SocketAddr::new(local, port), "{reply:?}");
            assert_eq!(reply.peer_seen.ip(), node, "{reply:?}");
        }
    }
    let m = metrics(&lab);
    for name in ["xdp_new_flow", "xdp_established", "xdp_rev_nat", "xdp_to_stack", "xnat_local_rev_nat"] {
        assert!(event(&m, name) > 0.0, "{name} counted: {}", event(&m, name));
    }
    assert_eq!(event(&m, "snat_exhausted"), 0.0);
    // 2 families × (24 remote + 2 local) new flows.
    assert_eq!(event(&m, "xdp_new_flow"), 52.0);
}

#[test]
fn exhausted_source_nat_ports_are_counted_and_never_translated_wrongly() {
    let lab = lab();
    // Two ports: two flows per backend at a time.
    let _agent = start(&lab, &["--external-snat-ports", "61000-61001"]);
    let target = SocketAddr::new(LOCAL_VIP.into(), 53);
    let mut answered = 0;
    let mut failed = 0;
    for _ in 0..4 {
        match udp_request(&lab.outside, target) {
            Ok(reply) => {
                assert_eq!(reply.identity, "local/pod");
                assert!((61000..=61001).contains(&reply.peer_seen.port()), "{reply:?}");
                answered += 1;
            }
            Err(_) => failed += 1,
        }
    }
    assert_eq!((answered, failed), (2, 2), "two flows fit the two ports; the others find none");
    let m = metrics(&lab);
    assert_eq!(event(&m, "snat_exhausted"), 2.0);
    assert!(m.contains("mcs_agent_datapath_drops_total{reason=\"snat_exhausted\"} 2"), "dropped, by reason");
}

#[test]
fn a_tcp_packet_past_the_handshake_that_no_flow_knows_is_dropped_not_balanced() {
    let lab = lab();
    let agent = start(&lab, &[]);
    // A connection made, then its conntrack forgotten by a restart of the
    // agent without pins: its next packet is mid-stream to the XDP program.
    let mut connection =
        mcs_tests::traffic::Connection::open(&lab.outside, SocketAddr::new(LOCAL_VIP.into(), 80)).expect("connects");
    connection.request().expect("answered");
    drop(agent);
    let _agent = start(&lab, &[]);
    assert!(connection.request().is_err(), "no answer from a connection balanced afresh");
    let m = metrics(&lab);
    assert!(event(&m, "xdp_midstream_miss") > 0.0, "counted");
    assert_eq!(event(&m, "xdp_new_flow"), 0.0, "never balanced afresh");
    // A new connection still works.
    let reply = tcp_request(&lab.outside, SocketAddr::new(LOCAL_VIP.into(), 80)).expect("a new connection");
    assert_eq!(reply.identity, "local/pod");
}
