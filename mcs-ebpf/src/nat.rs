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

/// Rewrites one side of the flow to `new_ip:new_port` (map byte order).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, flow: &Flow, side: Side, new_ip: u32, new_port: u16) -> Result<(), i64> {
    let (ip_off, port_off, old_ip, old_port) = match side {
        Side::Source => (IP_SRC_OFF, flow.l4_off, flow.src_ip, flow.src_port),
        Side::Destination => (IP_DST_OFF, flow.l4_off + 2, flow.dst_ip, flow.dst_port),
    };
    // A UDP checksum of zero means "none" and must stay zero.
    let (csum_off, mangled) = if flow.proto == IPPROTO_UDP {
        (flow.l4_off + UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0 as u64)
    } else {
        (flow.l4_off + TCP_CSUM_OFF, 0)
    };
    ctx.l4_csum_replace(csum_off, old_ip as u64, new_ip as u64, BPF_F_PSEUDO_HDR as u64 | mangled | 4)?;
    ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old_ip as u64, new_ip as u64, 4)?;
    ctx.store(ip_off, &new_ip, 0)?;
    ctx.store(port_off, &new_port, 0)?;
    Ok(())
}
