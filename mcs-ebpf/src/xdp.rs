//! XDP on external interfaces (`--external-interface`): traffic to a
//! ClusterSetIP that enters the node from outside it (VMs, hosts, nodes
//! without the agent, gateways routing the ClusterSetIP range here).
//!
//! A new flow is balanced as on the other paths and translated both ways:
//! destination to the backend, source to the node's address and a port of
//! the source NAT range, so the backend's reply comes back through this
//! node whichever cluster it is in. The reply is translated back (VIP ->
//! client). A translated packet leaves by the route's interface: `XDP_TX`
//! when that is the interface it came in on, else through the stack and
//! `mcs_uplink` (see `xnat`).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    macros::xdp,
    programs::XdpContext,
};
use mcs_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKey, FRAG_PART_DST, FRAG_PART_SRC, IPPROTO_TCP, IPPROTO_UDP, MapAddr, NatValue,
    ServiceKey, Stat,
};

use crate::{
    csum::Delta,
    family::{Family, V4, V6},
    icmp,
    maps::{XNAT, count, xnat_scratch},
    parse::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, Flow, Frag, IPV6_LEN, Parsed, load, parse_family, ptr_at},
    xnat::{Route, fragment_addr, in_port_range, known, open, remember},
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
        Some(Answer::Error { v6: false, l4_off }) => error_to_client::<V4>(&ctx, l4_off),
        Some(Answer::Error { v6: true, l4_off }) => error_to_client::<V6>(&ctx, l4_off),
        None => verdict,
    }
}

/// A packet to be answered, or dealt with, in `mcs_xdp`'s frame rather
/// than under the parsed flow's, in the verdict's place (XDP verdicts are
/// small numbers): what is needed of the parsed packet.
enum Answer {
    /// An ICMP error to the node's address, perhaps about a flow's packet.
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
        // An error about a flow's packet, from beyond the node, is the
        // client's; any other ICMP is the node's.
        return if flow.dst_ip == node && icmp::is_error::<F>(flow.icmp_type) {
            Answer::error::<F>(flow)
        } else {
            XDP_PASS
        };
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
    send::<F>(ctx, flow, value)
}

/// Translates the packet (source to `nat`, destination to `peer`) and sends
/// it on its way.
#[inline(never)]
fn send<F: Family>(ctx: &XdpContext, flow: &Flow<F::A>, value: &NatValue<F::A>) -> u32 {
    // SAFETY: a read of the context's field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    // The route first, with the packet's length: one too big for it is
    // answered as it came (its sender must learn the MTU for the address
    // it wrote to), so it is not translated yet.
    let route = Route::lookup::<F>(
        ctx.as_ptr(),
        (flow.proto, flow.ip_len),
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
        remember::<F>(flow, id, value);
    }
    out(ctx, &route, ingress)
}

/// A later fragment: translated as its first fragment was, if XDP saw it
/// (the first fragment's checksum update covered the whole datagram), and
/// sent the same way. Others are not ours, or lost, and pass.
#[inline(never)]
fn follow<F: Family>(ctx: &XdpContext, flow: &Flow<F::A>, id: u32) -> u32 {
    let mut key = flow.frag_key(id, FRAG_PART_DST);
    let Some(dst) = fragment_addr::<F>(&key) else { return XDP_PASS };
    key.part = FRAG_PART_SRC;
    let Some(src) = fragment_addr::<F>(&key) else {
        count(Stat::FragmentMiss);
        return XDP_DROP;
    };
    if ttl_ends::<F>(ctx) {
        count(Stat::XdpPassed);
        return XDP_PASS;
    }
    // SAFETY: a read of the context's field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let route = Route::lookup::<F>(ctx.as_ptr(), (flow.proto, flow.ip_len), (src, 0), (dst, 0), ingress);
    if route.rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        // Its first fragment was answered (it is the largest); this one is lost.
        count(Stat::XdpUnroutable);
        return XDP_DROP;
    }
    if rewrite_addrs::<F>(ctx, [&flow.src_ip, &src], [&flow.dst_ip, &dst]).is_none() {
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

/// Sends a packet, translated, by its route: back out of the uplink if the
/// route says so, else through the stack.
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
        // Another interface (a pod's, another uplink) or a neighbour not
        // resolved yet: the stack delivers it, steered by `mcs_uplink`.
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => to_stack(),
        _ => {
            count(Stat::XdpUnroutable);
            XDP_DROP
        }
    }
}

/// An ICMP error from beyond the node (a router's "fragmentation needed",
/// "unreachable", "time exceeded", or the backend's own) about a packet we
/// translated (node -> backend): the flow's client gets it, about the
/// packet it sent (client -> VIP), from the VIP, as Linux's NAT sends it
/// (a router's address beyond the node may mean nothing to the client, or
/// fail its source checks). The client's kernel matches errors to sockets
/// by the quote: this is how it learns the path MTU and that a backend is
/// unreachable. Errors or quotes with IPv4 options or IPv6 extension
/// headers pass untouched (the offsets stay constants, which the verifier
/// follows; a router adds neither).
#[inline(never)]
fn error_to_client<F: Family>(ctx: &XdpContext, l4_off: usize) -> u32 {
    if l4_off != Quote::l4_off::<F>() {
        return XDP_PASS;
    }
    let Some(config) = XNAT.get(0) else { return XDP_PASS };
    let inner = Quote::inner::<F>();
    // The quoted header's start, in one read: the verifier follows one
    // bounds check per packet pointer.
    let l4 = Quote::l4::<F>();
    let (plain, proto) = if F::HEADER_CSUM {
        let Some(h) = load::<[u8; 10]>(ctx, inner) else { return XDP_PASS };
        (h[0] == 0x45, h[9])
    } else {
        let Some(h) = load::<[u8; 8]>(ctx, inner) else { return XDP_PASS };
        (true, h[6])
    };
    if !plain || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return XDP_PASS;
    }
    // One at a time: a pair of Options leaves an uninitialised register on
    // the path where the first is None, which the verifier refuses.
    let Some(node) = load::<F::A>(ctx, inner + F::SRC_OFF) else { return XDP_PASS };
    let Some(backend) = load::<F::A>(ctx, inner + F::DST_OFF) else { return XDP_PASS };
    let Some(ports) = load::<[u16; 2]>(ctx, l4) else { return XDP_PASS };
    // About a packet we sent from the source NAT range.
    if node != F::xnat_addr(config) || !in_port_range(config, ports[0]) {
        return XDP_PASS;
    }
    let key = CtKey {
        src: backend,
        dst: node,
        src_port: ports[1],
        dst_port: ports[0],
        proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let Some(reply) = F::xnat_ct().get_ptr(key) else { return XDP_PASS };
    // SAFETY: map value pointer, valid for this program run.
    send_error::<F>(ctx, proto, unsafe { &*reply })
}

/// Where an error's parts sit (without options or extension headers).
struct Quote;

impl Quote {
    /// The ICMP header.
    const fn l4_off<F: Family>() -> usize {
        ETH_LEN + if F::HEADER_CSUM { 20 } else { IPV6_LEN }
    }

    /// The quoted IP header.
    const fn inner<F: Family>() -> usize {
        Self::l4_off::<F>() + 8
    }

    /// The quoted L4 header.
    const fn l4<F: Family>() -> usize {
        Self::inner::<F>() + if F::HEADER_CSUM { 20 } else { IPV6_LEN }
    }
}

/// Rewrites the error for the client (`reply`: the flow's reply entry,
/// which holds the client and the VIP) and sends it there.
// Out of line: the quote's pointers overflow the caller's frame. It ends
// with the route lookup, which needs the context itself: a function that
// only read the packet's bounds would get them as values, which the
// verifier refuses to check against.
#[inline(never)]
fn send_error<F: Family>(ctx: &XdpContext, proto: u8, reply: &NatValue<F::A>) -> u32 {
    if rewrite_error::<F>(ctx, proto, reply).is_none() {
        count(Stat::RewriteFailed);
        return XDP_DROP;
    }
    count(Stat::XdpIcmpRevNat);
    error_out::<F>(ctx, reply.nat, reply.peer)
}

// Out of line: the route lookup's parameters and the quote's pointers
// together overflow one frame.
#[inline(never)]
fn error_out<F: Family>(ctx: &XdpContext, vip: F::A, client: F::A) -> u32 {
    // SAFETY: a read of the context's field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    // An error is short: no MTU check (a zero length).
    let route = Route::lookup::<F>(ctx.as_ptr(), (F::ICMP, 0), (vip, 0), (client, 0), ingress);
    out(ctx, &route, ingress)
}

/// The quote (node:port -> backend:port) becomes client -> VIP, the outer
/// header VIP -> client, with every checksum they are in and the TTL (hop
/// limit), all pointers checked before the first write.
#[inline(always)]
fn rewrite_error<F: Family>(ctx: &XdpContext, proto: u8, reply: &NatValue<F::A>) -> Option<()> {
    let (l4_off, inner, l4) = (Quote::l4_off::<F>(), Quote::inner::<F>(), Quote::l4::<F>());
    let outer_src = ptr_at::<F::A>(ctx, ETH_LEN + F::SRC_OFF)?;
    let outer_dst = ptr_at::<F::A>(ctx, ETH_LEN + F::DST_OFF)?;
    let ttl = ptr_at::<[u8; 2]>(ctx, ETH_LEN + F::TTL_OFF)?;
    let icmp_csum = ptr_at::<u16>(ctx, l4_off + 2)?;
    let quoted_src = ptr_at::<F::A>(ctx, inner + F::SRC_OFF)?;
    let quoted_dst = ptr_at::<F::A>(ctx, inner + F::DST_OFF)?;
    let quoted_ports = ptr_at::<[u16; 2]>(ctx, l4)?;
    // The quoted L4 checksum, when the quote is long enough to hold it.
    let quoted_l4_csum = ptr_at::<u16>(ctx, l4 + if proto == IPPROTO_UDP { 6 } else { 16 });
    let (client, vip) = (reply.peer, reply.nat);
    // SAFETY (all): every pointer bounds-checked by ptr_at above.
    let (node, backend, ports) =
        unsafe { (quoted_src.read_unaligned(), quoted_dst.read_unaligned(), quoted_ports.read_unaligned()) };
    let addrs = F::delta(F::delta(Delta::NONE, node, client), backend, vip);
    let ports_delta = Delta::NONE.word(ports[0], reply.peer_port).word(ports[1], reply.nat_port);
    let mut icmp = Delta(addrs.0.wrapping_add(ports_delta.0));
    unsafe {
        quoted_src.write_unaligned(client);
        quoted_dst.write_unaligned(vip);
        quoted_ports.write_unaligned([reply.peer_port, reply.nat_port]);
    }
    if F::HEADER_CSUM {
        let check = ptr_at::<u16>(ctx, inner + 10)?;
        // SAFETY: as above.
        unsafe {
            let old = check.read_unaligned();
            let new = addrs.apply(old);
            check.write_unaligned(new);
            icmp = icmp.word(old, new);
        }
    }
    if let Some(p) = quoted_l4_csum {
        // SAFETY: as above.
        unsafe {
            let old = p.read_unaligned();
            // A UDP checksum of zero means "none".
            if !(proto == IPPROTO_UDP && F::HEADER_CSUM && old == 0) {
                let mut new = Delta(addrs.0.wrapping_add(ports_delta.0)).apply(old);
                if proto == IPPROTO_UDP && new == 0 {
                    new = 0xffff;
                }
                p.write_unaligned(new);
                icmp = icmp.word(old, new);
            }
        }
    }
    // SAFETY: as above.
    let (old_src, old_ttl) = unsafe { (outer_src.read_unaligned(), ttl.read_unaligned()) };
    let outer = F::delta(F::delta(Delta::NONE, old_src, vip), node, client);
    let new_ttl = [old_ttl[0].wrapping_sub(1), old_ttl[1]];
    if !F::HEADER_CSUM {
        // ICMPv6's checksum covers the pseudo-header.
        icmp = Delta(icmp.0.wrapping_add(outer.0));
    }
    // SAFETY: as above.
    unsafe {
        outer_src.write_unaligned(vip);
        outer_dst.write_unaligned(client);
        ttl.write_unaligned(new_ttl);
        icmp_csum.write_unaligned(icmp.apply(icmp_csum.read_unaligned()));
    }
    if F::HEADER_CSUM {
        let check = ptr_at::<u16>(ctx, ETH_LEN + 10)?;
        let header = outer.word(u16::from_ne_bytes(old_ttl), u16::from_ne_bytes(new_ttl));
        // SAFETY: as above.
        unsafe { check.write_unaligned(header.apply(check.read_unaligned())) };
    }
    Some(())
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
    let csum = ptr_at::<u16>(ctx, csum_off)?;
    let addrs = rewrite_addrs::<F>(ctx, [&flow.src_ip, &value.nat], [&flow.dst_ip, &value.peer])?;
    let l4 = addrs.word(flow.src_port, value.nat_port).word(flow.dst_port, value.peer_port);
    // SAFETY: both pointers bounds-checked by ptr_at above.
    unsafe {
        ports.write_unaligned([value.nat_port, value.peer_port]);
        let old = csum.read_unaligned();
        // An IPv4 UDP checksum of zero means "none" and stays so; a
        // computed zero is sent as all ones.
        if !(flow.proto == IPPROTO_UDP && F::HEADER_CSUM && old == 0) {
            let new = l4.apply(old);
            csum.write_unaligned(if flow.proto == IPPROTO_UDP && new == 0 { 0xffff } else { new });
        }
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

/// The checksum change of rewriting both addresses. Out of line: inlined,
/// IPv6's sixteen words each way spill into the caller's frame.
#[inline(never)]
fn addrs_delta<F: Family>(old_src: &F::A, src: &F::A, old_dst: &F::A, dst: &F::A) -> Delta {
    F::delta(F::delta(Delta::NONE, *old_src, *src), *old_dst, *dst)
}
