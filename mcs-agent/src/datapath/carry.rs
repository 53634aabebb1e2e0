//! Layout upgrades: flows, affinity and socket translations carried
//! from an older layout's maps into this one's.

// One module split by concern: the pieces share the root's types and imports.
use super::*;

/// Copies established flows, affinity and socket translations (both
/// families) from an older layout's pinned maps into this agent's, where
/// their shapes are the same, mapping service and backend ids through the
/// frontends and addresses both sides know. Entries this agent already has
/// win.
///
/// A layout bump that changes `CtKey`/`CtValue`, the affinity or the
/// `SockRev` types must add a conversion here (see ARCHITECTURE.md). Layout
/// 3's two conntrack maps are converted into `CT` entries (see below).
pub fn carry_over(current: &mut Datapath, old: &dyn OldMaps) -> CarriedOver {
    pub(super) fn open<K: aya::Pod, V: aya::Pod>(
        old: &dyn OldMaps,
        name: &'static str,
    ) -> Option<HashMap<MapData, K, V>> {
        let (kind, key, value, _) = expected(name);
        let data = old.open(name)?;
        let info = data.info().ok()?;
        if info.map_type().ok()? != kind || info.key_size() as usize != key || info.value_size() as usize != value {
            warn!(
                map = name,
                layout = old.version(),
                "the older layout's map has another shape; its entries are not carried over"
            );
            return None;
        }
        let map = if kind == MapType::LruHash { Map::LruHashMap(data) } else { Map::HashMap(data) };
        HashMap::try_from(map).ok()
    }
    /// Copies `from` into `to`, each value through `convert` (None: skip).
    pub(super) fn copy<K: aya::Pod, V: aya::Pod>(
        old: &dyn OldMaps,
        name: &'static str,
        to: &mut HashMap<MapData, K, V>,
        convert: impl Fn(&mut K, &mut V) -> bool,
    ) -> usize {
        let Some(from) = open::<K, V>(old, name) else { return 0 };
        let no_exist = 1; // BPF_NOEXIST
        let mut n = 0;
        for (mut k, mut v) in from.iter().filter_map(Result::ok) {
            if convert(&mut k, &mut v) && to.insert(k, v, no_exist).is_ok() {
                n += 1;
            }
        }
        n
    }
    // Translating ids reads every service and backend of both sides (seconds
    // at 100,000 services): not for maps with nothing to carry (a growth
    // before any traffic, an upgrade of an idle node).
    let carried_maps = [
        MAP_CT,
        MAP_CT6,
        MAP_SOCK_REV,
        MAP_SOCK_REV6,
        MAP_AFFINITY,
        MAP_AFFINITY6,
        v3::MAP_CONNTRACK,
        v3::MAP_CONNTRACK6,
        v3::MAP_REV_NAT,
        v3::MAP_REV_NAT6,
        MAP_XNAT_CT,
        MAP_XNAT_CT6,
    ];
    let empty = |name: &'static str| {
        old.open(name).is_none_or(|data| {
            let key_size = data.info().map_or(0, |i| i.key_size() as usize);
            crate::batch::is_empty(data.fd().as_fd(), key_size).unwrap_or(false)
        })
    };
    if carried_maps.into_iter().all(empty) {
        return CarriedOver::default();
    }
    let old_services = |name| -> Vec<(FrontendKey, u32)> {
        let pairs = |m: HashMap<MapData, ServiceKey, ServiceValue>| -> Vec<(FrontendKey, u32)> {
            m.iter().filter_map(Result::ok).filter_map(|(k, v)| Some((frontend_of(&k).ok()?, v.service_id))).collect()
        };
        let pairs6 = |m: HashMap<MapData, ServiceKey<Ip6>, ServiceValue>| -> Vec<(FrontendKey, u32)> {
            m.iter().filter_map(Result::ok).filter_map(|(k, v)| Some((frontend_of(&k).ok()?, v.service_id))).collect()
        };
        if name == MAP_SERVICES { open(old, name).map(pairs) } else { open(old, name).map(pairs6) }.unwrap_or_default()
    };
    let new_service_ids: BTreeMap<FrontendKey, u32> =
        current.kernel_state().services.into_iter().filter_map(|(k, v)| Some((k.ok()?, v.service_id))).collect();
    let service_id: BTreeMap<u32, u32> = old_services(MAP_SERVICES)
        .into_iter()
        .chain(old_services(MAP_SERVICES6))
        .filter_map(|(k, old_id)| Some((old_id, *new_service_ids.get(&k)?)))
        .collect();
    let old_backends = old.open(MAP_BACKENDS).and_then(|d| Array::<_, Backend>::try_from(Map::Array(d)).ok());
    let old_backends6 = old.open(MAP_BACKENDS6).and_then(|d| Array::<_, Backend<Ip6>>::try_from(Map::Array(d)).ok());
    let new_backend_ids: BTreeMap<BackendAddr, u32> =
        current.kernel_state().backends.into_iter().map(|(id, b)| (b, id)).collect();
    // Ids are one space over both families: an id names a backend in one of them.
    let backend_id = |old_id: u32| -> u32 {
        let addr = old_backends
            .as_ref()
            .and_then(|m| m.get(&old_id, 0).ok())
            .filter(|b| *b != Backend::default())
            .map(|b| backend_addr(&b))
            .or_else(|| {
                old_backends6
                    .as_ref()
                    .and_then(|m| m.get(&old_id, 0).ok())
                    .filter(|b| *b != Backend::default())
                    .map(|b| backend_addr(&b))
            });
        addr.and_then(|a| new_backend_ids.get(&a).copied()).unwrap_or(mcs_common::NO_BACKEND)
    };
    let service = |id: u32| service_id.get(&id).copied();
    let maps = &mut current.maps;
    // One conversion per value type, instantiated for each family.
    macro_rules! ct {
        () => {
            |_: &mut _, v: &mut CtValue<_>| {
                v.backend_id = backend_id(v.backend_id);
                v.service_id = service(v.service_id).unwrap_or(0);
                true
            }
        };
    }
    macro_rules! nat {
        () => {
            |_: &mut _, v: &mut NatValue<_>| {
                v.backend_id = backend_id(v.backend_id);
                v.service_id = service(v.service_id).unwrap_or(0);
                true
            }
        };
    }
    macro_rules! sock {
        () => {
            |_: &mut _, v: &mut SockRevValue<_>| {
                v.backend_id = backend_id(v.backend_id);
                v.service_id = service(v.service_id).unwrap_or(0);
                true
            }
        };
    }
    macro_rules! affinity {
        () => {
            |k: &mut AffinityKey<_>, v: &mut AffinityValue| {
                let (Some(sid), bid) = (service(k.service_id), backend_id(v.backend_id)) else { return false };
                k.service_id = sid;
                v.backend_id = bid;
                bid != mcs_common::NO_BACKEND
            }
        };
    }
    /// Layout 3's entries, each through `convert` to an entry of `CT`, with
    /// the sibling derived from it when `sibling` (inserted only where
    /// missing, and only beside an entry that went in).
    pub(super) fn convert<K: aya::Pod, V: aya::Pod, A: MapAddr + aya::Pod>(
        old: &dyn OldMaps,
        name: &'static str,
        to: &mut HashMap<MapData, CtKey<A>, CtValue<A>>,
        sibling: bool,
        convert: impl Fn(K, V) -> (CtKey<A>, CtValue<A>),
    ) -> usize
    where
        CtKey<A>: aya::Pod,
        CtValue<A>: aya::Pod,
    {
        let Some(from) = open::<K, V>(old, name) else { return 0 };
        let no_exist = 1; // BPF_NOEXIST
        let mut n = 0;
        for (k, v) in from.iter().filter_map(Result::ok) {
            let (key, value) = convert(k, v);
            if to.insert(key, value, no_exist).is_err() {
                continue;
            }
            n += 1;
            if sibling {
                let (sibling, sibling_value) = key.sibling(&value);
                let _ = to.insert(sibling, sibling_value, no_exist);
            }
        }
        n
    }
    macro_rules! from_v3_ct {
        () => {
            |k: v3::CtKey<_>, v: v3::CtValue<_>| {
                let key = CtKey {
                    src: k.client_ip,
                    dst: k.vip,
                    src_port: k.client_port,
                    dst_port: k.vip_port,
                    proto: k.proto,
                    dir: CT_DIR_ORIGINAL,
                    _pad: [0; 2],
                };
                let value = CtValue {
                    addr: v.backend_ip,
                    port: v.backend_port,
                    flags: v.flags,
                    _pad: 0,
                    backend_id: backend_id(v.backend_id),
                    service_id: service(v.service_id).unwrap_or(0),
                    closed_ns: v.closed_ns,
                    created_ns: v.created_ns,
                    paired_ns: 0,
                };
                (key, value)
            }
        };
    }
    macro_rules! from_v3_rev {
        () => {
            |k: v3::RevNatKey<_>, v: v3::RevNatValue<_>| {
                let key = CtKey {
                    src: k.backend_ip,
                    dst: k.client_ip,
                    src_port: k.backend_port,
                    dst_port: k.client_port,
                    proto: k.proto,
                    dir: CT_DIR_REPLY,
                    _pad: [0; 2],
                };
                // Layout 3 kept the service only on the client's side: the
                // reply entry goes without it (the reply path never reads it).
                let value = CtValue {
                    addr: v.vip,
                    port: v.vip_port,
                    flags: v.flags,
                    _pad: 0,
                    backend_id: backend_id(v.backend_id),
                    service_id: 0,
                    closed_ns: v.closed_ns,
                    created_ns: 0,
                    paired_ns: 0,
                };
                (key, value)
            }
        };
    }
    let conntrack = copy(old, MAP_CT, &mut maps.ct, ct!()) + copy(old, MAP_CT6, &mut maps.ct6, ct!());
    // A layout-3 `CONNTRACK` entry alone is not derived a reply: that
    // layout left one behind when a direct connection reused the tuple, and
    // a reply entry would capture that connection's replies. Its first
    // client packet puts the reply back (`paired_ns` 0: a check is due).
    // A `REV_NAT` entry brings its flow's original entry with it (only
    // packets to the VIP can meet that one).
    let converted = convert(old, v3::MAP_CONNTRACK, &mut maps.ct, false, from_v3_ct!())
        + convert(old, v3::MAP_CONNTRACK6, &mut maps.ct6, false, from_v3_ct!())
        + convert(old, v3::MAP_REV_NAT, &mut maps.ct, true, from_v3_rev!())
        + convert(old, v3::MAP_REV_NAT6, &mut maps.ct6, true, from_v3_rev!());
    let sockets =
        copy(old, MAP_SOCK_REV, &mut maps.sock_rev, sock!()) + copy(old, MAP_SOCK_REV6, &mut maps.sock_rev6, sock!());
    let affinity = copy(old, MAP_AFFINITY, &mut maps.affinity, affinity!())
        + copy(old, MAP_AFFINITY6, &mut maps.affinity6, affinity!());
    // Pinned, both datapaths share these maps (`external_map`): nothing to copy.
    let shared = |name, ours: &MapData| {
        let ours = ours.info().map(|i| i.id()).ok();
        old.open(name).and_then(|d| d.info().ok()).map(|i| i.id()) == ours
    };
    let mut outside = 0;
    {
        use aya::maps::IterableMap as _;
        if !shared(MAP_XNAT_CT, maps.xnat_ct.map()) {
            outside += copy(old, MAP_XNAT_CT, &mut maps.xnat_ct, nat!());
        }
        if !shared(MAP_XNAT_CT6, maps.xnat_ct6.map()) {
            outside += copy(old, MAP_XNAT_CT6, &mut maps.xnat_ct6, nat!());
        }
    }
    CarriedOver { conntrack, converted, sockets, affinity, outside }
}

/// Where [`carry_over`] copies from: an older layout's pins, or a
/// datapath this agent still holds (a growth, pinned or not).
pub trait OldMaps {
    fn version(&self) -> u32;
    /// The map pinned or held under this name, if there is one.
    fn open(&self, name: &'static str) -> Option<MapData>;
}

impl OldMaps for LayoutDir {
    fn version(&self) -> u32 {
        self.version
    }

    fn open(&self, name: &'static str) -> Option<MapData> {
        MapData::from_pin(self.map(name)).ok()
    }
}

impl OldMaps for Datapath {
    fn version(&self) -> u32 {
        self.layout.as_ref().map_or(LAYOUT_VERSION, |l| l.version)
    }

    fn open(&self, name: &'static str) -> Option<MapData> {
        use aya::maps::IterableMap as _;
        let maps = &self.maps;
        let fd = match name {
            MAP_SERVICES => maps.fds.services.as_fd(),
            MAP_SERVICES6 => maps.fds.services6.as_fd(),
            MAP_BACKENDS => maps.fds.backends.as_fd(),
            MAP_BACKENDS6 => maps.fds.backends6.as_fd(),
            MAP_CT => maps.fds.ct.as_fd(),
            MAP_CT6 => maps.fds.ct6.as_fd(),
            MAP_SOCK_REV => maps.sock_rev_fds[0].as_fd(),
            MAP_SOCK_REV6 => maps.sock_rev_fds[1].as_fd(),
            MAP_AFFINITY => maps.affinity.map().fd().as_fd(),
            MAP_AFFINITY6 => maps.affinity6.map().fd().as_fd(),
            MAP_XNAT_CT => maps.xnat_ct.map().fd().as_fd(),
            MAP_XNAT_CT6 => maps.xnat_ct6.map().fd().as_fd(),
            _ => return None,
        };
        MapData::from_fd(fd.try_clone_to_owned().ok()?).ok()
    }
}

/// What [`carry_over`] copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CarriedOver {
    /// Conntrack entries of the same layout as ours (two per flow).
    pub conntrack: usize,
    /// Layout 3 conntrack and reverse-NAT entries converted.
    pub converted: usize,
    /// Socket-level translations.
    pub sockets: usize,
    pub affinity: usize,
    /// Entries of flows from outside (two per flow), where the maps are
    /// not shared (`--no-pin`).
    pub outside: usize,
}
