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
pub const LAYOUT_VERSION: u32 = 4;

/// Subdirectory of the layout directory holding the pinned TCX links,
/// `ingress/<iface>` and `egress/<iface>` (bpffs names cannot hold a dot:
/// `.` in an interface name is written `%2E`).
pub const PIN_LINKS: &str = "links";

/// A TCP connection whose both sides sent FIN, or that saw a RST, keeps its
/// translation this long for retransmissions and the last ACK, then its
/// entries are treated as gone (an LRU map has no timer of its own).
pub const CT_CLOSE_GRACE_NS: u64 = 10_000_000_000;

/// `CtValue::flags`: what the datapath saw of a TCP connection's end. Both
/// entries of a flow carry the same bits.
pub const CT_F_FIN_CLIENT: u8 = 1;
pub const CT_F_FIN_BACKEND: u8 = 2;
pub const CT_F_RST: u8 = 4;
/// The backend answered the connection's SYN (passive health: it is alive).
pub const CT_F_SYNACK: u8 = 8;
/// A UDP flow's reply entry: the backend answered (both directions seen, so
/// the flow idles out after the longer stream timeout, as Linux conntrack's
/// `udp_timeout_stream`). Set on the reply entry only; TCP has `CT_F_SYNACK`.
pub const CT_F_REPLIED: u8 = 16;

/// `CtKey::dir`: which of a flow's two entries a key names. The client's
/// packets (client -> VIP) are looked up as `CT_DIR_ORIGINAL`, the backend's
/// replies (backend -> client) as `CT_DIR_REPLY`. Zero is neither, so a
/// zeroed key never matches.
pub const CT_DIR_ORIGINAL: u8 = 1;
pub const CT_DIR_REPLY: u8 = 2;

/// How often a flow's entry, when a packet finds it, confirms its sibling
/// (see [`CtKey::sibling`]): the lookup marks the sibling used, so a
/// direction that is quiet for now is not evicted while the other is
/// busy, and puts it back if memory pressure evicted it anyway. The LRU
/// turns a full default-sized map over in more than this below about 25,000
/// new flows a second; faster, an evicted sibling waits for the next check.
/// A check costs one more lookup (a cache miss at a million flows), so not
/// on every packet.
pub const CT_PAIR_CHECK_NS: u64 = 10_000_000_000;

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
/// XDP on an external interface (`--external-interface`): ClusterSetIP
/// traffic from outside the node, translated with source NAT (see [`NatValue`]).
pub const PROG_XDP: &str = "mcs_xdp";
/// TC ingress on an external interface: sends out what `mcs_xdp` translated
/// but handed to the stack (a backend on this node, a neighbour not yet
/// resolved), which routing would refuse (its source is the node's own address).
pub const PROG_UPLINK: &str = "mcs_uplink";
/// Socket-level load balancing: cgroup programs, one per hook, in attach
/// order (passive health's `sock_ops` counter and the reverse translations
/// before the calls that need them).
pub const PROG_SOCK: [(&str, SockHook); 10] = [
    ("mcs_sockops", SockHook::Ops),
    ("mcs_sockfree", SockHook::Release),
    ("mcs_recvmsg4", SockHook::Recvmsg4),
    ("mcs_recvmsg6", SockHook::Recvmsg6),
    ("mcs_peername4", SockHook::Getpeername4),
    ("mcs_peername6", SockHook::Getpeername6),
    ("mcs_connect4", SockHook::Connect4),
    ("mcs_connect6", SockHook::Connect6),
    ("mcs_sendmsg4", SockHook::Sendmsg4),
    ("mcs_sendmsg6", SockHook::Sendmsg6),
];

/// The cgroup hooks of socket-level load balancing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockHook {
    /// `sock_ops`: connection outcomes of translated TCP sockets (passive health).
    Ops,
    /// `sock_release`: a closed socket's `SOCK_REV` entry goes with it.
    Release,
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
    Recvmsg4,
    Recvmsg6,
    Getpeername4,
    Getpeername6,
}

impl SockHook {
    /// The name of its pinned link, `<layout>/links/cgroup/<name>`.
    pub const fn pin_name(self) -> &'static str {
        match self {
            SockHook::Ops => "sockops",
            SockHook::Release => "release",
            SockHook::Connect4 => "connect4",
            SockHook::Connect6 => "connect6",
            SockHook::Sendmsg4 => "sendmsg4",
            SockHook::Sendmsg6 => "sendmsg6",
            SockHook::Recvmsg4 => "recvmsg4",
            SockHook::Recvmsg6 => "recvmsg6",
            SockHook::Getpeername4 => "getpeername4",
            SockHook::Getpeername6 => "getpeername6",
        }
    }
}

/// Map names, identical on both sides.
pub const MAP_SERVICES: &str = "SERVICES";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_SELECTION: &str = "SELECTION";
/// Conntrack: both entries of every translated flow (see [`CtKey`]).
pub const MAP_CT: &str = "CT";
pub const MAP_STATS: &str = "STATS";
pub const MAP_AFFINITY: &str = "AFFINITY";
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_BACKEND_STATS: &str = "BACKEND_STATS";
pub const MAP_SERVICE_STATS: &str = "SERVICE_STATS";
/// The external interfaces XDP may redirect to (`XDP_REDIRECT`), by ifindex.
pub const MAP_XNAT_UPLINKS: &str = "XNAT_UPLINKS";
/// How many: the most external interfaces redirected between.
pub const XNAT_UPLINKS_MAX: u32 = 64;
/// `XNAT_UPLINKS` values: the interface's XDP mode.
pub const UPLINK_NATIVE: u32 = 1;
pub const UPLINK_GENERIC: u32 = 2;
/// The next IPv4 id of fragmented datagrams XDP sends on from the node
/// address (one, shared by the CPUs).
pub const MAP_XNAT_IP_ID: &str = "XNAT_IP_ID";
/// The same counters for flows from outside the node (the XDP path).
pub const MAP_XDP_BACKEND_STATS: &str = "XDP_BACKEND_STATS";
pub const MAP_XDP_SERVICE_STATS: &str = "XDP_SERVICE_STATS";
pub const MAP_HEALTH: &str = "HEALTH";
pub const MAP_FRAGS: &str = "FRAGS";
/// The IPv6 family's maps: the same types at [`Ip6`].
pub const MAP_SERVICES6: &str = "SERVICES6";
pub const MAP_BACKENDS6: &str = "BACKENDS6";
pub const MAP_CT6: &str = "CT6";
pub const MAP_AFFINITY6: &str = "AFFINITY6";
pub const MAP_FRAGS6: &str = "FRAGS6";
/// Socket-level load balancing: what a socket's backend address stands for.
pub const MAP_SOCK_REV: &str = "SOCK_REV";
pub const MAP_SOCK_REV6: &str = "SOCK_REV6";
/// `[0]`: the node's network namespace cookie (see `CONFIG_F_SOCK_HOST_ONLY`).
pub const MAP_HOST_NETNS: &str = "HOST_NETNS";
/// cgroup ids (and their descendants) that socket-level load balancing skips.
pub const MAP_SOCK_EXCLUDE: &str = "SOCK_EXCLUDE";
/// Conntrack of flows from outside the node, translated with source NAT by
/// `mcs_xdp`: both directions' entries (see [`NatValue`]).
pub const MAP_XNAT_CT: &str = "XNAT_CT";
pub const MAP_XNAT_CT6: &str = "XNAT_CT6";
/// `[0]`: [`XnatConfig`].
pub const MAP_XNAT: &str = "XNAT";
/// `--external-source-cidr`: LPM tries of the client ranges served from outside.
pub const MAP_XNAT_SRC: &str = "XNAT_SRC";
pub const MAP_XNAT_SRC6: &str = "XNAT_SRC6";

/// Ports tried for a new flow's source NAT before it counts as exhausted.
pub const XNAT_PORT_TRIES: u32 = 16;

/// `XnatConfig::flags`: only clients in `XNAT_SRC` (`XNAT_SRC6`) are served.
pub const XNAT_F_SOURCE_FILTER4: u32 = 1;
pub const XNAT_F_SOURCE_FILTER6: u32 = 2;

/// `XNAT[0]`: how flows from outside are translated. A zero address turns
/// that family off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct XnatConfig {
    /// The node address clients' flows are translated to (map byte order).
    pub addr4: Ip4,
    pub addr6: Ip6,
    /// The source NAT port range, `port_lo .. port_lo + port_count`, host byte order.
    pub port_lo: u16,
    pub port_count: u16,
    /// `XNAT_F_*`.
    pub flags: u32,
}

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
/// `SOCK_EXCLUDE` has entries: the socket programs walk the caller's cgroup
/// ancestors. Without it they skip the walk.
pub const CONFIG_F_SOCK_EXCLUDE: u32 = 2;

/// Socket-level load balancing is off for pods: the socket programs
/// translate only sockets of the node's own network namespace
/// (`HOST_NETNS[0]`), which no TC program sees.
pub const CONFIG_F_SOCK_HOST_ONLY: u32 = 4;

/// How many cgroup levels, counted from the hierarchy's root, an exclusion
/// is looked up at (a socket deeper than that is translated).
pub const SOCK_EXCLUDE_DEPTH: i32 = 12;

/// Sockets remembered for reverse translation (per family; LRU).
pub const DEFAULT_MAX_SOCK_REV: u32 = 262_144;

/// Default capacities compiled into the object; the agent may resize them at load time.
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
/// 64 MiB: about a thousand 10-backend frontends at the default Maglev size. Even.
pub const DEFAULT_MAX_SELECTION_SLOTS: u32 = 1 << 24;
pub const DEFAULT_MAX_CONNTRACK: u32 = 262_144;
pub const DEFAULT_MAX_AFFINITY: u32 = 262_144;
/// Fragmented datagrams in flight (per family); LRU.
pub const DEFAULT_MAX_FRAGS: u32 = 8_192;

/// Backend id 0 is never allocated: a zeroed selection slot or conntrack entry
/// therefore never names a live backend.
pub const NO_BACKEND: u32 = 0;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An IPv4 address in map byte order.
pub type Ip4 = u32;
/// An IPv6 address in map byte order: the 16 wire bytes as four native words
/// (compared and checksummed as they are, never swapped).
pub type Ip6 = [u32; 4];

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Ip4 {}
    impl Sealed for super::Ip6 {}
}

/// The two address types a key or value is generic over. Each family has
/// its own maps (`SERVICES` and `SERVICES6`, ...) with the same types
/// instantiated at [`Ip4`] or [`Ip6`]: an IPv4 entry never pays for 16-byte
/// addresses, and the IPv6 maps came without changing the IPv4 layout.
///
/// Sealed: the `Pod` impls below are sound because every generic type has no
/// padding for exactly these two (checked by `const` assertions).
pub trait MapAddr:
    sealed::Sealed + Copy + Default + PartialEq + Eq + core::hash::Hash + Ord + core::fmt::Debug + Pod + 'static
{
    /// The unspecified address (a zeroed, free `BACKENDS` entry).
    const ZERO: Self;
    /// Mixes the address into a running hash.
    fn mix(self, h: u32) -> u32;
}

impl MapAddr for Ip4 {
    const ZERO: Self = 0;
    #[inline(always)]
    fn mix(self, h: u32) -> u32 {
        fmix32(h ^ self)
    }
}

impl MapAddr for Ip6 {
    const ZERO: Self = [0; 4];
    #[inline(always)]
    fn mix(self, h: u32) -> u32 {
        fmix32(fmix32(fmix32(fmix32(h ^ self[0]) ^ self[1]) ^ self[2]) ^ self[3])
    }
}

/// `SERVICES` (`SERVICES6`) key: one frontend, `ClusterSetIP:port/protocol`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey<A = Ip4> {
    /// ClusterSetIP, network byte order.
    pub vip: A,
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

/// `BACKENDS` (`BACKENDS6`) value (array index = backend id). A zeroed entry
/// is a free id. Ids are one space over both families: an IPv6 backend's id
/// is zero in `BACKENDS` and the other way round, and `SELECTION`,
/// `BACKEND_STATS` and `HEALTH` are shared.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend<A = Ip4> {
    /// Pod IP, network byte order.
    pub ip: A,
    /// Pod port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// `CT` key: one direction of a translated flow, as that direction's
/// packets show it. `CT_DIR_ORIGINAL`: the client's packets
/// (`src` client, `dst` VIP). `CT_DIR_REPLY`: the backend's replies
/// (`src` backend, `dst` client). Each program looks up the packet's own
/// tuple; one map holds both entries of a flow, so they are created,
/// aged and removed as a pair (see [`CtKey::sibling`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey<A = Ip4> {
    pub src: A,
    pub dst: A,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// `CT_DIR_*`.
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// `CT` value: the other address of the translation. For the original
/// direction the backend the flow is pinned to; for the reply direction
/// the VIP the client believes it talks to.
///
/// The address is stored, not only the id, so an established flow keeps its
/// backend even after the backend id is freed and reused.
///
/// `packed(4)`: with 16-byte addresses the `u64`s would otherwise sit after
/// 4 bytes of padding; the IPv4 layout is the same either way.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue<A = Ip4> {
    pub addr: A,
    pub port: u16,
    /// `CT_F_*`, the same on both entries.
    pub flags: u8,
    pub _pad: u8,
    pub backend_id: u32,
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` when the connection closed (see [`ct_closed`]); 0 while open.
    pub closed_ns: u64,
    /// `bpf_ktime_get_ns()` when the flow was first translated (CLOCK_MONOTONIC).
    pub created_ns: u64,
    /// `bpf_ktime_get_coarse_ns()` when this entry last confirmed its sibling.
    pub paired_ns: u64,
}

impl<A: MapAddr> CtKey<A> {
    /// The flow's other entry, derived from this one: the reply of
    /// client -> VIP (translated to backend) comes from the backend to the
    /// client and is shown as coming from the VIP, and the other way round.
    /// Either entry alone is enough to rebuild its pair.
    #[inline(always)]
    pub fn sibling(&self, value: &CtValue<A>) -> (CtKey<A>, CtValue<A>) {
        let (addr, port) = self.sibling_addr();
        (self.sibling_key(value), CtValue { addr, port, ..*value })
    }

    /// The address and port the sibling's value holds: the side of this
    /// key that was translated (the VIP of an original, the backend of a reply).
    #[inline(always)]
    pub fn sibling_addr(&self) -> (A, u16) {
        if self.dir == CT_DIR_ORIGINAL { (self.dst, self.dst_port) } else { (self.src, self.src_port) }
    }

    /// The key half of [`CtKey::sibling`].
    #[inline(always)]
    pub fn sibling_key(&self, value: &CtValue<A>) -> CtKey<A> {
        // Original: client -> VIP, value the backend. Reply: backend -> client, value the VIP.
        let (src, src_port, dst, dst_port, dir) = if self.dir == CT_DIR_ORIGINAL {
            (value.addr, value.port, self.src, self.src_port, CT_DIR_REPLY)
        } else {
            (self.dst, self.dst_port, value.addr, value.port, CT_DIR_ORIGINAL)
        };
        CtKey { src, dst, src_port, dst_port, proto: self.proto, dir, _pad: [0; 2] }
    }
}

/// `XNAT_CT` (`XNAT_CT6`) value: how a packet of a flow from outside is
/// rewritten, in either direction: its source becomes `nat:nat_port`, its
/// destination `peer:peer_port`. The key is the packet's own tuple
/// ([`CtKey`]): `CT_DIR_ORIGINAL` is client -> VIP (rewritten to node
/// address -> backend), `CT_DIR_REPLY` is backend -> node address
/// (rewritten to VIP -> client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatValue<A = Ip4> {
    pub peer: A,
    pub nat: A,
    pub peer_port: u16,
    pub nat_port: u16,
    /// `CT_F_*`, as on the TC path's entries.
    pub flags: u8,
    pub _pad: [u8; 3],
    pub backend_id: u32,
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` when the connection closed; 0 while open.
    pub closed_ns: u64,
    pub created_ns: u64,
    /// `bpf_ktime_get_coarse_ns()` of the flow's last packet, either way,
    /// refreshed at most once per `CT_PAIR_CHECK_NS` (on both entries): the
    /// conntrack collector's idle clock.
    pub seen_ns: u64,
}

impl<A: MapAddr> NatValue<A> {
    /// The key of the flow's other entry: the packet this entry produces,
    /// answered.
    #[inline(always)]
    pub fn sibling_key(&self, proto: u8, dir: u8) -> CtKey<A> {
        let dir = if dir == CT_DIR_ORIGINAL { CT_DIR_REPLY } else { CT_DIR_ORIGINAL };
        CtKey {
            src: self.peer,
            dst: self.nat,
            src_port: self.peer_port,
            dst_port: self.nat_port,
            proto,
            dir,
            _pad: [0; 2],
        }
    }
}

/// `AFFINITY` key: ClientIP session affinity of one client to one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey<A = Ip4> {
    pub service_id: u32,
    pub client_ip: A,
}

/// `SOCK_REV` (`SOCK_REV6`) key: a socket translated at `connect()` or
/// `sendmsg()`, by its cookie and the backend it was sent to. A reply's
/// source (`recvmsg`) and a connected socket's peer (`getpeername`) are
/// looked up here to show the VIP instead. The cookie is split in two
/// words so the key has no padding for either family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey<A = Ip4> {
    pub cookie_lo: u32,
    pub cookie_hi: u32,
    pub backend_ip: A,
    pub backend_port: u16,
    pub _pad: u16,
}

/// `SockRevValue::flags`: the `sock_ops` program turned on this TCP socket's
/// state callbacks (no other program had), so it may turn them off again once
/// the attempt's outcome is known.
pub const SOCK_REV_F_STATE_CB: u8 = 1;

/// `SOCK_REV` value: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevValue<A = Ip4> {
    pub vip: A,
    pub vip_port: u16,
    pub proto: u8,
    /// `SOCK_REV_F_*`. Was padding: entries from before read as no flags.
    pub flags: u8,
    pub backend_id: u32,
    pub service_id: u32,
}

impl<A: MapAddr> SockRevKey<A> {
    #[inline(always)]
    pub fn new(cookie: u64, backend_ip: A, backend_port: u16) -> Self {
        Self { cookie_lo: cookie as u32, cookie_hi: (cookie >> 32) as u32, backend_ip, backend_port, _pad: 0 }
    }

    pub fn cookie(&self) -> u64 {
        u64::from(self.cookie_hi) << 32 | u64::from(self.cookie_lo)
    }
}

/// `FRAGS` (`FRAGS6`) key: one fragmented datagram as it arrives, by its
/// addresses, protocol and IP id (IPv4: 16 bits; IPv6: the fragment
/// header's 32). Both directions use it: a client's datagram to a VIP and a
/// backend's reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey<A = Ip4> {
    pub src: A,
    pub dst: A,
    pub id: u32,
    pub proto: u8,
    /// `FRAG_PART_*`: which of a datagram's entries (the TC paths keep one;
    /// the XDP path, which rewrites both addresses, three).
    pub part: u8,
    pub _pad: [u8; 2],
}

impl<A> FragKey<A> {
    pub const fn new(src: A, dst: A, id: u32, proto: u8, part: u8) -> Self {
        Self { src, dst, id, proto, part, _pad: [0; 2] }
    }
}

/// `FragKey::part`: the new destination (the TC paths' only entry); the new
/// source; and, keyed by the translated datagram, the mark that lets
/// `mcs_uplink` send a fragment from the node's address on.
pub const FRAG_PART_DST: u8 = 0;
pub const FRAG_PART_SRC: u8 = 1;
pub const FRAG_PART_SENT: u8 = 2;

/// `FRAGS` value: what the first fragment was translated to. Later
/// fragments carry no ports, so only the address changes for them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue<A = Ip4> {
    /// The new destination (DNAT) or source (reverse NAT) address.
    pub addr: A,
    /// 1: the destination was rewritten; 2: the source; 3: both (XDP).
    pub side: u32,
}

/// `FragValue::side`.
pub const FRAG_DNAT: u32 = 1;
pub const FRAG_REV_NAT: u32 = 2;
/// A datagram from outside (or its reply) that XDP translated: both
/// addresses, one entry each (`FragKey::part`). The low 8 bits of `side`;
/// the 24 above are the entry's `frag_extra`: for `FRAG_PART_DST` and
/// `FRAG_PART_SENT` entries the time of the first fragment (`frag_stamp`),
/// for `FRAG_PART_SRC` the IPv4 id the datagram was given, plus one (0: the
/// id is kept).
pub const FRAG_XNAT: u32 = 3;
/// How long a translated datagram's entries are honoured after its first
/// fragment, in `frag_stamp` units (Linux's `ipfrag_time`: 30 s).
pub const FRAG_XNAT_LIFETIME: u32 = 30;

/// A coarse clock for `FragValue::side`'s upper 24 bits: seconds (2^30 ns)
/// of CLOCK_MONOTONIC, wrapping every 194 days.
pub const fn frag_stamp(now_ns: u64) -> u32 {
    ((now_ns >> 30) as u32) & 0x00ff_ffff
}

/// Whether a stamp from `frag_stamp` is at most `FRAG_XNAT_LIFETIME` old.
pub const fn frag_fresh(stamp: u32, now_ns: u64) -> bool {
    frag_stamp(now_ns).wrapping_sub(stamp) & 0x00ff_ffff <= FRAG_XNAT_LIFETIME
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

/// Zeroable and Pod for the family-generic types: `#[repr(C)]` (or packed),
/// and no padding for either address type, as the sizes below prove (each
/// is the sum of its fields' sizes).
macro_rules! pod_for_both {
    ($($ty:ident: $v4:expr, $v6:expr;)*) => {$(
        // SAFETY: see above; `MapAddr` is sealed to `Ip4` and `Ip6`.
        unsafe impl<A: MapAddr> Zeroable for $ty<A> {}
        // SAFETY: as above.
        unsafe impl<A: MapAddr> Pod for $ty<A> {}
        const _: () = assert!(core::mem::size_of::<$ty<Ip4>>() == $v4 && core::mem::size_of::<$ty<Ip6>>() == $v6);
    )*};
}

pod_for_both! {
    ServiceKey: 4 + 4, 16 + 4;
    Backend: 4 + 4, 16 + 4;
    CtKey: 8 + 8, 32 + 8;
    CtValue: 4 + 36, 16 + 36;
    AffinityKey: 4 + 4, 4 + 16;
    FragKey: 8 + 8, 32 + 8;
    FragValue: 4 + 4, 16 + 4;
    SockRevKey: 8 + 4 + 4, 8 + 16 + 4;
    SockRevValue: 4 + 12, 16 + 12;
    NatValue: 8 + 40, 32 + 40;
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
    /// Ingress TCP/UDP packet whose destination is not a frontend.
    NotService = 0,
    /// New flow: a backend was selected and conntrack written.
    NewFlow = 1,
    /// Packet of a flow found in conntrack.
    Established = 2,
    /// Frontend without a ready backend: dropped.
    NoBackend = 3,
    /// First fragment of a datagram to a VIP: translated, and remembered
    /// for the datagram's later fragments.
    Fragment = 4,
    /// Truncated or malformed header: passed untouched.
    Malformed = 5,
    /// Egress reply rewritten back to the VIP.
    RevNat = 6,
    /// A conntrack insert failed: the packet is dropped, not half-translated.
    CtInsertFailed = 7,
    /// A checksum or store helper failed mid-rewrite: dropped.
    RewriteFailed = 8,
    /// A new flow went to its client's affinity backend.
    AffinityHit = 9,
    /// A direct (untranslated) TCP SYN removed the reply entry of an
    /// earlier connection through the VIP on the same tuple.
    StaleRevNat = 10,
    /// A closed connection's entry was found past its grace time and dropped.
    ClosedExpired = 11,
    /// An ICMP or ICMPv6 error quoting a translated flow was reverse-translated.
    IcmpRevNat = 12,
    /// A later fragment followed its first fragment's translation.
    FragmentTranslated = 13,
    /// A later fragment of a datagram to a VIP arrived without its first
    /// (reordered, or the entry was evicted): dropped, it cannot be routed.
    FragmentMiss = 14,
    /// A frontend without a usable backend answered a new flow with an ICMP
    /// unreachable (port unreachable / ICMPv6 port unreachable).
    Rejected = 15,
    /// IPv6 extension headers beyond what is parsed, or an IPv6 packet
    /// otherwise not handled: passed untouched.
    Ipv6Unparsed = 16,
    /// A socket's `connect()` to a frontend was sent to a backend (socket-level LB).
    SockConnect = 17,
    /// An unconnected UDP datagram to a frontend was sent to a backend.
    SockSendmsg = 18,
    /// A socket call to a frontend without a usable backend failed with ECONNREFUSED.
    SockRefused = 19,
    /// A reply's source or a socket's peer was shown as the frontend again.
    SockRevNat = 20,
    /// A socket call to a frontend from an excluded cgroup, left to the TC path.
    SockExcluded = 21,
    /// A flow's entry found its sibling evicted and put it back (see `CtKey::sibling`).
    CtPairRestored = 22,
    /// XDP: a new flow from outside was translated (backend selected, source NAT port taken).
    XdpNewFlow = 23,
    /// XDP: a packet of a known flow from outside was translated.
    XdpEstablished = 24,
    /// XDP: a backend's reply to the node address was translated back to the client.
    XdpRevNat = 25,
    /// XDP: a TCP packet past the handshake to a ClusterSetIP that no flow
    /// knows: dropped (balancing it afresh would change its source port).
    XdpMidstream = 26,
    /// XDP: no free source NAT port for a new flow: dropped.
    SnatExhausted = 27,
    /// XDP: a new flow to a frontend without a usable backend: dropped.
    XdpNoBackend = 28,
    /// XDP: translated and handed to the stack for delivery (a backend on
    /// this node, or a neighbour not yet resolved).
    XdpToStack = 29,
    /// XDP: a translated packet has no route, or is too big for it and
    /// cannot be answered (IPv4 options, IPv6 extension headers): dropped.
    XdpUnroutable = 30,
    /// A backend on this node answered a flow from outside: its reply was
    /// translated back at the pod's interface.
    XnatLocalRevNat = 31,
    /// XDP: a packet to a ClusterSetIP that XDP does not translate (a
    /// quote or header it does not parse, TTL expiring): passed to the
    /// stack untouched.
    XdpPassed = 32,
    /// XDP: a translated packet sent back out of the interface it came in on.
    XdpTx = 33,
    /// XDP: a packet too big for its route's MTU, answered with ICMP
    /// "fragmentation needed" / "packet too big" to its sender.
    XdpTooBig = 34,
    /// XDP: an ICMP error about a packet of a flow from outside translated
    /// on to the flow's other side: to the client if it came to the node's
    /// source NAT address, to the backend if it came to the VIP.
    XdpIcmpRevNat = 35,
    /// XDP: a translated packet sent out of another external interface
    /// (`XDP_REDIRECT`).
    XdpRedirect = 36,
}

impl Stat {
    pub const COUNT: u32 = 37;
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
        Stat::IcmpRevNat,
        Stat::FragmentTranslated,
        Stat::FragmentMiss,
        Stat::Rejected,
        Stat::Ipv6Unparsed,
        Stat::SockConnect,
        Stat::SockSendmsg,
        Stat::SockRefused,
        Stat::SockRevNat,
        Stat::SockExcluded,
        Stat::CtPairRestored,
        Stat::XdpNewFlow,
        Stat::XdpEstablished,
        Stat::XdpRevNat,
        Stat::XdpMidstream,
        Stat::SnatExhausted,
        Stat::XdpNoBackend,
        Stat::XdpToStack,
        Stat::XdpUnroutable,
        Stat::XnatLocalRevNat,
        Stat::XdpPassed,
        Stat::XdpTx,
        Stat::XdpTooBig,
        Stat::XdpIcmpRevNat,
        Stat::XdpRedirect,
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
            Stat::IcmpRevNat => "icmp_rev_nat",
            Stat::FragmentTranslated => "fragment_translated",
            Stat::FragmentMiss => "fragment_miss",
            Stat::Rejected => "rejected",
            Stat::Ipv6Unparsed => "ipv6_unparsed",
            Stat::SockConnect => "sock_connect",
            Stat::SockSendmsg => "sock_sendmsg",
            Stat::SockRefused => "sock_refused",
            Stat::SockRevNat => "sock_rev_nat",
            Stat::SockExcluded => "sock_excluded",
            Stat::CtPairRestored => "ct_pair_restored",
            Stat::XdpNewFlow => "xdp_new_flow",
            Stat::XdpEstablished => "xdp_established",
            Stat::XdpRevNat => "xdp_rev_nat",
            Stat::XdpMidstream => "xdp_midstream_miss",
            Stat::SnatExhausted => "snat_exhausted",
            Stat::XdpNoBackend => "xdp_no_backend",
            Stat::XdpToStack => "xdp_to_stack",
            Stat::XdpUnroutable => "xdp_unroutable",
            Stat::XnatLocalRevNat => "xnat_local_rev_nat",
            Stat::XdpPassed => "xdp_passed",
            Stat::XdpTx => "xdp_tx",
            Stat::XdpTooBig => "xdp_too_big",
            Stat::XdpIcmpRevNat => "xdp_icmp_rev_nat",
            Stat::XdpRedirect => "xdp_redirect",
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
pub fn flow_hash<A: MapAddr>(client_ip: A, vip: A, client_port: u16, vip_port: u16, proto: u8) -> u32 {
    let mut h = client_ip.mix(0x9e37_79b9);
    h = vip.mix(h);
    h = fmix32(h ^ (((client_port as u32) << 16) | vip_port as u32));
    fmix32(h ^ proto as u32)
}

/// Hash of a socket's request for a frontend at `connect()` or
/// `sendmsg()`, where the source port is not known yet: the socket cookie
/// stands in for it, so one socket's datagrams stay on one backend.
#[inline(always)]
pub fn socket_hash<A: MapAddr>(cookie: u64, vip: A, vip_port: u16, proto: u8) -> u32 {
    let h = fmix32(0x27d4_eb2f ^ cookie as u32) ^ (cookie >> 32) as u32;
    fmix32(vip.mix(fmix32(h)) ^ (((vip_port as u32) << 8) | proto as u32))
}

/// Hash of the client address alone: with ClientIP affinity every flow of a
/// client lands on the same slot.
#[inline(always)]
pub fn client_hash<A: MapAddr>(client_ip: A) -> u32 {
    fmix32(client_ip.mix(0x85eb_ca6b) ^ 0x9e37_79b9)
}

/// An IPv6 address in map byte order.
#[inline(always)]
pub fn ip6_to_map(octets: [u8; 16]) -> Ip6 {
    let w = |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The wire bytes of a map-order IPv6 address.
#[inline(always)]
pub fn ip6_from_map(addr: Ip6) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = addr[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
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

pub mod v3;

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: every type is #[repr(C)], has no implicit padding and is bytemuck::Pod.
    unsafe impl<A: MapAddr> aya::Pod for ServiceKey<A> {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl<A: MapAddr> aya::Pod for Backend<A> {}
    unsafe impl<A: MapAddr> aya::Pod for CtKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for CtValue<A> {}
    unsafe impl<A: MapAddr> aya::Pod for v3::CtKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for v3::CtValue<A> {}
    unsafe impl<A: MapAddr> aya::Pod for v3::RevNatKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for v3::RevNatValue<A> {}
    unsafe impl<A: MapAddr> aya::Pod for AffinityKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for FragKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for FragValue<A> {}
    unsafe impl<A: MapAddr> aya::Pod for SockRevKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for SockRevValue<A> {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for Health {}
    unsafe impl<A: MapAddr> aya::Pod for NatValue<A> {}
    unsafe impl aya::Pod for XnatConfig {}
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
        assert_eq!(size_of::<CtValue>(), 40);
        assert_eq!(size_of::<v3::CtValue<Ip4>>(), 32);
        assert_eq!(size_of::<v3::RevNatValue<Ip4>>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<BackendStats>(), 40);
        assert_eq!(size_of::<Health>(), 32);
        assert_eq!(size_of::<ServiceStats>(), 16);
        assert_eq!(size_of::<CtValue<Ip6>>(), 52);
        assert_eq!(size_of::<v3::CtValue<Ip6>>(), 44);
        assert_eq!(size_of::<v3::RevNatValue<Ip6>>(), 36);
    }

    #[test]
    fn a_flows_entries_derive_each_other() {
        let (client, vip, backend) = (ip_to_map([10, 1, 0, 2]), ip_to_map([10, 96, 0, 1]), ip_to_map([10, 2, 0, 7]));
        let original = CtKey {
            src: client,
            dst: vip,
            src_port: port_to_map(40_000),
            dst_port: port_to_map(80),
            proto: IPPROTO_TCP,
            dir: CT_DIR_ORIGINAL,
            _pad: [0; 2],
        };
        let pinned = CtValue {
            addr: backend,
            port: port_to_map(8080),
            flags: CT_F_SYNACK,
            backend_id: 7,
            service_id: 3,
            created_ns: 5,
            ..CtValue::default()
        };
        let (reply, shown) = original.sibling(&pinned);
        assert_eq!(
            reply,
            CtKey {
                src: backend,
                dst: client,
                src_port: port_to_map(8080),
                dst_port: port_to_map(40_000),
                proto: IPPROTO_TCP,
                dir: CT_DIR_REPLY,
                _pad: [0; 2],
            }
        );
        assert_eq!((shown.addr, shown.port), (vip, port_to_map(80)), "a reply is shown as coming from the VIP");
        assert_eq!((shown.backend_id, shown.service_id, shown.flags, shown.created_ns), (7, 3, CT_F_SYNACK, 5));
        assert_eq!(reply.sibling(&shown), (original, pinned), "and the reply's sibling is the original again");
    }

    #[test]
    fn the_ipv4_hash_did_not_change_with_generics() {
        // Pinned conntrack outlives agents; the slot a flow hashes to must
        // not move under an upgrade.
        let (c, v) = (ip_to_map([10, 1, 0, 2]), ip_to_map([10, 96, 0, 1]));
        let old = fmix32(fmix32(fmix32(fmix32(c ^ 0x9e37_79b9) ^ v) ^ ((1234u32 << 16) | 80)) ^ 6);
        assert_eq!(flow_hash(c, v, 1234, 80, 6), old);
        assert_eq!(client_hash(c), fmix32(fmix32(c ^ 0x85eb_ca6b) ^ 0x9e37_79b9));
    }

    #[test]
    fn ipv6_map_order_round_trips() {
        let octets = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
        assert_eq!(ip6_from_map(ip6_to_map(octets)), octets);
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
