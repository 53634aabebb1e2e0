//! TC ingress on pod-facing interfaces: traffic leaving a client pod.
//! `ClusterSetIP:port` is translated to the selected backend `podIP:port`.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::classifier, programs::TcContext};
use aya_log_ebpf::{debug, warn};
use mcs_common::{
    AffinityKey, AffinityValue, Backend, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_FIN_CLIENT, CT_F_SYNACK, CtKey, CtValue,
    FRAG_DNAT, FragValue, IPPROTO_TCP, IPPROTO_UDP, MapAddr, ServiceKey, ServiceValue, Stat, client_hash, flow_hash,
};

use crate::{
    ct,
    family::{Family, V4, V6},
    icmp,
    maps::{SELECTION, TC_ACT_SHOT, TC_NEXT, backend_stats, count, handoff, health_add, service_stats},
    nat::{Side, follow_fragment, rewrite},
    parse::{Flow, Frag, Parsed, parse},
    xnat::{self, is_bare_syn},
};

/// `ingress`'s answer for a new flow to a frontend with no backend.
const REJECT: i32 = i32::MIN;

#[classifier]
pub fn mcs_ingress(ctx: TcContext) -> i32 {
    // A rejection is made here, not in `ingress`: its buffers and the
    // translation's must not share a call chain's 512 bytes of stack. So is
    // the check for a local backend's reply to a flow from outside.
    match parse(&ctx) {
        Parsed::V4(flow) => match xnat::local_reply::<V4>(&ctx, &flow).unwrap_or_else(|| ingress::<V4>(&ctx, &flow)) {
            REJECT => icmp::reject::<V4>(&ctx, &flow),
            verdict => verdict,
        },
        Parsed::V6(flow) => match xnat::local_reply::<V6>(&ctx, &flow).unwrap_or_else(|| ingress::<V6>(&ctx, &flow)) {
            REJECT => icmp::reject::<V6>(&ctx, &flow),
            verdict => verdict,
        },
        Parsed::Other => TC_NEXT,
        Parsed::Unparsed6 => {
            count(Stat::Ipv6Unparsed);
            TC_NEXT
        }
        Parsed::Malformed => {
            count(Stat::Malformed);
            debug!(&ctx, "malformed packet passed untouched ({} bytes)", ctx.len());
            TC_NEXT
        }
    }
}

// A subprogram per family: inlined, both families' locals would share
// one stack frame, past BPF's 512 bytes.
#[inline(never)]
fn ingress<F: Family>(ctx: &TcContext, flow: &Flow<F::A>) -> i32 {
    if flow.proto == F::ICMP {
        return TC_NEXT;
    }
    if let Frag::Later(id) = flow.frag {
        return follow_fragment::<F>(ctx, flow, id, Side::Destination, true);
    }
    let key = ServiceKey { vip: flow.dst_ip, port: flow.dst_port, proto: flow.proto, _pad: 0 };
    let Some(service) = F::services().get_ptr(key) else {
        count(Stat::NotService);
        if is_bare_syn(flow) {
            forget_stale_reply::<F>(flow);
        }
        return TC_NEXT;
    };
    // SAFETY: map value pointer, valid for this program run.
    let service = unsafe { &*service };

    let ct_key = CtKey {
        src: flow.src_ip,
        dst: flow.dst_ip,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    };
    let backend = match established::<F>(flow, &ct_key) {
        Lookup::Pinned(id, backend) => {
            count(Stat::Established);
            // A TCP flow outlives its backend's id, which may now name another:
            // count it only while the id still means this address.
            if let Some(stats) = backend_stats::<false>(id)
                && F::backends().get(id).is_some_and(|b| b.ip == backend.ip && b.port == backend.port)
            {
                stats.packets_to += 1;
                stats.bytes_to += u64::from(flow.ip_len);
            }
            backend
        }
        // Mid-upgrade, a flow we do not know may be one the older programs
        // behind us translated: theirs to handle.
        Lookup::Unknown if handoff() => return TC_NEXT,
        Lookup::Unknown | Lookup::Reselect => match select::<F>(
            service,
            || flow_hash(flow.src_ip, flow.dst_ip, flow.src_port, flow.dst_port, flow.proto),
            flow.src_ip,
        ) {
            Some((id, backend)) => {
                // A TCP packet past the handshake (its entries were evicted, or
                // it predates this agent) belongs to a connection the backend
                // answered: it gets established's timeout, not a SYN's, and
                // passive health does not take a RST for a refusal.
                let flags = if flow.proto == IPPROTO_TCP && !is_bare_syn(flow) { CT_F_SYNACK } else { 0 };
                if let Err(e) = record::<F>(&ct_key, service, id, &backend, flags) {
                    count(Stat::CtInsertFailed);
                    warn!(ctx, "conntrack insert failed ({}) for service {}: packet dropped", e, service.service_id);
                    return TC_ACT_SHOT;
                }
                count(Stat::NewFlow);
                count_new_flow::<_, false>(flow, id, service.service_id);
                backend
            }
            None => {
                count(Stat::NoBackend);
                if let Some(stats) = service_stats::<false>(service.service_id) {
                    stats.no_backend += 1;
                }
                // Fail fast, as kube-proxy does: only a flow's opening packet
                // is answered (a reply to every packet of a stream is noise).
                if flow.proto == IPPROTO_UDP || is_bare_syn(flow) {
                    return REJECT;
                }
                return TC_ACT_SHOT;
            }
        },
    };

    if let Frag::First(id) = flow.frag {
        remember_fragment::<F>(flow, id, backend.ip);
    }
    if let Err(e) = rewrite::<F>(ctx, flow, Side::Destination, backend.ip, backend.port) {
        count(Stat::RewriteFailed);
        warn!(ctx, "DNAT rewrite failed ({}): packet dropped", e);
        return TC_ACT_SHOT;
    }
    TC_NEXT
}

/// A new flow's counters, on every path: the backend's and the frontend's,
/// and a connection attempt for passive health.
#[inline(always)]
pub fn count_new_flow<A, const XDP: bool>(flow: &Flow<A>, id: u32, service_id: u32) {
    if let Some(stats) = backend_stats::<XDP>(id) {
        stats.new_flows += 1;
        stats.packets_to += 1;
        stats.bytes_to += u64::from(flow.ip_len);
    }
    if is_bare_syn(flow) {
        health_add(id, |h| &mut h.syns);
    }
    if let Some(stats) = service_stats::<XDP>(service_id) {
        stats.new_flows += 1;
    }
}

/// The first fragment of a datagram to a VIP: its later fragments, which
/// carry no ports, go where it went.
#[inline(always)]
fn remember_fragment<F: Family>(flow: &Flow<F::A>, id: u32, backend_ip: F::A) {
    count(Stat::Fragment);
    let key = flow.frag_key(id, mcs_common::FRAG_PART_DST);
    // Best effort: without it the later fragments are counted as misses.
    let _ = F::frags().insert(key, FragValue { addr: backend_ip, side: FRAG_DNAT }, 0);
}

/// A direct connection from a client port that earlier talked to a VIP
/// translated to this very pod: the old reply entry would rewrite its
/// SYN-ACK to come from the VIP. The whole pair goes: the original entry
/// left alone would put the reply back. Only bare SYNs pay for this lookup.
#[inline(always)]
fn forget_stale_reply<F: Family>(flow: &Flow<F::A>) {
    let reply = CtKey {
        src: flow.dst_ip,
        dst: flow.src_ip,
        src_port: flow.dst_port,
        dst_port: flow.src_port,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    if let Some(value) = F::ct().get_ptr(reply) {
        // SAFETY: map value pointer, valid for this program run; copied.
        let value = unsafe { *value };
        ct::remove_pair::<F>(&reply, &value);
        count(Stat::StaleRevNat);
    }
}

/// What conntrack says about a packet that is not a bare SYN.
enum Lookup<A> {
    /// Pinned to this backend (its id when pinned, and address).
    Pinned(u32, Backend<A>),
    /// Not known here: a new flow, or mid-upgrade one of the older programs'.
    Unknown,
    /// Known, and to be balanced afresh now (its UDP backend left).
    Reselect,
}

/// The backend this flow is pinned to, if it should stay pinned.
#[inline(always)]
fn established<F: Family>(flow: &Flow<F::A>, ct_key: &CtKey<F::A>) -> Lookup<F::A> {
    // A bare SYN opens a new connection: a reused client port must not inherit
    // the backend of an earlier connection.
    if is_bare_syn(flow) {
        return Lookup::Reselect;
    }
    let Some(ct_ptr) = F::ct().get_ptr_mut(ct_key) else { return Lookup::Unknown };
    // SAFETY: map value pointer, valid for this program run.
    let ct = unsafe { *ct_ptr };
    let pinned = Backend { ip: ct.addr, port: ct.port, _pad: 0 };
    if ct.closed_ns != 0 && ct::expired(ct.closed_ns) {
        // A closed connection's leftovers: never translate on them again.
        ct::remove_pair::<F>(ct_key, &ct);
        count(Stat::ClosedExpired);
        return Lookup::Unknown;
    }
    if flow.proto == IPPROTO_TCP {
        let bits = ct::close_bits(flow.tcp_flags, CT_F_FIN_CLIENT);
        if bits != 0 {
            ct::mark::<F>(ct_key, ct_ptr, bits);
        }
    }
    // UDP has no connection to keep alive: once the backend is gone from the
    // service (its id freed or reused), re-select instead of sending into the void.
    // TCP keeps the pin so an established connection survives endpoint removal.
    if flow.proto == IPPROTO_UDP {
        let current = F::backends().get(ct.backend_id);
        if current.is_none_or(|current| current.ip != pinned.ip || current.port != pinned.port) {
            // The new selection writes a new pair; the old reply entry would linger.
            ct::remove_pair::<F>(ct_key, &ct);
            return Lookup::Reselect;
        }
    }
    ct::keep_pair::<F>(ct_key, ct_ptr);
    Lookup::Pinned(ct.backend_id, pinned)
}

/// The backend for a new flow: the slot `hash` picks, or with ClientIP
/// affinity the backend `client` had. The socket programs share it, so both
/// paths select alike. The hash is only computed without affinity.
#[inline(always)]
pub fn select<F: Family>(
    service: &ServiceValue,
    hash: impl FnOnce() -> u32,
    client: F::A,
) -> Option<(u32, Backend<F::A>)> {
    if service.slot_count == 0 {
        return None;
    }
    if service.affinity_timeout_secs == 0 {
        return slot_backend::<F>(service, hash());
    }
    // ClientIP affinity: reuse the client's backend while the entry is fresh.
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = AffinityKey { service_id: service.service_id, client_ip: client };
    let timeout_ns = service.affinity_timeout_secs as u64 * 1_000_000_000;
    if let Some(entry) = F::affinity().get_ptr_mut(key) {
        // SAFETY: map value pointer, valid for this program run.
        let entry = unsafe { &mut *entry };
        if now.wrapping_sub(entry.last_used_ns) <= timeout_ns
            && let Some(backend) = F::backends().get(entry.backend_id)
            && backend.ip != F::A::ZERO
        {
            entry.last_used_ns = now;
            count(Stat::AffinityHit);
            return Some((entry.backend_id, *backend));
        }
    }
    let (id, backend) = slot_backend::<F>(service, client_hash(client))?;
    let value = AffinityValue { backend_id: id, _pad: 0, last_used_ns: now };
    // Best effort: without the entry the next connection hashes to the same slot anyway.
    let _ = F::affinity().insert(key, value, 0);
    Some((id, backend))
}

#[inline(always)]
fn slot_backend<F: Family>(service: &ServiceValue, hash: u32) -> Option<(u32, Backend<F::A>)> {
    // checked_rem: a plain `%` keeps a divide-by-zero panic the verifier rejects.
    let slot = service.slot_offset.wrapping_add(hash.checked_rem(service.slot_count)?);
    let id = SELECTION.get(slot >> 1)?[(slot & 1) as usize];
    let backend = *F::backends().get(id)?;
    if backend.ip == F::A::ZERO {
        return None;
    }
    Some((id, backend))
}

#[inline(always)]
fn record<F: Family>(
    ct_key: &CtKey<F::A>,
    service: &ServiceValue,
    id: u32,
    backend: &Backend<F::A>,
    flags: u8,
) -> Result<(), i64> {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let ct = CtValue {
        addr: backend.ip,
        port: backend.port,
        flags,
        _pad: 0,
        backend_id: id,
        service_id: service.service_id,
        closed_ns: 0,
        created_ns: now,
        paired_ns: now,
    };
    ct::insert_pair::<F>(ct_key, &ct)
}
