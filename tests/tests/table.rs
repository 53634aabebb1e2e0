//! The packet table, Katran-style: each row a description, an input frame,
//! the expected verdict and the expected output frame, IPv4 and IPv6 side
//! by side, through the real programs (BPF_PROG_TEST_RUN) with maps
//! programmed by the agent's own reconcile path. Rows run in order on one
//! datapath, so a reply row finds the state its request row created.
//! Expected frames are built from scratch (full checksums): a byte-for-byte
//! match proves the incremental checksum updates, quoted ones included.

use std::net::IpAddr;

use mcs_common::{PROG_EGRESS, PROG_INGRESS, Stat};
use mcs_tests::{
    frame::{ICMP, ICMPV6, Ip, TCP, UDP, fragments, frame, icmp, ip_packet, packet, tcp, turned, udp},
    testrun::{programmed, run},
};

const TC_NEXT: i32 = -1;
const TC_ACT_REDIRECT: i32 = 7;
const TC_ACT_SHOT: i32 = 2;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

const MANIFESTS: &str = r#"
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {name: web, namespace: demo}
spec:
  type: ClusterSetIP
  ips: ["10.96.0.10", "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {name: http, port: 80, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {name: empty, namespace: demo}
spec:
  type: ClusterSetIP
  ips: ["10.96.0.20", "fd00:96::20"]
  ports: [{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-4
  namespace: demo
  labels: {multicluster.kubernetes.io/service-name: web, multicluster.kubernetes.io/source-cluster: a}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: ["10.10.0.1"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-6
  namespace: demo
  labels: {multicluster.kubernetes.io/service-name: web, multicluster.kubernetes.io/source-cluster: a}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: ["fd00:10::1"]}]
"#;

/// One family's cast: who talks to whom, and its ICMP numbers.
struct Family {
    name: &'static str,
    client: IpAddr,
    vip: IpAddr,
    empty: IpAddr,
    backend: IpAddr,
    router: IpAddr,
    other_pod: IpAddr,
    icmp: u8,
    port_unreachable: (u8, u8),
    too_big: (u8, u8, [u8; 4]),
    time_exceeded: (u8, u8),
    /// IP header length (no options, no extension headers).
    header: usize,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn families() -> [Family; 2] {
    [
        Family {
            name: "IPv4",
            client: ip("10.0.0.2"),
            vip: ip("10.96.0.10"),
            empty: ip("10.96.0.20"),
            backend: ip("10.10.0.1"),
            router: ip("10.255.0.1"),
            other_pod: ip("10.11.0.7"),
            icmp: ICMP,
            port_unreachable: (3, 3),
            // Fragmentation needed, next-hop MTU 1280.
            too_big: (3, 4, [0, 0, 0x05, 0x00]),
            time_exceeded: (11, 0),
            header: 20,
        },
        Family {
            name: "IPv6",
            client: ip("fd00::2"),
            vip: ip("fd00:96::10"),
            empty: ip("fd00:96::20"),
            backend: ip("fd00:10::1"),
            router: ip("fd00:255::1"),
            other_pod: ip("fd00:11::7"),
            icmp: ICMPV6,
            port_unreachable: (1, 4),
            // Packet too big, MTU 1280.
            too_big: (2, 0, [0, 0, 0x05, 0x00]),
            time_exceeded: (3, 0),
            header: 40,
        },
    ]
}

struct Row {
    what: String,
    program: &'static str,
    input: Vec<u8>,
    verdict: i32,
    output: Vec<u8>,
}

fn row(f: &Family, what: &str, program: &'static str, input: Vec<u8>, verdict: i32, output: Vec<u8>) -> Row {
    Row { what: format!("{}: {what}", f.name), program, input, verdict, output }
}

/// Passes untouched.
fn pass(f: &Family, what: &str, program: &'static str, input: Vec<u8>) -> Row {
    row(f, what, program, input.clone(), TC_NEXT, input)
}

/// An IP packet `src -> dst` carrying `l4`, as quoted by an ICMP error, cut to `len` bytes.
fn quote(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8], len: usize) -> Vec<u8> {
    let mut q = ip_packet(src, dst, proto, l4, &Ip::default());
    q.truncate(len);
    q
}

fn rows(f: &Family) -> Vec<Row> {
    let (c, vip, be) = (f.client, f.vip, f.backend);
    let mut rows = vec![
        row(
            f,
            "TCP SYN to the VIP is DNATted to the backend",
            PROG_INGRESS,
            packet(c, vip, TCP, &tcp(c, vip, 40000, 80, SYN, b"")),
            TC_NEXT,
            packet(c, be, TCP, &tcp(c, be, 40000, 8080, SYN, b"")),
        ),
        row(
            f,
            "the backend's SYN-ACK comes from the VIP",
            PROG_EGRESS,
            packet(be, c, TCP, &tcp(be, c, 8080, 40000, SYN | ACK, b"")),
            TC_NEXT,
            packet(vip, c, TCP, &tcp(vip, c, 80, 40000, SYN | ACK, b"")),
        ),
        row(
            f,
            "UDP to the VIP is DNATted by port name",
            PROG_INGRESS,
            packet(c, vip, UDP, &udp(c, vip, 5000, 53, b"query")),
            TC_NEXT,
            packet(c, be, UDP, &udp(c, be, 5000, 5353, b"query")),
        ),
        row(
            f,
            "the UDP reply comes from the VIP",
            PROG_EGRESS,
            packet(be, c, UDP, &udp(be, c, 5353, 5000, b"answer")),
            TC_NEXT,
            packet(vip, c, UDP, &udp(vip, c, 53, 5000, b"answer")),
        ),
    ];
    // ICMP errors on their way to the client.
    let (kind, code) = f.port_unreachable;
    let (full_udp_be, full_udp_vip) = (udp(c, be, 5000, 5353, b"query"), udp(c, vip, 5000, 53, b"query"));
    let len = f.header + full_udp_be.len();
    rows.push(row(
        f,
        "port unreachable from the backend: quote and source become the VIP's",
        PROG_EGRESS,
        packet(be, c, f.icmp, &icmp(be, c, kind, code, [0; 4], &quote(c, be, UDP, &full_udp_be, len))),
        TC_NEXT,
        packet(vip, c, f.icmp, &icmp(vip, c, kind, code, [0; 4], &quote(c, vip, UDP, &full_udp_vip, len))),
    ));
    let (seg_be, seg_vip) = (tcp(c, be, 40000, 8080, ACK, &[7; 100]), tcp(c, vip, 40000, 80, ACK, &[7; 100]));
    let (kind, code, mtu) = f.too_big;
    let len = f.header + seg_be.len();
    let r = f.router;
    rows.push(row(
        f,
        "path MTU error from a router: the quote becomes the VIP's, the router stays",
        PROG_EGRESS,
        packet(r, c, f.icmp, &icmp(r, c, kind, code, mtu, &quote(c, be, TCP, &seg_be, len))),
        TC_NEXT,
        packet(r, c, f.icmp, &icmp(r, c, kind, code, mtu, &quote(c, vip, TCP, &seg_vip, len))),
    ));
    let (kind, code) = f.time_exceeded;
    // RFC 792's minimum: the IP header and 8 bytes; the TCP checksum is not quoted.
    let len = f.header + 8;
    rows.push(row(
        f,
        "time exceeded with a minimal quote (no L4 checksum in it)",
        PROG_EGRESS,
        packet(r, c, f.icmp, &icmp(r, c, kind, code, [0; 4], &quote(c, be, TCP, &seg_be, len))),
        TC_NEXT,
        packet(r, c, f.icmp, &icmp(r, c, kind, code, [0; 4], &quote(c, vip, TCP, &seg_vip, len))),
    ));
    let other = f.other_pod;
    let direct = tcp(c, other, 40000, 8080, ACK, b"");
    rows.push(pass(
        f,
        "an error about an untranslated flow passes untouched",
        PROG_EGRESS,
        packet(r, c, f.icmp, &icmp(r, c, kind, code, [0; 4], &quote(c, other, TCP, &direct, f.header + 8))),
    ));
    rows.push(pass(
        f,
        "an error whose quote ends inside the IP header passes untouched",
        PROG_EGRESS,
        packet(r, c, f.icmp, &icmp(r, c, kind, code, [0; 4], &quote(c, be, TCP, &seg_be, f.header - 4))),
    ));

    // Fragments: the first carries the ports, the rest follow it by id.
    let payload = vec![0x5a; 1500];
    let (to_vip, to_be) = (udp(c, vip, 5001, 53, &payload), udp(c, be, 5001, 5353, &payload));
    let [in_first, in_rest] = fragments(c, vip, UDP, &to_vip, 1008, 0x4242);
    let [out_first, out_rest] = fragments(c, be, UDP, &to_be, 1008, 0x4242);
    rows.push(row(f, "the first fragment to the VIP is DNATted", PROG_INGRESS, in_first, TC_NEXT, out_first));
    rows.push(row(f, "a later fragment follows its first", PROG_INGRESS, in_rest, TC_NEXT, out_rest));
    let [_, orphan] = fragments(c, vip, UDP, &to_vip, 1008, 0x5151);
    rows.push(pass(f, "a later fragment whose first never came passes untranslated", PROG_INGRESS, orphan));
    let (from_be, from_vip) = (udp(be, c, 5353, 5001, &payload), udp(vip, c, 53, 5001, &payload));
    let [in_first, in_rest] = fragments(be, c, UDP, &from_be, 1008, 0x6161);
    let [out_first, out_rest] = fragments(vip, c, UDP, &from_vip, 1008, 0x6161);
    rows.push(row(
        f,
        "a fragmented reply's first fragment comes from the VIP",
        PROG_EGRESS,
        in_first,
        TC_NEXT,
        out_first,
    ));
    rows.push(row(f, "and so does the rest of it", PROG_EGRESS, in_rest, TC_NEXT, out_rest));

    // No backend: refused from the VIP, back where it came from. A SYN gets
    // a RST (the SYN acknowledged: its sequence number 1000, plus one).
    let empty = f.empty;
    let mut rst = tcp(empty, c, 80, 40001, 0x14, b"");
    rst[4..12].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0x03, 0xe9]);
    rst[14..16].copy_from_slice(&[0, 0]);
    rst[16..18].copy_from_slice(&[0, 0]);
    let csum = mcs_tests::packet::checksum(&[&mcs_tests::frame::pseudo(empty, c, TCP, rst.len()), &rst]);
    rst[16..18].copy_from_slice(&csum.to_be_bytes());
    rows.push(row(
        f,
        "a SYN to a VIP without backends is reset",
        PROG_INGRESS,
        packet(c, empty, TCP, &tcp(c, empty, 40001, 80, SYN, b"")),
        TC_ACT_REDIRECT,
        turned(packet(empty, c, TCP, &rst)),
    ));
    let (kind, code) = f.port_unreachable;
    let query = udp(c, empty, 5002, 53, b"query");
    rows.push(row(
        f,
        "UDP to a VIP without backends gets port unreachable",
        PROG_INGRESS,
        packet(c, empty, UDP, &query),
        TC_ACT_REDIRECT,
        turned(packet(
            empty,
            c,
            f.icmp,
            &icmp(empty, c, kind, code, [0; 4], &quote(c, empty, UDP, &query, f.header + 8)),
        )),
    ));
    // No answer to a source no single host has: a reflector otherwise.
    let group: IpAddr = if f.name == "IPv4" { ip("224.0.0.1") } else { ip("ff02::1") };
    let forged = packet(group, empty, TCP, &tcp(group, empty, 40003, 80, SYN, b""));
    rows.push(row(
        f,
        "a SYN from a multicast source to a VIP without backends gets no answer",
        PROG_INGRESS,
        forged.clone(),
        TC_ACT_SHOT,
        forged,
    ));
    rows.push(pass(f, "traffic to a pod passes byte for byte", PROG_INGRESS, packet(c, other, TCP, &direct)));
    if f.name == "IPv6" {
        // Hop-by-hop (a PadN option) and destination options before TCP.
        let ext = vec![(0u8, vec![0, 0, 1, 4, 0, 0, 0, 0]), (60u8, vec![0, 0, 1, 4, 0, 0, 0, 0])];
        let opts = Ip { ext, ..Ip::default() };
        rows.push(row(
            f,
            "extension headers are walked and kept",
            PROG_INGRESS,
            frame(&ip_packet(c, vip, TCP, &tcp(c, vip, 40002, 80, SYN, b""), &opts)),
            TC_NEXT,
            frame(&ip_packet(c, be, TCP, &tcp(c, be, 40002, 8080, SYN, b""), &opts)),
        ));
    }
    rows
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

#[test]
fn the_packet_table_ipv4_and_ipv6_side_by_side() {
    // Two families × (web, empty) × two ports.
    let mut dp = programmed(MANIFESTS, 1024, 8);
    let mut failures = Vec::new();
    let mut count = 0;
    for family in families() {
        for row in rows(&family) {
            count += 1;
            let (verdict, output) = run(&mut dp, row.program, &row.input);
            if (verdict, &output) != (row.verdict, &row.output) {
                failures.push(format!(
                    "{} ({}):\n  verdict {verdict}, expected {}\n  got      {}\n  expected {}",
                    row.what,
                    row.program,
                    row.verdict,
                    hex(&output),
                    hex(&row.output)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {count} rows failed:\n{}", failures.len(), failures.join("\n"));
    // Per family: three ICMP errors translated, one fragment followed each
    // way, one orphan, two rejections.
    assert_eq!(dp.stat(Stat::IcmpRevNat), 6);
    assert_eq!(dp.stat(Stat::FragmentTranslated), 4);
    assert_eq!(dp.stat(Stat::FragmentMiss), 2);
    assert_eq!(dp.stat(Stat::Rejected), 4);
    assert_eq!(dp.stat(Stat::NoBackend), 6, "four rejected, two from multicast sources not");
}
