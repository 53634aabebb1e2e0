//! Header parsing with a bounds check right before every access.

use aya_ebpf::programs::TcContext;
use mcs_common::{IPPROTO_TCP, IPPROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

const ETH_P_IP: u16 = 0x0800;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// An IPv4 TCP or UDP packet's addressing, in map byte order, with the offsets
/// the NAT helpers need.
pub struct Flow {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub l4_off: usize,
    /// IPv4 total length: the bytes counted per backend.
    pub ip_len: u16,
}

pub enum Parsed {
    /// Not IPv4 TCP/UDP: none of our business.
    Other,
    /// An IPv4 fragment: ports are absent or cannot be trusted alone.
    Fragment,
    /// A header is cut short or invalid.
    Malformed,
    Flow(Flow),
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Largest header stack we read: Ethernet + IPv4 with 40 bytes of options + TCP.
const MAX_HEADERS: u32 = (EthHdr::LEN + 60 + TcpHdr::LEN) as u32;

pub fn parse(ctx: &TcContext) -> Parsed {
    // Headers of a paged skb may sit outside the linear area; pull what we read.
    let linear = (ctx.data_end() - ctx.data()) as u32;
    if linear < MAX_HEADERS && ctx.len() > linear {
        let want = if ctx.len() < MAX_HEADERS { ctx.len() } else { MAX_HEADERS };
        if ctx.pull_data(want).is_err() {
            return Parsed::Malformed;
        }
    }

    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Other;
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Parsed::Other;
    }
    let l3_off = EthHdr::LEN;
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let proto = ip.proto;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::Other;
    }
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Parsed::Malformed;
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Parsed::Fragment;
    }
    let src_ip = u32::from_ne_bytes(ip.src_addr);
    let dst_ip = u32::from_ne_bytes(ip.dst_addr);
    let l4_off = l3_off + ihl;
    // The IP packet must hold the whole L4 header: bytes past its total length
    // (Ethernet padding, garbage) are not the packet's and are never rewritten.
    let l4_len = if proto == IPPROTO_TCP { TcpHdr::LEN } else { UdpHdr::LEN };
    let ip_len = u16::from_be_bytes(ip.tot_len);
    if (ip_len as usize) < ihl + l4_len {
        return Parsed::Malformed;
    }

    let (src_port, dst_port, tcp_flags) = if proto == IPPROTO_TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(ctx, l4_off) else {
            return Parsed::Malformed;
        };
        // SAFETY: bounds checked by ptr_at.
        let tcp = unsafe { &*tcp };
        // Byte 13 of the TCP header holds CWR..FIN; the bitfield accessors cost more.
        let flags_byte = unsafe { *((tcp as *const TcpHdr as *const u8).add(13)) };
        (u16::from_ne_bytes(tcp.source), u16::from_ne_bytes(tcp.dest), flags_byte)
    } else {
        let Some(udp) = ptr_at::<UdpHdr>(ctx, l4_off) else {
            return Parsed::Malformed;
        };
        // SAFETY: bounds checked by ptr_at.
        let udp = unsafe { &*udp };
        (u16::from_ne_bytes(udp.src), u16::from_ne_bytes(udp.dst), 0)
    };

    Parsed::Flow(Flow { src_ip, dst_ip, src_port, dst_port, proto, tcp_flags, l4_off, ip_len })
}
