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

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use mcs_tests::{
    agent::{Agent, probe},
    bpffs::ScratchBpffs,
    disruption::Load,
    ethtool, manifests,
    netns::{Netns, veth},
    peer::{XdpPass, xdp_pass},
    topology::v6,
    traffic::{Server, tcp_request, udp_request},
};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 2);
const REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// A service without endpoints.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
/// A service whose endpoints (the remote pods) listen on none of its ports.
const CLOSED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
/// Services whose UDP port goes to port [`ECHO_PORT`] of the remote pods,
/// and of the local pod, where a test may start an echo server.
const ECHO_REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const ECHO_LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const ECHO_PORT: u16 = 7007;
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
    let ports = "[{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]";
    manifests::dual_stack_import(name, [vip.into(), v6(vip).into()], ports)
}

fn slice(name: &str, service: &str, cluster: &str, family: &str, ips: &[IpAddr]) -> String {
    let ports =
        format!("[{{name: http, port: {TCP_PORT}, protocol: TCP}}, {{name: dns, port: {UDP_PORT}, protocol: UDP}}]");
    manifests::family_slice(name, service, cluster, family, &ports, ips)
}

struct Lab {
    node: Netns,
    outside: Netns,
    _cluster: Netns,
    _pod: Netns,
    _servers: Vec<Server>,
    dir: tempfile::TempDir,
    /// The outside's end of the uplink takes `XDP_TX` frames (see `peer`).
    _peer_xdp: XdpPass,
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
    let local4 = [IpAddr::V4(LOCAL_POD)];
    let local6 = [IpAddr::V6(v6(LOCAL_POD))];
    manifests::write(dir.path(), "remote.yaml", &import("remote", REMOTE_VIP));
    manifests::write(dir.path(), "remote-4.yaml", &slice("remote-a4", "remote", "cluster-a", "IPv4", &remote4));
    manifests::write(dir.path(), "remote-6.yaml", &slice("remote-a6", "remote", "cluster-a", "IPv6", &remote6));
    manifests::write(dir.path(), "local.yaml", &import("local", LOCAL_VIP));
    manifests::write(dir.path(), "empty.yaml", &import("empty", EMPTY_VIP));
    manifests::write(dir.path(), "closed.yaml", &import("closed", CLOSED_VIP));
    let closed_ports = "[{name: http, port: 8099, protocol: TCP}, {name: dns, port: 5399, protocol: UDP}]";
    for (family, ips) in [("IPv4", &remote4), ("IPv6", &remote6)] {
        let name = format!("closed-{family}");
        let slice = manifests::family_slice(&name, "closed", "cluster-a", family, closed_ports, ips);
        manifests::write(dir.path(), &format!("{name}.yaml"), &slice);
    }
    let echo_ports =
        format!("[{{name: http, port: 8099, protocol: TCP}}, {{name: dns, port: {ECHO_PORT}, protocol: UDP}}]");
    for (service, vip, cluster, ips4, ips6) in [
        ("echo-remote", ECHO_REMOTE_VIP, "cluster-a", &remote4[..], &remote6[..]),
        ("echo-local", ECHO_LOCAL_VIP, "cluster-b", &local4[..], &local6[..]),
    ] {
        manifests::write(dir.path(), &format!("{service}.yaml"), &import(service, vip));
        for (family, ips) in [("IPv4", ips4), ("IPv6", ips6)] {
            let name = format!("{service}-{family}");
            let slice = manifests::family_slice(&name, service, cluster, family, &echo_ports, ips);
            manifests::write(dir.path(), &format!("{name}.yaml"), &slice);
        }
    }
    manifests::write(dir.path(), "local-4.yaml", &slice("local-4", "local", "cluster-b", "IPv4", &local4));
    manifests::write(dir.path(), "local-6.yaml", &slice("local-6", "local", "cluster-b", "IPv6", &local6));
    let peer_xdp = xdp_pass(&outside, "eth0");
    Lab { node, outside, _cluster: cluster, _pod: pod, _servers: servers, dir, _peer_xdp: peer_xdp }
}

/// An agent whose state goes with it (`--no-pin`): these tests restart it
/// to forget flows.
fn start(lab: &Lab, extra: &[&str]) -> Agent {
    let mut args = vec!["--external-interface", "up0", "--xdp-mode", "native", "--no-pin"];
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

/// `mcs_agent_map_growths_total`; 0 while the agent is too busy to answer.
fn growths(lab: &Lab) -> f64 {
    let Some((_, m)) = probe(&lab.node, "/metrics") else { return 0.0 };
    m.lines().find_map(|l| l.strip_prefix("mcs_agent_map_growths_total ")).map_or(0.0, |v| v.trim().parse().unwrap())
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
    // Remote backends out of the uplink again (XDP_TX), the local pod through the stack.
    for name in ["xdp_new_flow", "xdp_established", "xdp_rev_nat", "xdp_tx", "xdp_to_stack", "xnat_local_rev_nat"] {
        assert!(event(&m, name) > 0.0, "{name} counted: {}", event(&m, name));
    }
    assert_eq!(event(&m, "snat_exhausted"), 0.0);
    // 2 families × (24 remote + 2 local) flows; a UDP client port the
    // kernel happens to pick twice is one flow.
    let new = event(&m, "xdp_new_flow");
    assert!((44.0..=52.0).contains(&new), "new flows from outside: {new}");
    // Counted as the XDP path's (path="xdp"), not on the pod paths' series.
    let sum = |name: &str, with: &[&str]| -> f64 {
        (m.lines().filter(|l| l.starts_with(&format!("{name}{{")) && with.iter().all(|w| l.contains(w))))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    let remote = r#"service="demo/remote",port="80/TCP""#;
    let local = r#"service="demo/local",port="80/TCP""#;
    let xdp = r#"path="xdp""#;
    assert!(m.contains(&format!("mcs_agent_frontend_new_connections_total{{{remote},{xdp}}} 24\n")), "12 a family");
    assert!(m.contains(&format!("mcs_agent_frontend_new_connections_total{{{remote}}} 0\n")), "none on the pod paths");
    assert!(m.contains(&format!("mcs_agent_frontend_new_connections_total{{{local},{xdp}}} 2\n")));
    assert_eq!(sum("mcs_agent_backend_new_connections_total", &[remote, xdp]), 24.0);
    assert_eq!(sum("mcs_agent_backend_new_connections_total", &[remote]), 24.0, "no pod-path connections");
    for side in ["to_backend", "from_backend"] {
        let direction = format!("direction=\"{side}\"");
        for frontend in [remote, local] {
            assert!(sum("mcs_agent_backend_packets_total", &[frontend, &direction, xdp]) > 0.0, "{frontend} {side}");
            assert!(sum("mcs_agent_backend_bytes_total", &[frontend, &direction, xdp]) > 0.0, "{frontend} {side}");
        }
    }
}

#[test]
fn clients_outside_the_source_ranges_pass_untouched_and_those_inside_are_served() {
    let lab = lab();
    let target = SocketAddr::new(REMOTE_VIP.into(), 80);
    {
        let _agent = start(&lab, &["--external-source-cidr", "192.0.2.0/24"]);
        assert!(
            tcp_request(&lab.outside, target).is_err(),
            "not a client of ours: left to the stack, which has no route"
        );
        assert_eq!(event(&metrics(&lab), "xdp_new_flow"), 0.0);
    }
    let ranges = format!("10.254.0.0/24,{}/32", v6(Ipv4Addr::new(10, 254, 0, 0)));
    let _agent = start(&lab, &["--external-source-cidr", &ranges]);
    for vip in [IpAddr::from(REMOTE_VIP), IpAddr::from(v6(REMOTE_VIP))] {
        let reply = tcp_request(&lab.outside, SocketAddr::new(vip, 80))
            .unwrap_or_else(|e| panic!("{vip}: a client in the ranges: {e}; {}", events(&lab)));
        assert!(reply.identity.starts_with("cluster-a/"), "{reply:?}");
    }
}

#[test]
fn a_forged_packet_from_the_node_address_is_not_steered_past_the_stack() {
    let lab = lab();
    let _agent = start(&lab, &[]);
    // A host outside forges the node's address and a source NAT port
    // toward the local pod; only a flow the agent translated may be sent on
    // past the stack's checks.
    lab.outside.ip(&["route", "add", "10.0.0.0/24", "via", &NODE.to_string()]);
    let received = || -> u64 {
        let out = lab._pod.exec(&["nstat", "-az", "IpInReceives"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("IpInReceives"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = received();
    let forged = lab.outside.run(|| {
        use std::os::fd::AsRawFd as _;
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and option of its size: send from an
        // address this host does not have.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_TRANSPARENT,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IP_TRANSPARENT");
        socket.bind(&SocketAddr::new(NODE.into(), 61_000).into()).unwrap();
        socket
            .connect_timeout(&SocketAddr::new(LOCAL_POD.into(), TCP_PORT).into(), std::time::Duration::from_millis(700))
    });
    assert!(forged.is_err(), "no connection through a forged source");
    assert_eq!(received(), before, "the pod never saw the forged SYNs");
    // The real thing still works.
    let reply = tcp_request(&lab.outside, SocketAddr::new(LOCAL_VIP.into(), 80)).expect("a translated flow");
    assert_eq!(reply.identity, "local/pod");
}

#[test]
fn exhausted_source_nat_ports_are_counted_and_the_flows_dropped() {
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

#[test]
fn restarts_a_growth_and_a_layout_upgrade_keep_serving_outside_clients_without_a_failure() {
    let lab = lab();
    let bpffs = ScratchBpffs::new();
    let binary = mcs_tests::agent::agent_binary();
    let next_layout = (mcs_common::LAYOUT_VERSION + 1).to_string();
    let agent = |extra: &[&str]| {
        let mut args = vec![
            "--bpffs".to_owned(),
            bpffs.arg(),
            "--external-interface".to_owned(),
            "up0".to_owned(),
            "--xdp-mode".to_owned(),
            "native".to_owned(),
            // Room for the load's short flows, thousands a second: each
            // holds its port and its entries until its grace time (TCP) or
            // idle timeout (UDP, 30 s) has passed.
            "--external-snat-ports".to_owned(),
            "10000-60000".to_owned(),
            "--max-external-conntrack".to_owned(),
            "262144".to_owned(),
            // Small maps, to grow under load.
            "--initial-services".to_owned(),
            "32".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start_binary(&binary, &lab.node, lab.dir.path(), &["pod0".to_owned()], &args)
    };
    let mut running = agent(&[]);
    let to = |port| SocketAddrV4::new(REMOTE_VIP, port);
    let load = Load::start(&lab.outside, to(80), to(53), 6);
    let settle = || std::thread::sleep(Duration::from_millis(800));
    settle();
    let mut phases = vec![("steady state", load.mark())];
    // `inspect conntrack` lists the load's flows by their XDP entries.
    let out =
        lab.node.exec(&[&binary.display().to_string(), "inspect", "conntrack", "-o", "json", "--bpffs", &bpffs.arg()]);
    let flows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect conntrack -o json");
    let flows = flows.as_array().unwrap();
    assert!(!flows.is_empty(), "the load's flows from outside are listed");
    for f in flows {
        let (vip, backend, snat) =
            (f["vip"].as_str().unwrap(), f["backend"].as_str().unwrap(), f["snat"].as_str().unwrap());
        assert_eq!(f["path"], "xdp", "{f}");
        assert!(vip == "10.96.0.10:80" || vip == "10.96.0.10:53", "{f}");
        assert!(REMOTE_PODS.iter().any(|p| backend.starts_with(&format!("{p}:"))), "{f}");
        let port: u16 = snat.strip_prefix("10.254.0.1:").expect("the node's address").parse().unwrap();
        assert!((10000..=60000).contains(&port), "a port of --external-snat-ports: {f}");
    }
    running.crash();
    settle();
    running = agent(&[]);
    settle();
    phases.push(("SIGKILL, restart after 0.8 s", load.mark()));
    let (clean, logs) = running.stop();
    assert!(clean, "SIGTERM ends the agent with status 0:\n{}", logs.join("\n"));
    settle();
    running = agent(&[]);
    settle();
    phases.push(("SIGTERM, restart after 0.8 s", load.mark()));
    // 24 frontends so far; two more imports of 4 pass 7/8 of 32.
    assert_eq!(growths(&lab), 0.0, "the maps grow only now, under load");
    let more: String = [70, 71]
        .iter()
        .map(|i| import(&format!("more-{i}"), Ipv4Addr::new(10, 96, 0, *i)))
        .collect::<Vec<_>>()
        .join("---\n");
    manifests::write(lab.dir.path(), "more.yaml", &more);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while growths(&lab) == 0.0 {
        assert!(std::time::Instant::now() < deadline, "the maps never grew");
        std::thread::sleep(Duration::from_millis(100));
    }
    settle();
    phases.push(("growth of the maps", load.mark()));
    running.stop();
    running = agent(&["--layout-version", &next_layout]);
    settle();
    phases.push(("SIGTERM, layout version bump", load.mark()));
    let (last, fates) = load.finish();
    phases.push(("after the last restart", last));
    for (kind, phase) in &phases {
        assert_eq!((phase.tcp.failed, phase.udp.failed), (0, 0), "{kind}: {:?}; {}", phase.errors, events(&lab));
        assert!(phase.tcp.ok > 0 && phase.udp.ok > 0, "{kind}: no traffic completed");
    }
    for fate in &fates {
        assert!(fate.broken.is_none(), "a long-lived connection from outside broke: {fate:?}");
        assert!(fate.moved_to.is_none(), "a long-lived connection changed backend: {fate:?}");
    }
    // Removing mcs-agent from the node takes the uplink's programs too.
    let (clean, _) = running.stop();
    assert!(clean);
    assert!(
        tcp_request(&lab.outside, SocketAddr::new(REMOTE_VIP.into(), 80)).is_ok(),
        "a stopped agent leaves XDP serving"
    );
    lab.node.exec(&[&binary.display().to_string(), "uninstall", "--bpffs", &bpffs.arg()]);
    assert!(
        tcp_request(&lab.outside, SocketAddr::new(REMOTE_VIP.into(), 80)).is_err(),
        "uninstalled: nothing translates"
    );
}

/// A datagram from a connected UDP socket, and its answer: only a
/// connected socket hears of an ICMP error, and only if the error quotes
/// the datagram as the socket sent it.
fn connected_udp_request(ns: &Netns, target: SocketAddr, wait: Duration) -> std::io::Result<usize> {
    ns.run(move || {
        let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
        let socket = std::net::UdpSocket::bind(any)?;
        socket.set_read_timeout(Some(wait))?;
        socket.connect(target)?;
        socket.send(b"hello\n")?;
        socket.recv(&mut [0u8; 64])
    })
}

#[test]
fn a_frontend_without_backends_refuses_outside_clients_at_once() {
    let lab = lab();
    let _agent = start(&lab, &[]);
    for vip in [IpAddr::from(EMPTY_VIP), IpAddr::from(v6(EMPTY_VIP))] {
        let started = std::time::Instant::now();
        let tcp = tcp_request(&lab.outside, SocketAddr::new(vip, 80)).expect_err("nothing serves it");
        assert_eq!(tcp.kind(), std::io::ErrorKind::ConnectionRefused, "{vip}: a RST from the VIP: {tcp}");
        let udp = connected_udp_request(&lab.outside, SocketAddr::new(vip, 53), Duration::from_secs(2));
        let udp = udp.expect_err("nothing serves it");
        assert_eq!(udp.kind(), std::io::ErrorKind::ConnectionRefused, "{vip}: port unreachable: {udp}");
        assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not timed out");
    }
    let m = metrics(&lab);
    assert_eq!(event(&m, "rejected"), 4.0, "two families, TCP and UDP");
    assert_eq!(event(&m, "xdp_no_backend"), 4.0);
}

/// One TCP connection carrying a request line of `size` bytes, and its
/// answer: past a link narrower than the client's, it gets through only
/// once the client's kernel learns the path MTU.
fn big_tcp_request(ns: &Netns, target: SocketAddr, size: usize) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    ns.run(move || {
        let stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut line = vec![b'x'; size];
        line.push(b'\n');
        (&stream).write_all(&line)?;
        let mut reply = String::new();
        std::io::BufReader::new(&stream).read_line(&mut reply)?;
        Ok(reply)
    })
}

/// The path MTU the client's kernel holds for `target`: `IP_MTU` /
/// `IPV6_MTU` of a UDP socket connected to it.
fn path_mtu(ns: &Netns, target: SocketAddr) -> i32 {
    use std::os::fd::AsRawFd;
    ns.run(move || {
        let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
        let socket = std::net::UdpSocket::bind(any).unwrap();
        socket.connect(target).unwrap();
        let (level, name) =
            if target.is_ipv4() { (libc::IPPROTO_IP, libc::IP_MTU) } else { (libc::IPPROTO_IPV6, libc::IPV6_MTU) };
        let mut mtu: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket and an int-sized buffer with its length.
        let rc = unsafe { libc::getsockopt(socket.as_raw_fd(), level, name, (&raw mut mtu).cast(), &mut len) };
        assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
        mtu
    })
}

#[test]
fn packets_too_big_for_the_way_to_a_backend_teach_the_outside_client_its_path_mtu() {
    let lab = lab();
    // The node's own way to the local pod, and the outside router's to
    // cluster-a, carry 1400 bytes. The pods' interfaces carry 1500: they
    // offer a 1460-byte MSS, and the client sends full-size segments.
    lab.node.ip(&["link", "set", "pod0", "mtu", "1400"]);
    lab.outside.ip(&["link", "set", "ca", "mtu", "1400"]);
    let _agent = start(&lab, &[]);
    for (remote, local, _, _) in families() {
        for (vip, who) in [(local, "local/pod "), (remote, "cluster-a/pod-")] {
            let target = SocketAddr::new(vip, 80);
            assert_eq!(path_mtu(&lab.outside, target), 1500, "{vip}: nothing learned yet");
            let reply = big_tcp_request(&lab.outside, target, 6000)
                .unwrap_or_else(|e| panic!("{vip}: a 6000-byte request from outside: {e}; {}", events(&lab)));
            assert!(reply.starts_with(who), "{vip}: {reply:?}");
            // Learned from an ICMP error that quotes the client's own packet
            // (client -> VIP): XDP's own for the node's narrow link, the
            // router's translated for the one beyond.
            assert_eq!(path_mtu(&lab.outside, target), 1400, "{vip}: the client learned the path MTU");
        }
    }
    let m = metrics(&lab);
    assert!(event(&m, "xdp_too_big") >= 2.0, "answered at the node: {}", events(&lab));
    assert!(event(&m, "xdp_icmp_rev_nat") >= 2.0, "the router's translated: {}", events(&lab));
    assert_eq!(event(&m, "xdp_unroutable"), 0.0);
}

#[test]
fn a_backends_own_icmp_error_remote_or_local_reaches_the_outside_client_from_the_vip() {
    let lab = lab();
    let _agent = start(&lab, &[]);
    // CLOSED: remote pods; ECHO_LOCAL: the local pod, whose echo server
    // this test does not start.
    let vips = [CLOSED_VIP, ECHO_LOCAL_VIP].map(|v| [IpAddr::from(v), IpAddr::from(v6(v))]).concat();
    for vip in vips {
        // The pod answers a datagram to a port nobody listens on with port
        // unreachable, to the node's source NAT address (a local pod's
        // through its own interface); the client's connected socket hears
        // of it only if the error quotes its own datagram (client -> VIP).
        let udp = connected_udp_request(&lab.outside, SocketAddr::new(vip, 53), Duration::from_secs(3));
        let udp = udp.expect_err("nothing listens");
        assert_eq!(
            udp.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{vip}: port unreachable: {udp}; {}",
            events(&lab)
        );
    }
    let m = metrics(&lab);
    assert_eq!(event(&m, "xdp_icmp_rev_nat"), 4.0, "{}", events(&lab));
    assert_eq!(event(&m, "rejected"), 0.0, "the backend's error, not the node's");
}

/// One datagram of `payload` to `target`, and the answer with its source.
fn udp_exchange(ns: &Netns, target: SocketAddr, payload: &[u8]) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    let sent = payload.to_vec();
    ns.run(move || {
        let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
        let socket = std::net::UdpSocket::bind(any)?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        socket.send_to(&sent, target)?;
        let mut buf = vec![0u8; 65536];
        let (n, from) = socket.recv_from(&mut buf)?;
        buf.truncate(n);
        Ok((buf, from))
    })
}

/// A server's thread, until dropped: its loop ends when the flag is set.
struct Serving {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Serving {
    fn spawn(serve: impl FnOnce(&std::sync::atomic::AtomicBool) + Send + 'static) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        Self { stop, handle: Some(std::thread::spawn(move || serve(&flag))) }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A UDP server that sends every datagram back whole.
fn echo(ns: &Netns, addr: SocketAddr) -> Serving {
    let socket = ns.run(move || std::net::UdpSocket::bind(addr)).unwrap_or_else(|e| panic!("echo on {addr}: {e}"));
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    Serving::spawn(move |stop| {
        let mut buf = vec![0u8; 65536];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], peer);
            }
        }
    })
}

#[test]
fn datagrams_fragmented_both_ways_reach_backends_and_come_back_whole() {
    let lab = lab();
    let mut echoes = Vec::new();
    for ip in REMOTE_PODS {
        echoes.push(echo(&lab._cluster, SocketAddr::new(ip.into(), ECHO_PORT)));
        echoes.push(echo(&lab._cluster, SocketAddr::new(v6(ip).into(), ECHO_PORT)));
    }
    echoes.push(echo(&lab._pod, SocketAddr::new(LOCAL_POD.into(), ECHO_PORT)));
    echoes.push(echo(&lab._pod, SocketAddr::new(v6(LOCAL_POD).into(), ECHO_PORT)));
    let _agent = start(&lab, &[]);
    // 4000 bytes: three fragments each way on 1500-byte links, the answer
    // fragmented by the backend's kernel. The backend's and the client's
    // kernels reassemble and check the UDP checksum over the whole.
    let payload: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    for vip in [ECHO_REMOTE_VIP, ECHO_LOCAL_VIP] {
        for vip in [IpAddr::from(vip), IpAddr::from(v6(vip))] {
            let (got, from) = udp_exchange(&lab.outside, SocketAddr::new(vip, 53), &payload)
                .unwrap_or_else(|e| panic!("{vip}: 4000 bytes from outside: {e}; {}", events(&lab)));
            assert_eq!(from, SocketAddr::new(vip, 53), "the answer comes from the VIP");
            assert!(got == payload, "{vip}: the echo is the datagram sent ({} bytes back)", got.len());
        }
    }
    let m = metrics(&lab);
    // Four exchanges, a first fragment each way (remote: both at XDP;
    // local: the answer's at the pod's interface), two later ones each.
    assert_eq!(event(&m, "fragment"), 8.0, "{}", events(&lab));
    assert_eq!(event(&m, "fragment_translated"), 16.0, "{}", events(&lab));
    assert_eq!(event(&m, "fragment_miss"), 0.0);
    drop(echoes);
}

/// Starts an agent on up0 (and pod0) that must fail to start: its log.
fn refused_start(node: &Netns, manifests: &std::path::Path, extra: &[&str]) -> String {
    let mut args: Vec<String> = ["run", "--manifests", &manifests.display().to_string(), "--interface", "pod0"]
        .into_iter()
        .chain(["--external-interface", "up0", "--no-pin", "--socket-lb", "off", "--socket-lb-host-namespace", "off"])
        .map(str::to_owned)
        .collect();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let mut refused = Agent::spawn(&mcs_tests::agent::agent_binary(), node, &args);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while refused.running() {
        assert!(std::time::Instant::now() < deadline, "the agent did not exit: {}", refused.logs().join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, log) = refused.stop();
    assert!(!ok, "a failed start exits non-zero");
    log.join("\n")
}

#[test]
fn a_jumbo_uplink_is_refused_native_xdp_with_the_reason_and_served_by_generic_xdp() {
    let Lab { node, outside, _pod: pod, dir, _peer_xdp: peer_xdp, _servers: servers, _cluster: cluster } = lab();
    // Jumbo frames on the uplink and to the local pod. The outside's own
    // XDP program goes first: a veth's peer cannot grow past what XDP
    // without fragments takes while one is attached.
    drop(peer_xdp);
    for (ns, dev) in [(&outside, "eth0"), (&node, "up0"), (&node, "pod0"), (&pod, "eth0")] {
        let mut set = false;
        for _ in 0..50 {
            let status = std::process::Command::new("ip")
                .args(["-n", ns.name(), "link", "set", dev, "mtu", "9000"])
                .status()
                .expect("running ip");
            if status.success() {
                set = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(set, "{dev}: MTU 9000");
    }
    let _echo = [
        echo(&pod, SocketAddr::new(LOCAL_POD.into(), ECHO_PORT)),
        echo(&pod, SocketAddr::new(v6(LOCAL_POD).into(), ECHO_PORT)),
    ];
    // Native: refused at start, naming the interface and what to do.
    let log = refused_start(&node, dir.path(), &["--xdp-mode", "native"]);
    assert!(log.contains("up0") && log.contains("MTU") && log.contains("--xdp-mode generic"), "the reason: {log}");
    // Auto: generic XDP, said in /metrics, and a jumbo datagram crosses whole.
    let _agent = Agent::start(&node, dir.path(), &["pod0".to_owned()], &["--external-interface", "up0", "--no-pin"]);
    let m = probe(&node, "/metrics").expect("/metrics answers").1;
    assert!(m.contains("mcs_agent_xdp_attached{interface=\"up0\",mode=\"generic\"} 1"), "generic XDP on up0");
    let payload: Vec<u8> = (0..8000u32).map(|i| (i % 251) as u8).collect();
    for vip in [IpAddr::from(ECHO_LOCAL_VIP), IpAddr::from(v6(ECHO_LOCAL_VIP))] {
        let (got, from) = udp_exchange(&outside, SocketAddr::new(vip, 53), &payload)
            .unwrap_or_else(|e| panic!("{vip}: 8000 bytes in one frame: {e}"));
        assert_eq!(from, SocketAddr::new(vip, 53));
        assert!(got == payload, "{vip}: the echo is the datagram sent ({} bytes back)", got.len());
    }
    // TCP, 100 kB: whatever the stack merges (GRO) before generic XDP
    // sees it leaves as it came, not answered as too big.
    for vip in [IpAddr::from(LOCAL_VIP), IpAddr::from(v6(LOCAL_VIP))] {
        let reply = big_tcp_request(&outside, SocketAddr::new(vip, 80), 100_000)
            .unwrap_or_else(|e| panic!("{vip}: 100 kB over TCP: {e}"));
        assert!(reply.starts_with("local/pod "), "{reply:?}");
    }
    let m = probe(&node, "/metrics").expect("/metrics answers").1;
    assert_eq!(event(&m, "xdp_too_big"), 0.0, "nothing answered as too big");
    assert_eq!(event(&m, "fragment"), 0.0, "one frame each way, not fragments");
    drop((servers, cluster));
    assert!(event(&m, "xdp_new_flow") >= 2.0);
}

#[test]
fn an_uplink_that_appears_after_the_start_is_served_and_released_when_it_goes() {
    let lab = lab();
    let args = ["--external-interface", "up*", "--xdp-mode", "native", "--no-pin"];
    let _agent = Agent::start(&lab.node, lab.dir.path(), &["pod0".to_owned()], &args);
    let attached = |iface: &str| {
        metrics(&lab).contains(&format!("mcs_agent_xdp_attached{{interface=\"{iface}\",mode=\"native\"}} 1"))
    };
    assert!(attached("up0") && !attached("up1"), "up0 at start, up1 not there yet");
    // A second uplink, to another outside network, after the start.
    let outside2 = Netns::new("mcs-xout2");
    forwarding(&outside2);
    veth(&lab.node, "up1", &outside2, "eth0");
    let (node2, client2) = (Ipv4Addr::new(10, 252, 0, 1), Ipv4Addr::new(10, 252, 0, 2));
    add(&lab.node, node2, 24, "up1");
    add(&outside2, client2, 24, "eth0");
    ethtool::set_tx_checksum(&outside2, "eth0", false);
    route(&outside2, Ipv4Addr::new(10, 96, 0, 0), 16, node2);
    let _peer2 = xdp_pass(&outside2, "eth0");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !attached("up1") {
        assert!(std::time::Instant::now() < deadline, "up1 never served: {}", metrics(&lab));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its client reaches a local and a remote backend, sees the VIP, and
    // the backend sees the node address. The remote backend's way is the
    // other uplink: both ways are redirected from one to the other in XDP.
    let redirected = event(&metrics(&lab), "xdp_redirect");
    for (vip, who) in [(LOCAL_VIP, "local/pod"), (REMOTE_VIP, "cluster-a/pod-")] {
        let reply = tcp_request(&outside2, SocketAddrV4::new(vip, 80))
            .unwrap_or_else(|e| panic!("{vip}:80 from behind up1: {e}; {}", events(&lab)));
        assert!(reply.identity.starts_with(who), "{reply:?}");
        assert_eq!(reply.reply_from, SocketAddr::new(vip.into(), 80), "{reply:?}");
        assert_eq!(reply.peer_seen.ip(), IpAddr::from(NODE), "{reply:?}");
        assert_eq!(reply.local.ip(), IpAddr::from(client2));
    }
    // The remote connection's SYN, SYN-ACK, request, answer and closing
    // segments, at least.
    let redirected = event(&metrics(&lab), "xdp_redirect") - redirected;
    assert!(redirected >= 6.0, "redirected between the uplinks: {redirected}; {}", events(&lab));
    // Gone: released, and up0 still served.
    lab.node.ip(&["link", "del", "up1"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while attached("up1") {
        assert!(std::time::Instant::now() < deadline, "up1 never released");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(attached("up0"));
    let reply = tcp_request(&lab.outside, SocketAddrV4::new(REMOTE_VIP, 80)).expect("up0 still serves");
    assert!(reply.identity.starts_with("cluster-a/pod-"));
}

#[test]
fn an_xdp_program_not_ours_on_the_uplink_is_never_replaced() {
    let lab = lab();
    // Another program on up0 (this crate's, loaded by another process and
    // pinned nowhere: to the agent, a CNI's).
    let foreign = xdp_pass(&lab.node, "up0");
    let log = refused_start(&lab.node, lab.dir.path(), &[]);
    assert!(
        log.contains("another XDP program is attached to up0") && log.contains("not replaced"),
        "the reason: {log}"
    );
    // Still there, and nothing of ours: traffic to a VIP is not translated.
    let shown = String::from_utf8_lossy(&lab.node.ip(&["link", "show", "up0"]).stdout).into_owned();
    assert!(shown.contains("xdp"), "the other program stays: {shown}");
    assert!(tcp_request(&lab.outside, SocketAddr::new(REMOTE_VIP.into(), 80)).is_err(), "nothing of ours serves");
    drop(foreign);
}

/// A TCP server that answers each connection's first line with `size`
/// bytes and a newline.
fn big_reply(ns: &Netns, addr: SocketAddr, size: usize) -> Serving {
    use std::io::{BufRead, Write};
    let listener =
        ns.run(move || std::net::TcpListener::bind(addr)).unwrap_or_else(|e| panic!("listening on {addr}: {e}"));
    listener.set_nonblocking(true).unwrap();
    Serving::spawn(move |stop| {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            std::thread::spawn(move || {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                if std::io::BufReader::new(&stream).read_line(&mut line).is_ok() {
                    let mut answer = vec![b'y'; size];
                    answer.push(b'\n');
                    let _ = (&stream).write_all(&answer);
                }
            });
        }
    })
}

#[test]
fn a_reply_too_big_for_the_clients_side_teaches_the_backend_its_path_mtu() {
    let lab = lab();
    // A client behind a router whose link to it carries 1400 bytes; the
    // client's own interface 1500, so it offers a 1460-byte MSS.
    //   client3 eth0 10.251.0.2 ── cl 10.251.0.1 (MTU 1400) router2 eth0 10.252.0.2 ── up1 10.252.0.1 node
    let router = Netns::new("mcs-xrt2");
    let client = Netns::new("mcs-xcl3");
    forwarding(&router);
    veth(&lab.node, "up1", &router, "eth0");
    veth(&router, "cl", &client, "eth0");
    add(&lab.node, Ipv4Addr::new(10, 252, 0, 1), 24, "up1");
    add(&router, Ipv4Addr::new(10, 252, 0, 2), 24, "eth0");
    add(&router, Ipv4Addr::new(10, 251, 0, 1), 24, "cl");
    add(&client, Ipv4Addr::new(10, 251, 0, 2), 24, "eth0");
    router.ip(&["link", "set", "cl", "mtu", "1400"]);
    ethtool::set_tx_checksum(&router, "eth0", false);
    route(&client, Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(10, 251, 0, 1));
    route(&router, Ipv4Addr::new(10, 96, 0, 0), 16, Ipv4Addr::new(10, 252, 0, 1));
    route(&lab.node, Ipv4Addr::new(10, 251, 0, 0), 24, Ipv4Addr::new(10, 252, 0, 2));
    let _router_xdp = xdp_pass(&router, "eth0");
    let mut servers: Vec<Serving> =
        REMOTE_PODS.iter().map(|ip| big_reply(&lab._cluster, SocketAddr::new((*ip).into(), 8099), 6000)).collect();
    servers.push(big_reply(&lab._pod, SocketAddr::new(LOCAL_POD.into(), 8099), 6000));
    let args = ["--external-interface", "up0", "--external-interface", "up1", "--xdp-mode", "native", "--no-pin"];
    let _agent = Agent::start(&lab.node, lab.dir.path(), &["pod0".to_owned()], &args);
    // 6000 bytes back in full-size segments: the router cannot pass them
    // on and says so to their source, the VIP, which is routed to the node.
    // A remote backend, then the local pod (the error reaches it through
    // the stack and mcs_uplink).
    for vip in [ECHO_REMOTE_VIP, ECHO_LOCAL_VIP] {
        let target = SocketAddr::new(vip.into(), 80);
        let reply = client.run(move || {
            use std::io::{BufRead, Write};
            let stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            (&stream).write_all(b"hello\n")?;
            let mut line = String::new();
            std::io::BufReader::new(&stream).read_line(&mut line)?;
            Ok::<_, std::io::Error>(line)
        });
        let reply =
            reply.unwrap_or_else(|e| panic!("{vip}: 6000 bytes back through a 1400-byte link: {e}; {}", events(&lab)));
        assert_eq!(reply.len(), 6001, "{vip}: the whole answer");
    }
    let m = metrics(&lab);
    assert!(event(&m, "xdp_icmp_rev_nat") >= 2.0, "the router's errors went to the backends: {}", events(&lab));
    drop(servers);
}
