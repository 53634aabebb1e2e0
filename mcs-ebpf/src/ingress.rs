//! TC ingress on pod-facing interfaces: traffic leaving a client pod.
//! `ClusterSetIP:port` is translated to the selected backend `podIP:port`.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::classifier, programs::TcContext};
use aya_log_ebpf::{debug, warn};
use mcs_common::{
    AffinityKey, AffinityValue, Backend, CT_F_FIN_CLIENT, CtKey, CtValue, IPPROTO_TCP, IPPROTO_UDP, RevNatKey,
    RevNatValue, ServiceKey, ServiceValue, Stat, client_hash, flow_hash,
};

use crate::{
    ct,
    maps::{
        AFFINITY, BACKENDS, CONNTRACK, REV_NAT, SELECTION, SERVICES, TC_ACT_SHOT, TC_NEXT, backend_stats, count,
        handoff, health_add, service_stats,
    },
    nat::{Side, rewrite},
    parse::{Flow, Parsed, TCP_FLAG_ACK, TCP_FLAG_SYN, parse},
};

#[classifier]
pub fn mcs_ingress(ctx: TcContext) -> i32 {
    let flow = match parse(&ctx) {
        Parsed::Flow(flow) => flow,
        Parsed::Other => return TC_NEXT,
        Parsed::Fragment => {
            count(Stat::Fragment);
            return TC_NEXT;
        }
        Parsed::Malformed => {
            count(Stat::Malformed);
            debug!(&ctx, "malformed packet passed untouched ({} bytes)", ctx.len());
            return TC_NEXT;
        }
    };
    let key = ServiceKey { vip: flow.dst_ip, port: flow.dst_port, proto: flow.proto, _pad: 0 };
    let Some(service) = SERVICES.get_ptr(key) else {
        count(Stat::NotService);
        if is_bare_syn(&flow) {
            forget_stale_reply(&flow);
        }
        return TC_NEXT;
    };
    // SAFETY: map value pointer, valid for this program run.
    let service = unsafe { &*service };

    let ct_key = CtKey {
        client_ip: flow.src_ip,
        vip: flow.dst_ip,
        client_port: flow.src_port,
        vip_port: flow.dst_port,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let backend = match established(&flow, &ct_key) {
        Some((id, backend)) => {
            count(Stat::Established);
            // A TCP flow outlives its backend's id, which may now name another:
            // count it only while the id still means this address.
            if let Some(stats) = backend_stats(id)
                && BACKENDS.get(id).is_some_and(|b| b.ip == backend.ip && b.port == backend.port)
            {
                stats.packets_to += 1;
                stats.bytes_to += u64::from(flow.ip_len);
            }
            backend
        }
        // Mid-upgrade, a flow we do not know may be one the older programs
        // behind us translated: theirs to handle.
        None if !is_bare_syn(&flow) && handoff() => return TC_NEXT,
        None => match select(&flow, service) {
            Some((id, backend)) => {
                if let Err(e) = record(&flow, &ct_key, service, id, &backend) {
                    count(Stat::CtInsertFailed);
                    warn!(&ctx, "conntrack insert failed ({}) for service {}: packet dropped", e, service.service_id);
                    return TC_ACT_SHOT;
                }
                count(Stat::NewFlow);
                if let Some(stats) = backend_stats(id) {
                    stats.new_flows += 1;
                    stats.packets_to += 1;
                    stats.bytes_to += u64::from(flow.ip_len);
                }
                if is_bare_syn(&flow) {
                    health_add(id, |h| &mut h.syns);
                }
                if let Some(stats) = service_stats(service.service_id) {
                    stats.new_flows += 1;
                }
                backend
            }
            None => {
                count(Stat::NoBackend);
                if let Some(stats) = service_stats(service.service_id) {
                    stats.no_backend += 1;
                }
                return TC_ACT_SHOT;
            }
        },
    };

    if let Err(e) = rewrite(&ctx, &flow, Side::Destination, backend.ip, backend.port) {
        count(Stat::RewriteFailed);
        warn!(&ctx, "DNAT rewrite failed ({}): packet dropped", e);
        return TC_ACT_SHOT;
    }
    TC_NEXT
}

#[inline(always)]
fn is_bare_syn(flow: &Flow) -> bool {
    flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

#[inline(always)]
fn rev_key(flow: &Flow, backend_ip: u32, backend_port: u16) -> RevNatKey {
    RevNatKey {
        backend_ip,
        client_ip: flow.src_ip,
        backend_port,
        client_port: flow.src_port,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

/// A direct connection from a client port that earlier talked to a VIP
/// translated to this very pod: the old reverse entry would rewrite its
/// SYN-ACK to come from the VIP. Only bare SYNs pay for this lookup.
#[inline(always)]
fn forget_stale_reply(flow: &Flow) {
    if REV_NAT.remove(rev_key(flow, flow.dst_ip, flow.dst_port)).is_ok() {
        count(Stat::StaleRevNat);
    }
}

/// The backend this flow is pinned to (its id when pinned, and address), if
/// it should stay pinned.
#[inline(always)]
fn established(flow: &Flow, ct_key: &CtKey) -> Option<(u32, Backend)> {
    // A bare SYN opens a new connection: a reused client port must not inherit
    // the backend of an earlier connection.
    if is_bare_syn(flow) {
        return None;
    }
    let ct_ptr = CONNTRACK.get_ptr_mut(ct_key)?;
    // SAFETY: map value pointer, valid for this program run.
    let ct = unsafe { &*ct_ptr };
    let pinned = Backend { ip: ct.backend_ip, port: ct.backend_port, _pad: 0 };
    if ct.closed_ns != 0 && ct::expired(ct.closed_ns) {
        // A closed connection's leftovers: never translate on them again.
        let _ = REV_NAT.remove(rev_key(flow, pinned.ip, pinned.port));
        let _ = CONNTRACK.remove(ct_key);
        count(Stat::ClosedExpired);
        return None;
    }
    if flow.proto == IPPROTO_TCP {
        let bits = ct::close_bits(flow.tcp_flags, CT_F_FIN_CLIENT);
        if bits != 0 {
            ct::mark(Some(ct_ptr), REV_NAT.get_ptr_mut(rev_key(flow, pinned.ip, pinned.port)), bits);
        }
    }
    // UDP has no connection to keep alive: once the backend is gone from the
    // service (its id freed or reused), re-select instead of sending into the void.
    // TCP keeps the pin so an established connection survives endpoint removal.
    if flow.proto == IPPROTO_UDP {
        let current = BACKENDS.get(ct.backend_id)?;
        if current.ip != pinned.ip || current.port != pinned.port {
            return None;
        }
    }
    Some((ct.backend_id, pinned))
}

#[inline(always)]
fn select(flow: &Flow, service: &ServiceValue) -> Option<(u32, Backend)> {
    if service.slot_count == 0 {
        return None;
    }
    if service.affinity_timeout_secs == 0 {
        let hash = flow_hash(flow.src_ip, flow.dst_ip, flow.src_port, flow.dst_port, flow.proto);
        return slot_backend(service, hash);
    }
    // ClientIP affinity: reuse the client's backend while the entry is fresh.
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = AffinityKey { service_id: service.service_id, client_ip: flow.src_ip };
    let timeout_ns = service.affinity_timeout_secs as u64 * 1_000_000_000;
    if let Some(entry) = AFFINITY.get_ptr_mut(key) {
        // SAFETY: map value pointer, valid for this program run.
        let entry = unsafe { &mut *entry };
        if now.wrapping_sub(entry.last_used_ns) <= timeout_ns
            && let Some(backend) = BACKENDS.get(entry.backend_id)
            && backend.ip != 0
        {
            entry.last_used_ns = now;
            count(Stat::AffinityHit);
            return Some((entry.backend_id, *backend));
        }
    }
    let (id, backend) = slot_backend(service, client_hash(flow.src_ip))?;
    let value = AffinityValue { backend_id: id, _pad: 0, last_used_ns: now };
    // Best effort: without the entry the next connection hashes to the same slot anyway.
    let _ = AFFINITY.insert(key, value, 0);
    Some((id, backend))
}

#[inline(always)]
fn slot_backend(service: &ServiceValue, hash: u32) -> Option<(u32, Backend)> {
    // checked_rem: a plain `%` keeps a divide-by-zero panic the verifier rejects.
    let slot = service.slot_offset.wrapping_add(hash.checked_rem(service.slot_count)?);
    let id = SELECTION.get(slot >> 1)?[(slot & 1) as usize];
    let backend = *BACKENDS.get(id)?;
    if backend.ip == 0 {
        return None;
    }
    Some((id, backend))
}

#[inline(always)]
fn record(flow: &Flow, ct_key: &CtKey, service: &ServiceValue, id: u32, backend: &Backend) -> Result<(), i64> {
    let rev = RevNatValue {
        vip: flow.dst_ip,
        vip_port: flow.dst_port,
        flags: 0,
        _pad: 0,
        backend_id: id,
        _pad2: 0,
        closed_ns: 0,
    };
    // Reverse entry first: a reply must never arrive for a flow we cannot un-NAT.
    REV_NAT.insert(rev_key(flow, backend.ip, backend.port), rev, 0)?;
    let ct = CtValue {
        backend_ip: backend.ip,
        backend_port: backend.port,
        flags: 0,
        _pad: 0,
        backend_id: id,
        service_id: service.service_id,
        closed_ns: 0,
        // SAFETY: helper without preconditions.
        created_ns: unsafe { bpf_ktime_get_ns() },
    };
    CONNTRACK.insert(ct_key, ct, 0)?;
    Ok(())
}
