//! Packet fixtures through BPF_PROG_TEST_RUN: the real programs, loaded into
//! the running kernel with maps programmed by the agent's own reconcile path.
//! Each fixture is an input frame, the expected verdict and the expected
//! output, with checksums recomputed from scratch by the test.

use std::{collections::BTreeSet, net::Ipv4Addr};

use mcs_agent::{
    datapath::{Datapath, Sizes},
    desired::{self, Policy},
    model::{BackendAddr, FrontendKey, Origin, Protocol},
    plan::{Capacity, selection_table},
    source::manifests::parse_documents,
};
use mcs_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, CT_F_RST, CT_F_SYNACK, CtKey, CtValue,
    IPPROTO_TCP, PROG_EGRESS, PROG_INGRESS, Stat, flow_hash, ip_to_map, port_to_map,
};
use mcs_tests::{
    packet::{Ipv4Spec, TCP_ACK, TCP_PSH, TCP_SYN, tcp, udp, view},
    testrun::{programmed, run, run_repeat},
};

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

const TC_NEXT: i32 = -1;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// In table order (sorted by address).
const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 10, 0, 1), Ipv4Addr::new(10, 11, 0, 1)];

const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);

const MANIFESTS: &str = r#"
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {name: sticky, namespace: demo}
spec:
  type: ClusterSetIP
  ips: ["10.96.0.30"]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-ab
  namespace: demo
  labels: {multicluster.kubernetes.io/service-name: sticky}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: ["10.10.0.1"]}, {addresses: ["10.11.0.1"]}, {addresses: ["10.12.0.1"]}]
---
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {name: web, namespace: demo}
spec:
  type: ClusterSetIP
  ips: ["10.96.0.10"]
  ports:
  - {name: http, port: 80, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {name: empty, namespace: demo}
spec: {type: ClusterSetIP, ips: ["10.96.0.20"], ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: demo
  labels: {multicluster.kubernetes.io/service-name: web, multicluster.kubernetes.io/source-cluster: a}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: ["10.10.0.1"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-b
  namespace: demo
  labels: {multicluster.kubernetes.io/service-name: web, multicluster.kubernetes.io/source-cluster: b}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: ["10.11.0.1"]}]
"#;

fn datapath() -> Datapath {
    datapath_with_conntrack(1024)
}

fn datapath_with_conntrack(conntrack: u32) -> Datapath {
    programmed(MANIFESTS, conntrack, 4)
}

/// The selection table the agent programs for `VIP:port`, computed by the
/// same pure functions (desired state, weighted Maglev).
fn table(vip_port: u16, protocol: Protocol) -> &'static [BackendAddr] {
    static TABLES: std::sync::OnceLock<[Vec<BackendAddr>; 2]> = std::sync::OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        let (snapshot, _) = parse_documents(&Origin("fixture".into()), MANIFESTS);
        let (state, _) = desired::compute(&snapshot, &Policy::default());
        let of = |port, protocol| selection_table(&state.frontends[&FrontendKey { vip: VIP.into(), port, protocol }]);
        [of(80, Protocol::Tcp), of(53, Protocol::Udp)]
    });
    match (vip_port, protocol) {
        (80, Protocol::Tcp) => &tables[0],
        (53, Protocol::Udp) => &tables[1],
        other => panic!("no fixture frontend {other:?}"),
    }
}

/// Which backend the kernel's hash picks for a client port, as userspace predicts it.
fn expected_backend(sport: u16, vip_port: u16, proto: u8) -> Ipv4Addr {
    let protocol = if proto == IPPROTO_TCP { Protocol::Tcp } else { Protocol::Udp };
    let table = table(vip_port, protocol);
    let h = flow_hash(
        ip_to_map(CLIENT.octets()),
        ip_to_map(VIP.octets()),
        port_to_map(sport),
        port_to_map(vip_port),
        proto,
    );
    match table[(h % table.len() as u32) as usize].ip {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("an IPv4 frontend's backend is {other}"),
    }
}

/// A client port that the hash sends to `backend`.
fn port_for(backend: Ipv4Addr) -> u16 {
    (40000..41000).find(|&p| expected_backend(p, 80, IPPROTO_TCP) == backend).unwrap()
}

#[test]
fn tcp_syn_to_the_vip_is_dnatted_with_valid_checksums_and_tracked() {
    let mut dp = datapath();
    let sport = 40123;
    let input = tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_SYN, b"");
    let (verdict, out) = run(&mut dp, PROG_INGRESS, &input);
    assert_eq!(verdict, TC_NEXT);
    let v = view(&out);
    assert_eq!((v.src, v.sport), (CLIENT, sport), "source untouched");
    assert_eq!((v.dst, v.dport), (expected_backend(sport, 80, IPPROTO_TCP), 8080));
    assert!(v.ip_checksum_ok, "IPv4 header checksum");
    assert_eq!(v.l4_checksum_ok, Some(true), "TCP checksum");
    assert_eq!(out.len(), input.len());
    assert_eq!(out[..14], input[..14], "Ethernet header untouched");
    assert_eq!(dp.conntrack_entries(CT_DIR_ORIGINAL).len(), 1);
    assert_eq!(dp.conntrack_entries(CT_DIR_REPLY).len(), 1, "created as a pair");
    assert_eq!(dp.stat(Stat::NewFlow), 1);
}

#[test]
fn established_packets_follow_conntrack_and_a_bare_syn_chooses_afresh() {
    let mut dp = datapath();
    let sport = port_for(BACKENDS[0]);
    // Pin the flow to the *other* backend, as an earlier selection might have.
    let (key, pinned) = (original_key(sport), pinned_to_second_backend());
    dp.insert_conntrack(key, pinned).unwrap();

    let ack = tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_ACK | TCP_PSH, b"GET / HTTP/1.1\r\n\r\n");
    let (verdict, out) = run(&mut dp, PROG_INGRESS, &ack);
    assert_eq!(verdict, TC_NEXT);
    let v = view(&out);
    assert_eq!(v.dst, BACKENDS[1], "established packets stay on the pinned backend");
    assert_eq!(v.l4_checksum_ok, Some(true));
    assert_eq!(v.payload, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(dp.stat(Stat::Established), 1);

    let syn = tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_SYN, b"");
    let (_, out) = run(&mut dp, PROG_INGRESS, &syn);
    assert_eq!(view(&out).dst, BACKENDS[0], "a reused client port with a new SYN is balanced afresh");
    let (_, out) = run(&mut dp, PROG_INGRESS, &ack);
    assert_eq!(view(&out).dst, BACKENDS[0], "and conntrack now follows the new choice");
}

/// A TCP packet past the handshake that finds no conntrack (its entries
/// evicted, or older than this agent) starts a pair that knows the backend
/// answered: the collector gives it an established connection's timeout,
/// not a SYN's 60 s, and a bare SYN's pair still does not.
#[test]
fn a_tracked_anew_connection_past_its_handshake_counts_as_answered() {
    let mut dp = datapath();
    let sport = 47001;
    let ack = tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_ACK | TCP_PSH, b"more data\n");
    run(&mut dp, PROG_INGRESS, &ack);
    let (original, reply) = flow_entries(&dp, sport);
    assert_eq!(original.expect("tracked").flags, CT_F_SYNACK);
    assert_eq!(reply.expect("its reply entry").1.flags, CT_F_SYNACK);

    let sport = 47002;
    run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_SYN, b""));
    assert_eq!(flow_entries(&dp, sport).1.expect("tracked").1.flags, 0, "a SYN is not answered yet");
}

#[test]
fn udp_is_dnatted_and_a_zero_checksum_stays_zero() {
    let mut dp = datapath();
    for zero in [false, true] {
        let input = udp(&Ipv4Spec::new(CLIENT, VIP), 5000, 53, b"query", zero);
        let (verdict, out) = run(&mut dp, PROG_INGRESS, &input);
        assert_eq!(verdict, TC_NEXT);
        let v = view(&out);
        assert_eq!((v.dst, v.dport), (expected_backend(5000, 53, 17), 5353));
        assert!(v.ip_checksum_ok);
        if zero {
            assert_eq!(v.l4_checksum_ok, None, "a UDP checksum of zero must stay zero");
        } else {
            assert_eq!(v.l4_checksum_ok, Some(true));
        }
    }
}

#[test]
fn replies_are_reverse_natted_to_the_vip_and_others_pass_untouched() {
    let mut dp = datapath();
    let sport = 40200;
    let backend = expected_backend(sport, 80, IPPROTO_TCP);
    run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_SYN, b""));

    let reply = tcp(&Ipv4Spec::new(backend, CLIENT), 8080, sport, TCP_SYN | TCP_ACK, b"");
    let (verdict, out) = run(&mut dp, PROG_EGRESS, &reply);
    assert_eq!(verdict, TC_NEXT);
    let v = view(&out);
    assert_eq!((v.src, v.sport), (VIP, 80), "the client must see the VIP");
    assert_eq!((v.dst, v.dport), (CLIENT, sport));
    assert!(v.ip_checksum_ok);
    assert_eq!(v.l4_checksum_ok, Some(true));
    assert_eq!(dp.stat(Stat::RevNat), 1);

    // Same backend, another client port: not a translated flow.
    let other = tcp(&Ipv4Spec::new(backend, CLIENT), 8080, sport + 1, TCP_ACK, b"x");
    let (verdict, out) = run(&mut dp, PROG_EGRESS, &other);
    assert_eq!((verdict, out), (TC_NEXT, other));
}

#[test]
fn non_service_traffic_passes_byte_for_byte_and_creates_no_state() {
    let mut dp = datapath();
    let cases = [
        tcp(&Ipv4Spec::new(CLIENT, Ipv4Addr::new(10, 10, 0, 1)), 40000, 8080, TCP_SYN, b""),
        tcp(&Ipv4Spec::new(CLIENT, VIP), 40000, 81, TCP_SYN, b""),
        udp(&Ipv4Spec::new(CLIENT, VIP), 40000, 80, b"", false),
    ];
    for input in cases {
        let (verdict, out) = run(&mut dp, PROG_INGRESS, &input);
        assert_eq!((verdict, &out), (TC_NEXT, &input));
    }
    // ARP and IPv6 frames.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let mut v6 = vec![0u8; 12];
    v6.extend_from_slice(&[0x86, 0xdd]);
    v6.extend_from_slice(&[0x60; 60]);
    for input in [arp, v6] {
        let (verdict, out) = run(&mut dp, PROG_INGRESS, &input);
        assert_eq!((verdict, &out), (TC_NEXT, &input));
    }
    assert!(no_conntrack(&dp));
    assert_eq!(dp.stat(Stat::NotService), 3);
}

#[test]
fn ip_options_shift_the_l4_header_and_are_preserved() {
    let mut dp = datapath();
    // Record-route option (type 7, length 11, pointer 4) padded with an end-of-list byte.
    let options = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let spec = Ipv4Spec { options: &options, ..Ipv4Spec::new(CLIENT, VIP) };
    let input = tcp(&spec, 40300, 80, TCP_SYN, b"opt");
    let (verdict, out) = run(&mut dp, PROG_INGRESS, &input);
    assert_eq!(verdict, TC_NEXT);
    let v = view(&out);
    assert_eq!((v.dst, v.dport), (expected_backend(40300, 80, IPPROTO_TCP), 8080));
    assert!(v.ip_checksum_ok);
    assert_eq!(v.l4_checksum_ok, Some(true));
    assert_eq!(out[34..46], options, "options untouched");
    assert_eq!(v.payload, b"opt");
}

#[test]
fn truncated_and_malformed_headers_pass_untouched() {
    let mut dp = datapath();
    let full = tcp(&Ipv4Spec::new(CLIENT, VIP), 40400, 80, TCP_SYN, b"");
    // BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than a full IP
    // header, so truncation is fed from there on.
    let mut cases: Vec<Vec<u8>> = [14 + 20, 14 + 20 + 12].iter().map(|&n| full[..n].to_vec()).collect();
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x43;
    cases.push(bad_ihl);
    let mut bad_version = full.clone();
    bad_version[14] = 0x65;
    cases.push(bad_version);
    // IHL claims 60 bytes of header but the frame ends first.
    let mut long_ihl = full.clone();
    long_ihl[14] = 0x4f;
    cases.push(long_ihl);
    let mut short_udp = udp(&Ipv4Spec::new(CLIENT, VIP), 5000, 53, b"", false);
    short_udp.truncate(14 + 20 + 4);
    cases.push(short_udp);
    for input in &cases {
        for program in [PROG_INGRESS, PROG_EGRESS] {
            let (verdict, out) = run(&mut dp, program, input);
            assert_eq!((verdict, &out), (TC_NEXT, input), "{program} on {} bytes", input.len());
        }
    }
    assert!(no_conntrack(&dp));
    assert!(dp.stat(Stat::Malformed) >= 5, "counted: {}", dp.stat(Stat::Malformed));
}

/// The per-packet cost of each path, from BPF_PROG_TEST_RUN's in-kernel timer.
///
/// Each sample is one run on a fresh frame: with `repeat > 1` the kernel reuses
/// the skb the first run already rewrote, so later runs would all take the
/// miss path. New flows use a distinct client port per sample. Printed, not
/// asserted (timing belongs to `cargo xtask bench`); every sample's output is checked.
#[test]
fn per_packet_cost_of_each_path() {
    let mut dp = datapath_with_conntrack(65_536);
    let samples = 20_000u16;
    let mut report = Vec::new();
    let mut measure = |name: &str, program: &'static str, frames: Vec<Vec<u8>>, translated: bool, dp: &mut Datapath| {
        let mut ns: Vec<u128> = frames
            .iter()
            .map(|frame| {
                let ((verdict, out), ns) = run_repeat(dp, program, frame, 1);
                assert_eq!(verdict, TC_NEXT, "{name}");
                assert_eq!(&out != frame, translated, "{name}");
                ns
            })
            .collect();
        ns.sort_unstable();
        let (p50, p99) = (ns[ns.len() / 2], ns[ns.len() * 99 / 100]);
        report.push(format!("{name}: p50 {p50} ns, p99 {p99} ns"));
    };
    let ports = || 20_000..20_000 + samples;
    let miss =
        ports().map(|p| tcp(&Ipv4Spec::new(CLIENT, Ipv4Addr::new(10, 10, 0, 1)), p, 8080, TCP_ACK, b"")).collect();
    measure("miss", PROG_INGRESS, miss, false, &mut dp);
    let syns = ports().map(|p| tcp(&Ipv4Spec::new(CLIENT, VIP), p, 80, TCP_SYN, b"")).collect();
    measure("new flow", PROG_INGRESS, syns, true, &mut dp);
    let acks = ports().map(|p| tcp(&Ipv4Spec::new(CLIENT, VIP), p, 80, TCP_ACK, b"")).collect();
    measure("established", PROG_INGRESS, acks, true, &mut dp);
    let replies = ports()
        .map(|p| tcp(&Ipv4Spec::new(expected_backend(p, 80, IPPROTO_TCP), CLIENT), 8080, p, TCP_ACK, b""))
        .collect();
    measure("reverse NAT", PROG_EGRESS, replies, true, &mut dp);
    assert_eq!(dp.conntrack_entries(CT_DIR_ORIGINAL).len(), usize::from(samples));
    println!("per-packet cost ({samples} samples each): {}", report.join("; "));
}

/// Unmounts the scratch bpffs even if the test panics.
struct Mount(tempfile::TempDir);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn maps_are_pinned_under_the_layout_version_and_removed_on_drop() {
    let mount = Mount(tempfile::tempdir().unwrap());
    let root = mount.0.path();
    let dir = mcs_agent::datapath::pin_dir(root);
    assert!(dir.ends_with(format!("mcs/v{}", mcs_common::LAYOUT_VERSION)));
    let sizes = Sizes { capacity: Capacity { services: 8, backends: 8, slots: 8 }, conntrack: 64, ..Sizes::default() };
    // The scratch directory is not a bpffs: the agent mounts one there.
    let dp = Datapath::load(sizes, Some(root)).expect("load with pinning");
    for map in ["SERVICES", "BACKENDS", "SELECTION", "CT", "CT6", "STATS"] {
        assert!(dir.join(map).exists(), "{map} pinned");
    }
    // A second load (a restart after a crash) adopts the pins instead of failing.
    let again = Datapath::load(sizes, Some(root)).expect("load over existing pins");
    assert!(again.adopted(), "the maps of the first load are adopted");
    drop(dp);
    drop(again);
    assert!(!dir.exists(), "no pins remain after a normal stop");
    assert!(!root.join("mcs").exists());
}

#[test]
fn client_ip_affinity_sends_every_new_connection_of_a_client_to_one_backend() {
    let mut dp = datapath();
    let mut chosen = BTreeSet::new();
    for sport in 30000..30100 {
        let (verdict, out) =
            run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, STICKY_VIP), sport, 80, TCP_SYN, b""));
        assert_eq!(verdict, TC_NEXT);
        let v = view(&out);
        assert_eq!(v.l4_checksum_ok, Some(true));
        chosen.insert(v.dst);
    }
    assert_eq!(chosen.len(), 1, "one client, one backend: {chosen:?}");
    assert_eq!(dp.stat(Stat::AffinityHit), 99);
    assert_eq!(dp.affinity_entries().len(), 1);

    // Other clients spread over the backends.
    let mut spread = BTreeSet::new();
    for last in 1..=60 {
        let client = Ipv4Addr::new(10, 0, 1, last);
        let (_, out) = run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(client, STICKY_VIP), 30000, 80, TCP_SYN, b""));
        spread.insert(view(&out).dst);
    }
    assert_eq!(spread.len(), 3, "{spread:?}");
}

#[test]
fn the_kernel_reads_exactly_the_agents_maglev_table() {
    let dp = datapath();
    let want = table(80, Protocol::Tcp);
    let mcs_agent::plan::FamilyKey::V4(key) =
        mcs_agent::plan::service_key(&FrontendKey { vip: VIP.into(), port: 80, protocol: Protocol::Tcp })
    else {
        panic!("an IPv4 frontend")
    };
    let (_, service) = dp.services().into_iter().find(|(k, _)| *k == key).expect("frontend programmed");
    assert_eq!(service.slot_count as usize, want.len());
    for (i, addr) in want.iter().enumerate() {
        let id = dp.selection_slot(service.slot_offset + i as u32).expect("slot in range");
        let backend = dp.backend(id).expect("backend id in range");
        assert_eq!(mcs_agent::plan::backend_addr(&backend), *addr, "slot {i} of {}", want.len());
    }
}

fn no_conntrack(dp: &Datapath) -> bool {
    dp.conntrack_entries(CT_DIR_ORIGINAL).is_empty() && dp.conntrack_entries(CT_DIR_REPLY).is_empty()
}

/// Both entries of the flow `CLIENT:sport -> VIP:80`: the original
/// direction's value, and the reply direction's key and value.
fn flow_entries(dp: &Datapath, sport: u16) -> (Option<CtValue>, Option<(CtKey, CtValue)>) {
    let port = port_to_map(sport);
    let ct = dp.conntrack_entries(CT_DIR_ORIGINAL).into_iter().find(|(k, _)| k.src_port == port).map(|(_, v)| v);
    let rev = dp.conntrack_entries(CT_DIR_REPLY).into_iter().find(|(k, _)| k.dst_port == port);
    (ct, rev)
}

#[test]
fn a_connection_closed_by_fins_from_both_sides_is_marked_closed_in_both_entries() {
    let mut dp = datapath();
    let sport = 41000;
    let backend = expected_backend(sport, 80, IPPROTO_TCP);
    run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_SYN, b""));
    let (ct, rev) = flow_entries(&dp, sport);
    let (ct, rev) = (ct.unwrap(), rev.unwrap().1);
    assert_eq!((ct.flags, rev.flags), (0, 0), "an open connection");
    assert!(ct.backend_id != 0 && rev.backend_id == ct.backend_id, "both entries name the backend: {ct:?} {rev:?}");

    run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_FIN | TCP_ACK, b""));
    let (ct, rev) = flow_entries(&dp, sport);
    let (ct, rev) = (ct.unwrap(), rev.unwrap().1);
    assert_eq!((ct.flags, rev.flags), (CT_F_FIN_CLIENT, CT_F_FIN_CLIENT), "the client's FIN reaches both entries");
    assert_eq!((ct.closed_ns, rev.closed_ns), (0, 0), "half-closed is still open");

    let (verdict, out) =
        run(&mut dp, PROG_EGRESS, &tcp(&Ipv4Spec::new(backend, CLIENT), 8080, sport, TCP_FIN | TCP_ACK, b""));
    assert_eq!(verdict, TC_NEXT);
    assert_eq!((view(&out).src, view(&out).sport), (VIP, 80), "the backend's FIN is still translated");
    let (ct, rev) = flow_entries(&dp, sport);
    let (ct, rev) = (ct.unwrap(), rev.unwrap().1);
    assert_eq!(ct.flags, CT_F_FIN_CLIENT | CT_F_FIN_BACKEND);
    assert_eq!(rev.flags, ct.flags);
    assert!(ct.closed_ns != 0 && ct.closed_ns == rev.closed_ns, "closed at one instant: {ct:?} {rev:?}");

    // The last ACK, within the grace time, is still translated.
    let (_, out) = run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_ACK, b""));
    assert_eq!(view(&out).dst, backend);
}

#[test]
fn a_reset_closes_at_once() {
    let mut dp = datapath();
    let sport = 41100;
    let backend = expected_backend(sport, 80, IPPROTO_TCP);
    run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_SYN, b""));
    run(&mut dp, PROG_EGRESS, &tcp(&Ipv4Spec::new(backend, CLIENT), 8080, sport, TCP_RST | TCP_ACK, b""));
    let (ct, rev) = flow_entries(&dp, sport);
    let (ct, rev) = (ct.unwrap(), rev.unwrap().1);
    assert_eq!((ct.flags, rev.flags), (CT_F_RST, CT_F_RST));
    assert!(ct.closed_ns != 0);
}

#[test]
fn entries_of_a_connection_closed_long_ago_are_never_used_again() {
    let mut dp = datapath();
    let sport = 41200;
    let backend = expected_backend(sport, 80, IPPROTO_TCP);
    // Age both entries past the grace time (closed at boot + 1 ns).
    let age = |dp: &mut Datapath| {
        let (ct, rev) = flow_entries(dp, sport);
        let (key, mut ct) = (dp.conntrack_entries(CT_DIR_ORIGINAL)[0].0, ct.unwrap());
        let (rev_key, mut rev) = rev.unwrap();
        ct.flags = CT_F_RST;
        ct.closed_ns = 1;
        rev.flags = CT_F_RST;
        rev.closed_ns = 1;
        dp.insert_conntrack(key, ct).unwrap();
        dp.insert_conntrack(rev_key, rev).unwrap();
    };
    run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_SYN, b""));
    age(&mut dp);

    // A reply on the old tuple is not ours any more: untouched, and the
    // whole pair is forgotten.
    let late = tcp(&Ipv4Spec::new(backend, CLIENT), 8080, sport, TCP_ACK, b"late");
    let (verdict, out) = run(&mut dp, PROG_EGRESS, &late);
    assert_eq!((verdict, out), (TC_NEXT, late));
    assert_eq!(dp.stat(Stat::ClosedExpired), 1);
    assert_eq!(flow_entries(&dp, sport), (None, None), "both entries are gone");

    // The same seen first by the client's side, on a flow pinned against
    // the hash: its next packet on the tuple no longer rides the old entry,
    // and the old reply entry goes with it.
    let sport = port_for(BACKENDS[0]);
    let key = original_key(sport);
    let closed = CtValue { flags: CT_F_RST, closed_ns: 1, ..pinned_to_second_backend() };
    let (old_reply, old_reply_value) = key.sibling(&closed);
    dp.insert_conntrack(key, closed).unwrap();
    dp.insert_conntrack(old_reply, old_reply_value).unwrap();
    let (_, out) = run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_ACK, b""));
    assert_eq!(view(&out).dst, BACKENDS[0], "balanced afresh");
    assert_eq!(dp.stat(Stat::ClosedExpired), 2);
    let (ct, rev) = flow_entries(&dp, sport);
    assert_eq!({ ct.unwrap().closed_ns }, 0, "what remains is a fresh entry");
    let (reply_key, reply) = rev.unwrap();
    assert_eq!((reply_key.src, { reply.closed_ns }), (ip_to_map(BACKENDS[0].octets()), 0), "with a fresh sibling");
    assert!(dp.conntrack_entries(CT_DIR_REPLY).iter().all(|(k, _)| *k != old_reply), "the old reply entry is gone");
}

#[test]
fn a_leftover_reply_of_an_earlier_connection_never_touches_the_new_one() {
    let mut dp = datapath();
    // The tuple's new connection went to BACKENDS[0]; a reply entry of an
    // earlier one to BACKENDS[1], long closed, is still in the map.
    let sport = port_for(BACKENDS[0]);
    run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_SYN, b""));
    let earlier = CtValue { flags: CT_F_RST, closed_ns: 1, ..pinned_to_second_backend() };
    let (leftover, leftover_value) = original_key(sport).sibling(&earlier);
    dp.insert_conntrack(leftover, leftover_value).unwrap();

    // A late segment of the earlier connection: not ours to translate, and
    // its entry's removal must not take the new connection's original along.
    let late = tcp(&Ipv4Spec::new(BACKENDS[1], CLIENT), 8080, sport, TCP_ACK, b"late");
    let (verdict, out) = run(&mut dp, PROG_EGRESS, &late);
    assert_eq!((verdict, out), (TC_NEXT, late));
    assert_eq!(dp.stat(Stat::ClosedExpired), 1);
    let (_, out) = run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_ACK, b""));
    assert_eq!(view(&out).dst, BACKENDS[0]);
    assert_eq!((dp.stat(Stat::Established), dp.stat(Stat::NewFlow)), (1, 1), "the new connection kept its entry");

    // Nor does a FIN from the earlier backend, while its entry is not yet
    // expired, close the new connection.
    let open_earlier = CtValue { flags: 0, closed_ns: 0, ..leftover_value };
    dp.insert_conntrack(leftover, open_earlier).unwrap();
    run(&mut dp, PROG_EGRESS, &tcp(&Ipv4Spec::new(BACKENDS[1], CLIENT), 8080, sport, TCP_FIN | TCP_ACK, b""));
    let (ct, _) = flow_entries(&dp, sport);
    assert_eq!(ct.unwrap().flags, 0, "the new connection is not marked");
}

#[test]
fn a_udp_flow_whose_backend_left_is_balanced_afresh_and_its_old_reply_entry_goes() {
    let mut dp = datapath();
    let sport = 42_000;
    // Pinned to an address the service no longer has (id 2 now names another).
    let key = CtKey { dst_port: port_to_map(53), proto: mcs_common::IPPROTO_UDP, ..original_key(sport) };
    let gone = CtValue { addr: ip_to_map([10, 99, 0, 1]), port: port_to_map(5353), ..pinned_to_second_backend() };
    let (old_reply, old_reply_value) = key.sibling(&gone);
    dp.insert_conntrack(key, gone).unwrap();
    dp.insert_conntrack(old_reply, old_reply_value).unwrap();
    let (_, out) = run(&mut dp, PROG_INGRESS, &udp(&Ipv4Spec::new(CLIENT, VIP), sport, 53, b"query", false));
    let v = view(&out);
    assert!(BACKENDS.contains(&v.dst) && v.dport == 5353, "balanced afresh: {v:?}");
    assert_eq!(dp.stat(Stat::NewFlow), 1);
    assert!(dp.conntrack_entries(CT_DIR_REPLY).iter().all(|(k, _)| *k != old_reply), "the old reply entry is gone");
    assert_eq!(dp.conntrack_entries(CT_DIR_REPLY).len(), 1);
}

#[test]
fn a_direct_syn_on_a_tuple_once_translated_removes_the_stale_reverse_entry() {
    let mut dp = datapath();
    let sport = 41300;
    let backend = expected_backend(sport, 80, IPPROTO_TCP);
    run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_SYN, b""));
    assert!(flow_entries(&dp, sport).1.is_some());

    // Later the client connects to the pod directly from the same port.
    let direct = tcp(&Ipv4Spec::new(CLIENT, backend), sport, 8080, TCP_SYN, b"");
    let (verdict, out) = run(&mut dp, PROG_INGRESS, &direct);
    assert_eq!((verdict, out), (TC_NEXT, direct), "direct traffic passes untouched");
    assert_eq!(dp.stat(Stat::StaleRevNat), 1);
    assert_eq!(flow_entries(&dp, sport), (None, None), "the whole pair: an original left would bring the reply back");
    let synack = tcp(&Ipv4Spec::new(backend, CLIENT), 8080, sport, TCP_SYN | TCP_ACK, b"");
    let (verdict, out) = run(&mut dp, PROG_EGRESS, &synack);
    assert_eq!((verdict, out), (TC_NEXT, synack), "its SYN-ACK must not be rewritten to come from the VIP");
}

#[test]
fn an_ip_total_length_that_ends_before_the_l4_header_is_malformed() {
    let mut dp = datapath();
    let mut frame = tcp(&Ipv4Spec::new(CLIENT, VIP), 41400, 80, TCP_SYN, b"");
    // Claim a 30-byte IP packet: the TCP header would end 10 bytes past it.
    frame[16..18].copy_from_slice(&30u16.to_be_bytes());
    let (verdict, out) = run(&mut dp, PROG_INGRESS, &frame);
    assert_eq!((verdict, out), (TC_NEXT, frame), "bytes outside the IP packet are never rewritten");
    assert_eq!(dp.stat(Stat::Malformed), 1);
    assert!(no_conntrack(&dp));
}

/// A tracing writer the test reads back.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn kernel_log_reports_rare_events_at_the_chosen_level_and_nothing_when_off() {
    use mcs_agent::datapath::KernelLog;
    let capacity = Capacity { services: 64, backends: 64, slots: 1 << 16 };
    let sizes = Sizes { capacity, conntrack: 1024, ..Sizes::default() };
    let mut malformed = tcp(&Ipv4Spec::new(CLIENT, VIP), 41500, 80, TCP_SYN, b"");
    malformed[14] = 0x43; // IHL 12 bytes: invalid

    let logged = |level: KernelLog| {
        let mut dp = Datapath::open(sizes, None, level).expect("loading with a kernel log level");
        let logger = dp.take_kernel_logger();
        assert_eq!(logger.is_some(), level != KernelLog::Off, "a reader only when logging is on");
        run(&mut dp, PROG_INGRESS, &malformed);
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        if let Some(mut logger) = logger {
            tracing::subscriber::with_default(subscriber, || logger.flush());
        }
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    };
    // Off is a constant of the loaded program (.rodata, frozen): the verifier
    // removes the logging code, so the translated program is smaller.
    let translated = |level| {
        let mut dp = Datapath::open(sizes, None, level).unwrap();
        dp.program_mut(PROG_INGRESS).unwrap().info().unwrap().size_translated().unwrap()
    };
    let (off, on) = (translated(KernelLog::Off), translated(KernelLog::Debug));
    eprintln!("mcs_ingress translated: {off} bytes with --kernel-log off, {on} with debug");
    assert!(off < on, "logging compiled out when off: {off} vs {on} bytes");
    let debug = logged(KernelLog::Debug);
    assert!(debug.contains("malformed packet passed untouched"), "{debug:?}");
    assert!(debug.contains("mcs_kernel"), "under the mcs_kernel target: {debug:?}");
    assert!(logged(KernelLog::Warn).is_empty(), "a debug event is below warn");
    assert!(logged(KernelLog::Off).is_empty());
}

/// The original-direction key of `CLIENT:sport -> VIP:80/TCP`.
fn original_key(sport: u16) -> CtKey {
    CtKey {
        src: ip_to_map(CLIENT.octets()),
        dst: ip_to_map(VIP.octets()),
        src_port: port_to_map(sport),
        dst_port: port_to_map(80),
        proto: IPPROTO_TCP,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    }
}

/// A conntrack value pinning a flow to BACKENDS[1]:8080 (id 2 of service 1).
fn pinned_to_second_backend() -> CtValue {
    CtValue {
        addr: ip_to_map(BACKENDS[1].octets()),
        port: port_to_map(8080),
        backend_id: 2,
        service_id: 1,
        ..CtValue::default()
    }
}

#[test]
fn a_flows_evicted_entry_comes_back_from_its_sibling() {
    let mut dp = datapath();
    // The hash picks BACKENDS[0]; the flow is pinned to BACKENDS[1], so only
    // conntrack (not a fresh selection) can send it there.
    let sport = port_for(BACKENDS[0]);
    let (key, pinned) = (original_key(sport), pinned_to_second_backend());
    // Only the original entry, as if pressure had evicted the reply's.
    dp.insert_conntrack(key, pinned).unwrap();
    let ack = tcp(&Ipv4Spec::new(CLIENT, VIP), sport, 80, TCP_ACK, b"");
    let (_, out) = run(&mut dp, PROG_INGRESS, &ack);
    assert_eq!(view(&out).dst, BACKENDS[1]);
    assert_eq!(dp.stat(Stat::CtPairRestored), 1, "the reply entry was put back");
    let reply = tcp(&Ipv4Spec::new(BACKENDS[1], CLIENT), 8080, sport, TCP_ACK, b"data");
    let (_, out) = run(&mut dp, PROG_EGRESS, &reply);
    let v = view(&out);
    assert_eq!((v.src, v.sport, v.l4_checksum_ok), (VIP, 80, Some(true)), "so the reply shows the VIP");

    // The other way: the original entry evicted, a reply seen first.
    let (reply_key, mut reply_value) = flow_entries(&dp, sport).1.unwrap();
    dp.remove_conntrack(&key).unwrap();
    reply_value.paired_ns = 0; // due for its check
    dp.insert_conntrack(reply_key, reply_value).unwrap();
    let (_, out) = run(&mut dp, PROG_EGRESS, &reply);
    assert_eq!((view(&out).src, view(&out).sport), (VIP, 80));
    assert_eq!(dp.stat(Stat::CtPairRestored), 2, "the original entry was put back");
    let (_, out) = run(&mut dp, PROG_INGRESS, &ack);
    assert_eq!(view(&out).dst, BACKENDS[1], "the client's next packet stays on the pinned backend");
    assert_eq!(dp.stat(Stat::NewFlow), 0, "never re-selected");

    // A check is due once per CT_PAIR_CHECK_NS per entry, not on every packet.
    dp.remove_conntrack(&reply_key).unwrap();
    run(&mut dp, PROG_INGRESS, &ack);
    assert_eq!(dp.stat(Stat::CtPairRestored), 2);
    assert!(flow_entries(&dp, sport).1.is_none());
}

/// A pinned map of the given shape, as an older agent would have left it
/// (aya creates maps only from an object file).
fn legacy_map(path: &std::path::Path, map_type: u32, key: usize, value: usize, entries: u32) -> aya::maps::Map {
    use std::os::fd::FromRawFd;
    let mut create = [0u32; 30];
    create[..4].copy_from_slice(&[map_type, key as u32, value as u32, entries]);
    // SAFETY: BPF_MAP_CREATE (0) with a zero-filled attribute of ample size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, create.as_ptr(), std::mem::size_of_val(&create)) };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor the kernel just returned, owned here.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = [0u64; 4];
    pin[0] = c_path.as_ptr() as u64;
    pin[1] = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64;
    // SAFETY: BPF_OBJ_PIN (6): pathname and descriptor, both live.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_ptr(), std::mem::size_of_val(&pin)) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN {}: {}", path.display(), std::io::Error::last_os_error());
    let data = aya::maps::MapData::from_pin(path).expect("reopening the pinned map");
    match map_type {
        1 => aya::maps::Map::HashMap(data),
        2 => aya::maps::Map::Array(data),
        _ => aya::maps::Map::LruHashMap(data),
    }
}

#[test]
fn layout_3_flows_are_carried_over_as_pairs() {
    use mcs_common::{Backend, ServiceKey, ServiceValue, v3};
    const HASH: u32 = 1;
    const ARRAY: u32 = 2;
    const LRU_HASH: u32 = 9;
    let bpffs = mcs_tests::bpffs::ScratchBpffs::new();
    let old = mcs_agent::datapath::LayoutDir::new(bpffs.path(), 3);
    std::fs::create_dir_all(&old.dir).unwrap();
    let (client, vip) = (ip_to_map(CLIENT.octets()), ip_to_map(VIP.octets()));
    let b = |i: usize| ip_to_map(BACKENDS[i].octets());

    // Layout 3's ids: service 9 is VIP:80/TCP, backend 5 is BACKENDS[1]:8080.
    let mut services: aya::maps::HashMap<_, ServiceKey, ServiceValue> =
        legacy_map(&old.map("SERVICES"), HASH, 8, 24, 8).try_into().unwrap();
    let frontend = ServiceKey { vip, port: port_to_map(80), proto: IPPROTO_TCP, _pad: 0 };
    services.insert(frontend, ServiceValue { service_id: 9, ..ServiceValue::default() }, 0).unwrap();
    let mut backends: aya::maps::Array<_, Backend> =
        legacy_map(&old.map("BACKENDS"), ARRAY, 4, 8, 8).try_into().unwrap();
    backends.set(5, Backend { ip: b(1), port: port_to_map(8080), _pad: 0 }, 0).unwrap();
    let mut conntrack: aya::maps::HashMap<_, v3::CtKey<u32>, v3::CtValue<u32>> =
        legacy_map(&old.map(v3::MAP_CONNTRACK), LRU_HASH, 16, 32, 64).try_into().unwrap();
    let mut rev_nat: aya::maps::HashMap<_, v3::RevNatKey<u32>, v3::RevNatValue<u32>> =
        legacy_map(&old.map(v3::MAP_REV_NAT), LRU_HASH, 16, 24, 64).try_into().unwrap();

    // Flow A, both entries, pinned against the hash to BACKENDS[1]. Flow B
    // only its reply entry (layout 3's maps could disagree like that); flow
    // C only its original entry.
    let (sport_a, sport_b) = (port_for(BACKENDS[0]), port_for(BACKENDS[0]) + 1);
    let sport_c = (sport_b + 1..).find(|&p| expected_backend(p, 80, IPPROTO_TCP) == BACKENDS[0]).unwrap();
    let backend_b = expected_backend(sport_b, 80, IPPROTO_TCP);
    let backend_b = if backend_b == BACKENDS[0] { 1 } else { 0 };
    let old_ct = |sport: u16| v3::CtKey {
        client_ip: client,
        vip,
        client_port: port_to_map(sport),
        vip_port: port_to_map(80),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let old_rev = |sport: u16, backend: usize| v3::RevNatKey {
        backend_ip: b(backend),
        client_ip: client,
        backend_port: port_to_map(8080),
        client_port: port_to_map(sport),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let rev_value = |id: u32| v3::RevNatValue {
        vip,
        vip_port: port_to_map(80),
        flags: CT_F_SYNACK,
        backend_id: id,
        ..Default::default()
    };
    let a = v3::CtValue {
        backend_ip: b(1),
        backend_port: port_to_map(8080),
        backend_id: 5,
        service_id: 9,
        created_ns: 77,
        ..Default::default()
    };
    conntrack.insert(old_ct(sport_a), a, 0).unwrap();
    conntrack.insert(old_ct(sport_c), a, 0).unwrap();
    rev_nat.insert(old_rev(sport_a, 1), rev_value(5), 0).unwrap();
    rev_nat.insert(old_rev(sport_b, backend_b), rev_value(0), 0).unwrap();

    let mut dp = datapath();
    let carried = mcs_agent::datapath::carry_over(&mut dp, &old);
    assert_eq!((carried.conntrack, carried.converted), (0, 4), "{carried:?}");
    assert_eq!(dp.conntrack_entries(CT_DIR_ORIGINAL).len(), 3, "A, B (derived from its reply) and C");
    assert_eq!(dp.conntrack_entries(CT_DIR_REPLY).len(), 2, "A and B: C's is not derived ahead of its traffic");

    // Ids are this agent's, found through the addresses both layouts know.
    let state = dp.kernel_state();
    let want_frontend = FrontendKey { vip: VIP.into(), port: 80, protocol: Protocol::Tcp };
    let new_service = state.services.iter().find(|(k, _)| *k == Ok(want_frontend)).unwrap().1.service_id;
    let (ct_a, rev_a) = flow_entries(&dp, sport_a);
    let (ct_a, rev_a) = (ct_a.unwrap(), rev_a.unwrap().1);
    let backend = dp.backend(ct_a.backend_id).expect("a backend id in range");
    assert_eq!(
        (backend.ip, backend.port),
        (b(1), port_to_map(8080)),
        "backend id 5 became this agent's id of the address"
    );
    assert_eq!((ct_a.service_id, ct_a.created_ns), (new_service, 77));
    assert_eq!((rev_a.addr, rev_a.port, rev_a.backend_id), (vip, port_to_map(80), ct_a.backend_id));
    assert_eq!(rev_a.flags, CT_F_SYNACK, "the reply entry keeps what layout 3's saw");

    // Both flows go on where they went.
    let (_, out) = run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport_a, 80, TCP_ACK, b""));
    assert_eq!(view(&out).dst, BACKENDS[1]);
    let (_, out) = run(&mut dp, PROG_EGRESS, &tcp(&Ipv4Spec::new(BACKENDS[1], CLIENT), 8080, sport_a, TCP_ACK, b""));
    assert_eq!((view(&out).src, view(&out).sport), (VIP, 80));
    let (_, out) = run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport_b, 80, TCP_ACK, b""));
    assert_eq!(view(&out).dst, BACKENDS[backend_b], "flow B's original entry was derived from its reply entry");
    // Flow C's first client packet brings its reply entry back.
    let (_, out) = run(&mut dp, PROG_INGRESS, &tcp(&Ipv4Spec::new(CLIENT, VIP), sport_c, 80, TCP_ACK, b""));
    assert_eq!(view(&out).dst, BACKENDS[1]);
    assert_eq!(dp.stat(Stat::CtPairRestored), 1);
    let (_, out) = run(&mut dp, PROG_EGRESS, &tcp(&Ipv4Spec::new(BACKENDS[1], CLIENT), 8080, sport_c, TCP_ACK, b""));
    assert_eq!((view(&out).src, view(&out).sport), (VIP, 80));
    assert_eq!(flow_entries(&dp, sport_c).1.unwrap().1.flags, CT_F_SYNACK, "past the handshake");
    assert_eq!(dp.stat(Stat::NewFlow), 0);
}
