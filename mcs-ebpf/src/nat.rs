//! Address and port rewriting with incremental checksum updates.
//!
//! The L4 checksum goes through the kernel's `bpf_l4_csum_replace`, which
//! also handles CHECKSUM_PARTIAL skbs (locally generated traffic on veth),
//! where the L4 field holds only the pseudo-header sum. Header fields are
//! written directly first: helpers invalidate packet pointers.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use mcs_common::{IPPROTO_UDP, Stat};

use crate::{
    family::{Family, write_ip},
    maps::{TC_ACT_SHOT, TC_NEXT, count},
    parse::{Flow, ptr_at},
};

const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;

#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

/// Rewrites one side of the flow to `new_ip:new_port` (map byte order).
/// In a later fragment (no L4 header) only the address changes: the first
/// fragment's checksum update covered the whole datagram.
#[inline(always)]
pub fn rewrite<F: Family>(
    ctx: &TcContext,
    flow: &Flow<F::A>,
    side: Side,
    new_ip: F::A,
    new_port: u16,
) -> Result<(), i64> {
    let (ip_off, port_off, old_ip, old_port) = match side {
        Side::Source => (F::SRC_OFF, flow.l4_off, flow.src_ip, flow.src_port),
        Side::Destination => (F::DST_OFF, flow.l4_off + 2, flow.dst_ip, flow.dst_port),
    };
    let later = matches!(flow.frag, crate::parse::Frag::Later(_));
    // Both bounds before any write, so a failure never leaves half a rewrite.
    // The port check is on the very pointer written through: the verifier
    // does not carry a bound from one variable-offset expression to another.
    let port = if later { None } else { Some(ptr_at::<u16>(ctx, port_off).ok_or(-1i64)?) };
    if let Some(port) = port {
        // SAFETY: bounds checked by ptr_at.
        unsafe { port.write_unaligned(new_port) };
    }
    let delta = write_ip::<F>(ctx, ip_off, old_ip, new_ip)?;
    if later {
        return Ok(());
    }
    // A UDP checksum of zero means "none" and must stay zero.
    let (csum_off, mangled) = if flow.proto == IPPROTO_UDP {
        (flow.l4_off + UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0 as u64)
    } else {
        (flow.l4_off + TCP_CSUM_OFF, 0)
    };
    ctx.l4_csum_replace(csum_off, 0, u64::from(delta.0), BPF_F_PSEUDO_HDR as u64 | mangled)?;
    ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)?;
    Ok(())
}

/// A later fragment (no ports): it follows its first fragment's
/// translation if that was seen. One that arrives before its first, or
/// after the entry was evicted, passes untranslated; toward a VIP that
/// means it is lost (nothing routes a VIP), like any lost fragment, and the
/// sender's datagram times out. `miss` counts those (ingress only: egress
/// sees every untranslated fragment).
#[inline(always)]
pub fn follow_fragment<F: Family>(ctx: &TcContext, flow: &Flow<F::A>, id: u32, side: Side, miss: bool) -> i32 {
    let key = flow.frag_key(id, mcs_common::FRAG_PART_DST);
    // The XDP path's entries (`FRAG_XNAT`) are not this path's.
    // SAFETY: map value pointer, valid for this program run.
    let Some(entry) = F::frags().get_ptr(key).filter(|e| unsafe { (**e).side } & 0xff != mcs_common::FRAG_XNAT) else {
        if miss {
            count(Stat::FragmentMiss);
        }
        return TC_NEXT;
    };
    // SAFETY: map value pointer, valid for this program run.
    let addr = unsafe { (*entry).addr };
    if rewrite::<F>(ctx, flow, side, addr, 0).is_err() {
        count(Stat::RewriteFailed);
        return TC_ACT_SHOT;
    }
    count(Stat::FragmentTranslated);
    TC_NEXT
}
