//! ICMP and ICMPv6: errors about translated flows, on their way back to the
//! client, and the errors we send ourselves for a frontend that has no
//! backend.

use aya_ebpf::{
    bindings::{
        TC_ACT_REDIRECT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action::{XDP_DROP, XDP_TX},
    },
    helpers::{
        bpf_redirect, bpf_skb_change_tail,
        generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    },
    programs::{TcContext, XdpContext},
};
use mcs_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, NatValue, Stat,
    XnatConfig,
};

use crate::{
    csum::{self, Delta, fold},
    family::{Family, addrs_delta, write_ip},
    maps::{TC_ACT_SHOT, TC_NEXT, count},
    parse::{ETH_LEN, Flow, IPV6_LEN, Packet, load, ptr_at, pull_more},
    xnat::in_port_range,
};

const ICMP_HDR: usize = 8;
/// An inner header stack we read: IPv4 with options (or IPv6) and the TCP
/// header up to its checksum.
const QUOTE_MAX: usize = 60 + 18;

/// Errors that quote the packet they are about (RFC 792, RFC 4443).
#[inline(always)]
pub fn is_error<F: Family>(icmp_type: u8) -> bool {
    if F::HEADER_CSUM {
        // Destination unreachable (incl. fragmentation needed), time
        // exceeded, parameter problem.
        matches!(icmp_type, 3 | 11 | 12)
    } else {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        matches!(icmp_type, 1..=4)
    }
}

/// An ICMP error to a client about a packet we translated (client → VIP,
/// sent on as client → pod) quotes the pod's address. The client's kernel
/// matches errors to sockets by the quote, so it would never learn of it:
/// the quote's destination becomes the VIP again, with its checksums, and
/// if the pod itself sent the error, so does the outer source.
#[inline(always)]
pub fn translate_error<F: Family>(ctx: &TcContext, flow: &Flow<F::A>) -> i32 {
    if !is_error::<F>(flow.icmp_type) {
        return TC_NEXT;
    }
    let inner = flow.l4_off + ICMP_HDR;
    if !pull_more(ctx, (inner + QUOTE_MAX) as u32) {
        return TC_NEXT;
    }
    match translate_quote::<F>(ctx, flow, inner) {
        Ok(true) => {
            count(Stat::IcmpRevNat);
            TC_NEXT
        }
        Ok(false) => TC_NEXT,
        Err(_) => {
            count(Stat::RewriteFailed);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn translate_quote<F: Family>(ctx: &TcContext, flow: &Flow<F::A>, inner: usize) -> Result<bool, i64> {
    // The quoted header: its length, protocol and addresses.
    let (ihl, proto) = if F::HEADER_CSUM {
        let Some(h) = load::<[u8; 10]>(ctx, inner) else { return Ok(false) };
        ((h[0] & 0x0f) as usize * 4, h[9])
    } else {
        let Some(h) = load::<[u8; 8]>(ctx, inner) else { return Ok(false) };
        (IPV6_LEN, h[6])
    };
    if ihl < 20 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return Ok(false);
    }
    // One at a time: a pair of Options leaves an uninitialised register on
    // the path where the first is None, which the verifier refuses.
    let Some(client) = load::<F::A>(ctx, inner + F::SRC_OFF) else { return Ok(false) };
    let Some(backend) = load::<F::A>(ctx, inner + F::DST_OFF) else { return Ok(false) };
    // The error must be about the very client it goes to.
    if client != flow.dst_ip {
        return Ok(false);
    }
    let l4 = inner + ihl;
    let Some(ports) = load::<[u16; 2]>(ctx, l4) else { return Ok(false) };
    // The quote is a packet the client sent (client -> backend): its reply
    // direction's entry holds the VIP the client addressed.
    let key = CtKey {
        src: backend,
        dst: client,
        src_port: ports[1],
        dst_port: ports[0],
        proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let Some(rev) = F::ct().get_ptr(key) else { return Ok(false) };
    // SAFETY: map value pointer, valid for this program run; copied.
    let rev = unsafe { *rev };
    let (vip, vip_port) = (rev.addr, rev.port);

    // Every pointer is checked before the first write.
    let icmp_csum = ptr_at::<u16>(ctx, flow.l4_off + 2).ok_or(-1i64)?;
    let quoted_dst = ptr_at::<F::A>(ctx, inner + F::DST_OFF).ok_or(-1i64)?;
    let quoted_port = ptr_at::<u16>(ctx, l4 + 2).ok_or(-1i64)?;
    let quoted_ip_csum = if F::HEADER_CSUM { ptr_at::<u16>(ctx, inner + 10) } else { None };
    // The quoted L4 checksum, when the quote is long enough to hold it.
    let quoted_l4_csum = ptr_at::<u16>(ctx, l4 + if proto == IPPROTO_UDP { 6 } else { 16 });

    let addr = F::delta(Delta::NONE, backend, vip);
    let port = Delta::NONE.word(ports[1], vip_port);
    // SAFETY: every pointer was bounds-checked by ptr_at above.
    let mut icmp = unsafe {
        quoted_dst.write_unaligned(vip);
        quoted_port.write_unaligned(vip_port);
        addr.word(ports[1], vip_port)
    };
    if let Some(p) = quoted_ip_csum {
        // SAFETY: as above.
        icmp = icmp.plus(unsafe { csum::update(p, addr, false, false) });
    }
    if let Some(p) = quoted_l4_csum {
        // SAFETY: as above.
        icmp = icmp.plus(unsafe { csum::update(p, addr.plus(port), proto == IPPROTO_UDP, true) });
    }
    // The pod itself answered (port unreachable): it speaks as the VIP.
    if flow.src_ip == backend {
        let outer = write_ip::<F>(ctx, F::SRC_OFF, backend, vip)?;
        if !F::HEADER_CSUM {
            // ICMPv6's checksum covers the pseudo-header.
            icmp = icmp.plus(outer);
        }
    }
    // write_ip validated its own pointers; ours are still in bounds (no helper ran).
    let icmp_csum = ptr_at::<u16>(ctx, flow.l4_off + 2).unwrap_or(icmp_csum);
    // SAFETY: bounds-checked by ptr_at.
    unsafe { icmp_csum.write_unaligned(icmp.apply(icmp_csum.read_unaligned())) };
    Ok(true)
}

/// Where an error's parts sit (without options or extension headers):
/// constants, which the verifier follows (a router adds neither).
pub struct Quote;

impl Quote {
    /// The ICMP header.
    pub const fn l4_off<F: Family>() -> usize {
        ETH_LEN + if F::HEADER_CSUM { 20 } else { IPV6_LEN }
    }

    /// The quoted IP header.
    pub const fn inner<F: Family>() -> usize {
        Self::l4_off::<F>() + 8
    }

    /// The quoted L4 header.
    pub const fn l4<F: Family>() -> usize {
        Self::inner::<F>() + if F::HEADER_CSUM { 20 } else { IPV6_LEN }
    }
}

/// An ICMP error (at [`Quote`]'s offsets) about a packet of a flow from
/// outside, sent to that packet's source: the quoted protocol and the
/// flow's entry of the direction the error goes on in (whose `peer` gets
/// it). The source is the node address and a port of the range (`to_vip`
/// false: only that), or a VIP. `None`: not such an error.
#[inline(always)]
pub fn quoted_entry<F: Family, C: Packet>(
    ctx: &C,
    config: &XnatConfig,
    to_vip: bool,
) -> Option<(u8, *const NatValue<F::A>)> {
    let (inner, l4) = (Quote::inner::<F>(), Quote::l4::<F>());
    // The quoted header's start, in one read: the verifier follows one
    // bounds check per packet pointer. IPv4: no options, and the quote of
    // a first fragment or a whole packet (a later fragment's bytes there
    // are no ports).
    let (plain, proto) = if F::HEADER_CSUM {
        let h = load::<[u8; 10]>(ctx, inner)?;
        (h[0] == 0x45 && h[6] & 0x1f == 0 && h[7] == 0, h[9])
    } else {
        let h = load::<[u8; 8]>(ctx, inner)?;
        (true, h[6])
    };
    if !plain || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    let to = load::<F::A>(ctx, ETH_LEN + F::DST_OFF)?;
    let sender = load::<F::A>(ctx, inner + F::SRC_OFF)?;
    let receiver = load::<F::A>(ctx, inner + F::DST_OFF)?;
    let ports = load::<[u16; 2]>(ctx, l4)?;
    // To the quoted packet's sender: the node (a port of the range), else
    // a VIP (a flow's original entry answers for it).
    let dir = if sender == F::xnat_addr(config) && in_port_range(config, ports[0]) {
        CT_DIR_REPLY
    } else if to_vip {
        // A host never says its own packet was too big for it: such an
        // error from the reply's client would only lower the backend's MTU
        // to the node, for every client.
        let kind = load::<[u8; 2]>(ctx, Quote::l4_off::<F>())?;
        let too_big = if F::HEADER_CSUM { kind == [3, 4] } else { kind[0] == 2 };
        if too_big && load::<F::A>(ctx, ETH_LEN + F::SRC_OFF)? == receiver {
            return None;
        }
        CT_DIR_ORIGINAL
    } else {
        return None;
    };
    if to != sender {
        return None;
    }
    // The quote's flow seen from the other side: the entry of the
    // direction the error's receiver is on.
    let key = CtKey { src: receiver, dst: sender, src_port: ports[1], dst_port: ports[0], proto, dir, _pad: [0; 2] };
    let entry = F::xnat_ct().get_ptr(key)?;
    Some((proto, entry))
}

/// The quote (the packet as translated: `sender` -> `receiver`) becomes the
/// packet as the other side knows it (`entry.peer` -> `entry.nat`: client ->
/// VIP, or backend -> node), the outer header `entry.nat` -> `entry.peer`
/// (it was to the sender), with every checksum they are in and the TTL (hop
/// limit), all pointers checked before the first write.
#[inline(always)]
pub fn rewrite_error<F: Family, C: Packet>(ctx: &C, proto: u8, entry: &NatValue<F::A>) -> Option<()> {
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
    let (peer, nat) = (entry.peer, entry.nat);
    // SAFETY (all): every pointer bounds-checked by ptr_at above.
    let (sender, receiver, ports) =
        unsafe { (quoted_src.read_unaligned(), quoted_dst.read_unaligned(), quoted_ports.read_unaligned()) };
    let addrs = addrs_delta::<F>(&sender, &peer, &receiver, &nat);
    let ports_delta = Delta::NONE.word(ports[0], entry.peer_port).word(ports[1], entry.nat_port);
    let mut icmp = addrs.plus(ports_delta);
    unsafe {
        quoted_src.write_unaligned(peer);
        quoted_dst.write_unaligned(nat);
        quoted_ports.write_unaligned([entry.peer_port, entry.nat_port]);
    }
    if F::HEADER_CSUM {
        let check = ptr_at::<u16>(ctx, inner + 10)?;
        // SAFETY: as above.
        icmp = icmp.plus(unsafe { csum::update(check, addrs, false, false) });
    }
    if let Some(p) = quoted_l4_csum {
        // SAFETY: as above.
        let l4 = addrs.plus(ports_delta);
        icmp = icmp.plus(unsafe { csum::update(p, l4, proto == IPPROTO_UDP, F::HEADER_CSUM) });
    }
    // SAFETY: as above.
    let (old_src, old_ttl) = unsafe { (outer_src.read_unaligned(), ttl.read_unaligned()) };
    // The outer destination was the sender (checked by the caller).
    let outer = addrs_delta::<F>(&old_src, &nat, &sender, &peer);
    let new_ttl = [old_ttl[0].wrapping_sub(1), old_ttl[1]];
    if !F::HEADER_CSUM {
        // ICMPv6's checksum covers the pseudo-header.
        icmp = icmp.plus(outer);
    }
    // SAFETY: as above.
    unsafe {
        // The TTL first: IPv6's two bytes there end in the source's first.
        ttl.write_unaligned(new_ttl);
        outer_src.write_unaligned(nat);
        outer_dst.write_unaligned(peer);
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

/// Answers a new flow to a frontend without a usable backend, from the VIP,
/// back out of the interface it came in on: a TCP SYN gets a RST, UDP an
/// ICMP port unreachable, so the client's connect() or recv() fails at once
/// with ECONNREFUSED, as with kube-proxy's REJECT. The packet itself becomes the error (trimmed to its
/// IP and L4 headers, the error's headers pushed in front), so nothing is
/// allocated. Packets with IP options or IPv6 extension headers are dropped
/// instead.
#[inline(always)]
pub fn reject<F: Family>(ctx: &TcContext, flow: &Flow<F::A>) -> i32 {
    if answer::<F, _>(ctx, flow.l4_off, flow.proto).is_err() {
        return TC_ACT_SHOT;
    }
    count(Stat::Rejected);
    // SAFETY: a plain skb field read.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: helper without preconditions.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action == i64::from(TC_ACT_REDIRECT) { TC_ACT_REDIRECT } else { TC_ACT_SHOT }
}

/// [`reject`] at XDP (a client outside the node): the answer goes back out
/// of the uplink with `XDP_TX`.
// Out of line: inlined, its reads would sit in the program's own frame,
// under every call chain of the translation.
#[inline(never)]
pub fn reject_xdp<F: Family>(ctx: &XdpContext, l4_off: usize, proto: u8) -> u32 {
    if answer::<F, _>(ctx, l4_off, proto).is_err() {
        return XDP_DROP;
    }
    count(Stat::Rejected);
    XDP_TX
}

/// A packet from outside the node that the route to its destination cannot
/// carry (the MTU is `mtu`), and that XDP cannot fragment: its sender gets
/// "fragmentation needed" (RFC 1191) or "packet too big" (RFC 8201), from
/// the address it wrote to, quoting its packet as sent, back out of the
/// interface it came in on. A client learns the path MTU to the VIP; a
/// backend, to the node. A sender that did not set DF learns it too and
/// fragments from then on, which XDP follows (this packet is lost either
/// way: XDP has no fragmentation).
#[inline(never)]
pub fn too_big_xdp<F: Family>(ctx: &XdpContext, l4_off: usize, mtu: u16) -> u32 {
    // Not answered (a source no host has, a header we do not quote): lost
    // where it could not go on, and counted so.
    if unicast_source::<F, _>(ctx).is_err() {
        count(Stat::XdpUnroutable);
        return XDP_DROP;
    }
    // Both carry the MTU in the header's last 16 bits (IPv6's field is 32
    // bits wide; MTUs here fit in 16).
    let done = if F::HEADER_CSUM {
        error4::<_, { (20 + 8) / 2 }>(ctx, l4_off, [w(3, 4), 0, 0, mtu.to_be()])
    } else {
        error6::<_, { (IPV6_LEN + 8) / 2 }>(ctx, l4_off, [w(2, 0), 0, 0, mtu.to_be()])
    };
    if done.is_err() {
        count(Stat::XdpUnroutable);
        return XDP_DROP;
    }
    count(Stat::XdpTooBig);
    XDP_TX
}

/// Never an answer to a source no single host has (RFC 1122 3.2.2,
/// 4.2.2.9): IPv4 multicast, reserved, broadcast and "this network"; IPv6
/// multicast and the unspecified address. A forged one would turn the node
/// into a reflector.
#[inline(always)]
fn unicast_source<F: Family, C: Answer>(ctx: &C) -> Result<(), i64> {
    let first: [u8; 2] = ctx.read(ETH_LEN + F::SRC_OFF)?;
    let unicast = if F::HEADER_CSUM { first[0] != 0 && first[0] < 224 } else { first[0] != 0xff && first != [0, 0] };
    if unicast { Ok(()) } else { Err(-1) }
}

/// Turns the packet into its rejection, in place.
#[inline(always)]
fn answer<F: Family, C: Answer>(ctx: &C, l4_off: usize, proto: u8) -> Result<(), i64> {
    unicast_source::<F, C>(ctx)?;
    // The quote keeps the whole L4 header: a locally sent TCP segment is
    // CHECKSUM_PARTIAL, and the kernel refuses to trim it short of its
    // checksum field.
    // A SYN gets a RST rather than an ICMP error: the error often arrives
    // while connect() still holds the socket, and Linux then only notes it
    // (LockDroppedIcmps) and retransmits; a RST is queued and always refuses.
    match (F::HEADER_CSUM, proto == IPPROTO_TCP) {
        (true, true) => reset4(ctx, l4_off),
        // Destination unreachable, port unreachable.
        (true, false) => error4::<_, { (20 + 8) / 2 }>(ctx, l4_off, [w(3, 3), 0, 0, 0]),
        (false, true) => reset6(ctx, l4_off),
        (false, false) => error6::<_, { (IPV6_LEN + 8) / 2 }>(ctx, l4_off, [w(1, 4), 0, 0, 0]),
    }
}

/// What building an answer in place needs of a hook.
pub trait Answer: Packet {
    fn read<T: Copy>(&self, off: usize) -> Result<T, i64>;
    /// Trims the packet to `keep` bytes (its headers and 8 bytes of L4),
    /// makes room after the Ethernet header for the answer's own headers,
    /// writes `answer` (those headers, then the quote) there and swaps the
    /// Ethernet addresses.
    fn turn_around<T: Copy>(&self, keep: u32, answer: &T) -> Result<(), i64>;
}

impl Answer for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Result<T, i64> {
        self.load(off)
    }

    #[inline(always)]
    fn turn_around<T: Copy>(&self, keep: u32, answer: &T) -> Result<(), i64> {
        let eth: [u16; 6] = self.load(0)?;
        // SAFETY: the context's own skb.
        if unsafe { bpf_skb_change_tail(self.skb.skb, keep, 0) } != 0 {
            return Err(-1);
        }
        let grow = core::mem::size_of::<T>() - (keep as usize - ETH_LEN);
        if grow > 0 {
            self.adjust_room(grow as i32, BPF_ADJ_ROOM_MAC, 0)?;
        }
        self.store(ETH_LEN, answer, 0)?;
        let swapped = [eth[3], eth[4], eth[5], eth[0], eth[1], eth[2]];
        self.store(0, &swapped, 0)?;
        Ok(())
    }
}

impl Answer for XdpContext {
    // The helpers copy, as TC's load and store do: copies through packet
    // pointers of whole answers cost the frames a stack they have not.
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Result<T, i64> {
        let mut out = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes exactly size_of::<T>() bytes or fails.
        let rc = unsafe {
            bpf_xdp_load_bytes(self.ctx, off as u32, out.as_mut_ptr().cast(), core::mem::size_of::<T>() as u32)
        };
        if rc != 0 {
            return Err(rc);
        }
        // SAFETY: filled by the helper.
        Ok(unsafe { out.assume_init() })
    }

    #[inline(always)]
    fn turn_around<T: Copy>(&self, keep: u32, answer: &T) -> Result<(), i64> {
        let eth: [u16; 7] = self.read(0)?;
        let len = (self.data_end() - self.data()) as i32;
        // SAFETY (all): the helpers check the room they take or give back,
        // and copy exactly the bytes given.
        if unsafe { bpf_xdp_adjust_tail(self.ctx, keep as i32 - len) } != 0 {
            return Err(-1);
        }
        let grow = core::mem::size_of::<T>() - (keep as usize - ETH_LEN);
        if grow > 0 && unsafe { bpf_xdp_adjust_head(self.ctx, -(grow as i32)) } != 0 {
            return Err(-1);
        }
        // The new head holds whatever was there: the whole Ethernet header
        // is written, its type kept.
        let mut head = [eth[3], eth[4], eth[5], eth[0], eth[1], eth[2], eth[6]];
        let mut body = *answer;
        let size = core::mem::size_of::<T>() as u32;
        let stored = unsafe {
            bpf_xdp_store_bytes(self.ctx, 0, head.as_mut_ptr().cast(), ETH_LEN as u32) == 0
                && bpf_xdp_store_bytes(self.ctx, ETH_LEN as u32, (&raw mut body).cast(), size) == 0
        };
        if stored { Ok(()) } else { Err(-1) }
    }
}

/// The ones'-complement sum of wire-order 16-bit words.
#[inline(always)]
fn sum_words<const N: usize>(words: &[u16; N]) -> u32 {
    let mut s = 0u32;
    for w in words {
        s += u32::from(*w);
    }
    s
}

/// A 16-bit word of two wire bytes.
#[inline(always)]
const fn w(a: u8, b: u8) -> u16 {
    u16::from_ne_bytes([a, b])
}

/// `Q`: the quote's length in 16-bit words.
#[repr(C)]
#[derive(Clone, Copy)]
struct Error4<const Q: usize> {
    ip: [u16; 10],
    icmp: [u16; 4],
    /// The client's IPv4 header and its L4 header.
    quote: [u16; Q],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Error6<const Q: usize> {
    ip: [u16; 20],
    icmp: [u16; 4],
    /// The client's IPv6 header and its L4 header.
    quote: [u16; Q],
}

// Subprograms: their buffers get frames of their own. `icmp`: the error's
// header, its checksum zero.
#[inline(never)]
fn error4<C: Answer, const Q: usize>(ctx: &C, l4_off: usize, icmp: [u16; 4]) -> Result<(), i64> {
    if l4_off != ETH_LEN + 20 {
        return Err(-1);
    }
    let quote: [u16; Q] = ctx.read(ETH_LEN)?;
    let len = core::mem::size_of::<Error4<Q>>() as u16;
    let mut e = Error4 {
        ip: [w(0x45, 0), len.to_be(), 0, 0, w(64, IPPROTO_ICMP), 0, quote[8], quote[9], quote[6], quote[7]],
        icmp,
        quote,
    };
    e.ip[5] = !fold(0, sum_words(&e.ip));
    e.icmp[1] = !fold(sum_words(&e.icmp), sum_words(&e.quote));
    ctx.turn_around((ETH_LEN + Q * 2) as u32, &e)
}

#[inline(never)]
fn error6<C: Answer, const Q: usize>(ctx: &C, l4_off: usize, icmp: [u16; 4]) -> Result<(), i64> {
    if l4_off != ETH_LEN + IPV6_LEN {
        return Err(-1);
    }
    let quote: [u16; Q] = ctx.read(ETH_LEN)?;
    let payload = (core::mem::size_of::<Error6<Q>>() - IPV6_LEN) as u16;
    let mut e = Error6 { ip: [0; 20], icmp, quote };
    e.ip[0] = w(0x60, 0);
    e.ip[2] = payload.to_be();
    e.ip[3] = w(IPPROTO_ICMPV6, 64);
    // Source: the VIP the client asked for; destination: the client.
    e.ip[4..12].copy_from_slice(&quote[12..20]);
    e.ip[12..20].copy_from_slice(&quote[4..12]);
    // The pseudo-header (both addresses, the length, the next header) and the message.
    let mut sum = sum_words(&e.ip) - u32::from(e.ip[0]) - u32::from(e.ip[2]) - u32::from(e.ip[3]);
    sum += u32::from(payload.to_be()) + u32::from(w(0, IPPROTO_ICMPV6));
    e.icmp[1] = !fold(sum + sum_words(&e.icmp), sum_words(&e.quote));
    ctx.turn_around((ETH_LEN + Q * 2) as u32, &e)
}

/// The acknowledgment of a SYN whose sequence number is in two wire words.
#[inline(always)]
fn ack_of(seq: [u16; 2]) -> [u16; 2] {
    let [a, b] = seq[0].to_ne_bytes();
    let [c, d] = seq[1].to_ne_bytes();
    let [a, b, c, d] = u32::from_be_bytes([a, b, c, d]).wrapping_add(1).to_be_bytes();
    [w(a, b), w(c, d)]
}

/// A bare TCP header answering a SYN: RST|ACK, the SYN acknowledged,
/// ports swapped (`ports`: the SYN's source and destination port words).
#[inline(always)]
fn rst_header(sport: u16, dport: u16, seq: [u16; 2], pseudo: u32) -> [u16; 10] {
    let ack = ack_of(seq);
    let mut tcp = [dport, sport, 0, 0, ack[0], ack[1], w(5 << 4, 0x14), 0, 0, 0];
    tcp[8] = !fold(pseudo, sum_words(&tcp));
    tcp
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Reset4 {
    ip: [u16; 10],
    tcp: [u16; 10],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Reset6 {
    ip: [u16; 20],
    tcp: [u16; 10],
}

#[inline(never)]
fn reset4<C: Answer>(ctx: &C, l4_off: usize) -> Result<(), i64> {
    if l4_off != ETH_LEN + 20 {
        return Err(-1);
    }
    // The SYN's IPv4 header, ports and sequence number.
    let syn: [u16; 14] = ctx.read(ETH_LEN)?;
    let mut ip = [w(0x45, 0), 40u16.to_be(), 0, 0, w(64, IPPROTO_TCP), 0, syn[8], syn[9], syn[6], syn[7]];
    ip[5] = !fold(0, sum_words(&ip));
    let pseudo = sum_words(&[ip[6], ip[7], ip[8], ip[9], w(0, IPPROTO_TCP), 20u16.to_be()]);
    let r = Reset4 { ip, tcp: rst_header(syn[10], syn[11], [syn[12], syn[13]], pseudo) };
    ctx.turn_around((ETH_LEN + 40) as u32, &r)
}

#[inline(never)]
fn reset6<C: Answer>(ctx: &C, l4_off: usize) -> Result<(), i64> {
    if l4_off != ETH_LEN + IPV6_LEN {
        return Err(-1);
    }
    let syn: [u16; 24] = ctx.read(ETH_LEN)?;
    let mut ip = [0u16; 20];
    ip[0] = w(0x60, 0);
    ip[2] = 20u16.to_be();
    ip[3] = w(IPPROTO_TCP, 64);
    ip[4..12].copy_from_slice(&syn[12..20]);
    ip[12..20].copy_from_slice(&syn[4..12]);
    let mut pseudo = u32::from(20u16.to_be()) + u32::from(w(0, IPPROTO_TCP));
    for word in &ip[4..20] {
        pseudo += u32::from(*word);
    }
    let r = Reset6 { ip, tcp: rst_header(syn[20], syn[21], [syn[22], syn[23]], pseudo) };
    ctx.turn_around((ETH_LEN + IPV6_LEN + 20) as u32, &r)
}
