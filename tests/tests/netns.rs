//! The whole agent, driven through its CLI, with real TCP and UDP sockets in
//! a flat clusterset built from network namespaces (see `mcs_tests::topology`).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use aya::programs::{SchedClassifier, TcAttachType};
use mcs_tests::{
    agent::Agent,
    manifests::{self, Port, endpoint_slice, service_import},
    netns::Netns,
    topology::Clusterset,
    traffic::{Connection, Reply, Server, tcp_request, udp_request},
};
use tempfile::TempDir;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const IMPORT_PORTS: &[Port<'static>] = &[("http", 80, "TCP"), ("dns", 53, "UDP"), ("tcp2", 4242, "TCP")];
const SLICE_PORTS: &[Port<'static>] = &[("http", 8080, "TCP"), ("dns", 5353, "UDP"), ("tcp2", 42, "TCP")];

/// A clusterset with backends serving `web` on every port, and an agent.
struct Lab {
    set: Clusterset,
    dir: TempDir,
    /// cluster name -> its pods' IPs
    pods: BTreeMap<String, Vec<Ipv4Addr>>,
    _servers: Vec<Server>,
}

impl Lab {
    /// `pods_per_cluster`: e.g. `&[("cluster-a", 2), ("cluster-b", 1)]`.
    fn new(pods_per_cluster: &[(&str, usize)]) -> Self {
        let names: Vec<&str> = pods_per_cluster.iter().map(|(n, _)| *n).collect();
        let mut set = Clusterset::new(1, &names);
        let mut pods = BTreeMap::new();
        let mut servers = Vec::new();
        for (cluster, &(_, count)) in set.clusters.iter_mut().zip(pods_per_cluster) {
            let mut ips = Vec::new();
            for k in 1..=count {
                let ip = cluster.add_pod();
                let id = format!("{}/pod-{k}", cluster.name);
                servers.push(Server::tcp(&cluster.ns, ip, 8080, &id));
                servers.push(Server::tcp(&cluster.ns, ip, 42, &format!("{id}:42")));
                servers.push(Server::udp(&cluster.ns, ip, 5353, &id));
                ips.push(ip);
            }
            pods.insert(cluster.name.clone(), ips);
        }
        let lab = Self { set, dir: tempfile::tempdir().expect("tempdir"), pods, _servers: servers };
        lab.write_import();
        for cluster in lab.pods.keys() {
            lab.write_slice(cluster, &[]);
        }
        lab
    }

    fn write_import(&self) {
        manifests::write(self.dir.path(), "web-import.yaml", &service_import("demo", "web", VIP, IMPORT_PORTS));
    }

    /// Writes `cluster`'s slice with all its pods, those in `not_ready` marked unready.
    fn write_slice(&self, cluster: &str, not_ready: &[Ipv4Addr]) {
        let endpoints: Vec<(Ipv4Addr, bool)> =
            self.pods[cluster].iter().map(|ip| (*ip, !not_ready.contains(ip))).collect();
        let yaml = endpoint_slice("demo", "web", cluster, SLICE_PORTS, &endpoints);
        manifests::write(self.dir.path(), &format!("web-{cluster}.yaml"), &yaml);
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        Agent::start(&self.set.node, self.dir.path(), &self.set.client_ifaces(), extra)
    }

    fn client(&self) -> &Netns {
        &self.set.clients[0].ns
    }

    fn client_ip(&self) -> Ipv4Addr {
        self.set.clients[0].ip
    }

    fn all_pods(&self) -> usize {
        self.pods.values().map(Vec::len).sum()
    }
}

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

/// TCX programs of ours still attached to `iface` in `ns`.
fn tcx_programs(ns: &Netns, iface: &'static str) -> Vec<String> {
    ns.run(move || {
        let mut names = Vec::new();
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, programs) = SchedClassifier::query_tcx(iface, attach_type).expect("query_tcx");
            names.extend(programs.iter().filter_map(|p| p.name_as_str().map(str::to_owned)));
        }
        names
    })
}

fn netlink_filters(ns: &Netns, iface: &str) -> String {
    let mut out = String::new();
    for dir in ["ingress", "egress"] {
        let listing = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), "tc", "filter", "show", "dev", iface, dir])
            .output()
            .expect("tc");
        out.push_str(&String::from_utf8_lossy(&listing.stdout));
    }
    out
}

#[test]
fn tcp_and_udp_through_the_vip_reach_every_ready_backend_as_the_vip() {
    let lab = Lab::new(&[("cluster-a", 2), ("cluster-b", 2)]);
    let agent = lab.agent(&[]);
    assert!(
        agent.logs().iter().any(|l| l.contains("mounted one of our own")),
        "the agent mounts bpffs inside `ip netns exec`"
    );
    let client_ip = lab.client_ip();

    let mut tcp_seen = BTreeSet::new();
    for _ in 0..80 {
        let reply = tcp_request(lab.client(), vip(80)).expect("TCP through the VIP");
        assert_eq!(reply.reply_from, SocketAddr::V4(vip(80)), "getpeername must be the VIP");
        assert_eq!(reply.peer_seen.ip(), client_ip, "the backend sees the client's own IP");
        assert_eq!(reply.peer_seen.port(), reply.local.port(), "and its own port");
        tcp_seen.insert(reply.identity);
    }
    assert_eq!(tcp_seen.len(), lab.all_pods(), "every ready backend answers: {tcp_seen:?}");
    assert!(
        tcp_seen.iter().any(|id| id.starts_with("cluster-a")) && tcp_seen.iter().any(|id| id.starts_with("cluster-b"))
    );

    let mut udp_seen = BTreeSet::new();
    for _ in 0..80 {
        let reply = udp_request(lab.client(), vip(53)).expect("UDP through the VIP");
        assert_eq!(reply.reply_from, SocketAddr::V4(vip(53)), "the reply's source must be the VIP");
        assert_eq!(reply.peer_seen.ip(), client_ip);
        udp_seen.insert(reply.identity);
    }
    assert_eq!(udp_seen.len(), lab.all_pods(), "{udp_seen:?}");

    // Named port: VIP tcp2/4242 maps to the slices' tcp2, pod port 42.
    for _ in 0..10 {
        let reply = tcp_request(lab.client(), vip(4242)).expect("tcp2 through the VIP");
        assert!(reply.identity.ends_with(":42"), "{}", reply.identity);
        assert_eq!(reply.reply_from, SocketAddr::V4(vip(4242)));
    }
    // Kept-alive connection: many requests, one backend.
    let mut conn = Connection::open(lab.client(), vip(80)).unwrap();
    let first = conn.request().unwrap().identity;
    for _ in 0..50 {
        assert_eq!(conn.request().unwrap().identity, first);
    }
    drop(conn);

    assert_eq!(tcx_programs(&lab.set.node, "pod0"), ["mcs_ingress", "mcs_egress"]);
    for (path, want) in [("/readyz", "200 OK"), ("/healthz", "200 OK"), ("/nope", "404")] {
        let response = lab.set.node.run(move || {
            let mut stream = std::net::TcpStream::connect("127.0.0.1:9878").expect("health endpoint");
            write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
        });
        assert!(response.starts_with(&format!("HTTP/1.1 {want}")), "{path}: {response}");
    }
    let (clean_exit, logs) = agent.stop();
    assert!(clean_exit, "SIGTERM must end the agent with status 0:\n{}", logs.join("\n"));
    assert!(tcx_programs(&lab.set.node, "pod0").is_empty(), "nothing stays attached after a normal stop");
    let stopped = logs.iter().find(|l| l.contains("stopped")).expect("final counters");
    assert!(stopped.contains(" rev_nat=") && !stopped.contains(" new_flow=0 "), "{stopped}");
}

#[test]
fn a_removed_endpoint_gets_no_new_connections_while_an_open_one_keeps_working() {
    let lab = Lab::new(&[("cluster-a", 1), ("cluster-b", 1)]);
    let mut agent = lab.agent(&[]);
    let leaving = lab.pods["cluster-a"][0];

    // An open connection to the backend that is about to leave.
    let mut kept = None;
    for _ in 0..64 {
        let mut conn = Connection::open(lab.client(), vip(80)).unwrap();
        if conn.request().unwrap().identity == "cluster-a/pod-1" {
            kept = Some(conn);
            break;
        }
    }
    let mut kept = kept.expect("some connection must land on cluster-a/pod-1");

    let generation = agent.generation();
    lab.write_slice("cluster-a", &[leaving]);
    agent.wait_reconciled_after(generation);

    for _ in 0..60 {
        let reply = tcp_request(lab.client(), vip(80)).unwrap();
        assert_eq!(reply.identity, "cluster-b/pod-1", "an unready endpoint must get no new connection");
    }
    for _ in 0..30 {
        let reply = udp_request(lab.client(), vip(53)).unwrap();
        assert_eq!(reply.identity, "cluster-b/pod-1", "nor new UDP flows");
    }
    for _ in 0..10 {
        let reply = kept.request().expect("the established connection keeps working");
        assert_eq!(reply.identity, "cluster-a/pod-1");
        assert_eq!(reply.reply_from, SocketAddr::V4(vip(80)));
    }

    // Back to ready: it serves new connections again.
    let generation = agent.generation();
    lab.write_slice("cluster-a", &[]);
    agent.wait_reconciled_after(generation);
    let seen: BTreeSet<String> = (0..40).map(|_| tcp_request(lab.client(), vip(80)).unwrap().identity).collect();
    assert!(seen.contains("cluster-a/pod-1"), "{seen:?}");
}

#[test]
fn a_deleted_service_import_makes_the_vip_unreachable() {
    let lab = Lab::new(&[("cluster-a", 1), ("cluster-b", 1)]);
    let mut agent = lab.agent(&[]);
    tcp_request(lab.client(), vip(80)).expect("served before the delete");
    let generation = agent.generation();
    manifests::remove(lab.dir.path(), "web-import.yaml");
    agent.wait_reconciled_after(generation);
    assert!(tcp_request(lab.client(), vip(80)).is_err(), "the VIP must stop answering TCP");
    assert!(udp_request(lab.client(), vip(53)).is_err(), "and UDP");

    let generation = agent.generation();
    lab.write_import();
    agent.wait_reconciled_after(generation);
    tcp_request(lab.client(), vip(80)).expect("served again once re-imported");
}

#[test]
fn invalid_objects_are_reported_by_file_object_and_field_and_the_rest_keeps_working() {
    let lab = Lab::new(&[("cluster-a", 1)]);
    let other_vip = Ipv4Addr::new(10, 96, 0, 11);
    let bad = service_import("demo", "broken", other_vip, &[("http", 80, "TCP")]).replace("port: 80", "port: 70000");
    manifests::write(lab.dir.path(), "broken.yaml", &bad);
    manifests::write(lab.dir.path(), "garbage.yaml", "kind: [unclosed\n");
    let mut agent = lab.agent(&[]);
    let logs = agent.logs().join("\n");
    assert!(
        logs.contains("broken.yaml (document 1): ServiceImport demo/broken: spec.ports[0].port: 70000 is out of range"),
        "{logs}"
    );
    assert!(logs.contains("garbage.yaml (document 1): invalid YAML"), "{logs}");
    tcp_request(lab.client(), vip(80)).expect("the valid import is served");

    // Fixing the file brings the import in, using web's endpoints.
    let generation = agent.generation();
    let fixed = service_import("demo", "web2", other_vip, &[("http", 80, "TCP")]);
    manifests::write(lab.dir.path(), "broken.yaml", &fixed);
    agent.wait_reconciled_after(generation);
    let fixed_slice = endpoint_slice("demo", "web2", "cluster-a", SLICE_PORTS, &[(lab.pods["cluster-a"][0], true)]);
    let generation = agent.generation();
    manifests::write(lab.dir.path(), "web2-slice.yaml", &fixed_slice);
    agent.wait_reconciled_after(generation);
    let reply = tcp_request(lab.client(), SocketAddrV4::new(other_vip, 80)).expect("the fixed import is served");
    assert_eq!(reply.reply_from, SocketAddr::V4(SocketAddrV4::new(other_vip, 80)));
}

#[test]
fn netlink_attach_serves_and_a_crashed_agents_filters_are_removed_at_start() {
    let lab = Lab::new(&[("cluster-a", 1), ("cluster-b", 1)]);
    let agent = lab.agent(&["--attach", "netlink"]);
    let reply = tcp_request(lab.client(), vip(80)).expect("served through netlink clsact filters");
    assert_eq!(reply.reply_from, SocketAddr::V4(vip(80)));
    agent.crash();
    let filters = netlink_filters(&lab.set.node, "pod0");
    assert!(filters.contains("mcs_ingress") && filters.contains("mcs_egress"), "a crash leaves filters: {filters}");

    // While no agent runs, the import goes away. A stale filter would keep
    // translating with its stale maps and the VIP would keep answering.
    manifests::remove(lab.dir.path(), "web-import.yaml");
    let agent = lab.agent(&["--attach", "tcx"]);
    let logs = agent.logs().join("\n");
    assert!(logs.contains("removed a stale netlink filter"), "{logs}");
    assert!(!netlink_filters(&lab.set.node, "pod0").contains("mcs_"));
    assert!(tcp_request(lab.client(), vip(80)).is_err(), "the deleted import must not be served by a stale program");
    let (clean, _) = agent.stop();
    assert!(clean);
    assert!(tcx_programs(&lab.set.node, "pod0").is_empty());
}

#[test]
fn an_unknown_interface_is_a_clear_error() {
    let lab = Lab::new(&[("cluster-a", 1)]);
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", lab.set.node.name()])
        .arg(mcs_tests::agent::agent_binary())
        .args(["run", "--manifests"])
        .arg(lab.dir.path())
        .args(["--interface", "nope0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--interface nope0") && stderr.contains("no such interface"), "{stderr}");
    assert!(tcx_programs(&lab.set.node, "pod0").is_empty(), "nothing half-attached");
}

#[test]
fn a_stale_tcx_link_of_ours_held_elsewhere_is_detached_at_start() {
    use aya::programs::{LinkOrder, tc::TcAttachOptions};
    let lab = Lab::new(&[("cluster-a", 1)]);
    // Another process's copy of our ingress program, attached first in line and
    // kept attached by a link this test holds, as a wedged or pinned one would be.
    let stale = lab.set.node.run(|| {
        let mut ebpf = aya::Ebpf::load(mcs_agent::datapath::OBJECT).expect("load");
        let prog: &mut SchedClassifier = ebpf.program_mut("mcs_ingress").unwrap().try_into().unwrap();
        prog.load().unwrap();
        let id = prog
            .attach_with_options("pod0", TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::first()))
            .unwrap();
        let link = prog.take_link(id).unwrap();
        (ebpf, link)
    });
    assert_eq!(tcx_programs(&lab.set.node, "pod0"), ["mcs_ingress"]);

    let agent = lab.agent(&[]);
    let logs = agent.logs().join("\n");
    assert!(logs.contains("detached a stale TCX link"), "{logs}");
    assert_eq!(
        tcx_programs(&lab.set.node, "pod0"),
        ["mcs_ingress", "mcs_egress"],
        "only the agent's own programs remain"
    );
    tcp_request(lab.client(), vip(80)).expect("served by the live agent");
    drop(agent);
    drop(stale);
    assert!(tcx_programs(&lab.set.node, "pod0").is_empty());
}

#[test]
fn capacity_limits_are_reported_and_what_fits_is_served() {
    let lab = Lab::new(&[("cluster-a", 1)]);
    // Three frontends (80, 53, 4242) but room for two.
    let agent = lab.agent(&["--max-services", "2"]);
    let logs = agent.logs().join("\n");
    assert!(logs.contains("ServiceImport demo/web frontend 10.96.0.10:4242/TCP: not programmed"), "{logs}");
    assert!(logs.contains("raise --max-services"), "{logs}");
    tcp_request(lab.client(), vip(80)).expect("port 80 fits and is served");
    udp_request(lab.client(), vip(53)).expect("port 53 fits and is served");
    assert!(tcp_request(lab.client(), vip(4242)).is_err());
}

#[test]
fn pods_created_after_the_agent_starts_are_served_and_gone_ones_forgotten() {
    let mut lab = Lab::new(&[("cluster-a", 1)]);
    // pod0 is also named explicitly: discovering it must not re-attach it.
    let mut agent = Agent::start(&lab.set.node, lab.dir.path(), &["pod0".into()], &["--interface-pattern", "pod*"]);
    tcp_request(lab.client(), vip(80)).expect("the pod present at start is served");

    let (late_ns, late_ip) = {
        let client = lab.set.add_client();
        (client.ns.name().to_owned(), client.ip)
    };
    agent.wait_for(|l| l.contains("attached") && l.contains("\"pod1\""), std::time::Duration::from_secs(5));
    let late = &lab.set.clients[1].ns;
    assert_eq!(late.name(), late_ns);
    let reply = tcp_request(late, vip(80)).expect("a pod created after start is served");
    assert_eq!(reply.reply_from, SocketAddr::V4(vip(80)));
    assert_eq!(reply.peer_seen.ip(), late_ip);
    assert_eq!(tcx_programs(&lab.set.node, "pod1"), ["mcs_ingress", "mcs_egress"]);

    // The pod goes away with its veth: the agent forgets the interface.
    drop(lab.set.clients.pop());
    agent.wait_for(|l| l.contains("interface gone") && l.contains("pod1"), std::time::Duration::from_secs(5));
    tcp_request(lab.client(), vip(80)).expect("the remaining pod is still served");
    let (clean, logs) = agent.stop();
    assert!(clean);
    let pod0 = logs.iter().filter(|l| l.contains(" attached") && l.contains("\"pod0\"")).count();
    assert_eq!(pod0, 1, "pod0 attached once, never detached and re-attached:\n{}", logs.join("\n"));
}

#[test]
fn a_burst_of_a_thousand_changes_becomes_a_few_reconciles() {
    let lab = Lab::new(&[("cluster-a", 2)]);
    let mut agent = lab.agent(&[]);
    let before = agent.generation();
    let flapping = lab.pods["cluster-a"][1];
    // Ends with the flapping pod unready, so the burst as a whole is a change.
    for i in 1..=1000 {
        let not_ready: &[Ipv4Addr] = if i % 2 == 0 { &[flapping] } else { &[] };
        lab.write_slice("cluster-a", not_ready);
    }
    agent.wait_reconciled_after(before);
    std::thread::sleep(std::time::Duration::from_millis(600));
    let passes = agent.generation() - before;
    println!("1000 manifest writes became {passes} map diffs");
    assert!(passes <= 20, "{passes} map diffs for one burst: the changes were not debounced");
    let seen: BTreeSet<String> = (0..40).map(|_| tcp_request(lab.client(), vip(80)).unwrap().identity).collect();
    assert_eq!(seen, BTreeSet::from(["cluster-a/pod-1".to_owned()]), "the datapath holds the final state");
}

#[test]
fn a_direct_connection_from_a_port_that_once_used_the_vip_is_not_rewritten() {
    use socket2::{Domain, Socket, Type};
    let lab = Lab::new(&[("cluster-a", 1)]);
    let _agent = lab.agent(&[]);
    let pod = lab.pods["cluster-a"][0];
    let port = 47123;
    let connect_from = |target: SocketAddrV4| {
        lab.client().run(move || -> std::io::Result<Reply> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())?;
            socket.connect_timeout(&SocketAddr::V4(target).into(), std::time::Duration::from_secs(2))?;
            let mut stream: std::net::TcpStream = socket.into();
            stream.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
            stream.write_all(b"hello\n")?;
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stream.try_clone()?), &mut line)?;
            let (identity, _) = line.split_once(' ').unwrap_or_default();
            Ok(Reply {
                identity: identity.to_owned(),
                peer_seen: stream.local_addr()?,
                reply_from: stream.peer_addr()?,
                local: stream.local_addr()?,
            })
        })
    };
    let through_vip = connect_from(vip(80)).expect("through the VIP");
    assert_eq!(through_vip.reply_from, SocketAddr::V4(vip(80)));
    // The same client port, now straight to the pod that served it.
    let direct = connect_from(SocketAddrV4::new(pod, 8080)).expect("a direct connection must not hang");
    assert_eq!(direct.reply_from, SocketAddr::V4(SocketAddrV4::new(pod, 8080)), "its replies come from the pod");
    assert_eq!(direct.identity, "cluster-a/pod-1");
}

#[test]
fn an_import_cannot_capture_a_pods_or_the_nodes_address() {
    let lab = Lab::new(&[("cluster-a", 1), ("cluster-b", 1)]);
    let victim = lab.pods["cluster-b"][0];
    // An import whose ClusterSetIP is a pod's address, and one with the node's own.
    let hijack = service_import("evil", "pod", victim, &[("http", 8080, "TCP")]);
    let node_ip = Ipv4Addr::new(10, 0, 0, 1);
    let _node_daemon = Server::tcp(&lab.set.node, node_ip, 7000, "node-daemon");
    let node = service_import("evil", "node", node_ip, &[("http", 7000, "TCP")]);
    let loopback = service_import("evil", "loopback", Ipv4Addr::LOCALHOST, &[("http", 80, "TCP")]);
    let slice = endpoint_slice("evil", "pod", "cluster-a", SLICE_PORTS, &[(lab.pods["cluster-a"][0], true)]);
    let node_slice = endpoint_slice("evil", "node", "cluster-a", SLICE_PORTS, &[(lab.pods["cluster-a"][0], true)]);
    for (file, yaml) in [
        ("hijack.yaml", &hijack),
        ("node.yaml", &node),
        ("loopback.yaml", &loopback),
        ("evil-slice.yaml", &slice),
        ("evil-node-slice.yaml", &node_slice),
    ] {
        manifests::write(lab.dir.path(), file, yaml);
    }
    let _agent = lab.agent(&[]);
    let reply = tcp_request(lab.client(), SocketAddrV4::new(victim, 8080)).expect("the pod is reached directly");
    assert_eq!(reply.identity, "cluster-b/pod-1", "the pod itself answers, not the import's backend");
    let reply = tcp_request(lab.client(), SocketAddrV4::new(node_ip, 7000)).expect("the node is reached directly");
    assert_eq!(reply.identity, "node-daemon", "the node itself answers");
    tcp_request(lab.client(), vip(80)).expect("the legitimate import is served");

    // The operator sees why, by object and field.
    let check = std::process::Command::new(mcs_tests::agent::agent_binary())
        .args(["check", "--manifests"])
        .arg(lab.dir.path())
        .output()
        .unwrap();
    assert!(!check.status.success());
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        stderr.contains(&format!("ServiceImport evil/pod: spec.ips[0]: {victim} is the address of an endpoint")),
        "{stderr}"
    );
    assert!(
        stderr.contains("ServiceImport evil/loopback: spec.ips[0]: 127.0.0.1 cannot be a ClusterSetIP"),
        "{stderr}"
    );
}

/// Conntrack expiry: a UDP client that keeps its source port used to stay on
/// its backend forever. Idle past its timeout, its flow is forgotten and its
/// next datagram is balanced afresh over the backends that arrived since; a
/// busy flow keeps its backend however long it lives.
#[test]
fn an_idle_udp_flow_is_balanced_afresh_after_its_timeout_and_a_busy_one_keeps_its_backend() {
    use std::{
        net::UdpSocket,
        time::{Duration, Instant},
    };
    let lab = Lab::new(&[("cluster-a", 4)]);
    let newcomers: Vec<Ipv4Addr> = lab.pods["cluster-a"][1..].to_vec();
    lab.write_slice("cluster-a", &newcomers);
    let mut agent = lab.agent(&[
        "--conntrack-udp-timeout",
        "2",
        "--conntrack-udp-stream-timeout",
        "3",
        "--conntrack-gc-interval",
        "1",
    ]);
    // Sixteen clients, each keeping its own source port.
    let sockets: Vec<UdpSocket> = (0..16)
        .map(|_| {
            let socket = lab.client().run(|| UdpSocket::bind("0.0.0.0:0")).expect("a client socket");
            socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            socket
        })
        .collect();
    let ask = |socket: &UdpSocket| -> String {
        socket.send_to(b"hello\n", vip(53)).expect("send");
        let mut buf = [0u8; 512];
        let (n, from) = socket.recv_from(&mut buf).expect("an answer");
        assert_eq!(from, SocketAddr::V4(vip(53)), "answered as the VIP");
        String::from_utf8_lossy(&buf[..n]).split_whitespace().next().unwrap_or_default().to_owned()
    };
    let first = "cluster-a/pod-1";
    for socket in &sockets {
        assert_eq!(ask(socket), first, "the only ready backend");
    }
    // Three more backends become ready; live flows stay where they are.
    let generation = agent.generation();
    lab.write_slice("cluster-a", &[]);
    agent.wait_reconciled_after(generation);
    for socket in &sockets {
        assert_eq!(ask(socket), first, "a live flow keeps its backend");
    }
    // Eight stay busy, eight go quiet past the stream timeout (3 s), the
    // pair check's 10 s of slack and the collector's interval.
    let quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(18) {
        for socket in &sockets[..8] {
            assert_eq!(ask(socket), first, "a busy flow keeps its backend past the timeout");
        }
        std::thread::sleep(Duration::from_millis(800));
    }
    let after: Vec<String> = sockets[8..].iter().map(ask).collect();
    let moved = after.iter().filter(|id| *id != first).count();
    // Each expired flow lands on pod-1 again with a chance of 1 in 4: all
    // eight doing so is 1 in 65,536.
    assert!(moved > 0, "no idle flow was balanced afresh: {after:?}");
    let (_, metrics) = mcs_tests::agent::probe(&lab.set.node, "/metrics").expect("/metrics");
    let expired: f64 = metrics
        .lines()
        .find(|l| l.starts_with("mcs_agent_conntrack_expired_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("mcs_agent_conntrack_expired_total");
    assert!(expired >= 8.0, "the eight idle flows were collected: {expired}");
    eprintln!("after 18 s idle: {moved} of 8 flows moved ({after:?}); {expired} flows expired");
}
