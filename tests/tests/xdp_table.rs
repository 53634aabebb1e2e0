//! The packet table of `mcs_xdp`, beside the TC one (`table.rs`): each row
//! an input frame as it arrives on the uplink, the expected verdict and the
//! expected output frame, IPv4 and IPv6, through the real program
//! (BPF_PROG_TEST_RUN) with maps programmed by the agent's reconcile path.
//! The runs happen in a namespace of the test's own, whose routes and
//! neighbours the program's route lookups read:
//!
//! ```text
//!  node ns: up0 10.254.0.1 (02:00:00:00:00:01) ── peer 10.254.0.2 (02:00:00:00:00:02)
//!           route 10.10.0.0/16 via 10.254.0.2 (MTU 1400); client 10.254.0.3 on the link
//! ```
//! so every frame leaving by `XDP_TX` is addressed `[peer | up0]`, the
//! frame helpers' fixed MACs, and every frame arriving is the reverse.
//! Expected frames are built from scratch: a byte-for-byte match proves the
//! incremental checksum updates and the TTL's.

use std::net::{IpAddr, Ipv4Addr};

use mcs_agent::datapath::Xnat;
use mcs_common::{IPPROTO_TCP, IPPROTO_UDP, MapAddr, Stat, flow_hash, ip_to_map, ip6_to_map, port_to_map};
use mcs_tests::{
    frame::{Frag, ICMP, ICMPV6, Ip, TCP, UDP, forwarded, frame, icmp, ip_packet, packet, tcp, turned, udp},
    manifests,
    netns::{Netns, veth},
    testrun::{programmed, run_xdp},
    topology::v6,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const RST_ACK: u8 = 0x14;
const NODE: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 3);
const PORTS: (u16, u16) = (61000, 61999);

/// `web` (one backend per family) and `empty` (none), each dual-stack
/// with a TCP and a UDP port.
fn manifests() -> String {
    let ports = "[{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]";
    let targets = "[{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]";
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    [
        manifests::dual_stack_import("web", [ip("10.96.0.10"), ip("fd00:60::a")], ports),
        manifests::dual_stack_import("empty", [ip("10.96.0.20"), ip("fd00:60::14")], ports),
        manifests::family_slice("web-4", "web", "a", "IPv4", targets, &[ip("10.10.0.1")]),
        manifests::family_slice("web-6", "web", "a", "IPv6", targets, &[ip("fd00:a::1")]),
    ]
    .join("---\n")
}

struct Family {
    name: &'static str,
    client: IpAddr,
    node: IpAddr,
    vip: IpAddr,
    empty: IpAddr,
    backend: IpAddr,
    /// A router on the way to the backends.
    peer: IpAddr,
    icmp: u8,
    port_unreachable: (u8, u8),
    header: usize,
}

impl Family {
    /// What an ICMP error quotes of a packet: its IP header and the first
    /// 8 bytes past it.
    fn quote(&self, src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut quoted = ip_packet(src, dst, proto, l4, &Ip::default());
        quoted.truncate(self.header + 8);
        quoted
    }
}

fn families() -> [Family; 2] {
    [
        Family {
            name: "IPv4",
            client: CLIENT.into(),
            node: NODE.into(),
            vip: "10.96.0.10".parse().unwrap(),
            empty: "10.96.0.20".parse().unwrap(),
            backend: "10.10.0.1".parse().unwrap(),
            peer: PEER.into(),
            icmp: ICMP,
            port_unreachable: (3, 3),
            header: 20,
        },
        Family {
            name: "IPv6",
            client: v6(CLIENT).into(),
            node: v6(NODE).into(),
            vip: "fd00:60::a".parse().unwrap(),
            empty: "fd00:60::14".parse().unwrap(),
            backend: "fd00:a::1".parse().unwrap(),
            peer: v6(PEER).into(),
            icmp: ICMPV6,
            port_unreachable: (1, 4),
            header: 40,
        },
    ]
}

/// The source NAT port a new flow gets first: the flow's hash, as the
/// program computes it, into the range.
fn snat_port(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> u16 {
    fn hash<A: MapAddr>(a: A, b: A, sport: u16, dport: u16, proto: u8) -> u32 {
        flow_hash(a, b, port_to_map(sport), port_to_map(dport), proto)
    }
    let h = match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => hash(ip_to_map(a.octets()), ip_to_map(b.octets()), sport, dport, proto),
        (IpAddr::V6(a), IpAddr::V6(b)) => hash(ip6_to_map(a.octets()), ip6_to_map(b.octets()), sport, dport, proto),
        _ => unreachable!("one family"),
    };
    PORTS.0 + ((h >> 8) % u32::from(PORTS.1 - PORTS.0 + 1)) as u16
}

struct Row {
    what: String,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    /// An IPv4 datagram sent on from the node address: it leaves with an
    /// id of the program's (a per-CPU series), the same in all its
    /// fragments. The expected frame takes the id it left with, and its
    /// header checksum is made again for it.
    renumbered: bool,
}

fn rows(f: &Family) -> Vec<Row> {
    let (c, vip, be, node) = (f.client, f.vip, f.backend, f.node);
    let row = |what: &str, input: Vec<u8>, verdict: u32, output: Vec<u8>| Row {
        what: format!("{}: {what}", f.name),
        input,
        verdict,
        output,
        renumbered: false,
    };
    // Frames arrive from the peer: the fixed MACs, turned.
    let arriving = |src, dst, proto, l4: &[u8]| turned(packet(src, dst, proto, l4));
    let p = snat_port(c, vip, 40000, 80, IPPROTO_TCP);
    let q = snat_port(c, vip, 5000, 53, IPPROTO_UDP);
    let mut rows = vec![
        row(
            "a SYN from outside goes to the backend from the node's address, out of the uplink",
            arriving(c, vip, TCP, &tcp(c, vip, 40000, 80, SYN, b"")),
            XDP_TX,
            forwarded(node, be, TCP, &tcp(node, be, p, 8080, SYN, b"")),
        ),
        row(
            "the backend's SYN-ACK to the node's port goes to the client from the VIP",
            arriving(be, node, TCP, &tcp(be, node, 8080, p, SYN | ACK, b"")),
            XDP_TX,
            forwarded(vip, c, TCP, &tcp(vip, c, 80, 40000, SYN | ACK, b"")),
        ),
        row(
            "the client's next segment follows its flow",
            arriving(c, vip, TCP, &tcp(c, vip, 40000, 80, ACK, b"hello")),
            XDP_TX,
            forwarded(node, be, TCP, &tcp(node, be, p, 8080, ACK, b"hello")),
        ),
        row(
            "UDP from outside, by port name",
            arriving(c, vip, UDP, &udp(c, vip, 5000, 53, b"query")),
            XDP_TX,
            forwarded(node, be, UDP, &udp(node, be, q, 5353, b"query")),
        ),
        row(
            "the UDP answer comes from the VIP",
            arriving(be, node, UDP, &udp(be, node, 5353, q, b"answer")),
            XDP_TX,
            forwarded(vip, c, UDP, &udp(vip, c, 53, 5000, b"answer")),
        ),
        row(
            "a segment past the handshake that no flow knows is dropped, never balanced afresh",
            arriving(c, vip, TCP, &tcp(c, vip, 40009, 80, ACK, b"late")),
            XDP_DROP,
            arriving(c, vip, TCP, &tcp(c, vip, 40009, 80, ACK, b"late")),
        ),
    ];
    let passes = [
        ("traffic to the node itself passes", arriving(c, node, TCP, &tcp(c, node, 40000, 22, SYN, b""))),
        (
            "a reply to a port of the range that no flow knows passes (the node's to answer)",
            arriving(be, node, TCP, &tcp(be, node, 8080, PORTS.1, SYN | ACK, b"")),
        ),
        ("traffic to other addresses passes", arriving(c, be, TCP, &tcp(c, be, 40000, 8080, SYN, b""))),
        (
            "a packet whose TTL ends here passes (the stack answers it)",
            turned(frame(&ip_packet(
                c,
                vip,
                TCP,
                &tcp(c, vip, 40001, 80, SYN, b""),
                &Ip { ttl: Some(1), ..Ip::default() },
            ))),
        ),
    ];
    for (what, input) in passes {
        rows.push(row(what, input.clone(), XDP_PASS, input));
    }
    // No backend: refused from the VIP, back out of the uplink.
    let empty = f.empty;
    let mut rst = tcp(empty, c, 80, 40002, RST_ACK, b"");
    rst[4..12].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0x03, 0xe9]);
    rst[14..18].copy_from_slice(&[0, 0, 0, 0]);
    let csum = mcs_tests::packet::checksum(&[&mcs_tests::frame::pseudo(empty, c, TCP, rst.len()), &rst]);
    rst[16..18].copy_from_slice(&csum.to_be_bytes());
    rows.push(row(
        "a SYN to a VIP without backends is reset",
        arriving(c, empty, TCP, &tcp(c, empty, 40002, 80, SYN, b"")),
        XDP_TX,
        packet(empty, c, TCP, &rst),
    ));
    let (kind, code) = f.port_unreachable;
    let query = udp(c, empty, 5002, 53, b"query");
    let quoted = f.quote(c, empty, UDP, &query);
    rows.push(row(
        "UDP to a VIP without backends gets port unreachable",
        arriving(c, empty, UDP, &query),
        XDP_TX,
        packet(empty, c, f.icmp, &icmp(empty, c, kind, code, [0; 4], &quoted)),
    ));
    // ICMP errors about a flow's packet, from beyond the node, go on to
    // the client about the packet it sent, from the VIP. A router's
    // "fragmentation needed" ("packet too big") about the SYN above, with
    // its whole TCP header quoted (both checksums inside are rewritten):
    let too_big = if f.name == "IPv4" { (3, 4) } else { (2, 0) };
    let mtu = [0, 0, 0x05, 0x78];
    let at_63 = Ip { ttl: Some(63), ..Ip::default() };
    let sent = ip_packet(node, be, TCP, &tcp(node, be, p, 8080, SYN, b""), &at_63);
    let asked = ip_packet(c, vip, TCP, &tcp(c, vip, 40000, 80, SYN, b""), &at_63);
    rows.push(row(
        "a router's \"too big\" about a translated packet reaches the client from the VIP",
        arriving(f.peer, node, f.icmp, &icmp(f.peer, node, too_big.0, too_big.1, mtu, &sent)),
        XDP_TX,
        forwarded(vip, c, f.icmp, &icmp(vip, c, too_big.0, too_big.1, mtu, &asked)),
    ));
    // The same from a router whose address shares nothing with the VIP's
    // (IPv6: the hop limit's neighbour is the source's first byte).
    let far: IpAddr = if f.name == "IPv4" { "192.0.2.1".parse().unwrap() } else { "2001:db8::1".parse().unwrap() };
    rows.push(row(
        "the same from a router in another network",
        arriving(far, node, f.icmp, &icmp(far, node, too_big.0, too_big.1, mtu, &sent)),
        XDP_TX,
        forwarded(vip, c, f.icmp, &icmp(vip, c, too_big.0, too_big.1, mtu, &asked)),
    ));
    // A router on the client's side that cannot carry the backend's reply
    // tells the VIP (routed here): the backend learns it, about its reply
    // as it sent it, from the node.
    let replied = ip_packet(vip, c, TCP, &tcp(vip, c, 80, 40000, SYN | ACK, b""), &at_63);
    let answered = ip_packet(be, node, TCP, &tcp(be, node, 8080, p, SYN | ACK, b""), &at_63);
    rows.push(row(
        "a \"too big\" about a reply, to the VIP, reaches the backend from the node",
        arriving(far, vip, f.icmp, &icmp(far, vip, too_big.0, too_big.1, mtu, &replied)),
        XDP_TX,
        forwarded(node, be, f.icmp, &icmp(node, be, too_big.0, too_big.1, mtu, &answered)),
    ));
    // The same from the client itself: no host says that of a packet it
    // received, and passed on it would lower the backend's MTU to the node.
    let forged = arriving(c, vip, f.icmp, &icmp(c, vip, too_big.0, too_big.1, mtu, &replied));
    rows.push(row("a \"too big\" about a reply from its own client passes", forged.clone(), XDP_PASS, forged));
    // The backend's own port unreachable about a datagram.
    let sent = ip_packet(node, be, UDP, &udp(node, be, q, 5353, b"query"), &at_63);
    let asked = ip_packet(c, vip, UDP, &udp(c, vip, 5000, 53, b"query"), &at_63);
    rows.push(row(
        "the backend's port unreachable reaches the client from the VIP",
        arriving(be, node, f.icmp, &icmp(be, node, kind, code, [0; 4], &sent)),
        XDP_TX,
        forwarded(vip, c, f.icmp, &icmp(vip, c, kind, code, [0; 4], &asked)),
    ));
    // An error about nothing we sent is the node's.
    let other = ip_packet(node, be, UDP, &udp(node, be, 33000, 5353, b"query"), &at_63);
    let input = arriving(be, node, f.icmp, &icmp(be, node, kind, code, [0; 4], &other));
    rows.push(row("an error about a port outside the range passes", input.clone(), XDP_PASS, input));
    // A segment of the flow above that the way to the backend (MTU 1400,
    // the route's) cannot carry: "fragmentation needed" ("packet too big")
    // from the VIP, quoting the client's packet as sent; nothing translated.
    let big = tcp(c, vip, 40000, 80, ACK, &[0x61; 1460]);
    let quoted = f.quote(c, vip, TCP, &big);
    rows.push(row(
        "a segment too big for the backend's route gets \"too big\" back from the VIP",
        arriving(c, vip, TCP, &big),
        XDP_TX,
        packet(vip, c, f.icmp, &icmp(vip, c, too_big.0, too_big.1, mtu, &quoted)),
    ));
    // A datagram from outside in two fragments, and its answer in two: the
    // first fragment is translated ports and all (its checksum covers the
    // whole datagram), the later one follows with the same addresses.
    let fragmented = |src, dst, l4: &[u8], id, ttl| {
        let at = |offset, more| Ip { frag: Some(Frag { offset, more, id }), ttl: Some(ttl), ..Ip::default() };
        [
            frame(&ip_packet(src, dst, UDP, &l4[..1008], &at(0, true))),
            frame(&ip_packet(src, dst, UDP, &l4[1008..], &at(1008 / 8, false))),
        ]
    };
    let body = [0x5a; 1500];
    let r = snat_port(c, vip, 5005, 53, IPPROTO_UDP);
    let [in_first, in_rest] = fragmented(c, vip, &udp(c, vip, 5005, 53, &body), 0x4242, 64);
    let [out_first, out_rest] = fragmented(node, be, &udp(node, be, r, 5353, &body), 0x4242, 63);
    let v4 = f.name == "IPv4";
    rows.push(Row {
        renumbered: v4,
        ..row("a datagram's first fragment from outside is translated", turned(in_first), XDP_TX, out_first)
    });
    rows.push(Row {
        renumbered: v4,
        ..row("its later fragment follows with the same addresses and id", turned(in_rest), XDP_TX, out_rest)
    });
    let [in_first, in_rest] = fragmented(be, node, &udp(be, node, 5353, r, &body), 0x6161, 64);
    let [out_first, out_rest] = fragmented(vip, c, &udp(vip, c, 53, 5005, &body), 0x6161, 63);
    rows.push(row("the answer's first fragment goes to the client from the VIP", turned(in_first), XDP_TX, out_first));
    rows.push(row("and its later fragment with it", turned(in_rest), XDP_TX, out_rest));
    // A later fragment whose first was never seen is not ours.
    let [_, orphan] = fragmented(c, vip, &udp(c, vip, 5006, 53, &body), 0x5151, 64);
    rows.push(row("a later fragment without its first passes", turned(orphan.clone()), XDP_PASS, turned(orphan)));
    // No answer to a source no single host has: a reflector otherwise.
    let group: IpAddr = if f.name == "IPv4" { "224.0.0.1".parse().unwrap() } else { "ff02::1".parse().unwrap() };
    let forged = arriving(group, empty, TCP, &tcp(group, empty, 40003, 80, SYN, b""));
    rows.push(row(
        "a SYN from a multicast source to a VIP without backends gets no answer",
        forged.clone(),
        XDP_DROP,
        forged,
    ));
    rows
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// The node of the table: up0 and its peer with fixed MACs, a route to
/// the backends via the peer, the client on the link, neighbours static.
fn node() -> (Netns, Netns) {
    let node = Netns::new("mcs-xtab");
    let peer = Netns::new("mcs-xtabp");
    veth(&node, "up0", &peer, "eth0");
    node.ip(&["link", "set", "up0", "address", "02:00:00:00:00:01"]);
    peer.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:02"]);
    node.sysctl("net.ipv4.ip_forward", "1");
    node.sysctl("net.ipv6.conf.all.forwarding", "1");
    node.ip(&["addr", "add", &format!("{NODE}/24"), "dev", "up0"]);
    node.ip(&["-6", "addr", "add", &format!("{}/64", v6(NODE)), "dev", "up0", "nodad"]);
    // The way to the backends carries 1400 bytes (the route's MTU, locked:
    // the route lookup of a forwarded packet heeds only a locked one).
    node.ip(&["route", "add", "10.10.0.0/16", "via", &PEER.to_string(), "mtu", "lock", "1400"]);
    node.ip(&["-6", "route", "add", "fd00:a::/32", "via", &v6(PEER).to_string(), "mtu", "lock", "1400"]);
    // Both the peer and the client answer to the peer's MAC: every frame
    // out of the uplink is addressed alike.
    for ip in [PEER, CLIENT] {
        node.ip(&[
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "up0",
            "nud",
            "permanent",
        ]);
        node.ip(&[
            "-6",
            "neigh",
            "replace",
            &v6(ip).to_string(),
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "up0",
            "nud",
            "permanent",
        ]);
    }
    (node, peer)
}

#[test]
fn the_xdp_packet_table_ipv4_and_ipv6_side_by_side() {
    let (node, _peer) = node();
    let (failures, count, stats) = node.run(|| {
        let ifindex = nix::net::if_::if_nametoindex("up0").expect("up0 in the table's namespace");
        // Two families × (web, empty) × two ports.
        let mut dp = programmed(&manifests(), 1024, 8);
        dp.set_xnat(&Xnat { addr4: Some(NODE), addr6: Some(v6(NODE)), ports: PORTS, sources: Vec::new() })
            .expect("programming the source NAT settings");
        let mut failures = Vec::new();
        let mut count = 0;
        // The id the IPv4 datagram from outside left with.
        let mut datagram_id: Option<[u8; 2]> = None;
        for family in families() {
            for row in rows(&family) {
                count += 1;
                let (verdict, output) = run_xdp(&mut dp, ifindex, &row.input);
                let mut expected = row.output.clone();
                if row.renumbered && output.len() >= 34 {
                    let id = [output[18], output[19]];
                    if *datagram_id.get_or_insert(id) != id || id == [row.input[18], row.input[19]] {
                        failures.push(format!(
                            "{}: id {id:02x?}: the client's, or not its first fragment's {datagram_id:02x?}",
                            row.what
                        ));
                    }
                    expected[18..20].copy_from_slice(&id);
                    expected[24..26].copy_from_slice(&[0, 0]);
                    let check = mcs_tests::packet::checksum(&[&expected[14..34]]);
                    expected[24..26].copy_from_slice(&check.to_be_bytes());
                }
                if (verdict, &output) != (row.verdict, &expected) {
                    failures.push(format!(
                        "{}:\n  verdict {verdict}, expected {}\n  got      {}\n  expected {}",
                        row.what,
                        row.verdict,
                        hex(&output),
                        hex(&expected)
                    ));
                }
            }
        }
        let stats = [
            Stat::XdpNewFlow,
            Stat::XdpRevNat,
            Stat::XdpMidstream,
            Stat::Rejected,
            Stat::XdpTx,
            Stat::XdpIcmpRevNat,
            Stat::XdpTooBig,
            Stat::Fragment,
            Stat::FragmentTranslated,
        ]
        .map(|s| dp.stat(s));
        (failures, count, stats)
    });
    assert!(failures.is_empty(), "{} of {count} rows failed:\n{}", failures.len(), failures.join("\n"));
    // Per family: three new flows, three replies, one mid-stream miss, two
    // rejections, thirteen translated frames sent back out (four of them
    // ICMP errors, four fragments), one "too big", two first fragments and
    // two later ones.
    assert_eq!(
        stats,
        [6, 6, 2, 4, 26, 8, 2, 4, 4],
        "new, replies, mid-stream, rejected, XDP_TX, ICMP errors, too big, first fragments, later fragments"
    );
}
