//! `mcs-agent inspect`: the node's datapath as the pinned maps hold it,
//! named by the running agent or by the `state.json` the last one left when
//! it stopped. Reads only; works while the agent is stopped (the datapath
//! keeps serving then). While the agent runs, it answers `inspect services`
//! itself ([`service_rows`] over its own datapath), so the tables and their
//! names are of one generation.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use mcs_common::{
    AffinityKey, AffinityValue, Backend, BackendStats, CT_DIR_ORIGINAL, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, CtKey,
    CtValue, IPPROTO_TCP, Ip6, MAP_AFFINITY, MAP_AFFINITY6, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_BACKENDS6, MAP_CT,
    MAP_CT6, MAP_SELECTION, MAP_SERVICE_STATS, MAP_SERVICES, MAP_SERVICES6, MAP_STATS, MAP_XDP_BACKEND_STATS,
    MAP_XDP_SERVICE_STATS, MAP_XNAT_CT, MAP_XNAT_CT6, NatValue, ServiceKey, ServiceStats, ServiceValue, Stat,
    ct_closed,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    datapath::{Datapath, LayoutDir, SlotMemory, external_map_pin, sum_backend, sum_service},
    inventory::{FrontendInfo, Inventory},
    plan::{ToIp, backend_addr},
};

#[derive(Debug, Error)]
pub enum InspectError {
    #[error(
        "no mcs-agent state is pinned on this node under {0} (is the agent running with this --bpffs? an agent run with --no-pin leaves nothing to inspect)"
    )]
    NothingPinned(String),
    #[error("reading pinned map {name}: {message}")]
    Map { name: &'static str, message: String },
    #[error("reading the agent's state.json: {0}")]
    State(#[from] std::io::Error),
}

/// The pinned maps of one layout.
pub struct Pinned {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, Backend>,
    selection: SlotMemory,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// The IPv6 family's maps (absent when pinned by an agent without them).
    services6: Option<HashMap<MapData, ServiceKey<Ip6>, ServiceValue>>,
    backends6: Option<Array<MapData, Backend<Ip6>>>,
    conntrack6: Option<HashMap<MapData, CtKey<Ip6>, CtValue<Ip6>>>,
    affinity6: Option<HashMap<MapData, AffinityKey<Ip6>, AffinityValue>>,
    stats: PerCpuArray<MapData, u64>,
    backend_stats: Option<PerCpuArray<MapData, BackendStats>>,
    service_stats: Option<PerCpuArray<MapData, ServiceStats>>,
    /// The XDP path's counters (absent when pinned by an agent without them).
    xdp_backend_stats: Option<PerCpuArray<MapData, BackendStats>>,
    xdp_service_stats: Option<PerCpuArray<MapData, ServiceStats>>,
    /// Flows from outside the node (`XNAT_CT`, `XNAT_CT6`, pinned beside the
    /// layouts): absent where no agent pinned them.
    xnat_ct: Option<HashMap<MapData, CtKey, NatValue>>,
    xnat_ct6: Option<HashMap<MapData, CtKey<Ip6>, NatValue<Ip6>>>,
    /// What is behind the ids: `state.json`, if a stopping agent left one
    /// (`inspect` puts the running agent's answer here instead).
    inventory: Option<Inventory>,
    /// Its frontends by service id: every flow is named through it.
    by_id: std::collections::HashMap<u32, usize>,
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(
    layout: &LayoutDir,
    name: &'static str,
    wrap: fn(MapData) -> Map,
) -> Result<T, InspectError> {
    open_at(&layout.map(name), name, wrap)
}

fn open_at<T: TryFrom<Map, Error = aya::maps::MapError>>(
    path: &Path,
    name: &'static str,
    wrap: fn(MapData) -> Map,
) -> Result<T, InspectError> {
    let err = |message: String| InspectError::Map { name, message };
    let data = MapData::from_pin(path).map_err(|e| err(e.to_string()))?;
    T::try_from(wrap(data)).map_err(|e| err(e.to_string()))
}

impl Pinned {
    pub fn open(bpffs: &Path, state_dir: &Path) -> Result<Self, InspectError> {
        let layout = LayoutDir::new(bpffs, mcs_common::LAYOUT_VERSION);
        if !layout.map(MAP_SERVICES).exists() {
            return Err(InspectError::NothingPinned(layout.dir.display().to_string()));
        }
        let selection = SlotMemory::open_pinned(&layout.map(MAP_SELECTION))
            .map_err(|e| InspectError::Map { name: MAP_SELECTION, message: e.to_string() })?;
        Ok(Self {
            services: open(&layout, MAP_SERVICES, Map::HashMap)?,
            backends: open(&layout, MAP_BACKENDS, Map::Array)?,
            selection,
            conntrack: open(&layout, MAP_CT, Map::LruHashMap)?,
            affinity: open(&layout, MAP_AFFINITY, Map::LruHashMap)?,
            services6: open(&layout, MAP_SERVICES6, Map::HashMap).ok(),
            backends6: open(&layout, MAP_BACKENDS6, Map::Array).ok(),
            conntrack6: open(&layout, MAP_CT6, Map::LruHashMap).ok(),
            affinity6: open(&layout, MAP_AFFINITY6, Map::LruHashMap).ok(),
            stats: open(&layout, MAP_STATS, Map::PerCpuArray)?,
            backend_stats: open(&layout, MAP_BACKEND_STATS, Map::PerCpuArray).ok(),
            service_stats: open(&layout, MAP_SERVICE_STATS, Map::PerCpuArray).ok(),
            xdp_backend_stats: open(&layout, MAP_XDP_BACKEND_STATS, Map::PerCpuArray).ok(),
            xdp_service_stats: open(&layout, MAP_XDP_SERVICE_STATS, Map::PerCpuArray).ok(),
            xnat_ct: open_at(&external_map_pin(&layout, MAP_XNAT_CT), MAP_XNAT_CT, Map::LruHashMap).ok(),
            xnat_ct6: open_at(&external_map_pin(&layout, MAP_XNAT_CT6), MAP_XNAT_CT6, Map::LruHashMap).ok(),
            inventory: None,
            by_id: std::collections::HashMap::new(),
        }
        .named(Inventory::read(state_dir)?))
    }

    /// A backend id's address, in whichever family's array holds it.
    fn backend(&self, id: u32) -> Option<SocketAddr> {
        let addr = match self.backends.get(&id, 0).ok().filter(|b| *b != Backend::default()) {
            Some(b) => backend_addr(&b),
            None => backend_addr(&self.backends6.as_ref()?.get(&id, 0).ok().filter(|b| *b != Backend::default())?),
        };
        Some(SocketAddr::new(addr.ip, addr.port))
    }

    fn backend_stats(&self, id: u32) -> BackendStats {
        self.backend_stats.as_ref().and_then(|m| sum_backend(m, id)).unwrap_or_default()
    }

    fn service_stats(&self, id: u32) -> ServiceStats {
        self.service_stats.as_ref().and_then(|m| sum_service(m, id)).unwrap_or_default()
    }

    fn xdp_backend_stats(&self, id: u32) -> BackendStats {
        self.xdp_backend_stats.as_ref().and_then(|m| sum_backend(m, id)).unwrap_or_default()
    }

    fn xdp_service_stats(&self, id: u32) -> ServiceStats {
        self.xdp_service_stats.as_ref().and_then(|m| sum_service(m, id)).unwrap_or_default()
    }

    fn info(&self, service_id: u32) -> Option<&FrontendInfo> {
        self.inventory.as_ref()?.frontends.get(*self.by_id.get(&service_id)?)
    }

    /// Names the ids with `inventory` (the running agent's, or `state.json`);
    /// the first frontend of an id names it, as before.
    pub fn named(mut self, inventory: Option<Inventory>) -> Self {
        self.by_id = inventory
            .iter()
            .flat_map(|i| i.frontends.iter().enumerate().rev().map(|(k, f)| (f.service_id, k)))
            .collect();
        self.inventory = inventory;
        self
    }

    pub fn inventory(&self) -> Option<&Inventory> {
        self.inventory.as_ref()
    }
}

/// The tables a service row is read from: the pinned maps (`inspect` on its
/// own) or the running agent's datapath (answering `inspect` on its socket,
/// with the names of the same generation).
pub trait Tables {
    /// Every programmed frontend: its name (`VIP:port/PROTO`) and entry.
    fn frontends(&self) -> Vec<(String, ServiceValue)>;
    /// The backend id in a selection slot.
    fn slot(&self, slot: u32) -> Option<u32>;
    /// A backend id's address, in whichever family's array holds it.
    fn backend(&self, id: u32) -> Option<SocketAddr>;
    /// A backend id's counters on the pod paths (TC, socket).
    fn backend_stats(&self, id: u32) -> BackendStats;
    fn service_stats(&self, id: u32) -> ServiceStats;
    /// A backend id's counters for flows from outside the node (XDP).
    fn xdp_backend_stats(&self, id: u32) -> BackendStats;
    fn xdp_service_stats(&self, id: u32) -> ServiceStats;
}

impl Tables for Pinned {
    fn frontends(&self) -> Vec<(String, ServiceValue)> {
        let v6 = self.services6.iter().flat_map(|m| m.iter().filter_map(Result::ok));
        let v4 = self.services.iter().filter_map(Result::ok).map(|(k, v)| (frontend_name(&k), v));
        v4.chain(v6.map(|(k, v)| (frontend_name(&k), v))).collect()
    }

    fn slot(&self, slot: u32) -> Option<u32> {
        self.selection.read(slot)
    }

    fn backend(&self, id: u32) -> Option<SocketAddr> {
        Pinned::backend(self, id)
    }

    fn backend_stats(&self, id: u32) -> BackendStats {
        Pinned::backend_stats(self, id)
    }

    fn service_stats(&self, id: u32) -> ServiceStats {
        Pinned::service_stats(self, id)
    }

    fn xdp_backend_stats(&self, id: u32) -> BackendStats {
        Pinned::xdp_backend_stats(self, id)
    }

    fn xdp_service_stats(&self, id: u32) -> ServiceStats {
        Pinned::xdp_service_stats(self, id)
    }
}

impl Tables for Datapath {
    fn frontends(&self) -> Vec<(String, ServiceValue)> {
        self.kernel_services().into_iter().map(|(key, value)| (key.to_string(), value)).collect()
    }

    fn slot(&self, slot: u32) -> Option<u32> {
        self.selection_slot(slot)
    }

    fn backend(&self, id: u32) -> Option<SocketAddr> {
        self.backend_address(id).map(|a| SocketAddr::new(a.ip, a.port))
    }

    fn backend_stats(&self, id: u32) -> BackendStats {
        Datapath::backend_stats(self, id).unwrap_or_default()
    }

    fn service_stats(&self, id: u32) -> ServiceStats {
        Datapath::service_stats(self, id).unwrap_or_default()
    }

    fn xdp_backend_stats(&self, id: u32) -> BackendStats {
        Datapath::xdp_backend_stats(self, id).unwrap_or_default()
    }

    fn xdp_service_stats(&self, id: u32) -> ServiceStats {
        Datapath::xdp_service_stats(self, id).unwrap_or_default()
    }
}

/// The endpoint's condition, unless passive health overrides it.
fn state_of(condition: &str, health: &str) -> String {
    match health {
        "ejected" | "probing" => health.to_owned(),
        _ => condition.to_owned(),
    }
}

fn frontend_name<A: ToIp>(key: &ServiceKey<A>) -> String {
    let proto = if key.proto == IPPROTO_TCP { "TCP" } else { "UDP" };
    format!("{}/{proto}", socket(key.vip, key.port))
}

/// A map-order address and port.
fn socket<A: ToIp>(ip: A, port: u16) -> SocketAddr {
    SocketAddr::new(ip.to_ip(), u16::from_be(port))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub service: Option<String>,
    pub port_name: Option<String>,
    pub service_id: u32,
    pub table_size: u32,
    pub affinity_timeout_secs: u32,
    /// On the pod paths (TC, socket-level load balancing).
    pub new_connections: u64,
    pub no_backend_drops: u64,
    /// Flows from outside the node (XDP, `--external-interface`); absent
    /// from an older agent's answer.
    #[serde(default)]
    pub xdp_new_connections: u64,
    #[serde(default)]
    pub xdp_no_backend_drops: u64,
    pub backends: Vec<BackendRow>,
    /// The agent's reconcile generation the row shows, when the running
    /// agent answered (maps and names then come from that one generation);
    /// `null` when read from the pinned maps and `state.json`.
    pub generation: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendRow {
    pub address: String,
    pub backend_id: u32,
    pub cluster: Option<String>,
    pub zone: Option<String>,
    pub tier: Option<String>,
    /// The share the agent intended (0-1).
    pub weight: Option<f64>,
    /// The share of the kernel's selection table this backend holds (0-1).
    pub table_share: f64,
    /// `ready`, `terminating` or `not-ready` from the agent's state.json, or
    /// `ejected` / `probing` when passive health says so.
    pub condition: Option<String>,
    /// On the pod paths (TC, socket-level load balancing).
    pub new_connections: u64,
    pub packets_to: u64,
    pub packets_from: u64,
    /// Flows from outside the node (XDP); absent from an older agent's answer.
    #[serde(default)]
    pub xdp_new_connections: u64,
    #[serde(default)]
    pub xdp_packets_to: u64,
    #[serde(default)]
    pub xdp_packets_from: u64,
}

/// What the running agent answers to `services` on its control socket.
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentServices {
    pub generation: u64,
    /// The agent's `--bpffs` (`None` with `--no-pin`): an `inspect` about
    /// another bpffs reads that one's pins instead.
    pub bpffs: Option<std::path::PathBuf>,
    pub rows: Vec<ServiceRow>,
}

/// What the running agent answers to `inventory`: the names behind the ids,
/// for `inspect conntrack` and `inspect affinity`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentInventory {
    pub generation: u64,
    /// As in [`AgentServices`].
    pub bpffs: Option<std::path::PathBuf>,
    pub inventory: Inventory,
}

/// Every frontend with its table's members, sorted by frontend, from the
/// pinned maps named by `state.json`.
pub fn services(pinned: &Pinned) -> Vec<ServiceRow> {
    service_rows(pinned, |id| pinned.info(id), None)
}

/// Every frontend of `tables` with its table's members, sorted by frontend;
/// `info` names what is behind a service id.
pub fn service_rows<'a>(
    tables: &impl Tables,
    info: impl Fn(u32) -> Option<&'a FrontendInfo>,
    generation: Option<u64>,
) -> Vec<ServiceRow> {
    let mut rows: Vec<ServiceRow> = tables
        .frontends()
        .into_iter()
        .map(|(name, value)| {
            let mut held: BTreeMap<u32, u32> = BTreeMap::new();
            for slot in value.slot_offset..value.slot_offset.saturating_add(value.slot_count) {
                if let Some(id) = tables.slot(slot) {
                    *held.entry(id).or_default() += 1;
                }
            }
            let info = info(value.service_id).filter(|f| f.key() == name);
            let mut backends: Vec<BackendRow> = held
                .iter()
                .map(|(&id, &slots)| {
                    let address = tables.backend(id);
                    let known = info.and_then(|f| {
                        f.backends
                            .iter()
                            .find(|b| b.backend_id == Some(id) && Some(SocketAddr::new(b.ip, b.port)) == address)
                    });
                    let stats = tables.backend_stats(id);
                    let xdp = tables.xdp_backend_stats(id);
                    BackendRow {
                        address: address.map_or_else(|| "(freed id)".to_owned(), |a| a.to_string()),
                        backend_id: id,
                        cluster: known.and_then(|b| b.cluster.clone()),
                        zone: known.and_then(|b| b.zone.clone()),
                        tier: known.map(|b| b.tier.clone()),
                        weight: known.map(|b| b.weight),
                        table_share: f64::from(slots) / f64::from(value.slot_count.max(1)),
                        condition: known.map(|b| state_of(&b.condition, &b.health)),
                        new_connections: stats.new_flows,
                        packets_to: stats.packets_to,
                        packets_from: stats.packets_from,
                        xdp_new_connections: xdp.new_flows,
                        xdp_packets_to: xdp.packets_to,
                        xdp_packets_from: xdp.packets_from,
                    }
                })
                .collect();
            // Endpoints that get no new connections (not ready, or a tier that takes
            // nothing): not in the table, but part of the picture.
            for b in info.iter().flat_map(|f| &f.backends).filter(|b| b.backend_id.is_none()) {
                backends.push(BackendRow {
                    address: SocketAddr::new(b.ip, b.port).to_string(),
                    backend_id: 0,
                    cluster: b.cluster.clone(),
                    zone: b.zone.clone(),
                    tier: Some(b.tier.clone()),
                    weight: Some(b.weight),
                    table_share: 0.0,
                    condition: Some(state_of(&b.condition, &b.health)),
                    new_connections: 0,
                    packets_to: 0,
                    packets_from: 0,
                    xdp_new_connections: 0,
                    xdp_packets_to: 0,
                    xdp_packets_from: 0,
                });
            }
            let stats = tables.service_stats(value.service_id);
            let xdp = tables.xdp_service_stats(value.service_id);
            ServiceRow {
                frontend: name,
                service: info.map(|f| f.service.clone()),
                port_name: info.map(|f| f.port_name.clone()),
                service_id: value.service_id,
                table_size: value.slot_count,
                affinity_timeout_secs: value.affinity_timeout_secs,
                new_connections: stats.new_flows,
                no_backend_drops: stats.no_backend,
                xdp_new_connections: xdp.new_flows,
                xdp_no_backend_drops: xdp.no_backend,
                backends,
                generation,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.frontend.cmp(&b.frontend));
    rows
}

#[derive(Clone, Debug, Serialize)]
pub struct FlowRow {
    pub client: String,
    pub vip: String,
    pub backend: String,
    pub protocol: &'static str,
    pub service: Option<String>,
    pub age_secs: f64,
    /// `open`, `closing` (one side sent FIN) or `closed` (both FINs or a RST).
    pub state: &'static str,
    /// `pod`: translated by the pod paths (TC; the socket path keeps no
    /// flows). `xdp`: a flow from outside the node, source NATed.
    pub path: &'static str,
    /// The node address and port the backend sees (`xdp` flows; `null`
    /// for `pod` flows, which keep their source).
    pub snat: Option<String>,
}

/// Translated flows, oldest first; `service` keeps only one ServiceImport's.
/// A flow is listed by its original direction's entry (the reply's holds
/// the same flow seen from the backend): the TC path's conntrack, then
/// the XDP path's (`XNAT_CT`, where an agent pinned it).
pub fn conntrack(pinned: &Pinned, service: Option<&str>) -> Vec<FlowRow> {
    let now = crate::conntrack::monotonic_ns();
    let v4 = pinned.conntrack.iter().filter_map(Result::ok).filter(|(k, _)| k.dir == CT_DIR_ORIGINAL);
    let v6 = pinned
        .conntrack6
        .iter()
        .flat_map(|m| m.iter().filter_map(Result::ok))
        .filter(|(k, _)| k.dir == CT_DIR_ORIGINAL);
    let x4 =
        pinned.xnat_ct.iter().flat_map(|m| m.iter().filter_map(Result::ok)).filter(|(k, _)| k.dir == CT_DIR_ORIGINAL);
    let x6 =
        pinned.xnat_ct6.iter().flat_map(|m| m.iter().filter_map(Result::ok)).filter(|(k, _)| k.dir == CT_DIR_ORIGINAL);
    let mut rows: Vec<FlowRow> = v4
        .map(|(k, v)| flow_row(pinned, now, &k, &v))
        .chain(v6.map(|(k, v)| flow_row(pinned, now, &k, &v)))
        .chain(x4.map(|(k, v)| xnat_row(pinned.info(v.service_id), now, &k, &v)))
        .chain(x6.map(|(k, v)| xnat_row(pinned.info(v.service_id), now, &k, &v)))
        .filter(|row| service.is_none_or(|s| row.service.as_deref() == Some(s)))
        .collect();
    rows.sort_by(|a, b| b.age_secs.total_cmp(&a.age_secs));
    rows
}

/// A connection's state from its entry's `CT_F_*` bits.
fn flow_state(flags: u8) -> &'static str {
    if ct_closed(flags) {
        "closed"
    } else if flags & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND) != 0 {
        "closing"
    } else {
        "open"
    }
}

fn protocol(proto: u8) -> &'static str {
    if proto == IPPROTO_TCP { "TCP" } else { "UDP" }
}

fn flow_row<A: ToIp>(pinned: &Pinned, now: u64, k: &CtKey<A>, v: &CtValue<A>) -> FlowRow {
    FlowRow {
        client: socket(k.src, k.src_port).to_string(),
        vip: socket(k.dst, k.dst_port).to_string(),
        backend: socket(v.addr, v.port).to_string(),
        protocol: protocol(k.proto),
        service: pinned.info(v.service_id).map(|f| f.service.clone()),
        age_secs: now.saturating_sub(v.created_ns) as f64 / 1e9,
        state: flow_state(v.flags),
        path: "pod",
        snat: None,
    }
}

/// A flow from outside by its original entry: client -> VIP, rewritten to
/// node address (`nat`) -> backend (`peer`); `info` is what names the
/// entry's service id.
fn xnat_row<A: ToIp>(info: Option<&FrontendInfo>, now: u64, k: &CtKey<A>, v: &NatValue<A>) -> FlowRow {
    let vip = socket(k.dst, k.dst_port);
    let protocol = protocol(k.proto);
    FlowRow {
        client: socket(k.src, k.src_port).to_string(),
        vip: vip.to_string(),
        backend: socket(v.peer, v.peer_port).to_string(),
        protocol,
        // Every datapath (a growth, a new layout) shares this map, so an
        // entry's service id may be of another generation's numbering: it
        // names the flow only if that frontend is the flow's VIP.
        service: info
            .filter(|f| f.vip == vip.ip() && f.port == vip.port() && f.protocol == protocol)
            .map(|f| f.service.clone()),
        age_secs: now.saturating_sub(v.created_ns) as f64 / 1e9,
        state: flow_state(v.flags),
        path: "xdp",
        snat: Some(socket(v.nat, v.nat_port).to_string()),
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct AffinityRow {
    pub service: Option<String>,
    pub service_id: u32,
    pub client: IpAddr,
    pub backend: Option<String>,
    pub idle_secs: f64,
}

pub fn affinity(pinned: &Pinned) -> Vec<AffinityRow> {
    let now = crate::conntrack::monotonic_ns();
    let row = |service_id: u32, client: IpAddr, v: AffinityValue| AffinityRow {
        service: pinned.info(service_id).map(|f| f.service.clone()),
        service_id,
        client,
        backend: pinned.backend(v.backend_id).map(|a| a.to_string()),
        idle_secs: now.saturating_sub(v.last_used_ns) as f64 / 1e9,
    };
    let v6 = pinned.affinity6.iter().flat_map(|m| m.iter().filter_map(Result::ok));
    let mut rows: Vec<AffinityRow> = (pinned.affinity.iter().filter_map(Result::ok))
        .map(|(k, v)| row(k.service_id, k.client_ip.to_ip(), v))
        .chain(v6.map(|(k, v)| row(k.service_id, k.client_ip.to_ip(), v)))
        .collect();
    rows.sort_by_key(|r| (r.service_id, r.client));
    rows
}

#[derive(Clone, Debug, Serialize)]
pub struct StatRow {
    pub event: &'static str,
    pub count: u64,
}

pub fn stats(pinned: &Pinned) -> Vec<StatRow> {
    Stat::ALL
        .iter()
        .map(|&stat| StatRow {
            event: stat.name(),
            count: pinned.stats.get(&(stat as u32), 0).map_or(0, |v| v.iter().sum()),
        })
        .collect()
}

/// Left-aligned columns, as wide as their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use mcs_common::{CT_F_FIN_CLIENT, CT_F_RST, IPPROTO_UDP, Ip4};

    use super::*;

    fn frontend(vip: &str, port: u16, protocol: &str) -> FrontendInfo {
        FrontendInfo {
            vip: vip.parse().unwrap(),
            port,
            protocol: protocol.into(),
            service: "demo/web".into(),
            port_name: "http".into(),
            service_id: 3,
            table_size: 13,
            affinity_timeout_secs: 0,
            tiers: Vec::new(),
            backends: Vec::new(),
        }
    }

    fn ip4(ip: &str) -> Ip4 {
        mcs_common::ip_to_map(ip.parse::<std::net::Ipv4Addr>().unwrap().octets())
    }

    /// An original entry of a flow from outside: 192.0.2.7:40000 -> VIP
    /// 10.96.0.10:80, sent on as 10.254.0.1:61000 -> 10.10.0.1:8080.
    fn original(proto: u8, flags: u8) -> (CtKey, NatValue) {
        let key = CtKey {
            src: ip4("192.0.2.7"),
            dst: ip4("10.96.0.10"),
            src_port: 40000u16.to_be(),
            dst_port: 80u16.to_be(),
            proto,
            dir: CT_DIR_ORIGINAL,
            _pad: [0; 2],
        };
        let value = NatValue {
            peer: ip4("10.10.0.1"),
            nat: ip4("10.254.0.1"),
            peer_port: 8080u16.to_be(),
            nat_port: 61000u16.to_be(),
            flags,
            _pad: [0; 3],
            backend_id: 1,
            service_id: 3,
            closed_ns: 0,
            created_ns: 1_000_000_000,
            seen_ns: 1_000_000_000,
        };
        (key, value)
    }

    #[test]
    fn a_flow_from_outside_shows_client_vip_backend_and_its_source_nat() {
        let (key, value) = original(IPPROTO_TCP, 0);
        let web = frontend("10.96.0.10", 80, "TCP");
        let row = xnat_row(Some(&web), 3_500_000_000, &key, &value);
        assert_eq!(
            (row.client.as_str(), row.vip.as_str(), row.backend.as_str(), row.snat.as_deref()),
            ("192.0.2.7:40000", "10.96.0.10:80", "10.10.0.1:8080", Some("10.254.0.1:61000"))
        );
        assert_eq!((row.protocol, row.path, row.state), ("TCP", "xdp", "open"));
        assert_eq!(row.service.as_deref(), Some("demo/web"));
        assert!((row.age_secs - 2.5).abs() < 1e-9);
        let closing = xnat_row(Some(&web), 0, &key, &original(IPPROTO_TCP, CT_F_FIN_CLIENT).1);
        assert_eq!(closing.state, "closing");
        assert_eq!(xnat_row(Some(&web), 0, &key, &original(IPPROTO_TCP, CT_F_RST).1).state, "closed");
    }

    #[test]
    fn a_service_id_naming_another_frontend_leaves_the_flow_unnamed() {
        // The map outlives a growth's renumbering: the id may now be another VIP's.
        let (key, value) = original(IPPROTO_UDP, 0);
        for other in
            [frontend("10.96.0.11", 80, "UDP"), frontend("10.96.0.10", 53, "UDP"), frontend("10.96.0.10", 80, "TCP")]
        {
            assert_eq!(xnat_row(Some(&other), 0, &key, &value).service, None, "{}", other.key());
        }
        assert_eq!(
            xnat_row(Some(&frontend("10.96.0.10", 80, "UDP")), 0, &key, &value).service.as_deref(),
            Some("demo/web")
        );
    }
}
