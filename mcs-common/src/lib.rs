//! The map layout: the only contract between the kernel programs and the agent.
//!
//! Byte order: every address and port in a key or value is stored exactly as it
//! appears on the wire (network byte order), read as a native integer. The kernel
//! side never swaps bytes; userspace converts with [`ip_to_map`] and
//! [`port_to_map`]. Padding is explicit so `bytemuck::Pod` holds and so the
//! kernel's hash of a key never sees uninitialised bytes.

#![no_std]

use bytemuck::{Pod, Zeroable};

/// Bumped whenever any type below changes size or meaning. Pinned maps and
/// links live under a directory named after it: an agent adopts the state of
/// its own layout and migrates an older one (see ARCHITECTURE.md, "Restarts
/// and upgrades").
pub const LAYOUT_VERSION: u32 = 3;

/// Subdirectory of the layout directory holding the pinned TCX links,
/// `ingress/<iface>` and `egress/<iface>` (bpffs names cannot hold a dot:
/// `.` in an interface name is written `%2E`).
pub const PIN_LINKS: &str = "links";

/// A TCP connection whose both sides sent FIN, or that saw a RST, keeps its
/// translation this long for retransmissions and the last ACK, then its
/// entries are treated as gone (an LRU map has no timer of its own).
pub const CT_CLOSE_GRACE_NS: u64 = 10_000_000_000;

/// `CtValue::flags` and `RevNatValue::flags`: what the datapath saw of a TCP
/// connection's end. Both entries of a flow carry the same bits.
pub const CT_F_FIN_CLIENT: u8 = 1;
pub const CT_F_FIN_BACKEND: u8 = 2;
pub const CT_F_RST: u8 = 4;
/// The backend answered the connection's SYN (passive health: it is alive).
pub const CT_F_SYNACK: u8 = 8;

/// True when a connection with these flags is over (both FINs, or a RST).
#[inline(always)]
pub const fn ct_closed(flags: u8) -> bool {
    flags & CT_F_RST != 0 || flags & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND) == (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND)
}

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
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_BACKEND_STATS: &str = "BACKEND_STATS";
pub const MAP_SERVICE_STATS: &str = "SERVICE_STATS";
pub const MAP_HEALTH: &str = "HEALTH";

/// Default number of backend ids and service ids with their own counters.
/// Ids are allocated smallest first, so this covers the first 16,383 of
/// each; per-CPU maps cost `entries × value size × CPUs` of kernel memory.
pub const DEFAULT_STATS_ENTRIES: u32 = 16_384;

/// `CONFIG[0]` bits, written by the agent.
///
/// During an upgrade across layout versions, the new programs run in front
/// of the old ones: a packet of a flow they do not know (conntrack miss,
/// not a bare SYN) is passed on, untranslated, to the old programs, which
/// know the flows created until the switch.
pub const CONFIG_F_HANDOFF: u32 = 1;

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
    /// `CT_F_*`.
    pub flags: u8,
    pub _pad: u8,
    pub backend_id: u32,
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` when the connection closed (see [`ct_closed`]); 0 while open.
    pub closed_ns: u64,
    /// `bpf_ktime_get_ns()` when the flow was first translated (CLOCK_MONOTONIC).
    pub created_ns: u64,
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
    /// `CT_F_*`, as on the flow's `CtValue`.
    pub flags: u8,
    pub _pad: u8,
    /// The backend the flow went to (per-backend accounting of replies).
    pub backend_id: u32,
    pub _pad2: u32,
    /// As `CtValue::closed_ns`.
    pub closed_ns: u64,
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

/// `BACKEND_STATS` value (per CPU, index = backend id): what went to and came
/// from one backend. Zeroed by the agent before an id is (re)used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendStats {
    /// New flows (connections, UDP flows) sent to this backend.
    pub new_flows: u64,
    /// Client → backend packets and their bytes (IP length, headers included).
    pub packets_to: u64,
    pub bytes_to: u64,
    /// Backend → client packets (reverse-translated) and bytes.
    pub packets_from: u64,
    pub bytes_from: u64,
}

/// `HEALTH` value (index = backend id; shared by all CPUs, atomic adds,
/// mmapable so the agent reads every backend without a syscall): passive
/// health's evidence, TCP connection attempts (bare SYNs) sent to it, the
/// SYN-ACKs that came back, and RSTs it sent instead of a SYN-ACK. Only
/// those packets write it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Health {
    pub syns: u64,
    pub synacks: u64,
    pub syn_rsts: u64,
    pub _reserved: u64,
}

impl BackendStats {
    /// Field by field: per-CPU values add up to the backend's total.
    pub const fn plus(self, o: Self) -> Self {
        Self {
            new_flows: self.new_flows + o.new_flows,
            packets_to: self.packets_to + o.packets_to,
            bytes_to: self.bytes_to + o.bytes_to,
            packets_from: self.packets_from + o.packets_from,
            bytes_from: self.bytes_from + o.bytes_from,
        }
    }
}

/// `SERVICE_STATS` value (per CPU, index = service id): one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceStats {
    pub new_flows: u64,
    /// Packets dropped because the frontend had no usable backend.
    pub no_backend: u64,
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
    /// A direct (untranslated) TCP SYN removed a reverse-NAT entry of an
    /// earlier connection through the VIP on the same tuple.
    StaleRevNat = 10,
    /// A closed connection's entry was found past its grace time and dropped.
    ClosedExpired = 11,
}

impl Stat {
    pub const COUNT: u32 = 12;
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
        Stat::StaleRevNat,
        Stat::ClosedExpired,
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
            Stat::StaleRevNat => "stale_rev_nat",
            Stat::ClosedExpired => "closed_expired",
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
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for Health {}
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
        assert_eq!(size_of::<CtValue>(), 32);
        assert_eq!(size_of::<RevNatKey>(), 16);
        assert_eq!(size_of::<RevNatValue>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<BackendStats>(), 40);
        assert_eq!(size_of::<Health>(), 32);
        assert_eq!(size_of::<ServiceStats>(), 16);
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
