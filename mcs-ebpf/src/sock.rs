//! Socket-level load balancing: cgroup hooks that pick the backend when a
//! socket calls `connect()` (TCP, connected UDP) or `sendmsg()` (unconnected
//! UDP), so its packets go to the pod directly and the TC programs, which
//! see no VIP in them, leave them alone. `recvmsg()` and `getpeername()`
//! show the VIP again, so the application sees what it asked for.
//!
//! Selection is the TC path's (`ingress::select`): same tables, tiers,
//! weights and affinity. What differs is the hash input: the source port is
//! not known at `connect()`, so the socket cookie stands in for it.

use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, generated::bpf_set_retval,
    },
    macros::{cgroup_sock, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use mcs_common::{
    CONFIG_F_SOCK_EXCLUDE, CONFIG_F_SOCK_HOST_ONLY, IPPROTO_TCP, IPPROTO_UDP, Ip4, Ip6, SOCK_EXCLUDE_DEPTH,
    SOCK_REV_F_STATE_CB, ServiceKey, SockRevKey, SockRevValue, Stat, socket_hash,
};

use crate::{
    family::{Family, V4, V6},
    ingress::select,
    maps::{HOST_NETNS, SOCK_EXCLUDE, backend_stats, config, count, health_add, service_stats},
};

/// What a `sock_addr` program returns to let the call go on (1), or to fail
/// it (0, with the error set by `bpf_set_retval`).
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Where a hook's address lives: `user_ip4`, `user_ip6`, or an IPv4 address
/// mapped into `user_ip6` (`::ffff:a.b.c.d`, a dual-stack socket reaching an
/// IPv4 VIP).
trait UserAddr {
    type F: Family;
    /// The address, if it is of this kind.
    fn get(ctx: &SockAddrContext) -> Option<<Self::F as Family>::A>;
    fn set(ctx: &SockAddrContext, addr: <Self::F as Family>::A);
    /// A stand-in client address for ClientIP affinity at `connect()`,
    /// where the source address is not chosen yet: one per network
    /// namespace (one per pod), as a pod's address would be.
    fn client(netns_cookie: u64) -> <Self::F as Family>::A;
}

struct User4;
struct User6;
struct Mapped4;

/// `::ffff:0:0/96`, the third word in map byte order.
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[inline(always)]
fn read6(ctx: &SockAddrContext) -> Ip6 {
    // SAFETY: the context pointer is valid for the program run; the verifier
    // allows 4-byte reads of each `user_ip6` word.
    unsafe {
        let a = &raw const (*ctx.sock_addr).user_ip6;
        [(*a)[0], (*a)[1], (*a)[2], (*a)[3]]
    }
}

#[inline(always)]
fn write6(ctx: &SockAddrContext, addr: Ip6) {
    // SAFETY: as above, 4-byte writes of each word.
    unsafe {
        let a = &raw mut (*ctx.sock_addr).user_ip6;
        (*a)[0] = addr[0];
        (*a)[1] = addr[1];
        (*a)[2] = addr[2];
        (*a)[3] = addr[3];
    }
}

impl UserAddr for User4 {
    type F = V4;
    #[inline(always)]
    fn get(ctx: &SockAddrContext) -> Option<Ip4> {
        // SAFETY: context pointer valid for the program run.
        Some(unsafe { (*ctx.sock_addr).user_ip4 })
    }
    #[inline(always)]
    fn set(ctx: &SockAddrContext, addr: Ip4) {
        // SAFETY: as above.
        unsafe { (*ctx.sock_addr).user_ip4 = addr };
    }
    #[inline(always)]
    fn client(netns_cookie: u64) -> Ip4 {
        netns_cookie as u32 ^ (netns_cookie >> 32) as u32
    }
}

impl UserAddr for User6 {
    type F = V6;
    #[inline(always)]
    fn get(ctx: &SockAddrContext) -> Option<Ip6> {
        let a = read6(ctx);
        (a[0] != 0 || a[1] != 0 || a[2] != MAPPED_PREFIX).then_some(a)
    }
    #[inline(always)]
    fn set(ctx: &SockAddrContext, addr: Ip6) {
        write6(ctx, addr);
    }
    #[inline(always)]
    fn client(netns_cookie: u64) -> Ip6 {
        [u32::MAX, u32::MAX, netns_cookie as u32, (netns_cookie >> 32) as u32]
    }
}

impl UserAddr for Mapped4 {
    type F = V4;
    #[inline(always)]
    fn get(ctx: &SockAddrContext) -> Option<Ip4> {
        let a = read6(ctx);
        (a[0] == 0 && a[1] == 0 && a[2] == MAPPED_PREFIX).then_some(a[3])
    }
    #[inline(always)]
    fn set(ctx: &SockAddrContext, addr: Ip4) {
        write6(ctx, [0, 0, MAPPED_PREFIX, addr]);
    }
    #[inline(always)]
    fn client(netns_cookie: u64) -> Ip4 {
        User4::client(netns_cookie)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Connect,
    Sendmsg,
}

#[cgroup_sock_addr(connect4)]
pub fn mcs_connect4(ctx: SockAddrContext) -> i32 {
    translate::<User4>(&ctx, Call::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn mcs_connect6(ctx: SockAddrContext) -> i32 {
    match translate::<User6>(&ctx, Call::Connect) {
        ALLOW => translate::<Mapped4>(&ctx, Call::Connect),
        deny => deny,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mcs_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate::<User4>(&ctx, Call::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mcs_sendmsg6(ctx: SockAddrContext) -> i32 {
    match translate::<User6>(&ctx, Call::Sendmsg) {
        ALLOW => translate::<Mapped4>(&ctx, Call::Sendmsg),
        deny => deny,
    }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mcs_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse::<User4>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mcs_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse::<User6>(&ctx);
    reverse::<Mapped4>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn mcs_peername4(ctx: SockAddrContext) -> i32 {
    reverse::<User4>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mcs_peername6(ctx: SockAddrContext) -> i32 {
    reverse::<User6>(&ctx);
    reverse::<Mapped4>(&ctx);
    ALLOW
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: context pointer valid for the program run.
    let proto = unsafe { (*ctx.sock_addr).protocol };
    // The whole number: IPPROTO_MPTCP (262) must not pass for TCP (6).
    if proto == u32::from(IPPROTO_TCP) {
        IPPROTO_TCP
    } else if proto == u32::from(IPPROTO_UDP) {
        IPPROTO_UDP
    } else {
        0
    }
}

#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: context pointer valid for the program run.
    unsafe { (*ctx.sock_addr).user_port as u16 }
}

#[inline(always)]
fn set_user_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: as above; the port is stored in network order in the low 16 bits.
    unsafe { (*ctx.sock_addr).user_port = u32::from(port) };
}

/// True when the caller's cgroup, or one of its ancestors, is excluded.
#[inline(always)]
fn excluded() -> bool {
    if !config(CONFIG_F_SOCK_EXCLUDE) {
        return false;
    }
    for level in 0..SOCK_EXCLUDE_DEPTH {
        // SAFETY: helper without preconditions.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        // SAFETY: a plain read of a map value, not kept.
        if unsafe { SOCK_EXCLUDE.get(id) }.is_some() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn refuse() -> i32 {
    count(Stat::SockRefused);
    // SAFETY: helper without preconditions; allowed in connect and sendmsg hooks.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

// Its own subprogram: the mapped-IPv4 and the IPv6 copy would otherwise
// share one stack frame.
#[inline(never)]
fn translate<U: UserAddr>(ctx: &SockAddrContext, call: Call) -> i32 {
    let proto = protocol(ctx);
    if proto == 0 {
        return ALLOW;
    }
    let Some(vip) = U::get(ctx) else {
        return ALLOW;
    };
    let vip_port = user_port(ctx);
    let key = ServiceKey { vip, port: vip_port, proto, _pad: 0 };
    let Some(service) = <U::F as Family>::services().get_ptr(key) else {
        return ALLOW;
    };
    // SAFETY: map value pointer, valid for this program run.
    let service = unsafe { &*service };
    // SAFETY: helper without preconditions for this program type.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    if excluded() || config(CONFIG_F_SOCK_HOST_ONLY) && HOST_NETNS.get(0).is_none_or(|host| *host != netns) {
        count(Stat::SockExcluded);
        return ALLOW;
    }
    // SAFETY: helpers without preconditions for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let hash = || socket_hash(cookie, vip, vip_port, proto);
    let Some((id, backend)) = select::<U::F>(service, hash, U::client(netns)) else {
        if let Some(stats) = service_stats::<false>(service.service_id) {
            stats.no_backend += 1;
        }
        return refuse();
    };
    let rev_key = SockRevKey::new(cookie, backend.ip, backend.port);
    // UDP sockets send to the same backend again and again: an entry already
    // there is no new flow. A TCP socket runs this hook once per connection
    // attempt, each one a new flow (a retry after a failed attempt too), so
    // the lookup is skipped: a TCP connect pays for every map access.
    let known = proto == IPPROTO_UDP
        && <U::F as Family>::sock_rev()
            .get_ptr(rev_key)
            // SAFETY: map value pointer, valid for this program run.
            .is_some_and(|rev| unsafe { (*rev).vip == vip && (*rev).vip_port == vip_port });
    if !known {
        let rev = SockRevValue { vip, vip_port, proto, flags: 0, backend_id: id, service_id: service.service_id };
        // Without the entry a reply would show the backend's address, which
        // an unconnected UDP client rejects: leave the call to the TC path.
        if <U::F as Family>::sock_rev().insert(rev_key, rev, 0).is_err() {
            count(Stat::CtInsertFailed);
            return ALLOW;
        }
        if let Some(stats) = backend_stats::<false>(id) {
            stats.new_flows += 1;
        }
        if let Some(stats) = service_stats::<false>(service.service_id) {
            stats.new_flows += 1;
        }
    }
    U::set(ctx, backend.ip);
    set_user_port(ctx, backend.port);
    count(if call == Call::Connect { Stat::SockConnect } else { Stat::SockSendmsg });
    ALLOW
}

/// A reply's source (`recvmsg`) or a connected socket's peer
/// (`getpeername`) that is a backend this socket was sent to: the VIP.
#[inline(never)]
fn reverse<U: UserAddr>(ctx: &SockAddrContext) {
    let Some(ip) = U::get(ctx) else {
        return;
    };
    // SAFETY: helper without preconditions for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let Some(rev) = <U::F as Family>::sock_rev().get_ptr(SockRevKey::new(cookie, ip, user_port(ctx))) else {
        return;
    };
    // SAFETY: map value pointer, valid for this program run.
    let (vip, vip_port) = unsafe { ((*rev).vip, (*rev).vip_port) };
    U::set(ctx, vip);
    set_user_port(ctx, vip_port);
    count(Stat::SockRevNat);
}

// Passive health for sockets translated at connect(): their SYNs go to the
// pod directly, so the TC programs never see them. The socket's own TCP
// events stand in: the SYN leaving (a connection attempt), the handshake
// completing (a SYN-ACK), and the attempt ending without one (refused, or
// given up), counted like a RST answering the SYN. Only that last one needs
// the state callbacks, so they are on from the SYN to the attempt's outcome:
// left on, each later state change (three more in a short connection's
// life) is one more program run. A program of another cgroup's that turns
// them on after the SYN loses them at the handshake: nothing records who
// asked after us.
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sock_ops]
pub fn mcs_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    let failed = op == BPF_SOCK_OPS_STATE_CB && ctx.arg(0) == TCP_SYN_SENT && ctx.arg(1) == TCP_CLOSE;
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && !failed {
        return 1;
    }
    // SAFETY: helper without preconditions for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // The remote port sits in the upper half, in network byte order.
    let port = (ctx.remote_port() >> 16) as u16;
    let entry = match ctx.family() {
        AF_INET => entry_of::<V4>(cookie, ctx.remote_ip4(), port),
        AF_INET6 => {
            let a = ctx.remote_ip6();
            if a[0] == 0 && a[1] == 0 && a[2] == MAPPED_PREFIX {
                entry_of::<V4>(cookie, a[3], port)
            } else {
                entry_of::<V6>(cookie, a, port)
            }
        }
        _ => None,
    };
    let Some((flags, id)) = entry else {
        return 1;
    };
    // Direct calls: BPF has no indirect ones.
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Only translated sockets ask for their state changes. The call
        // replaces the flags: keep what other programs asked for, and note
        // whether the state callbacks are ours to turn off.
        let cb = ctx.cb_flags() as i32;
        if cb & BPF_SOCK_OPS_STATE_CB_FLAG == 0 && ctx.set_cb_flags(cb | BPF_SOCK_OPS_STATE_CB_FLAG).is_ok() {
            // SAFETY: map value pointer, valid for this program run.
            unsafe { *flags |= SOCK_REV_F_STATE_CB };
        }
        if let Some(id) = id {
            health_add(id, |h| &mut h.syns);
        }
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        end_state_callbacks(&ctx, flags);
        if let Some(id) = id {
            health_add(id, |h| &mut h.synacks);
        }
    } else {
        // Also here: a retry on this socket starts over at its own SYN, which
        // must find the callbacks off to know they are ours again.
        end_state_callbacks(&ctx, flags);
        if let Some(id) = id {
            health_add(id, |h| &mut h.syn_rsts);
        }
    }
    1
}

/// The attempt's outcome is known: the state callbacks go, if they are ours.
#[inline(always)]
fn end_state_callbacks(ctx: &SockOpsContext, flags: *mut u8) {
    // SAFETY: map value pointer, valid for this program run.
    unsafe {
        if *flags & SOCK_REV_F_STATE_CB != 0 {
            let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 & !BPF_SOCK_OPS_STATE_CB_FLAG);
            *flags &= !SOCK_REV_F_STATE_CB;
        }
    }
}

/// A socket translated at connect(): its entry's flags, and the backend id
/// it was sent to while the id still names that backend.
#[inline(always)]
fn entry_of<F: Family>(cookie: u64, ip: F::A, port: u16) -> Option<(*mut u8, Option<u32>)> {
    let rev = F::sock_rev().get_ptr_mut(SockRevKey::new(cookie, ip, port))?;
    // SAFETY: map value pointer, valid for this program run.
    let (flags, id) = unsafe { (&raw mut (*rev).flags, (*rev).backend_id) };
    Some((flags, F::backends().get(id).filter(|b| b.ip == ip && b.port == port).map(|_| id)))
}

/// A socket closing takes its reverse entry with it: a connected socket's
/// destination is the backend it was sent to. (Entries of unconnected UDP
/// sockets, one per destination, are left to the LRU.)
#[cgroup_sock(sock_release)]
pub fn mcs_sockfree(ctx: SockContext) -> i32 {
    // SAFETY: context pointer valid for the program run.
    let (family, port) = unsafe { ((*ctx.sock).family, (*ctx.sock).dst_port) };
    if port == 0 {
        return 1;
    }
    // SAFETY: helper without preconditions for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    if family == AF_INET {
        // SAFETY: as above.
        let ip = unsafe { (*ctx.sock).dst_ip4 };
        let _ = V4::sock_rev().remove(SockRevKey::new(cookie, ip, port));
    } else if family == AF_INET6 {
        // SAFETY: as above; 4-byte reads of each word.
        let a = unsafe {
            let a = &raw const (*ctx.sock).dst_ip6;
            [(*a)[0], (*a)[1], (*a)[2], (*a)[3]]
        };
        if a[0] == 0 && a[1] == 0 && a[2] == MAPPED_PREFIX {
            let _ = V4::sock_rev().remove(SockRevKey::new(cookie, a[3], port));
        } else {
            let _ = V6::sock_rev().remove(SockRevKey::new(cookie, a, port));
        }
    }
    1
}
