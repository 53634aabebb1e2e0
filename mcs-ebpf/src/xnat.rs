//! Flows from outside the node (`--external-interface`): their conntrack
//! (`XNAT_CT`), shared by the XDP program that translates them and the TC
//! programs that finish what XDP cannot do itself. Source NAT to a node
//! address makes a backend in any cluster answer through this node; a
//! backend on this node answers through its pod interface, where
//! [`local_reply`] undoes the translation.

// The map calls take keys and values by reference on purpose: by value they
// would be copied onto a stack the XDP path has little of.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, bpf_fib_lookup},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh},
    },
    macros::classifier,
    programs::TcContext,
};
use mcs_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, CT_F_REPLIED, CT_F_SYNACK, CT_PAIR_CHECK_NS,
    CtKey, FRAG_PART_DST, FRAG_PART_SENT, FRAG_PART_SRC, FRAG_XNAT, FragKey, FragValue, IPPROTO_TCP, IPPROTO_UDP,
    MapAddr, NatValue, ServiceValue, Stat, XNAT_PORT_TRIES, XnatConfig, ct_closed, flow_hash, frag_fresh, frag_stamp,
};

use crate::{
    ct::{close_bits, expired},
    family::{Family, V4, V6},
    icmp::{self, Quote},
    ingress::{count_new_flow, select},
    maps::{TC_ACT_SHOT, TC_NEXT, XNAT, backend_stats, count, health_add, service_stats, xnat_scratch},
    nat::{Side, rewrite},
    parse::{Flow, Frag, Packet, Parsed, TCP_FLAG_ACK, TCP_FLAG_RST, TCP_FLAG_SYN, load, parse, ptr_at, pull_more},
};

/// See `known`: when an answered UDP flow counts as a stream.
const UDP_STREAM_AFTER_NS: u64 = 2_000_000_000;

#[inline(always)]
pub fn is_bare_syn<A>(flow: &Flow<A>) -> bool {
    flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

#[inline(always)]
fn tuple<A: MapAddr>(flow: &Flow<A>, dir: u8) -> CtKey<A> {
    CtKey {
        src: flow.src_ip,
        dst: flow.dst_ip,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        dir,
        _pad: [0; 2],
    }
}

/// Whether `port` (map byte order) is in the source NAT range.
#[inline(always)]
pub fn in_port_range(config: &XnatConfig, port: u16) -> bool {
    u16::from_be(port).wrapping_sub(config.port_lo) < config.port_count
}

/// The flow's other entry, if it is there and is this flow's: it must point
/// back. After an eviction the tuple may be another flow's (a port claimed
/// anew), whose entry this flow must never close, remove or refresh.
#[inline(always)]
fn sibling_of<F: Family>(key: &CtKey<F::A>, value: &NatValue<F::A>) -> Option<*mut NatValue<F::A>> {
    let sibling = value.sibling_key(key.proto, key.dir);
    let found = F::xnat_ct().get_ptr_mut(&sibling)?;
    // SAFETY: map value pointer, valid for this program run.
    let back = unsafe { (*found).sibling_key(sibling.proto, sibling.dir) };
    (back == *key).then_some(found)
}

/// Removes a flow's entry and, if it is this flow's, the other one.
#[inline(never)]
fn remove_pair<F: Family>(key: &CtKey<F::A>, value: &NatValue<F::A>) {
    if sibling_of::<F>(key, value).is_some() {
        let _ = F::xnat_ct().remove(&value.sibling_key(key.proto, key.dir));
    }
    let _ = F::xnat_ct().remove(key);
}

/// Adds `CT_F_*` bits to both entries; a connection's end (both FINs, a
/// RST) starts the grace time, as on the TC path.
#[inline(never)]
fn mark<F: Family>(key: &CtKey<F::A>, entry: *mut NatValue<F::A>, bits: u8) {
    // SAFETY: map value pointer, valid for this program run.
    let value = unsafe { &mut *entry };
    let sibling = sibling_of::<F>(key, value);
    let mut flags = bits | value.flags;
    if let Some(sibling) = sibling {
        // SAFETY: as above.
        flags |= unsafe { (*sibling).flags };
    }
    // SAFETY: helper without preconditions.
    let now = if ct_closed(flags) { unsafe { bpf_ktime_get_ns() } } else { 0 };
    for entry in [Some(entry), sibling].into_iter().flatten() {
        // SAFETY: as above.
        unsafe {
            (*entry).flags = flags;
            if { (*entry).closed_ns } == 0 {
                (*entry).closed_ns = now;
            }
        }
    }
}

/// The translation of a packet whose flow is known (either direction),
/// into `out`; false: unknown, or a closed connection's leftovers
/// (removed), or a UDP flow whose backend left (removed, to be balanced
/// afresh).
// Out of line, filling the caller's value: the XDP path's frames must stay
// within BPF's 512 bytes.
#[inline(never)]
pub fn known<F: Family>(flow: &Flow<F::A>, dir: u8, out: &mut NatValue<F::A>) -> bool {
    let key = tuple(flow, dir);
    let Some(entry) = F::xnat_ct().get_ptr_mut(&key) else { return false };
    // SAFETY: map value pointer, valid for this program run. A copy: the
    // entry is written below.
    let value = &unsafe { *entry };
    // A closed connection's tuple opened again by a new SYN, or past its grace time.
    if value.closed_ns != 0 && ((dir == CT_DIR_ORIGINAL && is_bare_syn(flow)) || expired(value.closed_ns)) {
        remove_pair::<F>(&key, value);
        count(Stat::ClosedExpired);
        return false;
    }
    if flow.proto == IPPROTO_TCP {
        let bits = close_bits(flow.tcp_flags, if dir == CT_DIR_ORIGINAL { CT_F_FIN_CLIENT } else { CT_F_FIN_BACKEND });
        if bits != 0 {
            mark::<F>(&key, entry, bits);
        }
    }
    // UDP has no connection to keep: once its backend left the service, it
    // is balanced afresh. Nor does a new TCP connection on a reused port.
    if dir == CT_DIR_ORIGINAL && (flow.proto == IPPROTO_UDP || is_bare_syn(flow)) {
        let current = F::backends().get(value.backend_id);
        if current.is_none_or(|b| b.ip != value.peer || b.port != value.peer_port) {
            remove_pair::<F>(&key, value);
            return false;
        }
    }
    if dir == CT_DIR_REPLY && flow.proto == IPPROTO_TCP && value.flags & CT_F_SYNACK == 0 {
        // Passive health: the backend's first answer to a connection's SYN.
        if flow.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN | TCP_FLAG_ACK {
            health_add(value.backend_id, |h| &mut h.synacks);
            // On both entries: one put back after an eviction copies its
            // sibling's (the collector's timeout depends on it).
            mark::<F>(&key, entry, CT_F_SYNACK);
        } else if flow.tcp_flags & TCP_FLAG_RST != 0 {
            health_add(value.backend_id, |h| &mut h.syn_rsts);
        }
    }
    // A UDP flow still answered two seconds after it began is a stream: the
    // collector gives it the stream timeout. A single exchange (a query and
    // its answer) keeps the short one, and gives its port back sooner, as
    // Linux conntrack does.
    if dir == CT_DIR_REPLY
        && flow.proto == IPPROTO_UDP
        && value.flags & CT_F_REPLIED == 0
        // SAFETY: helper without preconditions.
        && unsafe { bpf_ktime_get_coarse_ns() }.saturating_sub(value.created_ns) >= UDP_STREAM_AFTER_NS
    {
        mark::<F>(&key, entry, CT_F_REPLIED);
    }
    if !touch::<F>(&key, entry) {
        // Forgotten: its sibling's tuple is another flow's now.
        return false;
    }
    account::<F>(flow, value, dir);
    // SAFETY: as above.
    *out = unsafe { *entry };
    true
}

/// At most once per `CT_PAIR_CHECK_NS`: the flow's idle clock, on both
/// entries (a direction quiet for now must not look idle to the collector
/// while the other is busy; the lookup also keeps it recent in the LRU).
/// The coarse clock costs a memory read, not a clock read.
/// False when the entry was forgotten (see [`touch_sibling`]).
#[inline(always)]
fn touch<F: Family>(key: &CtKey<F::A>, entry: *mut NatValue<F::A>) -> bool {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: map value pointer, valid for this program run.
    let value = unsafe { &mut *entry };
    // Saturating: a fresh entry carries the fine clock, up to a tick ahead.
    if now.saturating_sub(value.seen_ns) < CT_PAIR_CHECK_NS {
        return true;
    }
    value.seen_ns = now;
    touch_sibling::<F>(key, value, now)
}

/// Refreshes the other entry, or puts it back if memory pressure evicted
/// it. Its tuple claimed by another flow meanwhile (a reply entry holds a
/// source NAT port), this flow cannot be translated without mixing with
/// that one: it is forgotten, and its next packet is a miss.
#[inline(never)]
fn touch_sibling<F: Family>(key: &CtKey<F::A>, value: &NatValue<F::A>, now: u64) -> bool {
    if let Some(sibling) = sibling_of::<F>(key, value) {
        // SAFETY: map value pointer, valid for this program run.
        unsafe { (*sibling).seen_ns = now };
        return true;
    }
    if value.closed_ns != 0 {
        return true;
    }
    // Built in the per-CPU scratch value, not on the stack (the callers'
    // frames leave little): free until `known` copies its entry out.
    let Some(restored) = xnat_scratch::<F::A>() else { return true };
    // The answered packet, translated back: to this entry's tuple, reversed.
    *restored = *value;
    (restored.peer, restored.nat, restored.peer_port, restored.nat_port) =
        (key.src, key.dst, key.src_port, key.dst_port);
    restored.seen_ns = now;
    if F::xnat_ct().insert(&value.sibling_key(key.proto, key.dir), &*restored, BPF_NOEXIST as u64).is_ok() {
        count(Stat::CtPairRestored);
        return true;
    }
    let _ = F::xnat_ct().remove(key);
    false
}

/// Per-backend packet and byte counters, while the id still names the
/// backend the flow went to.
#[inline(always)]
fn account<F: Family>(flow: &Flow<F::A>, value: &NatValue<F::A>, dir: u8) {
    let (ip, port) = if dir == CT_DIR_ORIGINAL { (value.peer, value.peer_port) } else { (flow.src_ip, flow.src_port) };
    if let Some(stats) = backend_stats::<true>(value.backend_id)
        && F::backends().get(value.backend_id).is_some_and(|b| b.ip == ip && b.port == port)
    {
        if dir == CT_DIR_ORIGINAL {
            stats.packets_to += 1;
            stats.bytes_to += u64::from(flow.ip_len);
        } else {
            stats.packets_from += 1;
            stats.bytes_from += u64::from(flow.ip_len);
        }
    }
}

/// A new flow from outside: a backend selected as on the other paths, a
/// source NAT port free for that backend, and both entries (the reply's
/// first: its insert is what claims the port). The original entry is left
/// in `value`. `Err`: not translated, already counted; `Err(true)`: to be
/// answered with a rejection (a new flow to a frontend without backends).
// One value and one key, reused from the reply's entry to the original's:
// the XDP path's frames must stay within BPF's 512 bytes.
#[inline(never)]
pub fn open<F: Family>(
    flow: &Flow<F::A>,
    service: &ServiceValue,
    config: &XnatConfig,
    node: F::A,
    value: &mut NatValue<F::A>,
) -> Result<(), bool> {
    // Under source NAT a connection balanced afresh mid-stream would reach
    // its backend from a new port and only earn a RST.
    if flow.proto == IPPROTO_TCP && !is_bare_syn(flow) {
        count(Stat::XdpMidstream);
        return Err(false);
    }
    let hash = flow_hash(flow.src_ip, flow.dst_ip, flow.src_port, flow.dst_port, flow.proto);
    let Some((id, backend)) = select::<F>(service, || hash, flow.src_ip) else {
        count(Stat::XdpNoBackend);
        if let Some(stats) = service_stats::<true>(service.service_id) {
            stats.no_backend += 1;
        }
        // Only a flow's opening packet is answered, as on the TC path.
        return Err(flow.proto == IPPROTO_UDP || is_bare_syn(flow));
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    *value = NatValue {
        peer: flow.src_ip,
        nat: flow.dst_ip,
        peer_port: flow.src_port,
        nat_port: flow.dst_port,
        flags: 0,
        _pad: [0; 3],
        backend_id: id,
        service_id: service.service_id,
        closed_ns: 0,
        created_ns: now,
        seen_ns: now,
    };
    let mut key = CtKey {
        src: backend.ip,
        dst: node,
        src_port: backend.port,
        dst_port: 0,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    // A port is taken when its reply tuple (backend, node address, port) is
    // free: the same port serves other backends at the same time. The first
    // try is the flow's hash, then ports scattered by it: trying the next
    // ports in turn would make runs of taken ports that grow with the load
    // (primary clustering), and a half-full range would fail new flows.
    let mut claimed = false;
    let span = u32::from(config.port_count);
    for i in 0..XNAT_PORT_TRIES {
        let Some(offset) = probe(hash, i).checked_rem(span) else { break };
        key.dst_port = (config.port_lo.wrapping_add(offset as u16)).to_be();
        // Looked up first: a failed insert into an LRU map still takes a
        // free node, evicting another flow's entry when the map is full.
        if F::xnat_ct().get_ptr(&key).is_none() && F::xnat_ct().insert(&key, &*value, BPF_NOEXIST as u64).is_ok() {
            claimed = true;
            break;
        }
    }
    if !claimed {
        count(Stat::SnatExhausted);
        return Err(false);
    }
    let port = key.dst_port;
    (value.peer, value.nat, value.peer_port, value.nat_port) = (backend.ip, node, backend.port, port);
    let reply = key;
    key = tuple(flow, CT_DIR_ORIGINAL);
    // Not over another CPU's translation of the same new flow: its reply
    // entry, holding another port, would be orphaned. Its translation
    // stands; this packet goes (the client sends it again).
    if F::xnat_ct().insert(&key, &*value, BPF_NOEXIST as u64).is_err() {
        let _ = F::xnat_ct().remove(&reply);
        count(Stat::CtInsertFailed);
        return Err(false);
    }
    count(Stat::XdpNewFlow);
    count_new_flow::<_, true>(flow, id, service.service_id);
    Ok(())
}

/// The `i`-th port a flow of hash `hash` tries (before the range's modulo):
/// the hash itself first (the packet tables predict it), then scattered.
#[inline(always)]
pub fn probe(hash: u32, i: u32) -> u32 {
    if i == 0 {
        return hash >> 8;
    }
    let mut h = hash ^ i.wrapping_mul(0x9e37_79b9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h
}

/// A route lookup's answer, in what is kept of it: the result, the
/// interface out, the frame's new MAC addresses (the next hop's, our own),
/// and with `BPF_FIB_LKUP_RET_FRAG_NEEDED` the route's MTU. A fifth of the
/// lookup's parameters, which die here: the XDP path's frames are tight.
#[derive(Clone, Copy)]
pub struct Route {
    pub rc: u32,
    pub ifindex: u32,
    pub macs: [u8; 12],
    pub mtu: u16,
}

impl Route {
    /// The route of a packet from `src:sport` to `dst:dport` (as
    /// translated) arriving on `ifindex`, checked against its MTU if
    /// `ip_len` is not zero. `ctx`: the program's context pointer.
    #[inline(always)]
    pub fn lookup<F: Family>(
        ctx: *mut core::ffi::c_void,
        (proto, ip_len): (u8, u16),
        (src, sport): (F::A, u16),
        (dst, dport): (F::A, u16),
        ifindex: u32,
    ) -> Self {
        // SAFETY: a plain C struct; zero is a valid value of every field.
        let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
        params.family = F::AF;
        params.l4_protocol = proto;
        params.sport = sport;
        params.dport = dport;
        params.__bindgen_anon_1.tot_len = ip_len;
        params.ifindex = ifindex;
        F::fib_addrs(&mut params, src, dst);
        // SAFETY: params is a valid, writable bpf_fib_lookup of the size passed.
        let rc = unsafe { fib_lookup(ctx, &mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) } as u32;
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&params.dmac);
        macs[6..].copy_from_slice(&params.smac);
        // SAFETY: the union's MTU; the kernel writes it with FRAG_NEEDED.
        let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
        Route { rc, ifindex: params.ifindex, macs, mtu }
    }

    /// Writes the next hop's and our own MAC into the Ethernet header.
    #[inline(always)]
    pub fn set_macs(&self, ctx: &impl Packet) -> bool {
        let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else { return false };
        // SAFETY: bounds checked by ptr_at.
        unsafe { eth.write_unaligned(self.macs) };
        true
    }
}

/// TC ingress on external interfaces: a packet `mcs_xdp` translated but
/// handed to the stack (a backend on this node, a neighbour not resolved
/// yet) goes out of the route's interface from here. Routing would refuse
/// it: its source is the node's own address, as no packet from outside
/// otherwise has (a martian). Other packets pay a parse and a compare.
#[classifier]
pub fn mcs_uplink(ctx: TcContext) -> i32 {
    match parse(&ctx) {
        Parsed::V4(flow) => uplink::<V4>(&ctx, &flow),
        Parsed::V6(flow) => uplink::<V6>(&ctx, &flow),
        _ => TC_NEXT,
    }
}

#[inline(never)]
fn uplink<F: Family>(ctx: &TcContext, flow: &Flow<F::A>) -> i32 {
    let Some(config) = XNAT.get(0) else { return TC_NEXT };
    let node = F::xnat_addr(config);
    if flow.src_ip != node || node == F::A::ZERO {
        return TC_NEXT;
    }
    // A later fragment (no ports) of a datagram `mcs_xdp` translated.
    if let Frag::Later(id) = flow.frag {
        let sent = FragKey::new(node, flow.dst_ip, id, flow.proto, FRAG_PART_SENT);
        return match fragment_entry::<F>(&sent) {
            Some(_) => route_out::<F>(ctx, flow, (flow.src_ip, 0), (flow.dst_ip, 0)),
            None => TC_NEXT,
        };
    }
    if flow.proto == F::ICMP {
        return uplink_error::<F>(ctx, flow, config);
    }
    if !in_port_range(config, flow.src_port) {
        return TC_NEXT;
    }
    // Only a flow we translated: anyone upstream can forge this source, and
    // a redirect passes by the stack's checks (martians, rp_filter, netfilter).
    let reply = CtKey {
        src: flow.dst_ip,
        dst: node,
        src_port: flow.dst_port,
        dst_port: flow.src_port,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    if F::xnat_ct().get_ptr(&reply).is_none() {
        return TC_NEXT;
    }
    route_out::<F>(ctx, flow, (flow.src_ip, flow.src_port), (flow.dst_ip, flow.dst_port))
}

/// An ICMP error `mcs_xdp` translated for a backend (from the node, quoting
/// the backend's reply as it sent it: backend -> node:port) and handed to
/// the stack (a backend on this node, a neighbour not resolved yet): sent
/// on, if the reply's flow is ours.
#[inline(never)]
fn uplink_error<F: Family>(ctx: &TcContext, flow: &Flow<F::A>, config: &XnatConfig) -> i32 {
    let (inner, l4) = (Quote::inner::<F>(), Quote::l4::<F>());
    if flow.l4_off != Quote::l4_off::<F>() || !icmp::is_error::<F>(flow.icmp_type) || !pull_more(ctx, (l4 + 4) as u32) {
        return TC_NEXT;
    }
    let proto_off = inner + if F::HEADER_CSUM { 9 } else { 6 };
    let Some(proto) = load::<u8>(ctx, proto_off) else { return TC_NEXT };
    let Some(sender) = load::<F::A>(ctx, inner + F::SRC_OFF) else { return TC_NEXT };
    let Some(receiver) = load::<F::A>(ctx, inner + F::DST_OFF) else { return TC_NEXT };
    let Some(ports) = load::<[u16; 2]>(ctx, l4) else { return TC_NEXT };
    if sender != flow.dst_ip || receiver != flow.src_ip || !in_port_range(config, ports[1]) {
        return TC_NEXT;
    }
    let reply = CtKey {
        src: sender,
        dst: receiver,
        src_port: ports[0],
        dst_port: ports[1],
        proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    if F::xnat_ct().get_ptr(reply).is_none() {
        return TC_NEXT;
    }
    route_out::<F>(ctx, flow, (flow.src_ip, 0), (flow.dst_ip, 0))
}

/// Sends a translated packet out of its route's interface, bypassing the
/// stack's routing (its source is a VIP or the node's own address).
#[inline(always)]
fn route_out<F: Family>(ctx: &TcContext, flow: &Flow<F::A>, src: (F::A, u16), dst: (F::A, u16)) -> i32 {
    // SAFETY: a read of the context's field.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // No MTU check (a zero length): the output path fragments or reports
    // as it would for routed traffic.
    let route = Route::lookup::<F>(ctx.as_ptr(), (flow.proto, 0), src, dst, ifindex);
    match route.rc {
        // SAFETY (both): helpers without preconditions.
        BPF_FIB_LKUP_RET_SUCCESS if route.set_macs(ctx) => unsafe { bpf_redirect(route.ifindex, 0) as i32 },
        BPF_FIB_LKUP_RET_NO_NEIGH => unsafe { bpf_redirect_neigh(route.ifindex, core::ptr::null_mut(), 0, 0) as i32 },
        _ => {
            count(Stat::XdpUnroutable);
            TC_ACT_SHOT
        }
    }
}

/// At TC ingress of a pod interface, before anything else: a reply to the
/// node's source NAT address from a backend on this node, for a flow from
/// outside. It never crosses the external interface's XDP program, so it
/// is translated back here (VIP -> client) and sent out of the route's
/// interface. `None`: not such a reply. Costs other packets an array read
/// and a compare.
#[inline(always)]
pub fn local_reply<F: Family>(ctx: &TcContext, flow: &Flow<F::A>) -> Option<i32> {
    let config = XNAT.get(0)?;
    let node = F::xnat_addr(config);
    if flow.dst_ip != node || node == F::A::ZERO {
        return None;
    }
    if let Frag::Later(id) = flow.frag {
        return local_reply_fragment::<F>(ctx, flow, id);
    }
    if flow.proto == F::ICMP {
        return if icmp::is_error::<F>(flow.icmp_type) { local_error::<F>(ctx, flow) } else { None };
    }
    if !in_port_range(config, flow.dst_port) {
        return None;
    }
    local_reply_known::<F>(ctx, flow)
}

/// A backend on this node's ICMP error about a packet of a flow from
/// outside (its port unreachable, to the node address): the client gets
/// it about the packet it sent, from the VIP, as from a remote backend.
#[inline(never)]
fn local_error<F: Family>(ctx: &TcContext, flow: &Flow<F::A>) -> Option<i32> {
    if flow.l4_off != Quote::l4_off::<F>() || !pull_more(ctx, (Quote::l4::<F>() + 20) as u32) {
        return None;
    }
    let config = XNAT.get(0)?;
    let (proto, entry) = icmp::quoted_entry::<F, _>(ctx, config, false)?;
    // SAFETY: map value pointer, valid for this program run.
    let entry = unsafe { &*entry };
    if icmp::rewrite_error::<F, _>(ctx, proto, entry).is_none() {
        count(Stat::RewriteFailed);
        return Some(TC_ACT_SHOT);
    }
    count(Stat::XdpIcmpRevNat);
    Some(route_out::<F>(ctx, flow, (entry.nat, 0), (entry.peer, 0)))
}

// Out of line: its conntrack key and value must not join the DNAT path's frame.
#[inline(never)]
fn local_reply_known<F: Family>(ctx: &TcContext, flow: &Flow<F::A>) -> Option<i32> {
    if flow.proto == F::ICMP {
        return None;
    }
    let mut value = NatValue::default();
    if !known::<F>(flow, CT_DIR_REPLY, &mut value) {
        return None;
    }
    Some(local_reply_send::<F>(ctx, flow, &value))
}

#[inline(never)]
fn local_reply_send<F: Family>(ctx: &TcContext, flow: &Flow<F::A>, value: &NatValue<F::A>) -> i32 {
    if rewrite::<F>(ctx, flow, Side::Source, value.nat, value.nat_port).is_err()
        || rewrite::<F>(ctx, flow, Side::Destination, value.peer, value.peer_port).is_err()
    {
        count(Stat::RewriteFailed);
        return TC_ACT_SHOT;
    }
    count(Stat::XnatLocalRevNat);
    if let Frag::First(id) = flow.frag {
        remember::<F>(flow, id, value, 0);
    }
    route_out::<F>(ctx, flow, (value.nat, value.nat_port), (value.peer, value.peer_port))
}

/// A later fragment of a local backend's reply whose first fragment was
/// translated here: the same addresses (the first fragment's checksum
/// update covered the whole datagram). `None`: not one.
#[inline(never)]
fn local_reply_fragment<F: Family>(ctx: &TcContext, flow: &Flow<F::A>, id: u32) -> Option<i32> {
    let mut key = flow.frag_key(id, FRAG_PART_DST);
    let (dst, _) = fragment_entry::<F>(&key)?;
    key.part = FRAG_PART_SRC;
    // A reply is never renumbered.
    let Some((src, _)) = fragment_entry::<F>(&key) else {
        count(Stat::FragmentMiss);
        return Some(TC_ACT_SHOT);
    };
    if rewrite::<F>(ctx, flow, Side::Source, src, 0).is_err()
        || rewrite::<F>(ctx, flow, Side::Destination, dst, 0).is_err()
    {
        count(Stat::RewriteFailed);
        return Some(TC_ACT_SHOT);
    }
    count(Stat::FragmentTranslated);
    Some(route_out::<F>(ctx, flow, (src, 0), (dst, 0)))
}

/// The first fragment of a datagram translated from or to outside: its
/// later fragments (no ports) get the same addresses (and the IPv4 id it
/// was given: `renumbered` is that id plus one, 0 if it kept its own), and
/// if it now leaves from the node's address `mcs_uplink` may send them on
/// (by their translated key). Honoured for `FRAG_XNAT_LIFETIME`. Best
/// effort: a later fragment without its entries is lost, as any lost
/// fragment is.
// `renumbered` is no Option: a None's unset half would be an argument
// register the verifier refuses to read.
#[inline(never)]
pub fn remember<F: Family>(flow: &Flow<F::A>, id: u32, value: &NatValue<F::A>, renumbered: u32) {
    count(Stat::Fragment);
    // SAFETY: helper without preconditions.
    let stamp = frag_stamp(unsafe { bpf_ktime_get_coarse_ns() }) << 8;
    let mut key = flow.frag_key(id, FRAG_PART_DST);
    let _ = F::frags().insert(key, FragValue { addr: value.peer, side: FRAG_XNAT | stamp }, 0);
    key.part = FRAG_PART_SRC;
    let _ = F::frags().insert(key, FragValue { addr: value.nat, side: FRAG_XNAT | (renumbered << 8) }, 0);
    if XNAT.get(0).is_some_and(|c| F::xnat_addr(c) == value.nat) {
        let sent_id = if renumbered == 0 { id } else { renumbered - 1 };
        let sent = FragKey::new(value.nat, value.peer, sent_id, flow.proto, FRAG_PART_SENT);
        let _ = F::frags().insert(sent, FragValue { addr: flow.src_ip, side: FRAG_XNAT | stamp }, 0);
    }
}

/// A translated datagram's entry (`key.part`), if its first fragment was
/// seen: the address, and the entry's `frag_extra` bits. A stamped entry
/// (`FRAG_PART_DST`, `FRAG_PART_SENT`) only within its lifetime.
#[inline(always)]
pub fn fragment_entry<F: Family>(key: &FragKey<F::A>) -> Option<(F::A, u32)> {
    // SAFETY: map value pointer, valid for this program run; copied.
    let entry = unsafe { *F::frags().get_ptr(*key)? };
    let extra = entry.side >> 8;
    if entry.side & 0xff != FRAG_XNAT {
        return None;
    }
    // SAFETY: helper without preconditions.
    let fresh = key.part == FRAG_PART_SRC || frag_fresh(extra, unsafe { bpf_ktime_get_coarse_ns() });
    fresh.then_some((entry.addr, extra))
}
