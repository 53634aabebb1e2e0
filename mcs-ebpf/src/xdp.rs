//! XDP on external interfaces (`--external-interface`): traffic to a
//! ClusterSetIP that enters the node from outside it (VMs, hosts, nodes
//! without the agent, gateways routing the ClusterSetIP range here).
//!
//! A new flow is balanced as on the other paths and translated both ways:
//! destination to the backend, source to the node's address and a port of
//! the source NAT range, so the backend's reply comes back through this
//! node whichever cluster it is in. The reply is translated back (VIP ->
//! client). A translated packet leaves by the route's interface: `XDP_TX`
//! when that is the interface it came in on, `XDP_REDIRECT` when it is
//! another external interface served natively, else through the stack and
//! `mcs_uplink` (see `xnat`).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    },
    helpers::{bpf_redirect, generated::bpf_check_mtu},
    macros::xdp,
    programs::XdpContext,
};
use mcs_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, FRAG_PART_DST, FRAG_PART_SRC, IPPROTO_UDP, MapAddr, NatValue, ServiceKey, Stat,
    UPLINK_GENERIC, UPLINK_NATIVE,
};

use crate::{
    csum::{self, Delta},
    family::{Family, V4, V6, addrs_delta},
    icmp,
    icmp::Quote,
    maps::{XNAT, XNAT_IP_ID, XNAT_UPLINKS, count, fetch_inc, xnat_scratch},
    parse::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, Flow, Frag, Parsed, load, parse_family, ptr_at},
    xnat::{Route, fragment_entry, in_port_range, known, open, remember},
};

#[xdp]
pub fn mcs_xdp(ctx: XdpContext) -> u32 {
    let verdict = match load::<[u8; 2]>(&ctx, 12).map(u16::from_be_bytes) {
        Some(ETH_P_IP) => xdp_v4(&ctx),
        Some(ETH_P_IPV6) => xdp_v6(&ctx),
        _ => return XDP_PASS,
    };
    // An answer is made here, in the program's own small frame: its
    // buffers and the parsed flow's must not share a call chain's 512
    // bytes of stack.
    match Answer::decode(verdict) {
        Some(Answer::Reject { v6: false, l4_off, proto }) => icmp::reject_xdp::<V4>(&ctx, l4_off, proto),
        Some(Answer::Reject { v6: true, l4_off, proto }) => icmp::reject_xdp::<V6>(&ctx, l4_off, proto),
        Some(Answer::TooBig { v6: false, l4_off, mtu }) => icmp::too_big_xdp::<V4>(&ctx, l4_off, mtu),
        Some(Answer::TooBig { v6: true, l4_off, mtu }) => icmp::too_big_xdp::<V6>(&ctx, l4_off, mtu),
        Some(Answer::Error { v6: false, l4_off }) => error_to_peer::<V4>(&ctx, l4_off),
        Some(Answer::Error { v6: true, l4_off }) => error_to_peer::<V6>(&ctx, l4_off),
        None => verdict,
    }
}

/// A packet to be answered, or dealt with, in `mcs_xdp`'s frame rather
/// than under the parsed flow's, in the verdict's place (XDP verdicts are
/// small numbers): what is needed of the parsed packet.
enum Answer {
    /// An ICMP error, perhaps about a flow's packet.
    Error { v6: bool, l4_off: usize },
    /// A new flow to a frontend with no backend.
    Reject { v6: bool, l4_off: usize, proto: u8 },
    /// A packet its route's MTU cannot carry.
    TooBig { v6: bool, l4_off: usize, mtu: u16 },
}

impl Answer {
    const BIT: u32 = 1 << 31;
    const V6: u32 = 1 << 30;
    const TOO_BIG: u32 = 1 << 29;
    const ERROR: u32 = 1 << 28;

    fn family<F: Family>() -> u32 {
        Self::BIT | if F::HEADER_CSUM { 0 } else { Self::V6 }
    }

    fn reject<F: Family>(flow: &Flow<F::A>) -> u32 {
        Self::family::<F>() | ((flow.l4_off as u32 & 0xffff) << 8) | u32::from(flow.proto)
    }

    fn error<F: Family>(flow: &Flow<F::A>) -> u32 {
        Self::family::<F>() | Self::ERROR | (flow.l4_off as u32 & 0xffff)
    }

    /// `None`: a header too long to say in 12 bits (never one we answer).
    fn too_big<F: Family>(flow: &Flow<F::A>, mtu: u16) -> Option<u32> {
        (flow.l4_off < 1 << 12)
            .then(|| Self::family::<F>() | Self::TOO_BIG | ((flow.l4_off as u32) << 16) | u32::from(mtu))
    }

    fn decode(verdict: u32) -> Option<Self> {
        if verdict & Self::BIT == 0 {
            return None;
        }
        let v6 = verdict & Self::V6 != 0;
        Some(if verdict & Self::ERROR != 0 {
            Answer::Error { v6, l4_off: (verdict & 0xffff) as usize }
        } else if verdict & Self::TOO_BIG != 0 {
            Answer::TooBig { v6, l4_off: ((verdict >> 16) & 0xfff) as usize, mtu: verdict as u16 }
        } else {
            Answer::Reject { v6, l4_off: ((verdict >> 8) & 0xffff) as usize, proto: verdict as u8 }
        })
    }
}

// A subprogram per family, parsing included: BPF's 512 bytes of stack are
// shared by the call chain, and inlined, both families' flows would stay in
// the program's frame.
#[inline(never)]
fn xdp_v4(ctx: &XdpContext) -> u32 {
    match parse_family(ctx, ETH_P_IP) {
        Parsed::V4(flow) => xdp::<V4>(ctx, &flow),
        _ => XDP_PASS,
    }
}

#[inline(never)]
fn xdp_v6(ctx: &XdpContext) -> u32 {
    match parse_family(ctx, ETH_P_IPV6) {
        Parsed::V6(flow) => xdp::<V6>(ctx, &flow),
        _ => XDP_PASS,
    }
}

#[inline(always)]
fn xdp<F: Family>(ctx: &XdpContext, flow: &Flow<F::A>) -> u32 {
    let Some(config) = XNAT.get(0) else { return XDP_PASS };
    let node = F::xnat_addr(config);
    if node == F::A::ZERO {
        return XDP_PASS;
    }
    // A later fragment has no ports: it follows its first.
    if let Frag::Later(id) = flow.frag {
        return follow::<F>(ctx, flow, id);
    }
    if flow.proto == F::ICMP {
        // An error about a flow's packet goes on translated (if it is one:
        // see `error_to_peer`); any other ICMP is none of ours.
        return if icmp::is_error::<F>(flow.icmp_type) { Answer::error::<F>(flow) } else { XDP_PASS };
    }
    let dir = if flow.dst_ip == node {
        // Only the source NAT range is ours; the node's own traffic passes.
        if !in_port_range(config, flow.dst_port) {
            return XDP_PASS;
        }
        CT_DIR_REPLY
    } else {
        let key = ServiceKey { vip: flow.dst_ip, port: flow.dst_port, proto: flow.proto, _pad: 0 };
        if F::services().get_ptr(key).is_none() {
            return XDP_PASS;
        }
        // Clients outside `--external-source-cidr` are none of our business.
        if config.flags & F::SOURCE_FILTER != 0
            && F::xnat_src().get(aya_ebpf::maps::lpm_trie::Key::new(F::BITS, flow.src_ip)).is_none()
        {
            return XDP_PASS;
        }
        CT_DIR_ORIGINAL
    };
    // Not translated here: packets whose TTL ends at this hop (the stack
    // answers those).
    if ttl_ends::<F>(ctx) {
        count(Stat::XdpPassed);
        return XDP_PASS;
    }
    let Some(value) = xnat_scratch::<F::A>() else { return XDP_PASS };
    match known::<F>(flow, dir, value) {
        true => count(if dir == CT_DIR_ORIGINAL { Stat::XdpEstablished } else { Stat::XdpRevNat }),
        // A reply nobody waits for: the node's to answer.
        false if dir == CT_DIR_REPLY => return XDP_PASS,
        false => {
            let key = ServiceKey { vip: flow.dst_ip, port: flow.dst_port, proto: flow.proto, _pad: 0 };
            let Some(service) = F::services().get_ptr(key) else { return XDP_PASS };
            // SAFETY: map value pointer, valid for this program run.
            match open::<F>(flow, unsafe { &*service }, config, node, value) {
                Ok(()) => {}
                Err(true) => return Answer::reject::<F>(flow),
                Err(false) => return XDP_DROP,
            }
        }
    }
    send::<F>(ctx, flow, value, dir)
}

/// Translates the packet (source to `nat`, destination to `peer`) and sends
/// it on its way.
#[inline(never)]
fn send<F: Family>(ctx: &XdpContext, flow: &Flow<F::A>, value: &NatValue<F::A>, dir: u8) -> u32 {
    // SAFETY: a read of the context's field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    // The route first, with the packet's length: one too big for it is
    // answered as it came (its sender must learn the MTU for the address
    // it wrote to), so it is not translated yet.
    let route = Route::lookup::<F>(
        ctx.as_ptr(),
        (flow.proto, checked_len(ctx, flow, ingress)),
        (value.nat, value.nat_port),
        (value.peer, value.peer_port),
        ingress,
    );
    if route.rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        return Answer::too_big::<F>(flow, route.mtu).unwrap_or(XDP_DROP);
    }
    if translate::<F>(ctx, flow, value).is_none() {
        count(Stat::RewriteFailed);
        return XDP_DROP;
    }
    if let Frag::First(id) = flow.frag {
        // Sent on from the node address, with an id of ours (IPv4's are
        // 16 bits: many clients' ids would meet at the backend).
        let renumbered = if F::HEADER_CSUM && dir == CT_DIR_ORIGINAL { renumber(ctx) } else { None };
        remember::<F>(flow, id, value, renumbered.map_or(0, |id| u32::from(id) + 1));
    }
    out(ctx, &route, ingress)
}

/// The length the route lookup checks against the MTU: the packet's, or
/// none (0) for one bigger than the interface it came in on, which only
/// generic XDP sees: segments the stack merged (GRO), which leave as they
/// came.
#[inline(always)]
fn checked_len<A>(ctx: &XdpContext, flow: &Flow<A>, ingress: u32) -> u16 {
    // No lookup for the common packet, which no interface of ours is
    // narrower than (IPv6's minimum MTU): merged segments are bigger.
    if flow.ip_len <= 1280 {
        return flow.ip_len;
    }
    // SAFETY: map value pointer, valid for this program run.
    let generic = XNAT_UPLINKS.get_ptr(ingress).is_some_and(|mode| unsafe { *mode } == UPLINK_GENERIC);
    let mut len = 0;
    // SAFETY: the context and a writable u32; length 0 means the packet's.
    if generic && unsafe { bpf_check_mtu(ctx.as_ptr(), ingress, &mut len, 0, 0) } != 0 {
        return 0;
    }
    flow.ip_len
}

/// Gives the IPv4 packet the node's next id, its header checksum updated;
/// the id given.
#[inline(never)]
fn renumber(ctx: &XdpContext) -> Option<u16> {
    let id = fetch_inc(XNAT_IP_ID.get_ptr_mut(0)?) as u16;
    set_ip_id(ctx, id)?;
    Some(id)
}

/// Writes an IPv4 id, with the header checksum.
#[inline(always)]
fn set_ip_id(ctx: &XdpContext, id: u16) -> Option<()> {
    let field = ptr_at::<u16>(ctx, ETH_LEN + 4)?;
    let check = ptr_at::<u16>(ctx, ETH_LEN + 10)?;
    // SAFETY: both bounds-checked by ptr_at.
    unsafe {
        let old = field.read_unaligned();
        field.write_unaligned(id);
        check.write_unaligned(Delta::NONE.word(old, id).apply(check.read_unaligned()));
    }
    Some(())
}

/// A later fragment: translated as its first fragment was, if XDP saw it
/// (the first fragment's checksum update covered the whole datagram), and
/// sent the same way. Others are not ours, or lost, and pass.
#[inline(never)]
fn follow<F: Family>(ctx: &XdpContext, flow: &Flow<F::A>, id: u32) -> u32 {
    let mut key = flow.frag_key(id, FRAG_PART_DST);
    let Some((dst, _)) = fragment_entry::<F>(&key) else { return XDP_PASS };
    key.part = FRAG_PART_SRC;
    let Some((src, renumbered_id)) = fragment_entry::<F>(&key) else {
        count(Stat::FragmentMiss);
        return XDP_DROP;
    };
    if ttl_ends::<F>(ctx) {
        count(Stat::XdpPassed);
        return XDP_PASS;
    }
    // SAFETY: a read of the context's field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let route =
        Route::lookup::<F>(ctx.as_ptr(), (flow.proto, checked_len(ctx, flow, ingress)), (src, 0), (dst, 0), ingress);
    if route.rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        // Its first fragment was answered (it is the largest); this one is lost.
        count(Stat::XdpUnroutable);
        return XDP_DROP;
    }
    // The id its first fragment was given, if any (IPv4 only).
    let renumbered = F::HEADER_CSUM && renumbered_id != 0;
    if rewrite_addrs::<F>(ctx, [&flow.src_ip, &src], [&flow.dst_ip, &dst]).is_none()
        || (renumbered && set_ip_id(ctx, (renumbered_id - 1) as u16).is_none())
    {
        count(Stat::RewriteFailed);
        return XDP_DROP;
    }
    count(Stat::FragmentTranslated);
    out(ctx, &route, ingress)
}

/// The packet's TTL (hop limit) ends at this hop.
#[inline(always)]
fn ttl_ends<F: Family>(ctx: &XdpContext) -> bool {
    load::<u8>(ctx, ETH_LEN + F::TTL_OFF).is_none_or(|ttl| ttl <= 1)
}

/// Sends a packet, translated, by its route: back out of the uplink
/// (`XDP_TX`) or out of another one (`XDP_REDIRECT`) if the route says so,
/// else through the stack.
#[inline(always)]
fn out(ctx: &XdpContext, route: &Route, ingress: u32) -> u32 {
    match route.rc {
        BPF_FIB_LKUP_RET_SUCCESS if route.ifindex == ingress => {
            if !route.set_macs(ctx) {
                return XDP_DROP;
            }
            count(Stat::XdpTx);
            XDP_TX
        }
        // Another uplink served natively: straight there.
        // SAFETY: map value pointer, valid for this program run.
        BPF_FIB_LKUP_RET_SUCCESS
            if XNAT_UPLINKS.get_ptr(route.ifindex).is_some_and(|mode| unsafe { *mode } == UPLINK_NATIVE) =>
        {
            if !route.set_macs(ctx) {
                return XDP_DROP;
            }
            // SAFETY: helper without preconditions.
            let action = unsafe { bpf_redirect(route.ifindex, 0) } as u32;
            if action == XDP_REDIRECT {
                count(Stat::XdpRedirect);
            }
            action
        }
        // Another interface (a pod's) or a neighbour not resolved yet: the
        // stack delivers it, steered by `mcs_uplink`.
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => to_stack(),
        _ => {
            count(Stat::XdpUnroutable);
            XDP_DROP
        }
    }
}

/// An ICMP error from beyond the node (a router's "fragmentation needed",
/// "unreachable", "time exceeded", or a host's own) about a packet we
/// translated, sent to the address that packet came from:
/// - about one to a backend (node:port -> backend), to the node: the
///   flow's client gets it, about the packet it sent (client -> VIP), from
///   the VIP, as Linux's NAT sends it (a router's address beyond the node
///   may mean nothing to the client, or fail its source checks);
/// - about a reply to a client (VIP -> client), to the VIP (routed here):
///   the backend gets it, about its reply (backend -> node:port), from the
///   node. Its path MTU to the client is the one it must learn.
///
/// A kernel matches errors to sockets by the quote: this is how a client
/// learns the path MTU and that a backend is unreachable. Errors or quotes
/// with IPv4 options or IPv6 extension headers pass untouched (the offsets
/// stay constants, which the verifier follows; a router adds neither).
#[inline(never)]
fn error_to_peer<F: Family>(ctx: &XdpContext, l4_off: usize) -> u32 {
    // The stack answers an error whose TTL ends here.
    if l4_off != Quote::l4_off::<F>() || ttl_ends::<F>(ctx) {
        return XDP_PASS;
    }
    let Some(config) = XNAT.get(0) else { return XDP_PASS };
    match icmp::quoted_entry::<F, _>(ctx, config, true) {
        // SAFETY: map value pointer, valid for this program run.
        Some((proto, entry)) => send_error::<F>(ctx, proto, unsafe { &*entry }),
        None => XDP_PASS,
    }
}

/// Rewrites the error for the flow's other side and sends it there
/// (`entry`: the flow's entry of the direction the error goes, whose `peer`
/// gets it and whose `nat` it comes from).
// Out of line: the quote's pointers overflow the caller's frame. It ends
// with the route lookup, which needs the context itself: a function that
// only read the packet's bounds would get them as values, which the
// verifier refuses to check against.
#[inline(never)]
fn send_error<F: Family>(ctx: &XdpContext, proto: u8, entry: &NatValue<F::A>) -> u32 {
    if icmp::rewrite_error::<F, _>(ctx, proto, entry).is_none() {
        count(Stat::RewriteFailed);
        return XDP_DROP;
    }
    count(Stat::XdpIcmpRevNat);
    error_out::<F>(ctx, entry.nat, entry.peer)
}

// Out of line: the route lookup's parameters and the quote's pointers
// together overflow one frame.
#[inline(never)]
fn error_out<F: Family>(ctx: &XdpContext, from: F::A, to: F::A) -> u32 {
    // SAFETY: a read of the context's field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    // An error is short: no MTU check (a zero length).
    let route = Route::lookup::<F>(ctx.as_ptr(), (F::ICMP, 0), (from, 0), (to, 0), ingress);
    out(ctx, &route, ingress)
}

/// Hands a translated packet to the stack, where `mcs_uplink` sends it
/// out of its route's interface. (XDP metadata would spare it a route
/// lookup, but not every kernel lets an XDP program write it.)
#[inline(always)]
fn to_stack() -> u32 {
    count(Stat::XdpToStack);
    XDP_PASS
}

/// Rewrites both addresses and ports, decrements the TTL (hop limit), and
/// updates the checksums incrementally: XDP has no checksum helpers, and
/// a frame from a NIC carries a complete checksum.
#[inline(always)]
fn translate<F: Family>(ctx: &XdpContext, flow: &Flow<F::A>, value: &NatValue<F::A>) -> Option<()> {
    let csum_off = flow.l4_off + if flow.proto == IPPROTO_UDP { 6 } else { 16 };
    // Every bound before any write: a failure never leaves half a rewrite
    // (the IP header's fields lie before these).
    let ports = ptr_at::<[u16; 2]>(ctx, flow.l4_off)?;
    let check = ptr_at::<u16>(ctx, csum_off)?;
    let addrs = rewrite_addrs::<F>(ctx, [&flow.src_ip, &value.nat], [&flow.dst_ip, &value.peer])?;
    let l4 = addrs.word(flow.src_port, value.nat_port).word(flow.dst_port, value.peer_port);
    // SAFETY: both pointers bounds-checked by ptr_at above.
    unsafe {
        ports.write_unaligned([value.nat_port, value.peer_port]);
        // An IPv4 UDP checksum of zero means "none" and stays so.
        csum::update(check, l4, flow.proto == IPPROTO_UDP, F::HEADER_CSUM);
    }
    Some(())
}

/// Rewrites the IP header's addresses and decrements its TTL (hop limit),
/// with the IPv4 header checksum. The change to the addresses, for the L4
/// checksum's pseudo-header, is returned.
#[inline(always)]
fn rewrite_addrs<F: Family>(ctx: &XdpContext, [old_src, src]: [&F::A; 2], [old_dst, dst]: [&F::A; 2]) -> Option<Delta> {
    let src_p = ptr_at::<F::A>(ctx, ETH_LEN + F::SRC_OFF)?;
    let dst_p = ptr_at::<F::A>(ctx, ETH_LEN + F::DST_OFF)?;
    // IPv4: the TTL and protocol word; IPv6: the hop limit and the
    // address's first byte. The TTL is the first byte either way.
    let ttl = ptr_at::<[u8; 2]>(ctx, ETH_LEN + F::TTL_OFF)?;
    let check = if F::HEADER_CSUM { Some(ptr_at::<u16>(ctx, ETH_LEN + 10)?) } else { None };
    let addrs = addrs_delta::<F>(old_src, src, old_dst, dst);
    // SAFETY: every pointer bounds-checked by ptr_at above.
    unsafe {
        let old_ttl = ttl.read_unaligned();
        let new_ttl = [old_ttl[0].wrapping_sub(1), old_ttl[1]];
        ttl.write_unaligned(new_ttl);
        if let Some(check) = check {
            let header = addrs.word(u16::from_ne_bytes(old_ttl), u16::from_ne_bytes(new_ttl));
            check.write_unaligned(header.apply(check.read_unaligned()));
        }
        src_p.write_unaligned(*src);
        dst_p.write_unaligned(*dst);
    }
    Some(addrs)
}
