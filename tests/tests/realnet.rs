//! Real networks: a dual-stack clusterset (every address has an IPv6 twin),
//! ICMP errors, a 1280-byte hop with path MTU discovery, fragmented
//! datagrams and fast refusal, through the whole agent and real sockets.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use mcs_tests::{
    agent::Agent,
    manifests,
    netns::{Netns, veth},
    topology::{Clusterset, v6},
    traffic::{Server, tcp_request, udp_request},
};
use tempfile::TempDir;

const WEB4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const FAR4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const ECHO_PORT: u16 = 7777;
const CLOSED_PORT: u16 = 9999;
const DATA_PORT: u16 = 9000;
/// The far cluster's one pod, behind the 1280-byte hop.
const FAR_POD: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 1);

fn web6() -> Ipv6Addr {
    "fd00:96::10".parse().unwrap()
}

/// Both families' addresses of a VIP: `[IPv4, IPv6]`.
fn both(v4: Ipv4Addr) -> [IpAddr; 2] {
    let v6: Ipv6Addr = format!("fd00:96::{:x}", v4.octets()[3]).parse().unwrap();
    [v4.into(), v6.into()]
}

fn import(name: &str, vip: Ipv4Addr, ports: &str) -> String {
    manifests::dual_stack_import(name, both(vip), ports)
}

fn slice(name: &str, service: &str, cluster: &str, family: &str, ports: &str, ips: &[IpAddr]) -> String {
    manifests::family_slice(name, service, cluster, family, ports, ips)
}

/// A UDP server that sends every datagram back as it came; stops on drop.
struct Echo {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let socket = ns.run(move || UdpSocket::bind(addr)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], peer);
                }
            }
        });
        Self { stop, handle: Some(handle) }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A TCP server for bulk transfers: `up N\n` reads N bytes and answers
/// `ok N\n`; `down N\n` sends N bytes. Stops on drop.
struct Bulk {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Bulk {
    fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns.run(move || TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || {
                            let _ = serve_bulk(stream);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { stop, handle: Some(handle) }
    }
}

fn serve_bulk(stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let (verb, n) = line.trim().split_once(' ').unwrap_or(("", "0"));
    let n: usize = n.parse().unwrap_or(0);
    match verb {
        "up" => {
            let mut left = n;
            let mut buf = vec![0u8; 65536];
            while left > 0 {
                let got = reader.read(&mut buf[..left.min(65536)])?;
                if got == 0 {
                    break;
                }
                left -= got;
            }
            writer.write_all(format!("ok {}\n", n - left).as_bytes())
        }
        "down" => writer.write_all(&vec![0xa5; n]),
        _ => Ok(()),
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The far cluster: node ─(1280-byte link)─ router ─(1500)─ pod 10.20.0.1,
/// so a client's full-size packets need path MTU discovery on the way to
/// the pod, and the pod's on the way back.
struct Far {
    router: Netns,
    cluster: Netns,
}

impl Far {
    fn new(node: &Netns) -> Self {
        let (router, cluster) = (Netns::new("mcs-rt"), Netns::new("mcs-far"));
        router.sysctl("net.ipv4.ip_forward", "1");
        router.sysctl("net.ipv6.conf.all.forwarding", "1");
        veth(node, "far0", &router, "rup");
        veth(&router, "rdown", &cluster, "eth0");
        node.ip(&["link", "set", "far0", "mtu", "1280"]);
        router.ip(&["link", "set", "rup", "mtu", "1280"]);
        let addr6 = |ns: &Netns, addr: String, dev: &str| ns.ip(&["-6", "addr", "add", &addr, "dev", dev, "nodad"]);
        // Node <-> router: 10.254.0.0/24; router <-> cluster: 10.253.0.0/24.
        node.ip(&["addr", "add", "10.254.0.1/24", "dev", "far0"]);
        router.ip(&["addr", "add", "10.254.0.2/24", "dev", "rup"]);
        router.ip(&["addr", "add", "10.253.0.1/24", "dev", "rdown"]);
        cluster.ip(&["addr", "add", "10.253.0.2/24", "dev", "eth0"]);
        cluster.ip(&["addr", "add", &format!("{FAR_POD}/32"), "dev", "eth0"]);
        let six = |a: [u8; 4]| v6(Ipv4Addr::from(a)).to_string();
        addr6(node, format!("{}/64", six([10, 254, 0, 1])), "far0");
        addr6(&router, format!("{}/64", six([10, 254, 0, 2])), "rup");
        addr6(&router, format!("{}/64", six([10, 253, 0, 1])), "rdown");
        addr6(&cluster, format!("{}/64", six([10, 253, 0, 2])), "eth0");
        addr6(&cluster, format!("{}/128", v6(FAR_POD)), "eth0");
        node.ip(&["route", "add", "10.20.0.0/16", "via", "10.254.0.2"]);
        router.ip(&["route", "add", "10.20.0.0/16", "via", "10.253.0.2"]);
        router.ip(&["route", "add", "default", "via", "10.254.0.1"]);
        cluster.ip(&["route", "add", "default", "via", "10.253.0.1"]);
        let pods6 = format!("{}/48", v6(Ipv4Addr::new(10, 20, 0, 0)));
        node.ip(&["-6", "route", "add", &pods6, "via", &six([10, 254, 0, 2])]);
        router.ip(&["-6", "route", "add", &pods6, "via", &six([10, 253, 0, 2])]);
        router.ip(&["-6", "route", "add", "default", "via", &six([10, 254, 0, 1])]);
        cluster.ip(&["-6", "route", "add", "default", "via", &six([10, 253, 0, 1])]);
        Self { router, cluster }
    }
}

struct Lab {
    set: Clusterset,
    far: Far,
    dir: TempDir,
    _servers: Vec<Server>,
    _echo: Vec<Echo>,
    _bulk: Vec<Bulk>,
}

const WEB_PORTS: &str = "[{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}, {name: closed, port: 54, protocol: UDP}, {name: big, port: 55, protocol: UDP}]";

impl Lab {
    fn new() -> Self {
        let mut set = Clusterset::new(1, &["cluster-a", "cluster-b"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let slice_ports = format!(
            "[{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}, {{name: closed, port: {CLOSED_PORT}, protocol: UDP}}, {{name: big, port: {ECHO_PORT}, protocol: UDP}}]"
        );
        let (mut servers, mut echo) = (Vec::new(), Vec::new());
        for cluster in &mut set.clusters {
            let (ips, mut s) = cluster.add_serving_pods(1, 8080, 5353);
            servers.append(&mut s);
            let four: Vec<IpAddr> = ips.iter().map(|ip| IpAddr::V4(*ip)).collect();
            let six: Vec<IpAddr> = ips.iter().map(|ip| IpAddr::V6(v6(*ip))).collect();
            for ip in four.iter().chain(&six) {
                echo.push(Echo::start(&cluster.ns, SocketAddr::new(*ip, ECHO_PORT)));
            }
            let name = &cluster.name;
            let yaml = [("4", "IPv4", &four), ("6", "IPv6", &six)]
                .map(|(suffix, family, ips)| {
                    slice(&format!("web-{name}-{suffix}"), "web", name, family, &slice_ports, ips)
                })
                .join("---\n");
            manifests::write(dir.path(), &format!("web-{name}.yaml"), &yaml);
        }
        manifests::write(dir.path(), "web.yaml", &import("web", WEB4, WEB_PORTS));
        let empty_ports = "[{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]";
        manifests::write(dir.path(), "empty.yaml", &import("empty", EMPTY4, empty_ports));

        let far = Far::new(&set.node);
        let far_ips = [IpAddr::V4(FAR_POD), IpAddr::V6(v6(FAR_POD))];
        let bulk = far_ips.iter().map(|ip| Bulk::start(&far.cluster, SocketAddr::new(*ip, DATA_PORT))).collect();
        let ports = format!("[{{name: data, port: {DATA_PORT}, protocol: TCP}}]");
        let yaml = [("4", "IPv4", &far_ips[..1]), ("6", "IPv6", &far_ips[1..])]
            .map(|(suffix, family, ips)| slice(&format!("far-{suffix}"), "far", "cluster-far", family, &ports, ips))
            .join("---\n");
        manifests::write(dir.path(), "far-slices.yaml", &yaml);
        manifests::write(dir.path(), "far.yaml", &import("far", FAR4, "[{name: data, port: 80, protocol: TCP}]"));
        Self { set, far, dir, _servers: servers, _echo: echo, _bulk: bulk }
    }

    fn agent(&self) -> Agent {
        Agent::start(&self.set.node, self.dir.path(), &self.set.client_ifaces(), &[])
    }

    fn client(&self) -> &Netns {
        &self.set.clients[0].ns
    }

    fn client_ip(&self, vip: IpAddr) -> IpAddr {
        let v4 = self.set.clients[0].ip;
        if vip.is_ipv4() { v4.into() } else { v6(v4).into() }
    }
}

#[test]
fn tcp_and_udp_reach_both_vips_of_a_dual_stack_import() {
    let lab = Lab::new();
    let _agent = lab.agent();
    for vip in both(WEB4) {
        let mut tcp_seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let reply = tcp_request(lab.client(), SocketAddr::new(vip, 80)).expect("TCP through the VIP");
            assert_eq!(reply.reply_from, SocketAddr::new(vip, 80), "getpeername is the VIP");
            assert_eq!(reply.peer_seen.ip(), lab.client_ip(vip), "the backend sees the client's own address");
            tcp_seen.insert(reply.identity);
        }
        assert_eq!(tcp_seen.len(), 2, "{vip}: both clusters answer over TCP: {tcp_seen:?}");
        let mut udp_seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let reply = udp_request(lab.client(), SocketAddr::new(vip, 53)).expect("UDP through the VIP");
            assert_eq!(reply.reply_from, SocketAddr::new(vip, 53), "the reply's source is the VIP");
            assert_eq!(reply.peer_seen.ip(), lab.client_ip(vip));
            udp_seen.insert(reply.identity);
        }
        assert_eq!(udp_seen.len(), 2, "{vip}: both clusters answer over UDP: {udp_seen:?}");
    }
    assert!(web6().is_unique_local());
}

/// A connected UDP socket learns of an unreachable port through the ICMP
/// error the pod sends: on a VIP only if that error is translated back.
#[test]
fn a_connected_udp_socket_to_a_closed_port_gets_econnrefused() {
    let lab = Lab::new();
    let _agent = lab.agent();
    for vip in both(WEB4) {
        let target = SocketAddr::new(vip, 54);
        let result = lab.client().run(move || -> io::Result<(io::Result<usize>, Duration)> {
            let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
            let socket = UdpSocket::bind(any)?;
            socket.connect(target)?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            let start = Instant::now();
            socket.send(b"anyone?")?;
            let mut buf = [0u8; 64];
            Ok((socket.recv(&mut buf), start.elapsed()))
        });
        let (outcome, took) = result.expect("socket setup");
        let err = outcome.expect_err("nothing listens: the receive must fail");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{vip}: {err} after {took:?}");
    }
}

/// A frontend without endpoints answers at once, like kube-proxy's REJECT:
/// a connect with a 100 ms timeout is refused rather than timing out.
#[test]
fn a_service_with_no_endpoints_refuses_within_100ms() {
    let lab = Lab::new();
    let _agent = lab.agent();
    for vip in both(EMPTY4) {
        let target = SocketAddr::new(vip, 80);
        let err = lab
            .client()
            .run(move || TcpStream::connect_timeout(&target, Duration::from_millis(100)))
            .expect_err("no endpoint: the connection must fail");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{target}: {err}");
        let target = SocketAddr::new(vip, 53);
        let err = lab
            .client()
            .run(move || -> io::Result<usize> {
                let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
                let socket = UdpSocket::bind(any)?;
                socket.connect(target)?;
                socket.set_read_timeout(Some(Duration::from_millis(100)))?;
                socket.send(b"query")?;
                socket.recv(&mut [0u8; 64])
            })
            .expect_err("no endpoint: the query must fail");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{target}: {err}");
    }
}

/// 4000 bytes do not fit in one 1500-byte packet: the request and the echo
/// both travel as fragments.
#[test]
fn a_4000_byte_udp_request_and_reply_cross_the_vip_in_fragments() {
    let lab = Lab::new();
    let _agent = lab.agent();
    for vip in both(WEB4) {
        let target = SocketAddr::new(vip, 55);
        let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = payload.clone();
        let (n, from, got) = lab
            .client()
            .run(move || -> io::Result<(usize, SocketAddr, Vec<u8>)> {
                let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
                let socket = UdpSocket::bind(any)?;
                socket.set_read_timeout(Some(Duration::from_secs(2)))?;
                socket.send_to(&sent, target)?;
                let mut buf = vec![0u8; 65536];
                let (n, from) = socket.recv_from(&mut buf)?;
                Ok((n, from, buf[..n].to_vec()))
            })
            .unwrap_or_else(|e| panic!("{target}: 4000-byte request and echo: {e}"));
        assert_eq!(n, 4000, "{target}: the whole datagram came back");
        assert_eq!(from, target, "from the VIP");
        assert!(got == payload, "{target}: the echo is byte for byte what was sent");
    }
}

/// 1 MB each way to a pod behind a 1280-byte hop. The node's "fragmentation
/// needed" / "packet too big" quotes the pod's address; translated back,
/// the client's kernel lowers its path MTU to the VIP and the upload flows.
#[test]
fn a_megabyte_each_way_across_a_1280_byte_hop_with_path_mtu_discovery() {
    let lab = Lab::new();
    let _agent = lab.agent();
    const MB: usize = 1 << 20;
    for vip in both(FAR4) {
        let target = SocketAddr::new(vip, 80);
        let outcome = lab.client().run(move || -> io::Result<(String, usize, Duration)> {
            let start = Instant::now();
            let mut up = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            up.set_read_timeout(Some(Duration::from_secs(10)))?;
            up.set_write_timeout(Some(Duration::from_secs(10)))?;
            up.write_all(format!("up {MB}\n").as_bytes())?;
            up.write_all(&vec![0x3c; MB])?;
            let mut answer = String::new();
            BufReader::new(&up).read_line(&mut answer)?;
            let mut down = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            down.set_read_timeout(Some(Duration::from_secs(10)))?;
            down.write_all(format!("down {MB}\n").as_bytes())?;
            let mut got = Vec::with_capacity(MB);
            down.read_to_end(&mut got)?;
            Ok((answer, got.len(), start.elapsed()))
        });
        let (answer, downloaded, took) =
            outcome.unwrap_or_else(|e| panic!("{target}: transfer across the 1280-byte hop stalled: {e}"));
        assert_eq!(answer.trim(), format!("ok {MB}"), "{target}: the pod received the whole upload");
        assert_eq!(downloaded, MB, "{target}: the whole download arrived");
        eprintln!("{target}: 1 MB up and 1 MB down in {took:?}");
    }
    // The router is only there to hold the 1280-byte link.
    let _ = &lab.far.router;
}
