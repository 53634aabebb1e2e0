//! TC egress on pod-facing interfaces: traffic entering a client pod.
//! Replies from a backend get the `ClusterSetIP:port` the client connected to.

use aya_ebpf::{macros::classifier, programs::TcContext};
use mcs_common::{RevNatKey, Stat};

use crate::{
    maps::{REV_NAT, TC_ACT_SHOT, TC_NEXT, count},
    nat::{Side, rewrite},
    parse::{Parsed, parse},
};

#[classifier]
pub fn mcs_egress(ctx: TcContext) -> i32 {
    let Parsed::Flow(flow) = parse(&ctx) else {
        return TC_NEXT;
    };
    let key = RevNatKey {
        backend_ip: flow.src_ip,
        client_ip: flow.dst_ip,
        backend_port: flow.src_port,
        client_port: flow.dst_port,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let Some(rev) = REV_NAT.get_ptr(key) else {
        return TC_NEXT;
    };
    // SAFETY: map value pointer, valid for this program run; copied before the rewrite.
    let rev = unsafe { *rev };
    if rewrite(&ctx, &flow, Side::Source, rev.vip, rev.vip_port).is_err() {
        count(Stat::RewriteFailed);
        return TC_ACT_SHOT;
    }
    count(Stat::RevNat);
    TC_NEXT
}
