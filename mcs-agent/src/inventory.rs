//! What is programmed, described for people: which ServiceImport, port name,
//! cluster, zone and tier stand behind each frontend and backend id. The
//! maps only hold addresses and ids; `/metrics` labels its series from this,
//! the running agent answers `inspect` with it, and a stopping agent writes
//! it next to the pins (`state.json` in `--state-dir`) so `mcs-agent inspect`
//! can name things while no agent runs.

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    desired::{Frontend, Runtime},
    model::{Condition, FrontendKey},
    plan::Applied,
};

/// Bumped when a field changes meaning; readers refuse other versions.
pub const SCHEMA: u32 = 1;
pub const FILE: &str = "state.json";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub schema: u32,
    pub layout_version: u32,
    /// The agent's generation these names are of (`None` in files of agents
    /// before it was recorded).
    #[serde(default)]
    pub generation: Option<u64>,
    pub frontends: Vec<FrontendInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrontendInfo {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// `namespace/name` of the ServiceImport.
    pub service: String,
    pub port_name: String,
    pub service_id: u32,
    pub table_size: u32,
    pub affinity_timeout_secs: u32,
    pub tiers: Vec<String>,
    pub backends: Vec<BackendInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub ip: IpAddr,
    pub port: u16,
    /// `None` for an endpoint that gets no new connections (not in the table).
    pub backend_id: Option<u32>,
    pub cluster: Option<String>,
    pub zone: Option<String>,
    pub region: Option<String>,
    /// The locality tier it serves in (`-` when it serves in none).
    pub tier: String,
    /// Intended share of new connections, 0 to 1.
    pub weight: f64,
    /// `ready`, `terminating` (serving as a last resort) or `not-ready`.
    pub condition: String,
    /// Passive health: `healthy`, `ejected` or `probing`.
    #[serde(default)]
    pub health: String,
}

impl FrontendInfo {
    pub fn key(&self) -> String {
        format!("{}/{}", std::net::SocketAddr::new(self.vip, self.port), self.protocol)
    }
}

impl Inventory {
    /// One frontend, when it is programmed.
    pub fn frontend(
        key: &FrontendKey,
        frontend: &Frontend,
        applied: &Applied,
        runtime: &Runtime,
    ) -> Option<FrontendInfo> {
        let (service_id, table_size) = applied.frontend(key)?;
        let backends = frontend
            .endpoints
            .iter()
            .map(|endpoint| {
                let weighted = frontend.weights.iter().find(|w| w.addr == endpoint.addr);
                BackendInfo {
                    ip: endpoint.addr.ip,
                    port: endpoint.addr.port,
                    backend_id: weighted.and_then(|_| applied.backend_id(&endpoint.addr)),
                    cluster: endpoint.locality.cluster.clone(),
                    zone: endpoint.locality.zone.clone(),
                    region: endpoint.locality.region.clone(),
                    tier: weighted.map_or_else(|| "-".to_owned(), |w| frontend.tiers[w.tier()].to_string()),
                    weight: weighted.map_or(0.0, |w| w.share),
                    condition: match endpoint.condition {
                        Condition::Ready => "ready",
                        Condition::Terminating => "terminating",
                        Condition::NotReady => "not-ready",
                    }
                    .to_owned(),
                    health: if runtime.ejected.contains(&endpoint.addr) {
                        "ejected"
                    } else if runtime.probing.contains(&endpoint.addr) {
                        "probing"
                    } else {
                        "healthy"
                    }
                    .to_owned(),
                }
            })
            .collect();
        Some(FrontendInfo {
            vip: key.vip,
            port: key.port,
            protocol: key.protocol.to_string(),
            service: frontend.service.clone(),
            port_name: frontend.port_name.clone(),
            service_id,
            table_size,
            affinity_timeout_secs: frontend.affinity_timeout_secs,
            tiers: frontend.tiers.iter().map(ToString::to_string).collect(),
            backends,
        })
    }

    /// Writes `dir/state.json` atomically (a reader never sees half a
    /// file), streamed: at 100,000 services it is tens of megabytes.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{FILE}.tmp"));
        let mut out = io::BufWriter::with_capacity(256 * 1024, std::fs::File::create(&tmp)?);
        serde_json::to_writer(&mut out, self).map_err(io::Error::other)?;
        out.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&tmp, dir.join(FILE))
    }

    /// Removes `dir/state.json`, if there is one.
    pub fn remove(dir: &Path) -> io::Result<()> {
        match std::fs::remove_file(dir.join(FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Reads `dir/state.json`; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> io::Result<Option<Self>> {
        let path: PathBuf = dir.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let inventory: Self = serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?;
        if inventory.schema != SCHEMA {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: schema {} (this agent reads {SCHEMA})", path.display(), inventory.schema),
            ));
        }
        Ok(Some(inventory))
    }
}
