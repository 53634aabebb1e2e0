//! Socket-level load balancing: clients in a cgroup of the test's own, real
//! TCP and UDP sockets, the agent attached to that cgroup only.
//!
//! What a user would see is asserted: who answered, the peer the
//! application sees (getpeername, recvfrom: the VIP), the client address
//! the backend sees (the pod's own), the error of a call to a frontend
//! without backends, and which path translated (the datapath's counters,
//! through `inspect stats`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use mcs_tests::{
    agent::{Agent, agent_binary, probe},
    bpffs::ScratchBpffs,
    cgroup::{HeldClient, Outcome, TestCgroup, agent_path, requests},
    manifests::{self, Port, endpoint_slice, service_import, service_import_with},
    netns::Netns,
    topology::Clusterset,
    traffic::{Server, tcp_request},
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const IMPORT_PORTS: &[Port<'static>] = &[("http", 80, "TCP"), ("dns", 53, "UDP"), ("tcp2", 4242, "TCP")];
const SLICE_PORTS: &[Port<'static>] = &[("http", 8080, "TCP"), ("dns", 5353, "UDP"), ("tcp2", 42, "TCP")];
const ECONNREFUSED: i32 = 111;

struct Lab {
    set: Clusterset,
    dir: tempfile::TempDir,
    bpffs: ScratchBpffs,
    cgroup: TestCgroup,
    /// cluster -> its pods
    pods: BTreeMap<String, Vec<Ipv4Addr>>,
    _servers: Vec<Server>,
}

/// Two clusters of two pods; the node is in cluster-a, one of whose pods is
/// not ready: with tiers `cluster,any`, cluster-a's tier takes 70 %
/// (1.4 × 1/2), cluster-b's the rest, on the TC path and here alike.
fn lab() -> Lab {
    let mut set = Clusterset::new(1, &["cluster-a", "cluster-b"]);
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    let mut pods = BTreeMap::new();
    manifests::write(dir.path(), "web.yaml", &service_import("demo", "web", VIP, IMPORT_PORTS));
    manifests::write(dir.path(), "empty.yaml", &service_import("demo", "empty", EMPTY_VIP, IMPORT_PORTS));
    let affinity = "  sessionAffinity: ClientIP\n";
    manifests::write(
        dir.path(),
        "sticky.yaml",
        &service_import_with("demo", "sticky", STICKY_VIP, IMPORT_PORTS, &[], affinity),
    );
    for cluster in &mut set.clusters {
        let (ips, serving) = cluster.add_serving_pods(2, 8080, 5353);
        servers.extend(serving);
        for (k, ip) in ips.iter().enumerate() {
            servers.push(Server::tcp(&cluster.ns, *ip, 42, &format!("{}/pod-{}:42", cluster.name, k + 1)));
        }
        let endpoints: Vec<(Ipv4Addr, bool)> =
            ips.iter().enumerate().map(|(k, ip)| (*ip, !(cluster.name == "cluster-a" && k == 1))).collect();
        for service in ["web", "sticky"] {
            let yaml = endpoint_slice("demo", service, &cluster.name, SLICE_PORTS, &endpoints);
            manifests::write(dir.path(), &format!("{service}-{}.yaml", cluster.name), &yaml);
        }
        pods.insert(cluster.name.clone(), ips);
    }
    Lab { set, dir, bpffs: ScratchBpffs::new(), cgroup: TestCgroup::new("mcs-socklb"), pods, _servers: servers }
}

impl Lab {
    fn agent(&self, extra: &[&str]) -> Agent {
        let bpffs = self.bpffs.arg();
        let cgroup = self.cgroup.agent_path();
        let mut args = vec![
            "--bpffs",
            &bpffs,
            "--cluster-id",
            "cluster-a",
            "--locality-tiers",
            "cluster,any",
            "--socket-lb-cgroup",
            &cgroup,
        ];
        if !extra.contains(&"--socket-lb") {
            args.extend(["--socket-lb", "on"]);
        }
        args.extend_from_slice(extra);
        Agent::start(&self.set.node, self.dir.path(), &self.set.client_ifaces(), &args)
    }

    fn pod(&self) -> &Netns {
        &self.set.clients[0].ns
    }

    fn pod_ip(&self) -> IpAddr {
        self.set.clients[0].ip.into()
    }

    /// `inspect stats`: datapath event -> count.
    fn events(&self) -> BTreeMap<String, u64> {
        let out = std::process::Command::new(agent_binary())
            .args(["inspect", "stats", "-o", "json", "--bpffs", &self.bpffs.arg()])
            .output()
            .expect("running mcs-agent inspect");
        assert!(out.status.success(), "inspect stats: {}", String::from_utf8_lossy(&out.stderr));
        let stats: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        stats
            .as_array()
            .expect("a list")
            .iter()
            .map(|s| (s["event"].as_str().unwrap().to_owned(), s["count"].as_u64().unwrap()))
            .collect()
    }

    /// `mcs_agent_socket_lb_attached` from /metrics.
    fn socket_lb_gauge(&self) -> String {
        let (_, body) = probe(&self.set.node, "/metrics").expect("/metrics answers");
        body.lines()
            .find(|l| l.starts_with("mcs_agent_socket_lb_attached "))
            .unwrap_or_else(|| panic!("no socket_lb_attached gauge: {body}"))
            .to_owned()
    }

    fn all_pods(&self) -> Vec<Ipv4Addr> {
        self.pods.values().flatten().copied().collect()
    }
}

fn ok(outcome: &Outcome) -> (&str, SocketAddr, SocketAddr) {
    match outcome {
        Outcome::Ok { identity, peer_seen, reply_from, .. } => (identity.as_str(), *peer_seen, *reply_from),
        Outcome::Err { errno, message } => panic!("request failed: errno {errno}: {message}"),
    }
}

/// Per answering cluster, how many answered.
fn per_cluster(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for outcome in outcomes {
        let (identity, _, _) = ok(outcome);
        *counts.entry(identity.split('/').next().unwrap().to_owned()).or_default() += 1;
    }
    counts
}

#[test]
fn a_pod_in_the_cgroup_reaches_every_ready_backend_and_sees_the_vip() {
    let lab = lab();
    let _agent = lab.agent(&[]);
    let cgroup = Some(lab.cgroup.path());
    let vip = |port| SocketAddr::new(VIP.into(), port);
    let ready = ["cluster-a/pod-1", "cluster-b/pod-1", "cluster-b/pod-2"];

    for (mode, port) in [("tcp", 80), ("udp", 53), ("udp-connected", 53)] {
        let outcomes = requests(lab.pod(), cgroup, mode, vip(port), 60);
        assert_eq!(outcomes.len(), 60);
        let mut seen: Vec<&str> = Vec::new();
        for outcome in &outcomes {
            let (identity, peer_seen, reply_from) = ok(outcome);
            // The application sees the VIP (getpeername for TCP and connected
            // UDP, recvfrom's source for unconnected UDP) ...
            assert_eq!(reply_from, vip(port), "{mode}: the peer the client sees");
            // ... and the backend sees the pod, not a translated address.
            assert_eq!(peer_seen.ip(), lab.pod_ip(), "{mode}: the client address the backend sees");
            assert!(ready.contains(&identity), "{mode}: {identity} is not a ready backend");
            if !seen.contains(&identity) {
                seen.push(identity);
            }
        }
        seen.sort();
        assert_eq!(seen, ready, "{mode}: every ready backend answers");
    }

    // Named port: tcp2/4242 reaches the pods' port 42.
    for outcome in requests(lab.pod(), cgroup, "tcp", vip(4242), 10) {
        let (identity, _, reply_from) = ok(&outcome);
        assert!(identity.ends_with(":42"), "{identity} answered on the port named tcp2");
        assert_eq!(reply_from, vip(4242));
    }

    // Translated at the socket, never again by TC: the TC path saw no new flow.
    let events = lab.events();
    assert_eq!(events["sock_connect"], 60 + 60 + 10, "TCP and connected UDP: one connect each: {events:?}");
    assert!(events["sock_sendmsg"] >= 60, "unconnected UDP: every datagram: {events:?}");
    assert!(events["sock_rev_nat"] >= 180, "getpeername and recvfrom showed the VIP: {events:?}");
    assert_eq!(events["new_flow"], 0, "the TC programs translated nothing: {events:?}");
    assert_eq!(events["rev_nat"], 0, "{events:?}");
    assert_eq!(lab.socket_lb_gauge(), "mcs_agent_socket_lb_attached 1");

    // Closed sockets took their reverse entries with them; only the
    // unconnected UDP sockets' (one per destination, left to the LRU) remain.
    let pinned = mcs_agent::datapath::pin_dir(lab.bpffs.path()).join(mcs_common::MAP_SOCK_REV);
    let data = aya::maps::MapData::from_pin(&pinned).expect("SOCK_REV is pinned");
    let map: aya::maps::HashMap<_, mcs_common::SockRevKey, mcs_common::SockRevValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("an LRU hash");
    let left = map.keys().filter(Result::is_ok).count();
    assert_eq!(left, 60, "entries left: the 60 unconnected UDP sockets', not the 130 closed connected ones");
}

#[test]
fn locality_weights_and_affinity_split_as_on_the_tc_path() {
    let lab = lab();
    let _agent = lab.agent(&[]);
    let cgroup = Some(lab.cgroup.path());
    // cluster-a 70 %, cluster-b 30 % (see `lab`). 400 connections: three
    // standard deviations of a binomial(400, 0.7) are 27, the tolerance the
    // TC path's tests use too.
    let counts = per_cluster(&requests(lab.pod(), cgroup, "tcp", SocketAddr::new(VIP.into(), 80), 400));
    let a = counts.get("cluster-a").copied().unwrap_or(0);
    assert!((280 - 27..=280 + 27).contains(&a), "cluster-a got {a} of 400, expected 280 ± 27: {counts:?}");
    eprintln!("socket LB split over 400 connections: {counts:?}");

    // ClientIP affinity: every connection of this pod goes to one backend.
    let outcomes = requests(lab.pod(), cgroup, "tcp", SocketAddr::new(STICKY_VIP.into(), 80), 30);
    let first = ok(&outcomes[0]).0.to_owned();
    assert!(outcomes.iter().all(|o| ok(o).0 == first), "affinity: all to {first}: {outcomes:?}");
    assert!(lab.events()["affinity_hit"] >= 29);
}

#[test]
fn a_frontend_without_backends_fails_at_once() {
    let lab = lab();
    let _agent = lab.agent(&[]);
    let cgroup = Some(lab.cgroup.path());
    for (mode, port) in [("tcp", 80), ("udp", 53), ("udp-connected", 53)] {
        let started = std::time::Instant::now();
        let outcomes = requests(lab.pod(), cgroup, mode, SocketAddr::new(EMPTY_VIP.into(), port), 3);
        for outcome in &outcomes {
            assert!(
                matches!(outcome, Outcome::Err { errno: ECONNREFUSED, .. }),
                "{mode} to a frontend without backends: {outcome:?}"
            );
        }
        // Refused by the call itself: no SYN retries, no read timeout (2 s).
        assert!(started.elapsed().as_millis() < 1500, "{mode} took {:?}", started.elapsed());
    }
    assert!(lab.events()["sock_refused"] >= 9);
}

#[test]
fn host_network_clients_reach_the_vip() {
    let lab = lab();
    let _agent = lab.agent(&[]);
    // A process in the node's own namespace (hostNetwork pods, node daemons):
    // no TC program is on its path, only the socket hooks.
    let node = &lab.set.node;
    let cgroup = Some(lab.cgroup.path());
    for (mode, port) in [("tcp", 80), ("udp", 53), ("udp-connected", 53)] {
        let outcomes = requests(node, cgroup, mode, SocketAddr::new(VIP.into(), port), 20);
        for outcome in &outcomes {
            let (identity, peer_seen, reply_from) = ok(outcome);
            assert_eq!(reply_from, SocketAddr::new(VIP.into(), port), "{mode} from the node");
            assert!(identity.starts_with("cluster-"), "{identity}");
            assert!(!lab.all_pods().iter().any(|p| IpAddr::from(*p) == peer_seen.ip()));
        }
    }
    // Outside the cgroup the same process is not translated: a VIP is not
    // routed anywhere in this lab.
    let outside = requests(node, None, "tcp", SocketAddr::new(VIP.into(), 80), 1);
    assert!(matches!(outside[0], Outcome::Err { .. }), "{outside:?}");
}

#[test]
fn an_excluded_cgroup_is_left_to_the_tc_path() {
    let lab = lab();
    let mesh = lab.cgroup.child("mesh");
    let excluded = agent_path(&mesh);
    let _agent = lab.agent(&["--socket-lb-exclude-cgroup", &excluded]);
    let outcomes = requests(lab.pod(), Some(&mesh), "tcp", SocketAddr::new(VIP.into(), 80), 10);
    for outcome in &outcomes {
        assert_eq!(ok(outcome).2, SocketAddr::new(VIP.into(), 80));
    }
    let events = lab.events();
    assert_eq!(events["sock_connect"], 0, "{events:?}");
    assert_eq!(events["sock_excluded"], 10, "{events:?}");
    assert_eq!(events["new_flow"], 10, "the TC path translated them: {events:?}");
}

#[test]
fn off_leaves_pods_to_the_tc_path_and_still_serves_the_node() {
    let lab = lab();
    let agent = lab.agent(&[]);
    let cgroup = Some(lab.cgroup.path());
    let vip = SocketAddr::new(VIP.into(), 80);
    ok(&requests(lab.pod(), cgroup, "tcp", vip, 1)[0]);
    // A stopped agent leaves socket LB attached (pinned) like the TC hooks.
    let (clean, _) = agent.stop();
    assert!(clean);
    ok(&requests(lab.pod(), cgroup, "tcp", vip, 1)[0]);
    let before = lab.events();
    assert_eq!(before["sock_connect"], 2, "{before:?}");

    // Off: pods go through TC; the node's own namespace, which no TC
    // program sees, is still translated at the socket.
    let agent = lab.agent(&["--socket-lb", "off"]);
    let reply = tcp_request(lab.pod(), vip).expect("TC path");
    assert_eq!(reply.reply_from, vip);
    let outcomes = requests(lab.pod(), cgroup, "tcp", vip, 5);
    outcomes.iter().for_each(|o| assert_eq!(ok(o).2, vip));
    let after = lab.events();
    assert_eq!(after["sock_connect"], 2, "off: no socket translation for pods: {after:?}");
    assert!(after["new_flow"] >= 6, "{after:?}");
    for (mode, port) in [("tcp", 80), ("udp", 53)] {
        let target = SocketAddr::new(VIP.into(), port);
        for outcome in requests(&lab.set.node, cgroup, mode, target, 5) {
            assert_eq!(ok(&outcome).2, target, "{mode} from the node with --socket-lb off");
        }
    }
    assert_eq!(lab.events()["sock_connect"], 2 + 5, "the node's TCP connects were translated at the socket");
    assert_eq!(lab.socket_lb_gauge(), "mcs_agent_socket_lb_attached 0", "off for pods");
    drop(agent);

    // And entirely off: the socket programs are gone, the node cannot reach the VIP.
    let _agent = lab.agent(&["--socket-lb", "off", "--socket-lb-host-namespace", "off"]);
    let outcome = &requests(&lab.set.node, cgroup, "tcp", vip, 1)[0];
    assert!(matches!(outcome, Outcome::Err { .. }), "{outcome:?}");
    ok(&requests(lab.pod(), cgroup, "tcp", vip, 1)[0]);
}

#[test]
fn a_connected_udp_socket_to_a_removed_backend_is_ended_and_the_next_reaches_a_live_one() {
    let lab = lab();
    let agent = lab.agent(&[]);
    let target = SocketAddr::new(VIP.into(), 53);
    let mut clients: Vec<HeldClient> =
        (0..12).map(|_| HeldClient::start(lab.pod(), Some(lab.cgroup.path()), "udp-connected", target)).collect();
    let firsts: Vec<String> = clients.iter_mut().map(|c| ok(&c.request()).0.to_owned()).collect();
    for (client, first) in clients.iter_mut().zip(&firsts) {
        assert_eq!(ok(&client.request()).0, first, "a connected socket stays on its backend");
    }
    // cluster-a's ready pod (70 % of sockets) leaves the service; its
    // not-ready one stays listed.
    let removed = firsts.iter().filter(|f| *f == "cluster-a/pod-1").count();
    assert!(removed > 0, "no socket went to cluster-a/pod-1 ({firsts:?}): the lab's weights changed");
    let generation = agent.generation();
    let kept: Vec<(Ipv4Addr, bool)> = vec![(lab.pods["cluster-a"][1], false)];
    manifests::write(
        lab.dir.path(),
        "web-cluster-a.yaml",
        &endpoint_slice("demo", "web", "cluster-a", SLICE_PORTS, &kept),
    );
    let mut agent = agent;
    agent.wait_reconciled_after(generation);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut ended = 0;
    for (client, first) in clients.iter_mut().zip(&firsts) {
        let outcome = client.request();
        if first == "cluster-a/pod-1" {
            assert!(matches!(outcome, Outcome::Err { .. }), "the socket to the removed pod is ended: {outcome:?}");
            ended += 1;
            // The application's next socket reaches a live backend.
            let next = client.request();
            let (identity, _, reply_from) = ok(&next);
            assert!(identity.starts_with("cluster-b/"), "{identity}");
            assert_eq!(reply_from, target);
        } else {
            assert_eq!(ok(&outcome).0, first, "sockets to backends still in the service are left alone");
        }
    }
    assert_eq!(ended, removed);
}

const VIP6_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);

/// An IPv6-only import `demo/six` (http 80 → 8080, dns 53 → 5353) on these endpoints.
fn six_manifest(endpoints: &[std::net::Ipv6Addr]) -> String {
    let vip6 = mcs_tests::topology::v6(VIP6_V4);
    let ready: Vec<String> = endpoints.iter().map(|ip| format!("{{addresses: [\"{ip}\"]}}")).collect();
    format!(
        r#"apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {{name: six, namespace: demo}}
spec: {{type: ClusterSetIP, ips: ["{vip6}"], ipFamilies: [IPv6], ports: [{{name: http, port: 80, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: six-all
  namespace: demo
  labels: {{multicluster.kubernetes.io/service-name: six, multicluster.kubernetes.io/source-cluster: cluster-b}}
addressType: IPv6
ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints: [{}]
"#,
        ready.join(", ")
    )
}

#[test]
fn ipv6_and_ipv4_mapped_sockets_are_translated_too() {
    use mcs_tests::topology::v6;
    let lab = lab();
    let vip6 = v6(VIP6_V4);
    let pods: Vec<_> = lab.all_pods().iter().map(|ip| v6(*ip)).collect();
    manifests::write(lab.dir.path(), "six.yaml", &six_manifest(&pods));
    let _agent = lab.agent(&[]);
    let cgroup = Some(lab.cgroup.path());
    let pod6 = IpAddr::from(v6(lab.set.clients[0].ip));
    for (mode, port) in [("tcp", 80), ("udp", 53), ("udp-connected", 53)] {
        let target = SocketAddr::new(vip6.into(), port);
        let outcomes = requests(lab.pod(), cgroup, mode, target, 20);
        for outcome in &outcomes {
            let (identity, peer_seen, reply_from) = ok(outcome);
            assert_eq!(reply_from, target, "{mode} over IPv6");
            assert_eq!(peer_seen.ip(), pod6, "{mode}: the backend sees the pod's IPv6 address");
            assert!(identity.starts_with("cluster-"), "{identity}");
        }
    }
    // A dual-stack (AF_INET6) socket dialing the IPv4 VIP as ::ffff:a.b.c.d.
    let mapped = SocketAddr::new(VIP.to_ipv6_mapped().into(), 80);
    for outcome in requests(lab.pod(), cgroup, "tcp", mapped, 10) {
        let (_, peer_seen, reply_from) = ok(&outcome);
        assert_eq!(reply_from, mapped, "getpeername shows the mapped VIP");
        assert_eq!(peer_seen.ip(), lab.pod_ip());
    }
    let events = lab.events();
    assert_eq!(events["new_flow"], 0, "all at the socket: {events:?}");
}

#[test]
fn a_layout_bump_carries_ipv6_flows_and_socket_translations() {
    use mcs_tests::{topology::v6, traffic::Connection};
    let lab = lab();
    let vip6 = v6(VIP6_V4);
    let pods: Vec<_> = lab.all_pods().iter().map(|ip| v6(*ip)).collect();
    manifests::write(lab.dir.path(), "six.yaml", &six_manifest(&pods));
    let agent = lab.agent(&[]);
    // Through TC (this thread is not in the cgroup): an IPv6 connection held open.
    let mut held = Connection::open(lab.pod(), SocketAddr::new(vip6.into(), 80)).expect("IPv6 through the VIP");
    let before = held.request().expect("first request");
    // At the socket: a connected UDP socket held open.
    let dns = SocketAddr::new(VIP.into(), 53);
    let mut udp = HeldClient::start(lab.pod(), Some(lab.cgroup.path()), "udp-connected", dns);
    let udp_before = udp.request();
    assert_eq!(ok(&udp_before).2, dns);

    let (clean, _) = agent.stop();
    assert!(clean);
    // Eight more endpoints (addresses nobody answers on): a flow the new
    // layout did not carry would be selected afresh, most likely onto one of
    // them, and break. A carried flow stays pinned to its backend.
    let mut more = pods.clone();
    more.extend((100..108).map(|k| v6(Ipv4Addr::new(10, 10, 0, k))));
    manifests::write(lab.dir.path(), "six.yaml", &six_manifest(&more));
    let next = (mcs_common::LAYOUT_VERSION + 1).to_string();
    let _agent = lab.agent(&["--layout-version", &next]);
    let old = mcs_agent::datapath::pin_dir(lab.bpffs.path());
    assert!(!old.exists(), "the old layout is retired");

    let after = held.request().expect("the IPv6 connection survives the layout bump");
    assert_eq!(after.identity, before.identity, "on the same backend");
    assert_eq!(after.reply_from, before.reply_from);
    let udp_after = udp.request();
    assert_eq!(ok(&udp_after).0, ok(&udp_before).0, "the UDP socket stays on its backend");
    assert_eq!(ok(&udp_after).2, dns, "and still sees the VIP as its peer");
}

/// The `web` import (port 80, TCP) over `pods` (8080) in cluster-a, and an
/// agent balancing it at the socket for a cgroup of the test's own.
struct WebAtSocket {
    // Declared first, dropped first: the agent stops before its cgroup and
    // bpffs go.
    _agent: Agent,
    bpffs: ScratchBpffs,
    cgroup: TestCgroup,
}

impl WebAtSocket {
    fn start(set: &Clusterset, dir: &std::path::Path, pods: &[Ipv4Addr], cgroup: &str) -> Self {
        manifests::write(dir, "web.yaml", &service_import("demo", "web", VIP, &[("http", 80, "TCP")]));
        let endpoints: Vec<(Ipv4Addr, bool)> = pods.iter().map(|ip| (*ip, true)).collect();
        manifests::write(
            dir,
            "slice.yaml",
            &endpoint_slice("demo", "web", "cluster-a", &[("http", 8080, "TCP")], &endpoints),
        );
        let cgroup = TestCgroup::new(cgroup);
        let bpffs = ScratchBpffs::new();
        let (cg, fs) = (cgroup.agent_path(), bpffs.arg());
        let agent = Agent::start(
            &set.node,
            dir,
            &set.client_ifaces(),
            &["--bpffs", &fs, "--socket-lb", "on", "--socket-lb-cgroup", &cg],
        );
        Self { _agent: agent, bpffs, cgroup }
    }
}

#[test]
fn passive_health_sees_connections_made_at_the_socket() {
    // One cluster of three pods; the third answers nothing on 8080 (refused).
    let mut set = Clusterset::new(1, &["cluster-a"]);
    let dir = tempfile::tempdir().unwrap();
    let cluster = &mut set.clusters[0];
    let pods: Vec<Ipv4Addr> = (0..3).map(|_| cluster.add_pod()).collect();
    let _servers: Vec<Server> = pods[..2]
        .iter()
        .enumerate()
        .map(|(k, ip)| Server::tcp(&cluster.ns, *ip, 8080, &format!("cluster-a/pod-{}", k + 1)))
        .collect();
    let lab = WebAtSocket::start(&set, dir.path(), &pods, "mcs-sockhealth");
    let cgroup = &lab.cgroup;
    let target = SocketAddr::new(VIP.into(), 80);
    // One of three may be out (the 50 % limit): the gauge counts the cluster's.
    let ejected = |body: &str| body.lines().any(|l| l.starts_with("mcs_agent_backend_ejected{") && l.ends_with(" 1"));
    // Connections at the socket, some refused by the dead pod, until the
    // agent ejects it (its SYNs never reach a TC program).
    let started = std::time::Instant::now();
    let mut refused = 0;
    loop {
        refused += requests(&set.clients[0].ns, Some(cgroup.path()), "tcp", target, 10)
            .iter()
            .filter(|o| matches!(o, Outcome::Err { .. }))
            .count();
        let (_, body) = probe(&set.node, "/metrics").expect("/metrics");
        if ejected(&body) {
            break;
        }
        assert!(started.elapsed().as_secs() < 20, "the refusing pod was never ejected ({refused} refused):\n{body}");
    }
    assert!(refused >= 5, "ejected after {refused} refusals: the threshold is 5 in a row");
    // Ejected: new connections go to the live pods only.
    let after = requests(&set.clients[0].ns, Some(cgroup.path()), "tcp", target, 40);
    assert!(after.iter().all(|o| matches!(o, Outcome::Ok { .. })), "{after:?}");
}

#[test]
fn a_socket_translated_at_connect_has_no_state_callbacks_past_its_handshake() {
    use aya::{
        programs::{
            links::{FdLink, PinnedLink},
            loaded_programs,
        },
        sys::{Stats, enable_stats},
    };
    // One pod; the same connections to its address and to the VIP.
    let mut set = Clusterset::new(1, &["cluster-a"]);
    let dir = tempfile::tempdir().unwrap();
    let cluster = &mut set.clusters[0];
    let pod = cluster.add_pod();
    let _server = Server::tcp(&cluster.ns, pod, 8080, "cluster-a/pod-1");
    let lab = WebAtSocket::start(&set, dir.path(), &[pod], "mcs-sockcb");
    let (cgroup, bpffs) = (&lab.cgroup, &lab.bpffs);
    // This agent's sock_ops program (other tests' agents load their own).
    let pin =
        mcs_agent::datapath::pin_dir(bpffs.path()).join("links/cgroup").join(mcs_common::SockHook::Ops.pin_name());
    let link = PinnedLink::from_pin(&pin).unwrap_or_else(|e| panic!("the sock_ops link at {}: {e}", pin.display()));
    let program = FdLink::from(link).info().expect("the sock_ops link's info").program_id();
    let _stats = enable_stats(Stats::RunTime).expect("BPF_ENABLE_STATS: run counts");
    let runs = || {
        loaded_programs()
            .flatten()
            .find(|p| p.id() == program)
            .map(|p| p.run_count())
            .expect("the agent's sock_ops program is loaded")
    };
    const CONNECTIONS: usize = 40;
    let per_connection = |target: SocketAddr| {
        let before = runs();
        let outcomes = requests(&set.clients[0].ns, Some(cgroup.path()), "tcp", target, CONNECTIONS);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Ok { .. })), "{target}: {outcomes:?}");
        // A closed socket's last state changes may come after the client exits.
        std::thread::sleep(std::time::Duration::from_millis(500));
        (runs() - before) as f64 / CONNECTIONS as f64
    };
    let direct = per_connection(SocketAddr::new(pod.into(), 8080));
    let translated = per_connection(SocketAddr::new(VIP.into(), 80));
    // One more than a direct connection: the change to ESTABLISHED comes
    // before the program can turn the callbacks off. Left on, they added
    // four (FIN_WAIT1, FIN_WAIT2 and CLOSE too).
    assert!(
        (translated - direct - 1.0).abs() < 0.25,
        "sock_ops runs per connection: {translated} through the VIP, {direct} to the pod's address"
    );
}
