//! Header parsing with a bounds check right before every access.

use aya_ebpf::programs::{TcContext, XdpContext};
use mcs_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Ip4, Ip6};

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
pub const IPV6_LEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up (Cilium walks 4 as well):
/// a packet with more is passed untouched and counted.
const MAX_EXT_HEADERS: usize = 4;
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const ICMP_LEN: usize = 8;

/// Where a packet sits in a fragmented datagram. Ids are the IPv4 id or the
/// IPv6 fragment header's, as read (never swapped).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    Whole,
    /// Offset 0 with more to come: it carries the ports.
    First(u32),
    /// No L4 header: only addresses, protocol and id say whose it is.
    Later(u32),
}

/// A TCP, UDP or ICMP packet's addressing, in map byte order, with the
/// offsets the NAT helpers need. `A` is [`Ip4`] or [`Ip6`].
pub struct Flow<A> {
    pub src_ip: A,
    pub dst_ip: A,
    /// Zero in a later fragment and in ICMP.
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// ICMP or ICMPv6 type; 0 otherwise.
    pub icmp_type: u8,
    pub l4_off: usize,
    /// The IP packet's length, headers included: the bytes counted per backend.
    pub ip_len: u16,
    pub frag: Frag,
}

impl<A: Copy> Flow<A> {
    /// The `FRAGS` key of this packet's datagram (`id`: its [`Frag`]'s).
    #[inline(always)]
    pub fn frag_key(&self, id: u32, part: u8) -> mcs_common::FragKey<A> {
        mcs_common::FragKey::new(self.src_ip, self.dst_ip, id, self.proto, part)
    }
}

pub enum Parsed {
    /// Not IP TCP/UDP/ICMP: none of our business.
    Other,
    /// A header is cut short or invalid.
    Malformed,
    /// IPv6 with more extension headers than we walk, or ones we do not parse.
    Unparsed6,
    V4(Flow<Ip4>),
    V6(Flow<Ip6>),
}

/// A packet as both hooks see it: TC's skb and XDP's buffer. Parsing and
/// the header accesses are written once over it.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length (an skb may hold part of it outside the linear area).
    fn len(&self) -> u32;
    /// Makes the first `len` bytes linear.
    fn pull_data(&self, len: u32) -> Result<(), i64>;
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn pull_data(&self, len: u32) -> Result<(), i64> {
        TcContext::pull_data(self, len)
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }
    /// An XDP buffer without fragments is linear already; every access is
    /// bounds-checked against `data_end` anyway.
    #[inline(always)]
    fn pull_data(&self, _len: u32) -> Result<(), i64> {
        Ok(())
    }
}

#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Reads a `T` at `off`, unaligned.
#[inline(always)]
pub fn load<T: Copy>(ctx: &impl Packet, off: usize) -> Option<T> {
    // SAFETY: bounds checked by ptr_at.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

/// The headers the common path reads, per family: Ethernet, the fixed IP
/// header and 20 bytes of L4 header. Only these are made linear: a TCP
/// segment's linear part holds its headers and little more, and pulling
/// past it copies the head of every cloned skb (each data segment a local
/// socket sends). IPv4 options are pulled when a packet has them.
const V4_HEADERS: u32 = (ETH_LEN + 20 + TCP_LEN) as u32;
const V6_HEADERS: u32 = (ETH_LEN + IPV6_LEN + TCP_LEN) as u32;

/// Makes the first `want` bytes (or the whole packet, if shorter) linear:
/// headers of a paged skb may sit outside the linear area.
#[inline(always)]
pub fn pull(ctx: &impl Packet, want: u32) -> bool {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    if linear < want && ctx.len() > linear {
        let want = if ctx.len() < want { ctx.len() } else { want };
        return ctx.pull_data(want).is_ok();
    }
    true
}

/// As [`pull`], unconditionally: for rare packets (extension headers, ICMP
/// errors), where computing the linear length again trips the verifier (the
/// compiler reuses the packet pointer it read before an earlier pull).
#[inline(always)]
pub fn pull_more(ctx: &impl Packet, want: u32) -> bool {
    let len = ctx.len();
    ctx.pull_data(if len < want { len } else { want }).is_ok()
}

pub fn parse(ctx: &impl Packet) -> Parsed {
    // The Ethernet header is linear at TC (the stack pulled it to read the
    // protocol); a frame without one is not ours.
    let Some(ether_type) = load::<[u8; 2]>(ctx, 12) else {
        return Parsed::Other;
    };
    match u16::from_be_bytes(ether_type) {
        ETH_P_IP if pull(ctx, V4_HEADERS) => parse_v4(ctx),
        ETH_P_IPV6 if pull(ctx, V6_HEADERS) => parse_v6(ctx),
        ETH_P_IP | ETH_P_IPV6 => Parsed::Malformed,
        _ => Parsed::Other,
    }
}

/// [`parse`] of a frame whose EtherType was read already: one family's
/// code only (the XDP program parses in a function per family, so the
/// other family's locals never share its frame).
#[inline(always)]
pub fn parse_family(ctx: &impl Packet, ether_type: u16) -> Parsed {
    match ether_type {
        ETH_P_IP if pull(ctx, V4_HEADERS) => parse_v4(ctx),
        ETH_P_IPV6 if pull(ctx, V6_HEADERS) => parse_v6(ctx),
        ETH_P_IP | ETH_P_IPV6 => Parsed::Malformed,
        _ => Parsed::Other,
    }
}

/// Ports, TCP flags and ICMP type at `l4_off`; `None` when the frame does
/// not hold the whole header (every field a rewrite touches must be there).
#[inline(always)]
fn l4(ctx: &impl Packet, proto: u8, l4_off: usize) -> Option<(u16, u16, u8, u8)> {
    match proto {
        IPPROTO_TCP => {
            // Byte 13 holds CWR..FIN.
            let h = load::<[u8; TCP_LEN]>(ctx, l4_off)?;
            Some((u16::from_ne_bytes([h[0], h[1]]), u16::from_ne_bytes([h[2], h[3]]), h[13], 0))
        }
        IPPROTO_UDP => {
            let h = load::<[u8; UDP_LEN]>(ctx, l4_off)?;
            Some((u16::from_ne_bytes([h[0], h[1]]), u16::from_ne_bytes([h[2], h[3]]), 0, 0))
        }
        _ => {
            let h = load::<[u8; ICMP_LEN]>(ctx, l4_off)?;
            Some((0, 0, 0, h[0]))
        }
    }
}

/// Fills the flow's ports, TCP flags and ICMP type; false when cut short.
#[inline(always)]
fn read_l4<A>(ctx: &impl Packet, flow: &mut Flow<A>) -> bool {
    let Some((src_port, dst_port, tcp_flags, icmp_type)) = l4(ctx, flow.proto, flow.l4_off) else {
        return false;
    };
    flow.src_port = src_port;
    flow.dst_port = dst_port;
    flow.tcp_flags = tcp_flags;
    flow.icmp_type = icmp_type;
    true
}

#[inline(always)]
const fn l4_min(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => TCP_LEN,
        IPPROTO_UDP => UDP_LEN,
        _ => ICMP_LEN,
    }
}

fn parse_v4(ctx: &impl Packet) -> Parsed {
    let l3_off = ETH_LEN;
    let Some(ip) = load::<[u8; 20]>(ctx, l3_off) else {
        return Parsed::Malformed;
    };
    let proto = ip[9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP {
        return Parsed::Other;
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    let ip_len = u16::from_be_bytes([ip[2], ip[3]]);
    let id = u32::from(u16::from_ne_bytes([ip[4], ip[5]]));
    let frags = u16::from_be_bytes([ip[6], ip[7]]);
    let frag = if frags & IP_OFFSET_MASK != 0 {
        Frag::Later(id)
    } else if frags & IP_MF != 0 {
        Frag::First(id)
    } else {
        Frag::Whole
    };
    let src_ip = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let dst_ip = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let l4_off = l3_off + ihl;
    if ihl > 20 && !pull_more(ctx, (l4_off + TCP_LEN) as u32) {
        return Parsed::Malformed;
    }
    let mut flow =
        Flow { src_ip, dst_ip, src_port: 0, dst_port: 0, proto, tcp_flags: 0, icmp_type: 0, l4_off, ip_len, frag };
    if let Frag::Later(_) = frag {
        return Parsed::V4(flow);
    }
    // The IP packet must hold the whole L4 header: bytes past its total length
    // (Ethernet padding, garbage) are not the packet's and are never rewritten.
    if (ip_len as usize) < ihl + l4_min(proto) {
        return Parsed::Malformed;
    }
    if !read_l4(ctx, &mut flow) {
        return Parsed::Malformed;
    }
    Parsed::V4(flow)
}

fn parse_v6(ctx: &impl Packet) -> Parsed {
    let l3_off = ETH_LEN;
    let Some(ip) = load::<[u8; 8]>(ctx, l3_off) else {
        return Parsed::Malformed;
    };
    if ip[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]);
    let (Some(src_ip), Some(dst_ip)) = (load::<Ip6>(ctx, l3_off + 8), load::<Ip6>(ctx, l3_off + 24)) else {
        return Parsed::Malformed;
    };
    let mut next = ip[6];
    let mut off = l3_off + IPV6_LEN;
    let mut frag = Frag::Whole;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                if !pull_more(ctx, (off + 2) as u32) {
                    return Parsed::Malformed;
                }
                let Some(h) = load::<[u8; 2]>(ctx, off) else {
                    return Parsed::Malformed;
                };
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                if !pull_more(ctx, (off + 8) as u32) {
                    return Parsed::Malformed;
                }
                let Some(h) = load::<[u8; 8]>(ctx, off) else {
                    return Parsed::Malformed;
                };
                next = h[0];
                let offset_flags = u16::from_be_bytes([h[2], h[3]]);
                let id = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                frag = if offset_flags & 0xfff8 != 0 {
                    Frag::Later(id)
                } else if offset_flags & 1 != 0 {
                    Frag::First(id)
                } else {
                    // An atomic fragment (RFC 6946): a whole datagram.
                    Frag::Whole
                };
                off += 8;
            }
            _ => break,
        }
    }
    let proto = next;
    if matches!(proto, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT) {
        return Parsed::Unparsed6;
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMPV6 {
        return Parsed::Other;
    }
    let ip_len = payload_len.saturating_add(IPV6_LEN as u16);
    let mut flow =
        Flow { src_ip, dst_ip, src_port: 0, dst_port: 0, proto, tcp_flags: 0, icmp_type: 0, l4_off: off, ip_len, frag };
    if let Frag::Later(_) = frag {
        return Parsed::V6(flow);
    }
    if (ip_len as usize) < off - l3_off + l4_min(proto) {
        return Parsed::Malformed;
    }
    if off > ETH_LEN + IPV6_LEN && !pull_more(ctx, (off + TCP_LEN) as u32) {
        return Parsed::Malformed;
    }
    if !read_l4(ctx, &mut flow) {
        return Parsed::Malformed;
    }
    Parsed::V6(flow)
}
