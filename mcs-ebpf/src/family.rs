//! What differs between IPv4 and IPv6: maps, header offsets, the IPv4
//! header checksum. The programs are written once, generic over [`Family`].

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    maps::{Array, HashMap, LpmTrie, LruHashMap},
};
use mcs_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, FragKey, FragValue, Ip4, Ip6, MapAddr, NatValue, ServiceKey,
    ServiceValue, SockRevKey, SockRevValue, XNAT_F_SOURCE_FILTER4, XNAT_F_SOURCE_FILTER6, XnatConfig,
};

use crate::{
    csum::Delta,
    maps::{
        AFFINITY, AFFINITY6, BACKENDS, BACKENDS6, CT, CT6, FRAGS, FRAGS6, SERVICES, SERVICES6, SOCK_REV, SOCK_REV6,
        XNAT_CT, XNAT_CT6, XNAT_SRC, XNAT_SRC6,
    },
    parse::{ETH_LEN, Packet, ptr_at},
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
    /// Offset of the TTL (hop limit) from the IP header.
    const TTL_OFF: usize;
    /// `AF_INET` or `AF_INET6`, for `bpf_fib_lookup`.
    const AF: u8;
    /// The `XnatConfig::flags` bit of this family's source filter.
    const SOURCE_FILTER: u32;
    /// Prefix length of a whole address, for an LPM lookup.
    const BITS: u32;

    fn services() -> &'static HashMap<ServiceKey<Self::A>, ServiceValue>;
    fn backends() -> &'static Array<Backend<Self::A>>;
    fn ct() -> &'static LruHashMap<CtKey<Self::A>, CtValue<Self::A>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self::A>, AffinityValue>;
    fn frags() -> &'static LruHashMap<FragKey<Self::A>, FragValue<Self::A>>;
    fn sock_rev() -> &'static LruHashMap<SockRevKey<Self::A>, SockRevValue<Self::A>>;
    fn xnat_ct() -> &'static LruHashMap<CtKey<Self::A>, NatValue<Self::A>>;
    fn xnat_src() -> &'static LpmTrie<Self::A, u8>;
    /// This family's source NAT address (zero: the family is not served from outside).
    fn xnat_addr(config: &XnatConfig) -> Self::A;
    /// The source and destination of a route lookup.
    fn fib_addrs(params: &mut bpf_fib_lookup, src: Self::A, dst: Self::A);
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
    const TTL_OFF: usize = 8;
    const AF: u8 = 2;
    const SOURCE_FILTER: u32 = XNAT_F_SOURCE_FILTER4;
    const BITS: u32 = 32;

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
    fn xnat_ct() -> &'static LruHashMap<CtKey<Ip4>, NatValue<Ip4>> {
        &XNAT_CT
    }
    #[inline(always)]
    fn xnat_src() -> &'static LpmTrie<Ip4, u8> {
        &XNAT_SRC
    }
    #[inline(always)]
    fn xnat_addr(config: &XnatConfig) -> Ip4 {
        config.addr4
    }
    #[inline(always)]
    fn fib_addrs(params: &mut bpf_fib_lookup, src: Ip4, dst: Ip4) {
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
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
    const TTL_OFF: usize = 7;
    const AF: u8 = 10;
    const SOURCE_FILTER: u32 = XNAT_F_SOURCE_FILTER6;
    const BITS: u32 = 128;

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
    fn xnat_ct() -> &'static LruHashMap<CtKey<Ip6>, NatValue<Ip6>> {
        &XNAT_CT6
    }
    #[inline(always)]
    fn xnat_src() -> &'static LpmTrie<Ip6, u8> {
        &XNAT_SRC6
    }
    #[inline(always)]
    fn xnat_addr(config: &XnatConfig) -> Ip6 {
        config.addr6
    }
    #[inline(always)]
    fn fib_addrs(params: &mut bpf_fib_lookup, src: Ip6, dst: Ip6) {
        params.__bindgen_anon_3.ipv6_src = src;
        params.__bindgen_anon_4.ipv6_dst = dst;
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
pub fn write_ip<F: Family>(ctx: &impl Packet, off: usize, old: F::A, new: F::A) -> Result<Delta, i64> {
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

/// The checksum change of rewriting two addresses. Out of line: inlined,
/// IPv6's sixteen words each way spill into the caller's frame (160 bytes
/// of the XDP path's, 300 of the pod interface's error path).
#[inline(never)]
pub fn addrs_delta<F: Family>(old_a: &F::A, a: &F::A, old_b: &F::A, b: &F::A) -> Delta {
    F::delta(F::delta(Delta::NONE, *old_a, *a), *old_b, *b)
}
