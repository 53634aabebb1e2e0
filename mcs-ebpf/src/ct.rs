//! A flow's two conntrack entries, kept as a pair. Each program looks up
//! only its own direction's entry (one lookup per packet); the entry can
//! rebuild its sibling (`CtKey::sibling`), so a FIN or RST seen by either
//! program updates both, both expire together once the connection is over,
//! and a sibling that memory pressure evicted comes back.

// The map calls take the scratch key and value by reference on purpose: by
// value they would be copied onto the stack the scratch entry spares.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, generated::bpf_ktime_get_coarse_ns},
};
use mcs_common::{
    CT_CLOSE_GRACE_NS, CT_DIR_ORIGINAL, CT_F_RST, CT_F_SYNACK, CT_PAIR_CHECK_NS, CtKey, CtValue, IPPROTO_TCP, MapAddr,
    Stat, ct_closed,
};

use crate::{
    family::Family,
    maps::{CT_SCRATCH, CT_SCRATCH_VALUE, count},
    parse::{TCP_FLAG_FIN, TCP_FLAG_RST},
};

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

/// A key and value in `CT_SCRATCH`.
type ScratchPair<A> = (&'static mut CtKey<A>, &'static mut CtValue<A>);

/// The sibling of `key` (whose value is `value`), built in the per-CPU
/// scratch entry: the packet path's frame has no room for another key and
/// value (92 bytes for IPv6) below the BPF stack limit.
#[inline(always)]
fn sibling_in_scratch<F: Family>(key: &CtKey<F::A>, value: &CtValue<F::A>) -> Option<ScratchPair<F::A>> {
    let scratch = CT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU map value of `CtScratch`'s size, 8-aligned, with room
    // for the IPv6 key and value; no other user on this CPU during the run.
    let (k, v) =
        unsafe { (&mut *scratch.cast::<CtKey<F::A>>(), &mut *scratch.cast::<u8>().add(CT_SCRATCH_VALUE).cast()) };
    *k = key.sibling_key(value);
    *v = *value;
    (v.addr, v.port) = key.sibling_addr();
    Some((k, v))
}

/// Both entries of a new flow. The reply entry first: a reply must never
/// arrive for a flow we cannot un-NAT; if the second insert fails the first
/// is taken back, so no half pair is left.
// Out of line, as every pair operation: inlined, their locals would share
// the packet path's frame.
#[inline(never)]
pub fn insert_pair<F: Family>(key: &CtKey<F::A>, value: &CtValue<F::A>) -> Result<(), i64> {
    let (sibling, sibling_value) = sibling_in_scratch::<F>(key, value).ok_or(-1i64)?;
    F::ct().insert(&*sibling, &*sibling_value, 0)?;
    if let Err(e) = F::ct().insert(key, value, 0) {
        let _ = F::ct().remove(&*sibling);
        return Err(e.into());
    }
    Ok(())
}

/// Whether a sibling found in the map is this flow's: it must point back
/// (name the address this entry's key was translated from or to, as the
/// derived `expected` does). On a reused client port, a leftover reply entry
/// of an earlier connection to another backend derives the same original
/// key as the new connection's, and must not close or remove it.
#[inline(always)]
fn points_back<A: MapAddr>(found: *const CtValue<A>, expected: &CtValue<A>) -> bool {
    // SAFETY: map value pointer, valid for this program run.
    let (addr, port) = unsafe { ((*found).addr, (*found).port) };
    addr == { expected.addr } && port == expected.port
}

/// The flow's other entry, if it is there and is this flow's.
#[inline(always)]
fn sibling_of<F: Family>(key: &CtKey<F::A>, value: &CtValue<F::A>) -> Option<*mut CtValue<F::A>> {
    let (sibling, expected) = sibling_in_scratch::<F>(key, value)?;
    let found = F::ct().get_ptr_mut(&*sibling)?;
    points_back(found, expected).then_some(found)
}

/// Removes both entries of a flow (the sibling only if it is this flow's).
#[inline(never)]
pub fn remove_pair<F: Family>(key: &CtKey<F::A>, value: &CtValue<F::A>) {
    if let Some((sibling, expected)) = sibling_in_scratch::<F>(key, value)
        && F::ct().get_ptr(&*sibling).is_some_and(|found| points_back(found, expected))
    {
        let _ = F::ct().remove(&*sibling);
    }
    let _ = F::ct().remove(key);
}

/// At most once per `CT_PAIR_CHECK_NS` per entry: looks the sibling up,
/// which marks it used in the LRU (a direction quiet for now is not evicted
/// while the other is busy), and puts it back if it was evicted anyway.
/// The coarse clock costs a memory read, not a clock read.
#[inline(always)]
pub fn keep_pair<F: Family>(key: &CtKey<F::A>, entry: *mut CtValue<F::A>) {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: map value pointer, valid for this program run.
    let value = unsafe { &mut *entry };
    // Saturating: an entry created a moment ago carries the fine clock,
    // which runs up to a tick ahead of the coarse one.
    if now.saturating_sub(value.paired_ns) < CT_PAIR_CHECK_NS {
        return;
    }
    value.paired_ns = now;
    restore_sibling::<F>(key, value, now);
}

#[inline(never)]
fn restore_sibling<F: Family>(key: &CtKey<F::A>, value: &CtValue<F::A>, now: u64) {
    let Some((sibling, sibling_value)) = sibling_in_scratch::<F>(key, value) else { return };
    if let Some(found) = F::ct().get_ptr_mut(&*sibling) {
        // Touched either way; refreshed only if it is this flow's.
        if points_back(found, sibling_value) {
            // SAFETY: map value pointer, valid for this program run.
            unsafe { (*found).paired_ns = now };
        }
        return;
    }
    // A connection that is over needs no reply path back: once the client
    // moved on, the tuple may be another connection's.
    if value.closed_ns != 0 {
        return;
    }
    sibling_value.paired_ns = now;
    // Only packets past the handshake reach here from the client's side: the
    // backend did answer the SYN (passive health must not take its next RST
    // for a refused connection).
    if key.dir == CT_DIR_ORIGINAL && key.proto == IPPROTO_TCP {
        sibling_value.flags |= CT_F_SYNACK;
    }
    if F::ct().insert(&*sibling, &*sibling_value, BPF_NOEXIST as u64).is_ok() {
        count(Stat::CtPairRestored);
    }
}

/// Adds `bits` to an entry and its sibling (which may be missing after an
/// eviction) and starts the grace time once the connection is over.
#[inline(never)]
pub fn mark<F: Family>(key: &CtKey<F::A>, entry: *mut CtValue<F::A>, bits: u8) {
    // SAFETY: map value pointer, valid for this program run.
    let value = unsafe { &mut *entry };
    let sibling = sibling_of::<F>(key, value);
    let mut flags = bits | value.flags;
    if let Some(sibling) = sibling {
        // SAFETY: as above.
        flags |= unsafe { (*sibling).flags };
    }
    let closed_ns = if ct_closed(flags) {
        // SAFETY: helper without preconditions.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    set_flags(entry, flags, closed_ns);
    if let Some(sibling) = sibling {
        set_flags(sibling, flags, closed_ns);
    }
}

#[inline(always)]
fn set_flags<A>(entry: *mut CtValue<A>, flags: u8, closed_ns: u64) {
    // SAFETY: map value pointer, valid for this program run.
    unsafe {
        (*entry).flags = flags;
        if { (*entry).closed_ns } == 0 {
            (*entry).closed_ns = closed_ns;
        }
    }
}

/// True when an entry closed more than the grace time ago.
#[inline(always)]
pub fn expired(closed_ns: u64) -> bool {
    // SAFETY: helper without preconditions.
    closed_ns != 0 && unsafe { bpf_ktime_get_ns() }.wrapping_sub(closed_ns) > CT_CLOSE_GRACE_NS
}
