//! What differs between IPv4 and IPv6: maps, header offsets, the IPv4
//! header checksum. The programs are written once, generic over [`Family`].

use aya_ebpf::{
    maps::{Array, HashMap, LruHashMap},
    programs::TcContext,
};
use mcs_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, FragKey, FragValue, Ip4, Ip6, MapAddr, ServiceKey,
    ServiceValue, SockRevKey, SockRevValue,
};

use crate::{
    csum::Delta,
    maps::{
        AFFINITY, AFFINITY6, BACKENDS, BACKENDS6, CT, CT6, FRAGS, FRAGS6, SERVICES, SERVICES6, SOCK_REV, SOCK_REV6,
    },
    parse::{ETH_LEN, ptr_at},
};

pub trait Family {
    type A: MapAddr;
    /// Offsets of the source and destination address from the IP header.
    const SRC_OFF: usize;
    const DST_OFF: usize;
    /// `IPPROTO_ICMP` or `IPPROTO_ICMPV6`.
    const ICMP: u8;
    /// IPv4 has a header checksum; IPv6 has none, but its pseudo-header is
    /// in the ICMPv6 checksum.
    const HEADER_CSUM: bool;

    fn services() -> &'static HashMap<ServiceKey<Self::A>, ServiceValue>;
    fn backends() -> &'static Array<Backend<Self::A>>;
    fn ct() -> &'static LruHashMap<CtKey<Self::A>, CtValue<Self::A>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self::A>, AffinityValue>;
    fn frags() -> &'static LruHashMap<FragKey<Self::A>, FragValue<Self::A>>;
    fn sock_rev() -> &'static LruHashMap<SockRevKey<Self::A>, SockRevValue<Self::A>>;
    /// The checksum change of an address changing from `old` to `new`.
    fn delta(d: Delta, old: Self::A, new: Self::A) -> Delta;
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type A = Ip4;
    const SRC_OFF: usize = 12;
    const DST_OFF: usize = 16;
    const ICMP: u8 = mcs_common::IPPROTO_ICMP;
    const HEADER_CSUM: bool = true;

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<Ip4>, ServiceValue> {
        &SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static Array<Backend<Ip4>> {
        &BACKENDS
    }
    #[inline(always)]
    fn ct() -> &'static LruHashMap<CtKey<Ip4>, CtValue<Ip4>> {
        &CT
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Ip4>, AffinityValue> {
        &AFFINITY
    }
    #[inline(always)]
    fn frags() -> &'static LruHashMap<FragKey<Ip4>, FragValue<Ip4>> {
        &FRAGS
    }
    #[inline(always)]
    fn sock_rev() -> &'static LruHashMap<SockRevKey<Ip4>, SockRevValue<Ip4>> {
        &SOCK_REV
    }
    #[inline(always)]
    fn delta(d: Delta, old: Ip4, new: Ip4) -> Delta {
        d.dword(old, new)
    }
}

impl Family for V6 {
    type A = Ip6;
    const SRC_OFF: usize = 8;
    const DST_OFF: usize = 24;
    const ICMP: u8 = mcs_common::IPPROTO_ICMPV6;
    const HEADER_CSUM: bool = false;

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<Ip6>, ServiceValue> {
        &SERVICES6
    }
    #[inline(always)]
    fn backends() -> &'static Array<Backend<Ip6>> {
        &BACKENDS6
    }
    #[inline(always)]
    fn ct() -> &'static LruHashMap<CtKey<Ip6>, CtValue<Ip6>> {
        &CT6
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Ip6>, AffinityValue> {
        &AFFINITY6
    }
    #[inline(always)]
    fn frags() -> &'static LruHashMap<FragKey<Ip6>, FragValue<Ip6>> {
        &FRAGS6
    }
    #[inline(always)]
    fn sock_rev() -> &'static LruHashMap<SockRevKey<Ip6>, SockRevValue<Ip6>> {
        &SOCK_REV6
    }
    #[inline(always)]
    fn delta(d: Delta, old: Ip6, new: Ip6) -> Delta {
        d.words(old, new)
    }
}

/// Writes an address of the outer IP header (at `ETH_LEN + off`) and, for
/// IPv4, compensates the header checksum. Returns the change for the L4
/// (pseudo-header) checksum.
#[inline(always)]
pub fn write_ip<F: Family>(ctx: &TcContext, off: usize, old: F::A, new: F::A) -> Result<Delta, i64> {
    let addr = ptr_at::<F::A>(ctx, ETH_LEN + off).ok_or(-1i64)?;
    if F::HEADER_CSUM {
        let check = ptr_at::<u16>(ctx, ETH_LEN + 10).ok_or(-1i64)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { check.write_unaligned(F::delta(Delta::NONE, old, new).apply(check.read_unaligned())) };
    }
    // SAFETY: bounds checked by ptr_at.
    unsafe { addr.write_unaligned(new) };
    Ok(F::delta(Delta::NONE, old, new))
}
