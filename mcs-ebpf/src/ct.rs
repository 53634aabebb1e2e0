//! The end of a TCP connection, as both programs see it. A flow has two
//! entries (CONNTRACK for the client's packets, REV_NAT for the replies);
//! each program sees one direction, so a FIN or RST seen by either updates
//! both, and both expire together once the connection is over.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use mcs_common::{CT_CLOSE_GRACE_NS, CT_F_RST, CtValue, MapAddr, RevNatValue, ct_closed};

use crate::parse::{TCP_FLAG_FIN, TCP_FLAG_RST};

/// `CT_F_*` bits a packet with these TCP flags contributes, from the side
/// whose FIN bit is `fin_bit`.
#[inline(always)]
pub fn close_bits(tcp_flags: u8, fin_bit: u8) -> u8 {
    let mut bits = 0;
    if tcp_flags & TCP_FLAG_FIN != 0 {
        bits |= fin_bit;
    }
    if tcp_flags & TCP_FLAG_RST != 0 {
        bits |= CT_F_RST;
    }
    bits
}

/// Adds `bits` to both entries (either may be missing after an eviction) and
/// starts the grace time once the connection is over.
#[inline(always)]
pub fn mark<A: MapAddr>(ct: Option<*mut CtValue<A>>, rev: Option<*mut RevNatValue<A>>, bits: u8) {
    // SAFETY: map value pointers, valid for this program run.
    let mut flags = bits;
    if let Some(ct) = ct {
        flags |= unsafe { (*ct).flags };
    }
    if let Some(rev) = rev {
        flags |= unsafe { (*rev).flags };
    }
    let closed_ns = if ct_closed(flags) {
        // SAFETY: helper without preconditions.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    // SAFETY: as above.
    unsafe {
        if let Some(ct) = ct {
            (*ct).flags = flags;
            if { (*ct).closed_ns } == 0 {
                (*ct).closed_ns = closed_ns;
            }
        }
        if let Some(rev) = rev {
            (*rev).flags = flags;
            if { (*rev).closed_ns } == 0 {
                (*rev).closed_ns = closed_ns;
            }
        }
    }
}

/// True when an entry closed more than the grace time ago.
#[inline(always)]
pub fn expired(closed_ns: u64) -> bool {
    // SAFETY: helper without preconditions.
    closed_ns != 0 && unsafe { bpf_ktime_get_ns() }.wrapping_sub(closed_ns) > CT_CLOSE_GRACE_NS
}
