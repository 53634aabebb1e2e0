//! The maps, typed by `mcs-common`. Userspace resizes them at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use mcs_common::{
    AffinityKey, AffinityValue, Backend, BackendStats, CtKey, CtValue, DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_CONNTRACK, DEFAULT_MAX_FRAGS, DEFAULT_MAX_SELECTION_SLOTS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOCK_REV,
    DEFAULT_STATS_ENTRIES, FragKey, FragValue, Health, Ip6, NatValue, SelectionPair, ServiceKey, ServiceStats,
    ServiceValue, SockRevKey, SockRevValue, Stat, XnatConfig,
};

/// TC_ACT_UNSPEC, which TCX calls TCX_NEXT: hand the packet, translated or not,
/// to the programs after us (a CNI's policy or routing). TC_ACT_OK would end
/// the chain and bypass them.
pub const TC_NEXT: i32 = -1;
pub const TC_ACT_SHOT: i32 = 2;

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Slot pairs (see `mcs_common::SelectionPair`), mmapable so the agent writes
/// a whole table as one memory copy.
#[map]
pub static SELECTION: Array<SelectionPair> =
    Array::with_max_entries(DEFAULT_MAX_SELECTION_SLOTS / 2, aya_ebpf::bindings::BPF_F_MMAPABLE);

/// Both entries of every flow (see `mcs_common::CtKey`): two per flow.
#[map]
pub static CT: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(2 * DEFAULT_MAX_CONNTRACK, 0);

/// Room for one conntrack key and value of either family, per CPU: the
/// pair operations build a sibling here, not on the stack. Not pinned (no
/// state outlives a program run).
#[map]
pub static CT_SCRATCH: PerCpuArray<[u64; 12]> = PerCpuArray::with_max_entries(1, 0);
/// Offset of the value in a `CT_SCRATCH` entry: after an IPv6 key.
pub const CT_SCRATCH_VALUE: usize = core::mem::size_of::<CtKey<Ip6>>();
const _: () = assert!(CT_SCRATCH_VALUE + core::mem::size_of::<CtValue<Ip6>>() <= 12 * 8);

#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::with_max_entries(DEFAULT_MAX_AFFINITY, 0);

#[map]
pub static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(DEFAULT_MAX_FRAGS, 0);

// The IPv6 family: the same types at 16-byte addresses. Backend ids are
// shared with IPv4 (see `mcs_common::Backend`).

#[map]
pub static SERVICES6: HashMap<ServiceKey<Ip6>, ServiceValue> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map]
pub static BACKENDS6: Array<Backend<Ip6>> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map]
pub static CT6: LruHashMap<CtKey<Ip6>, CtValue<Ip6>> = LruHashMap::with_max_entries(2 * DEFAULT_MAX_CONNTRACK, 0);

#[map]
pub static AFFINITY6: LruHashMap<AffinityKey<Ip6>, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_AFFINITY, 0);

#[map]
pub static FRAGS6: LruHashMap<FragKey<Ip6>, FragValue<Ip6>> = LruHashMap::with_max_entries(DEFAULT_MAX_FRAGS, 0);

#[map]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::with_max_entries(DEFAULT_MAX_SOCK_REV, 0);

#[map]
pub static SOCK_REV6: LruHashMap<SockRevKey<Ip6>, SockRevValue<Ip6>> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOCK_REV, 0);

/// `[0]`: the node's network namespace cookie (`CONFIG_F_SOCK_HOST_ONLY`).
#[map]
pub static HOST_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// cgroup id -> 1: sockets of these cgroups and their descendants are left
/// to the TC path (a sidecar mesh that must see the VIP).
#[map]
pub static SOCK_EXCLUDE: HashMap<u64, u32> = HashMap::with_max_entries(256, 0);

/// Flows from outside the node (`mcs_xdp`): both entries of each, one map
/// per family. Sized like `CT` by the agent.
#[map]
pub static XNAT_CT: LruHashMap<CtKey, NatValue> = LruHashMap::with_max_entries(2 * DEFAULT_MAX_CONNTRACK, 0);

#[map]
pub static XNAT_CT6: LruHashMap<CtKey<Ip6>, NatValue<Ip6>> = LruHashMap::with_max_entries(2 * DEFAULT_MAX_CONNTRACK, 0);

/// Room for one flow's translation of either family, per CPU: the XDP
/// path's frames have no room for it below the BPF stack limit. Not pinned.
#[map]
pub static XNAT_SCRATCH: PerCpuArray<NatValue<Ip6>> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch translation, as family `A`'s.
#[inline(always)]
pub fn xnat_scratch<A: mcs_common::MapAddr>() -> Option<&'static mut NatValue<A>> {
    const { assert!(core::mem::size_of::<NatValue<A>>() <= core::mem::size_of::<NatValue<Ip6>>()) };
    // SAFETY: a per-CPU map value, 8-aligned, at least as large as either
    // family's value (checked above); no other user on this CPU during the run.
    XNAT_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p.cast::<NatValue<A>>() })
}

#[map]
pub static XNAT: Array<XnatConfig> = Array::with_max_entries(1, 0);

/// External interfaces, by ifindex: 1 served in native mode, 2 in generic
/// mode. A translated packet whose route leaves by a native one is
/// redirected there (`XDP_REDIRECT`); any other interface (a pod's, one
/// whose driver has no XDP) is reached through the stack. In generic mode a
/// packet bigger than its interface (segments the stack merged, GRO) skips
/// the MTU check: it leaves as it came.
#[map]
pub static XNAT_UPLINKS: HashMap<u32, u32> = HashMap::with_max_entries(mcs_common::XNAT_UPLINKS_MAX, 0);

/// The next IPv4 id XDP gives a fragmented datagram it sends from the
/// node's address, shared by the CPUs: many clients' datagrams to one
/// backend share that address, and their own ids would meet in the
/// backend's reassembly.
#[map]
pub static XNAT_IP_ID: Array<u64> = Array::with_max_entries(1, 0);

/// Adds one to `counter`, atomically (every CPU shares it): its value before.
#[inline(always)]
pub fn fetch_inc(counter: *mut u64) -> u64 {
    let mut value = 1u64;
    // SAFETY: an aligned u64 inside a live map value; BPF's atomic
    // fetch-and-add (core's atomics have no read-modify-write for this
    // target).
    unsafe {
        core::arch::asm!("{0} = atomic_fetch_add((u64 *)({1} + 0), {0})", inout(reg) value, in(reg) counter);
    }
    value
}

/// `--external-source-cidr`, by family (consulted only with `XNAT_F_SOURCE_FILTER*`).
#[map]
pub static XNAT_SRC: LpmTrie<u32, u8> = LpmTrie::with_max_entries(1024, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub static XNAT_SRC6: LpmTrie<Ip6, u8> = LpmTrie::with_max_entries(1024, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::with_max_entries(DEFAULT_STATS_ENTRIES, 0);

#[map]
pub static SERVICE_STATS: PerCpuArray<ServiceStats> = PerCpuArray::with_max_entries(DEFAULT_STATS_ENTRIES, 0);

/// The same counters for flows from outside the node (`mcs_xdp`, and the
/// replies of local backends to them): the agent reports them with
/// `path="xdp"`.
#[map]
pub static XDP_BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::with_max_entries(DEFAULT_STATS_ENTRIES, 0);

#[map]
pub static XDP_SERVICE_STATS: PerCpuArray<ServiceStats> = PerCpuArray::with_max_entries(DEFAULT_STATS_ENTRIES, 0);

#[map]
pub static HEALTH: Array<Health> = Array::with_max_entries(DEFAULT_STATS_ENTRIES, aya_ebpf::bindings::BPF_F_MMAPABLE);

/// Adds one to a passive-health counter of backend `id` (atomically: all
/// CPUs share the entry; only SYNs, SYN-ACKs and RSTs come here).
#[inline(always)]
pub fn health_add(id: u32, field: fn(&mut Health) -> &mut u64) {
    if let Some(entry) = HEALTH.get_ptr_mut(id) {
        // SAFETY: an aligned u64 inside a live map value. Every CPU writes the
        // entry, so the add is BPF's atomic one (core's atomics have no
        // read-modify-write for this target).
        unsafe {
            let counter: *mut u64 = field(&mut *entry);
            core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) counter, in(reg) 1u64);
        }
    }
}

/// The counters of backend `id`, if it has its own (ids past the map's
/// size do not): the pod paths' (TC, socket), or with `XDP` those of flows
/// from outside. A constant, so that each call site names one map.
#[inline(always)]
pub fn backend_stats<const XDP: bool>(id: u32) -> Option<&'static mut BackendStats> {
    let map = if XDP { &XDP_BACKEND_STATS } else { &BACKEND_STATS };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU; valid for this program run.
    map.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn service_stats<const XDP: bool>(id: u32) -> Option<&'static mut ServiceStats> {
    let map = if XDP { &XDP_SERVICE_STATS } else { &SERVICE_STATS };
    // SAFETY: as above.
    map.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

/// `CONFIG[0]`: `CONFIG_F_*` bits.
#[map]
pub static CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// True while an older layout's programs run behind ours (see `CONFIG_F_HANDOFF`).
#[inline(always)]
pub fn handoff() -> bool {
    config(mcs_common::CONFIG_F_HANDOFF)
}

#[inline(always)]
pub fn config(bit: u32) -> bool {
    CONFIG.get(0).is_some_and(|flags| flags & bit != 0)
}

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}
