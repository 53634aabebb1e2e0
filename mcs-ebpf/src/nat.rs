//! Address and port rewriting with incremental checksum updates.
//!
//! The kernel's csum helpers are used instead of hand-written arithmetic because
//! they also handle CHECKSUM_PARTIAL skbs (locally generated traffic on veth),
//! where the L4 field holds only the pseudo-header sum.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use mcs_common::IPPROTO_UDP;
use network_types::eth::EthHdr;

use crate::parse::Flow;

const IP_CSUM_OFF: usize = EthHdr::LEN + 10;
const IP_SRC_OFF: usize = EthHdr::LEN + 12;
const IP_DST_OFF: usize = EthHdr::LEN + 16;
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;

pub enum Side {
    Source,
    Destination,
}

/// RFC 1624 incremental update of a ones'-complement checksum for a 32-bit
/// field changing from `old` to `new`. Works on raw (wire-order) words: the
/// ones'-complement sum does not care about byte order as long as it is consistent.
#[inline(always)]
fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let mut sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Rewrites one side of the flow to `new_ip:new_port` (map byte order).
///
/// The address, the port and the IPv4 header checksum are written directly
/// (a header change whose checksum compensates leaves CHECKSUM_COMPLETE sums
/// valid); the L4 checksum goes through `bpf_l4_csum_replace`, which also
/// handles CHECKSUM_PARTIAL. Helpers invalidate packet pointers, so the
/// direct writes come first.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, flow: &Flow, side: Side, new_ip: u32, new_port: u16) -> Result<(), i64> {
    let (ip_off, port_off, old_ip, old_port) = match side {
        Side::Source => (IP_SRC_OFF, flow.l4_off, flow.src_ip, flow.src_port),
        Side::Destination => (IP_DST_OFF, flow.l4_off + 2, flow.dst_ip, flow.dst_port),
    };
    let data = ctx.data();
    // Both bounds before any write, so a failure never leaves half a rewrite.
    // The port check is on the very pointer written through: the verifier does
    // not carry a bound from one variable-offset expression to another.
    let port = data + port_off;
    if port + 2 > ctx.data_end() || data + IP_DST_OFF + 4 > ctx.data_end() {
        return Err(-1);
    }
    // SAFETY: bounds-checked just above.
    unsafe {
        let check = (data + IP_CSUM_OFF) as *mut u16;
        check.write_unaligned(csum_replace4(check.read_unaligned(), old_ip, new_ip));
        ((data + ip_off) as *mut u32).write_unaligned(new_ip);
        (port as *mut u16).write_unaligned(new_port);
    }
    // A UDP checksum of zero means "none" and must stay zero.
    let (csum_off, mangled) = if flow.proto == IPPROTO_UDP {
        (flow.l4_off + UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0 as u64)
    } else {
        (flow.l4_off + TCP_CSUM_OFF, 0)
    };
    ctx.l4_csum_replace(csum_off, old_ip as u64, new_ip as u64, BPF_F_PSEUDO_HDR as u64 | mangled | 4)?;
    ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)?;
    Ok(())
}
