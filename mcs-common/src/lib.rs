//! The map layout: the only contract between the kernel programs and the agent.
//!
//! Byte order: every address and port in a key or value is stored exactly as it
//! appears on the wire (network byte order), read as a native integer. The kernel
//! side never swaps bytes; userspace converts with [`ip_to_map`] and
//! [`port_to_map`]. Padding is explicit so `bytemuck::Pod` holds and so the
//! kernel's hash of a key never sees uninitialised bytes.

#![no_std]

use bytemuck::{Pod, Zeroable};

/// Bumped whenever any type below changes size or meaning. Pinned maps live
/// under a directory named after it, so an agent never adopts maps of
/// another layout.
pub const LAYOUT_VERSION: u32 = 2;

/// Directory below the bpffs mount that holds our pins: `<bpffs>/mcs/v<LAYOUT_VERSION>/`.
pub const PIN_ROOT: &str = "mcs";

/// Names of the programs, as the kernel reports them (used to find stale attachments).
pub const PROG_INGRESS: &str = "mcs_ingress";
pub const PROG_EGRESS: &str = "mcs_egress";

/// Map names, identical on both sides.
pub const MAP_SERVICES: &str = "SERVICES";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_SELECTION: &str = "SELECTION";
pub const MAP_CONNTRACK: &str = "CONNTRACK";
pub const MAP_REV_NAT: &str = "REV_NAT";
pub const MAP_STATS: &str = "STATS";
pub const MAP_AFFINITY: &str = "AFFINITY";

/// Default capacities compiled into the object; the agent may resize them at load time.
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
/// 64 MiB: about a thousand 10-backend frontends at the default Maglev size. Even.
pub const DEFAULT_MAX_SELECTION_SLOTS: u32 = 1 << 24;
pub const DEFAULT_MAX_CONNTRACK: u32 = 262_144;
pub const DEFAULT_MAX_AFFINITY: u32 = 262_144;

/// Backend id 0 is never allocated: a zeroed selection slot or conntrack entry
/// therefore never names a live backend.
pub const NO_BACKEND: u32 = 0;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// `SERVICES` key: one frontend, `ClusterSetIP:port/protocol`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// ClusterSetIP, network byte order.
    pub vip: u32,
    /// Port, network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// `SERVICES` value: where this frontend's selection table lives.
///
/// The table is `SELECTION[slot_offset .. slot_offset + slot_count]`. A flow
/// picks `slot_offset + hash % slot_count`, so a weighted table (a backend
/// repeated in proportion to its weight, e.g. Maglev) needs no layout change:
/// only the userspace builder of the table changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceValue {
    /// Stable id of the frontend while it exists (statistics, affinity).
    pub service_id: u32,
    pub slot_offset: u32,
    /// 0 means the frontend exists but has no ready backend: packets are dropped.
    pub slot_count: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
    /// ClientIP affinity timeout; 0 disables affinity. With affinity the slot
    /// is chosen by [`client_hash`] instead of [`flow_hash`].
    pub affinity_timeout_secs: u32,
    pub _reserved: u32,
}

/// `SELECTION` element: two consecutive slots (backend ids). Slot `s` is
/// `SELECTION[s / 2][s % 2]`. BPF arrays store elements at an 8-byte stride,
/// so pairing keeps 4 bytes a slot, and the agent's mmap of the map reads as
/// one flat `u32` array of slots.
pub type SelectionPair = [u32; 2];

/// `BACKENDS` value (array index = backend id). A zeroed entry is a free id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend {
    /// Pod IP, network byte order.
    pub ip: u32,
    /// Pod port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// `CONNTRACK` key: the client's view of a flow (client -> VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    pub client_ip: u32,
    pub vip: u32,
    pub client_port: u16,
    pub vip_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `CONNTRACK` value: the backend a flow is pinned to.
///
/// The address is stored, not only the id, so an established flow keeps its
/// backend even after the backend id is freed and reused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtValue {
    pub backend_ip: u32,
    pub backend_port: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub service_id: u32,
}

/// `REV_NAT` key: a reply's view of a flow (backend -> client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RevNatKey {
    pub backend_ip: u32,
    pub client_ip: u32,
    pub backend_port: u16,
    pub client_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `REV_NAT` value: the address the client believes it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RevNatValue {
    pub vip: u32,
    pub vip_port: u16,
    pub _pad: u16,
}

/// `AFFINITY` key: ClientIP session affinity of one client to one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client_ip: u32,
}

/// `AFFINITY` value. The agent deletes entries whose backend leaves the
/// frontend, so a hit is always a current backend of that frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last new connection that used it.
    pub last_used_ns: u64,
}

/// Indexes into the per-CPU `STATS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Ingress IPv4 TCP/UDP packet whose destination is not a frontend.
    NotService = 0,
    /// New flow: a backend was selected and conntrack written.
    NewFlow = 1,
    /// Packet of a flow found in conntrack.
    Established = 2,
    /// Frontend without a ready backend: dropped.
    NoBackend = 3,
    /// IPv4 fragment: passed untouched.
    Fragment = 4,
    /// Truncated or malformed header: passed untouched.
    Malformed = 5,
    /// Egress reply rewritten back to the VIP.
    RevNat = 6,
    /// A conntrack or reverse-NAT insert failed: the packet is dropped, not half-translated.
    CtInsertFailed = 7,
    /// A checksum or store helper failed mid-rewrite: dropped.
    RewriteFailed = 8,
    /// A new flow went to its client's affinity backend.
    AffinityHit = 9,
}

impl Stat {
    pub const COUNT: u32 = 10;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::NotService,
        Stat::NewFlow,
        Stat::Established,
        Stat::NoBackend,
        Stat::Fragment,
        Stat::Malformed,
        Stat::RevNat,
        Stat::CtInsertFailed,
        Stat::RewriteFailed,
        Stat::AffinityHit,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::NotService => "not_service",
            Stat::NewFlow => "new_flow",
            Stat::Established => "established",
            Stat::NoBackend => "no_backend",
            Stat::Fragment => "fragment",
            Stat::Malformed => "malformed",
            Stat::RevNat => "rev_nat",
            Stat::CtInsertFailed => "ct_insert_failed",
            Stat::RewriteFailed => "rewrite_failed",
            Stat::AffinityHit => "affinity_hit",
        }
    }
}

#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a flow's 5-tuple, as the kernel computes it to pick a selection slot.
///
/// Shared so that userspace (tests, `inspect`-style tools) can predict which
/// slot a given flow lands in. Inputs are the raw map-order values.
#[inline(always)]
pub const fn flow_hash(client_ip: u32, vip: u32, client_port: u16, vip_port: u16, proto: u8) -> u32 {
    let mut h = fmix32(client_ip ^ 0x9e37_79b9);
    h = fmix32(h ^ vip);
    h = fmix32(h ^ (((client_port as u32) << 16) | vip_port as u32));
    fmix32(h ^ proto as u32)
}

/// Hash of the client address alone: with ClientIP affinity every flow of a
/// client lands on the same slot.
#[inline(always)]
pub const fn client_hash(client_ip: u32) -> u32 {
    fmix32(fmix32(client_ip ^ 0x85eb_ca6b) ^ 0x9e37_79b9)
}

/// An IPv4 address in map byte order.
#[inline(always)]
pub const fn ip_to_map(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// A port in map byte order.
#[inline(always)]
pub const fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: every type is #[repr(C)], has no implicit padding and is bytemuck::Pod.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn sizes_are_the_contract() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 24);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 16);
        assert_eq!(size_of::<RevNatKey>(), 16);
        assert_eq!(size_of::<RevNatValue>(), 8);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
    }

    #[test]
    fn map_byte_order_is_wire_order() {
        let ip = ip_to_map([10, 0, 0, 1]);
        assert_eq!(ip.to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(port_to_map(4242).to_ne_bytes(), 4242u16.to_be_bytes());
    }

    #[test]
    fn flow_hash_spreads_source_ports() {
        let vip = ip_to_map([10, 96, 0, 1]);
        let client = ip_to_map([10, 1, 0, 2]);
        let mut buckets = [0u32; 4];
        for sport in 30_000u16..34_000 {
            let h = flow_hash(client, vip, port_to_map(sport), port_to_map(80), IPPROTO_TCP);
            buckets[(h % 4) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "uneven buckets {buckets:?}");
        }
    }
}
