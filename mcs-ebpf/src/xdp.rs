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
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::generated::bpf_fib_lookup as fib_lookup,
    macros::xdp,
    programs::XdpContext,
};
use mcs_common::{CT_DIR_ORIGINAL, CT_DIR_REPLY, IPPROTO_UDP, MapAddr, NatValue, ServiceKey, Stat};

use crate::{
    csum::Delta,
    family::{Family, V4, V6},
    icmp,
    maps::{XNAT, count, xnat_scratch},
    parse::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, Flow, Frag, Parsed, load, parse_family, ptr_at},
    xnat::{fib_params, in_port_range, known, open, set_macs},
};

#[xdp]
pub fn mcs_xdp(ctx: XdpContext) -> u32 {
    let verdict = match load::<[u8; 2]>(&ctx, 12).map(u16::from_be_bytes) {
        Some(ETH_P_IP) => xdp_v4(&ctx),
        Some(ETH_P_IPV6) => xdp_v6(&ctx),
        _ => return XDP_PASS,
    };
    // A rejection is made here, in the program's own small frame: its
    // buffers and the parsed flow's must not share a call chain's 512
    // bytes of stack.
    match Reject::decode(verdict) {
        Some(Reject { v6: false, l4_off, proto }) => icmp::reject_xdp::<V4>(&ctx, l4_off, proto),
        Some(Reject { v6: true, l4_off, proto }) => icmp::reject_xdp::<V6>(&ctx, l4_off, proto),
        None => verdict,
    }
}

/// A new flow to a frontend with no backend, to be answered: what the
/// answer needs of the parsed packet, in the verdict's place.
struct Reject {
    v6: bool,
    l4_off: usize,
    proto: u8,
}

impl Reject {
    const BIT: u32 = 1 << 31;
    const V6: u32 = 1 << 30;

    fn encode<F: Family>(flow: &Flow<F::A>) -> u32 {
        let family = if F::HEADER_CSUM { 0 } else { Self::V6 };
        Self::BIT | family | ((flow.l4_off as u32 & 0xffff) << 8) | u32::from(flow.proto)
    }

    fn decode(verdict: u32) -> Option<Self> {
        (verdict & Self::BIT != 0).then_some(Reject {
            v6: verdict & Self::V6 != 0,
            l4_off: ((verdict >> 8) & 0xffff) as usize,
            proto: verdict as u8,
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
    if node == F::A::ZERO || flow.proto == F::ICMP {
        return XDP_PASS;
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
    // Not translated here (yet): fragments, and packets whose TTL ends at
    // this hop (the stack answers those).
    if !matches!(flow.frag, Frag::Whole) || load::<u8>(ctx, ETH_LEN + F::TTL_OFF).is_none_or(|ttl| ttl <= 1) {
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
                Err(true) => return Reject::encode::<F>(flow),
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
    if translate::<F>(ctx, flow, value).is_none() {
        count(Stat::RewriteFailed);
        return XDP_DROP;
    }
    // SAFETY: a read of the context's field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut params = fib_params::<F>(flow, (value.nat, value.nat_port), (value.peer, value.peer_port), ingress);
    // SAFETY: params is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS if params.ifindex == ingress => {
            if !set_macs(ctx, &params) {
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
    // Every bound before any write: a failure never leaves half a rewrite.
    let ports = ptr_at::<[u16; 2]>(ctx, flow.l4_off)?;
    let csum = ptr_at::<u16>(ctx, csum_off)?;
    let src = ptr_at::<F::A>(ctx, ETH_LEN + F::SRC_OFF)?;
    let dst = ptr_at::<F::A>(ctx, ETH_LEN + F::DST_OFF)?;
    // IPv4: the TTL and protocol word; IPv6: the hop limit and the
    // address's first byte. The TTL is the first byte either way.
    let ttl = ptr_at::<[u8; 2]>(ctx, ETH_LEN + F::TTL_OFF)?;
    let addrs = F::delta(F::delta(Delta::NONE, flow.src_ip, value.nat), flow.dst_ip, value.peer);
    let l4 = addrs.word(flow.src_port, value.nat_port).word(flow.dst_port, value.peer_port);
    // SAFETY: every pointer bounds-checked by ptr_at above.
    unsafe {
        let old_ttl = ttl.read_unaligned();
        let new_ttl = [old_ttl[0].wrapping_sub(1), old_ttl[1]];
        ttl.write_unaligned(new_ttl);
        if F::HEADER_CSUM {
            let check = ptr_at::<u16>(ctx, ETH_LEN + 10)?;
            let header = addrs.word(u16::from_ne_bytes(old_ttl), u16::from_ne_bytes(new_ttl));
            check.write_unaligned(header.apply(check.read_unaligned()));
        }
        src.write_unaligned(value.nat);
        dst.write_unaligned(value.peer);
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
