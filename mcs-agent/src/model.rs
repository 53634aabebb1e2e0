//! The Kubernetes objects the agent reads, as typed values.
//!
//! `EndpointSlice` comes from k8s-openapi. `ServiceImport` (multicluster.x-k8s.io
//! v1alpha1 and v1beta1 share one schema) is declared here after
//! `../shared/reference/mcs-api/multicluster.x-k8s.io_serviceimports.yaml`.

use std::{fmt, net::IpAddr, sync::Arc};

use k8s_openapi::{api::discovery::v1::EndpointSlice, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::{Deserialize, Serialize};

pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
pub const LABEL_SERVICE_NAME: &str = "multicluster.kubernetes.io/service-name";
pub const LABEL_SOURCE_CLUSTER: &str = "multicluster.kubernetes.io/source-cluster";

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImport {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceImportSpec,
    /// Kept raw: the agent reads `status.clusterSelectorResults` (KEP-5939,
    /// alpha) itself, so that an unexpected shape is reported without losing
    /// the import.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(rename = "type", default)]
    pub type_: Option<String>,
    #[serde(default)]
    pub session_affinity: Option<String>,
    #[serde(default)]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(default)]
    pub traffic_distribution: Option<String>,
    #[serde(default)]
    pub internal_traffic_policy: Option<String>,
    #[serde(default)]
    pub ip_families: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
    pub port: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    // The API spells it clientIP, which camelCase renaming would not produce.
    #[serde(default, rename = "clientIP")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    #[serde(default)]
    pub timeout_seconds: Option<i64>,
}

/// Where an object came from, for error messages: `dir/web.yaml (document 2)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin(pub String);

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything the decision logic looks at, from whichever source.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub imports: Vec<(Origin, ServiceImport)>,
    pub slices: Vec<(Origin, EndpointSlice)>,
    /// The cluster's Services by ClusterIP (Kubernetes mode): no ClusterSetIP
    /// may capture one, unless it is the import's own derived Service.
    pub cluster_ips: ClusterIps,
}

/// A Service that holds a ClusterIP, as the ClusterSetIP safety rules need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceIp {
    pub namespace: String,
    pub name: String,
    /// Names of the ServiceImports (in its namespace) among its
    /// `metadata.ownerReferences`: a Service an MCS controller derived from
    /// an import and owns through it.
    pub owner_imports: Vec<String>,
}

impl std::fmt::Display for ServiceIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// ClusterIP -> the Service holding it (the first by `namespace/name` if a
/// source lists two).
pub type ClusterIps = std::collections::BTreeMap<std::net::IpAddr, ServiceIp>;

/// The Service's ClusterIPs (`spec.clusterIPs`, else `spec.clusterIP`;
/// headless and ExternalName Services have none) with what VIP safety reads.
pub fn service_ips(service: &k8s_openapi::api::core::v1::Service) -> Vec<(std::net::IpAddr, ServiceIp)> {
    let Some(spec) = &service.spec else { return Vec::new() };
    let listed = spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter());
    let mut ips: Vec<std::net::IpAddr> = listed.filter_map(|ip| ip.parse().ok()).collect();
    ips.sort();
    ips.dedup();
    let (namespace, name) = object_ref(&service.metadata);
    let owner_imports: Vec<String> = service
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.kind == "ServiceImport" && o.api_version.split('/').next() == Some(MCS_GROUP))
        .map(|o| o.name.clone())
        .collect();
    let owner = ServiceIp { namespace, name, owner_imports };
    ips.into_iter().map(|ip| (ip, owner.clone())).collect()
}

/// `namespace/name`, with Kubernetes' default namespace for manifests that omit it.
pub fn object_ref(meta: &ObjectMeta) -> (String, String) {
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".to_owned());
    (namespace, meta.name.clone().unwrap_or_default())
}

// The datapath's vocabulary: what a frontend and its endpoints are, below
// every decision module (`locality`, `maglev`, `desired`).

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => mcs_common::IPPROTO_TCP,
            Protocol::Udp => mcs_common::IPPROTO_UDP,
        }
    }

    /// Kubernetes spelling; absent or empty means TCP.
    pub(crate) fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("") {
            "" | "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Err("protocol SCTP is not supported by the mcs-agent datapath (TCP and UDP are)".to_owned()),
            other => Err(format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// `ClusterSetIP:port/protocol`, what a client dials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    /// One entry of `spec.ips`: each family's ClusterSetIP is its own frontend.
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", std::net::SocketAddr::new(self.vip, self.port), self.protocol)
    }
}

/// A pod `IP:port` that serves a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::net::SocketAddr::new(self.ip, self.port))
    }
}

/// An endpoint's EndpointSlice conditions, reduced to what selection uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// `ready` true or absent.
    Ready,
    /// Not ready, but `serving` and `terminating`: a last resort.
    Terminating,
    NotReady,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    /// `multicluster.kubernetes.io/source-cluster` of its slice.
    pub cluster: Option<String>,
    /// `endpoints[].zone`.
    pub zone: Option<String>,
    /// `topology.kubernetes.io/region` label of its slice.
    pub region: Option<String>,
    /// `endpoints[].nodeName`.
    pub node: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: BackendAddr,
    /// Shared: one allocation per slice endpoint, whatever the number of
    /// frontends (ports, passes) that list it.
    pub locality: Arc<Locality>,
    pub condition: Condition,
}
