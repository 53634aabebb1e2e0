//! TC egress on pod-facing interfaces: traffic entering a client pod.
//! Replies from a backend get the `ClusterSetIP:port` the client connected to.

use aya_ebpf::{macros::classifier, programs::TcContext};
use aya_log_ebpf::warn;
use mcs_common::{
    CT_DIR_REPLY, CT_F_FIN_BACKEND, CT_F_REPLIED, CT_F_SYNACK, CtKey, FRAG_REV_NAT, FragValue, IPPROTO_TCP, Stat,
};

use crate::{
    ct,
    family::{Family, V4, V6},
    icmp,
    maps::{TC_ACT_SHOT, TC_NEXT, backend_stats, count, health_add},
    nat::{Side, follow_fragment, rewrite},
    parse::{Flow, Frag, Parsed, TCP_FLAG_ACK, TCP_FLAG_RST, TCP_FLAG_SYN, parse},
};

#[classifier]
pub fn mcs_egress(ctx: TcContext) -> i32 {
    match parse(&ctx) {
        Parsed::V4(flow) => egress::<V4>(&ctx, &flow),
        Parsed::V6(flow) => egress::<V6>(&ctx, &flow),
        _ => TC_NEXT,
    }
}

// A subprogram per family: inlined, both families' locals would share
// one stack frame, past BPF's 512 bytes.
#[inline(never)]
fn egress<F: Family>(ctx: &TcContext, flow: &Flow<F::A>) -> i32 {
    if flow.proto == F::ICMP {
        return icmp::translate_error::<F>(ctx, flow);
    }
    if let Frag::Later(id) = flow.frag {
        return follow_fragment::<F>(ctx, flow, id, Side::Source, false);
    }
    let key = CtKey {
        src: flow.src_ip,
        dst: flow.dst_ip,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let Some(rev_ptr) = F::ct().get_ptr_mut(key) else {
        return TC_NEXT;
    };
    // SAFETY: map value pointer, valid for this program run; copied before the rewrite.
    let rev = unsafe { *rev_ptr };
    if rev.closed_ns != 0 && ct::expired(rev.closed_ns) {
        // The connection this entry belonged to is over: whatever this is, it
        // was not translated by us and must not be reverse-translated.
        ct::remove_pair::<F>(&key, &rev);
        count(Stat::ClosedExpired);
        return TC_NEXT;
    }
    if flow.proto == IPPROTO_TCP {
        let bits = ct::close_bits(flow.tcp_flags, CT_F_FIN_BACKEND);
        if bits != 0 {
            ct::mark::<F>(&key, rev_ptr, bits);
        }
    }
    ct::keep_pair::<F>(&key, rev_ptr);
    if let Frag::First(id) = flow.frag {
        let key = flow.frag_key(id, mcs_common::FRAG_PART_DST);
        let _ = F::frags().insert(key, FragValue { addr: rev.addr, side: FRAG_REV_NAT }, 0);
    }
    if let Err(e) = rewrite::<F>(ctx, flow, Side::Source, rev.addr, rev.port) {
        count(Stat::RewriteFailed);
        warn!(ctx, "reverse NAT rewrite failed ({}): packet dropped", e);
        return TC_ACT_SHOT;
    }
    count(Stat::RevNat);
    // As on ingress: only while the id still names this backend.
    if let Some(stats) = backend_stats::<false>(rev.backend_id)
        && F::backends().get(rev.backend_id).is_some_and(|b| b.ip == flow.src_ip && b.port == flow.src_port)
    {
        stats.packets_from += 1;
        stats.bytes_from += u64::from(flow.ip_len);
    }
    // Passive health: the first answer to a connection's SYN says whether
    // the backend is alive. Only SYN-ACKs and RSTs pay for this.
    if flow.proto == IPPROTO_TCP && rev.flags & CT_F_SYNACK == 0 {
        if flow.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN | TCP_FLAG_ACK {
            health_add(rev.backend_id, |h| &mut h.synacks);
            // SAFETY: map value pointer, valid for this program run.
            unsafe { (*rev_ptr).flags |= CT_F_SYNACK };
        } else if flow.tcp_flags & TCP_FLAG_RST != 0 {
            health_add(rev.backend_id, |h| &mut h.syn_rsts);
        }
    } else if flow.proto != IPPROTO_TCP && rev.flags & CT_F_REPLIED == 0 {
        // The first reply of a UDP flow: the collector gives it the stream timeout.
        // SAFETY: map value pointer, valid for this program run.
        unsafe { (*rev_ptr).flags |= CT_F_REPLIED };
    }
    TC_NEXT
}
