//! Which backend gets which share of new connections. Pure.
//!
//! Endpoints fall into locality tiers in order (by default: same zone, same
//! region, anywhere). A tier's health is `min(100 %, 1.4 × usable/total)`; it
//! takes that share of new connections and the rest spills to the next tier,
//! as Envoy's priority levels do. Within a tier, cluster weights (from the
//! ServiceImport annotation) split the tier's share between clusters, and each
//! cluster's share is split evenly among its usable endpoints.

use std::{collections::BTreeMap, fmt, str::FromStr};

use crate::model::{BackendAddr, Condition, Endpoint};

/// Label on an EndpointSlice naming the region of its endpoints.
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
/// ServiceImport annotation: `cluster-a=90,cluster-b=10` (`*=N` for clusters
/// not listed; without `*` they get 0). Weight 0 drains a cluster.
pub const ANNOTATION_CLUSTER_WEIGHTS: &str = "mcs-agent.io/cluster-weights";

/// How much a partly healthy tier is trusted: a tier at 1/1.4 ≈ 71 % ready
/// still takes all traffic (Envoy's overprovisioning factor).
pub const OVERPROVISIONING: f64 = 1.4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Endpoints on this node (`endpoints[].nodeName`).
    Node,
    /// Endpoints in this node's zone (`endpoints[].zone`).
    Zone,
    /// Endpoints of this node's cluster (`multicluster.kubernetes.io/source-cluster`).
    Cluster,
    /// Endpoints in this node's region (slice label, else `--cluster-region`).
    Region,
    /// Every endpoint.
    Any,
}

impl FromStr for Tier {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "node" => Ok(Tier::Node),
            "zone" => Ok(Tier::Zone),
            "cluster" => Ok(Tier::Cluster),
            "region" => Ok(Tier::Region),
            "any" => Ok(Tier::Any),
            other => Err(format!("unknown tier {other:?} (expected node, zone, cluster, region or any)")),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Node => "node",
            Tier::Zone => "zone",
            Tier::Cluster => "cluster",
            Tier::Region => "region",
            Tier::Any => "any",
        })
    }
}

/// Parses `zone,region,any`.
pub fn parse_tiers(list: &str) -> Result<Vec<Tier>, String> {
    let mut tiers = Vec::new();
    for part in list.split(',') {
        let tier: Tier = part.parse()?;
        if tiers.contains(&tier) {
            return Err(format!("tier {tier} is listed twice"));
        }
        tiers.push(tier);
    }
    Ok(tiers)
}

pub const DEFAULT_TIERS: [Tier; 3] = [Tier::Zone, Tier::Region, Tier::Any];

/// Where this node is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeLocality {
    pub node: Option<String>,
    pub zone: Option<String>,
    pub region: Option<String>,
    pub cluster: Option<String>,
    /// Region of each cluster, for slices without a region label.
    pub cluster_regions: BTreeMap<String, String>,
}

/// `spec.trafficDistribution`, which overrides the configured tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficDistribution {
    /// `PreferSameZone`, or its older alias `PreferClose`.
    PreferSameZone,
    PreferSameNode,
}

impl TrafficDistribution {
    /// Unknown values are ignored (the API may grow new ones), not rejected.
    pub fn parse(value: Option<&str>) -> Option<Self> {
        match value? {
            "PreferSameZone" | "PreferClose" => Some(TrafficDistribution::PreferSameZone),
            "PreferSameNode" => Some(TrafficDistribution::PreferSameNode),
            _ => None,
        }
    }

    pub fn tiers(self) -> Vec<Tier> {
        match self {
            TrafficDistribution::PreferSameZone => vec![Tier::Zone, Tier::Region, Tier::Any],
            TrafficDistribution::PreferSameNode => vec![Tier::Node, Tier::Zone, Tier::Region, Tier::Any],
        }
    }
}

/// Parses the cluster-weights annotation.
pub fn parse_cluster_weights(value: &str) -> Result<BTreeMap<String, u32>, String> {
    let mut weights = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (cluster, weight) = item.split_once('=').ok_or_else(|| format!("{item:?} is not CLUSTER=WEIGHT"))?;
        let weight: u32 =
            weight.trim().parse().map_err(|_| format!("weight {weight:?} of {cluster:?} is not a whole number ≥ 0"))?;
        if weights.insert(cluster.trim().to_owned(), weight).is_some() {
            return Err(format!("cluster {cluster:?} is listed twice"));
        }
    }
    if weights.is_empty() {
        return Err("no CLUSTER=WEIGHT entries".into());
    }
    Ok(weights)
}

fn cluster_weight(weights: Option<&BTreeMap<String, u32>>, cluster: Option<&str>) -> u32 {
    let Some(weights) = weights else { return 1 };
    cluster.and_then(|c| weights.get(c)).or_else(|| weights.get("*")).copied().unwrap_or(0)
}

/// Envoy's priority spill: each tier takes its health, capped by what the tiers
/// before it left; when all healths add up to less than 100 % the loads are
/// scaled up so the whole load is still placed.
pub fn tier_loads(health: &[f64]) -> Vec<f64> {
    let mut remaining = 1.0_f64;
    let mut loads: Vec<f64> = health
        .iter()
        .map(|h| {
            let load = h.clamp(0.0, 1.0).min(remaining);
            remaining -= load;
            load
        })
        .collect();
    let total: f64 = loads.iter().sum();
    if total > 0.0 && total < 1.0 {
        loads.iter_mut().for_each(|l| *l /= total);
    }
    loads
}

pub fn tier_health(usable: usize, total: usize) -> f64 {
    if total == 0 { 0.0 } else { (OVERPROVISIONING * usable as f64 / total as f64).min(1.0) }
}

/// A backend's share of new connections. One per backend of every frontend
/// (a million at 100,000 services): 32 bytes, its locality is the
/// endpoint's.
#[derive(Clone, Debug, PartialEq)]
pub struct Weighted {
    pub addr: BackendAddr,
    /// Fraction of new connections, all shares of a frontend summing to 1.
    pub share: f64,
    /// Index into the tiers used (a handful).
    pub tier: u8,
}

impl Weighted {
    pub fn tier(&self) -> usize {
        usize::from(self.tier)
    }
}

fn endpoint_region<'a>(e: &'a Endpoint, node: &'a NodeLocality) -> Option<&'a str> {
    e.locality
        .region
        .as_deref()
        .or_else(|| e.locality.cluster.as_deref().and_then(|c| node.cluster_regions.get(c)).map(String::as_str))
}

fn same(a: Option<&str>, b: Option<&str>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a == b)
}

fn in_tier(tier: Tier, e: &Endpoint, node: &NodeLocality) -> bool {
    match tier {
        Tier::Node => same(e.locality.node.as_deref(), node.node.as_deref()),
        Tier::Zone => same(e.locality.zone.as_deref(), node.zone.as_deref()),
        Tier::Cluster => same(e.locality.cluster.as_deref(), node.cluster.as_deref()),
        Tier::Region => {
            let node_region = node
                .region
                .as_deref()
                .or_else(|| node.cluster.as_deref().and_then(|c| node.cluster_regions.get(c)).map(String::as_str));
            same(endpoint_region(e, node), node_region)
        }
        Tier::Any => true,
    }
}

/// The first of `tiers` an endpoint falls in.
pub fn tier_of(e: &Endpoint, tiers: &[Tier], node: &NodeLocality) -> Option<usize> {
    tiers.iter().position(|t| in_tier(*t, e, node))
}

/// Shares of new connections for one frontend's endpoints. Endpoints in no
/// tier, of a drained cluster, or not usable get nothing. Serving-but-
/// terminating endpoints are used only when no endpoint is ready.
pub fn weights(
    endpoints: &[Endpoint],
    cluster_weights: Option<&BTreeMap<String, u32>>,
    tiers: &[Tier],
    node: &NodeLocality,
) -> Vec<Weighted> {
    let eligible: Vec<(&Endpoint, usize, u32)> = endpoints
        .iter()
        .filter_map(|e| {
            let weight = cluster_weight(cluster_weights, e.locality.cluster.as_deref());
            let tier = tiers.iter().position(|t| in_tier(*t, e, node))?;
            (weight > 0).then_some((e, tier, weight))
        })
        .collect();
    let any_ready = eligible.iter().any(|(e, _, _)| e.condition == Condition::Ready);
    let usable_condition = if any_ready { Condition::Ready } else { Condition::Terminating };
    let usable = |e: &Endpoint| e.condition == usable_condition;

    let health: Vec<f64> = (0..tiers.len())
        .map(|t| {
            let in_t = eligible.iter().filter(|(_, tier, _)| *tier == t);
            let total = in_t.clone().count();
            let ok = in_t.filter(|(e, _, _)| usable(e)).count();
            tier_health(ok, total)
        })
        .collect();
    let loads = tier_loads(&health);

    let mut out = Vec::new();
    for (t, load) in loads.iter().enumerate().filter(|(_, l)| **l > 0.0) {
        // cluster -> (weight, usable endpoints)
        let mut clusters: BTreeMap<Option<&str>, (u32, Vec<&Endpoint>)> = BTreeMap::new();
        for (e, _, weight) in eligible.iter().filter(|(e, tier, _)| *tier == t && usable(e)) {
            let entry = clusters.entry(e.locality.cluster.as_deref()).or_insert((*weight, Vec::new()));
            entry.1.push(e);
        }
        let total_weight: u64 = clusters.values().map(|(w, _)| u64::from(*w)).sum();
        for (weight, members) in clusters.values() {
            let cluster_share = load * f64::from(*weight) / total_weight as f64;
            for e in members {
                out.push(Weighted {
                    addr: e.addr,
                    share: cluster_share / members.len() as f64,
                    tier: u8::try_from(t).expect("a handful of tiers"),
                });
            }
        }
    }
    out.sort_by_key(|w| w.addr);
    // Kept for as long as the frontend: no spare capacity.
    out.shrink_to_fit();
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::Locality;

    fn node() -> NodeLocality {
        NodeLocality {
            node: Some("node-1".into()),
            zone: Some("r1-a".into()),
            region: Some("r1".into()),
            cluster: Some("cluster-a".into()),
            cluster_regions: BTreeMap::from([("cluster-c".into(), "r2".into())]),
        }
    }

    fn ep(last: u8, cluster: &str, zone: &str, region: Option<&str>, condition: Condition) -> Endpoint {
        Endpoint {
            addr: BackendAddr { ip: Ipv4Addr::new(10, 0, 0, last).into(), port: 80 },
            locality: Locality {
                cluster: Some(cluster.into()),
                zone: Some(zone.into()),
                region: region.map(Into::into),
                node: None,
            }
            .into(),
            condition,
        }
    }

    fn share_by_tier(w: &[Weighted]) -> Vec<f64> {
        let mut by = [0.0; 3];
        for x in w {
            by[x.tier()] += x.share;
        }
        by.iter().map(|s| (s * 1000.0).round() / 1000.0).collect()
    }

    use Condition::{NotReady, Ready, Terminating};

    #[test]
    fn all_local_ready_takes_everything() {
        let eps = [
            ep(1, "cluster-a", "r1-a", Some("r1"), Ready),
            ep(2, "cluster-a", "r1-a", Some("r1"), Ready),
            ep(3, "cluster-b", "r1-b", Some("r1"), Ready),
            ep(4, "cluster-c", "r2-a", None, Ready),
        ];
        let w = weights(&eps, None, &DEFAULT_TIERS, &node());
        assert_eq!(share_by_tier(&w), [1.0, 0.0, 0.0]);
        assert_eq!(w.len(), 2);
        assert!(w.iter().all(|x| (x.share - 0.5).abs() < 1e-9));
    }

    #[test]
    fn half_ready_spills_thirty_percent_to_the_next_tier() {
        let eps = [
            ep(1, "cluster-a", "r1-a", Some("r1"), Ready),
            ep(2, "cluster-a", "r1-a", Some("r1"), NotReady),
            ep(3, "cluster-b", "r1-b", Some("r1"), Ready),
            ep(4, "cluster-c", "r2-a", None, Ready),
        ];
        assert_eq!(share_by_tier(&weights(&eps, None, &DEFAULT_TIERS, &node())), [0.7, 0.3, 0.0]);
    }

    #[test]
    fn a_tier_without_ready_endpoints_takes_nothing_and_regions_come_from_the_cluster_map() {
        let eps = [
            ep(1, "cluster-a", "r1-a", Some("r1"), NotReady),
            ep(3, "cluster-b", "r1-b", Some("r1"), NotReady),
            // cluster-c has no region label: the node's --cluster-region map says r2.
            ep(4, "cluster-c", "r2-a", None, Ready),
        ];
        let w = weights(&eps, None, &DEFAULT_TIERS, &node());
        assert_eq!(share_by_tier(&w), [0.0, 0.0, 1.0]);
    }

    #[test]
    fn spill_rule_matches_envoy_priority_loads() {
        assert_eq!(tier_loads(&[1.0, 1.0]), [1.0, 0.0]);
        assert_eq!(tier_loads(&[0.7, 1.0]), [0.7, 0.30000000000000004]);
        assert_eq!(tier_loads(&[0.0, 0.0]), [0.0, 0.0]);
        let scaled = tier_loads(&[0.5, 0.2]);
        assert!((scaled[0] - 0.5 / 0.7).abs() < 1e-9 && (scaled[1] - 0.2 / 0.7).abs() < 1e-9);
        assert!((tier_health(1, 2) - 0.7).abs() < 1e-9);
        assert_eq!(tier_health(3, 4), 1.0);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_nothing_is_ready() {
        let eps = [ep(1, "cluster-a", "r1-a", None, Terminating), ep(2, "cluster-b", "r1-b", None, NotReady)];
        let w = weights(&eps, None, &DEFAULT_TIERS, &node());
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].addr.ip, Ipv4Addr::new(10, 0, 0, 1));
        let eps = [ep(1, "cluster-a", "r1-a", None, Terminating), ep(2, "cluster-b", "r1-b", None, Ready)];
        let w = weights(&eps, None, &DEFAULT_TIERS, &node());
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].addr.ip, Ipv4Addr::new(10, 0, 0, 2));
    }

    #[test]
    fn cluster_weights_split_within_a_tier_and_zero_drains() {
        let eps = [
            ep(1, "cluster-a", "x", None, Ready),
            ep(2, "cluster-a", "x", None, Ready),
            ep(3, "cluster-b", "y", None, Ready),
        ];
        let cw = parse_cluster_weights("cluster-a=90, cluster-b=10").unwrap();
        let w = weights(&eps, Some(&cw), &[Tier::Any], &node());
        let cluster = |x: &Weighted| eps.iter().find(|e| e.addr == x.addr).and_then(|e| e.locality.cluster.clone());
        let a: f64 = w.iter().filter(|x| cluster(x).as_deref() == Some("cluster-a")).map(|x| x.share).sum();
        assert!((a - 0.9).abs() < 1e-9, "{w:?}");
        let cw = parse_cluster_weights("cluster-a=0,*=5").unwrap();
        let w = weights(&eps, Some(&cw), &[Tier::Any], &node());
        assert_eq!(w.len(), 1);
        assert_eq!(cluster(&w[0]).as_deref(), Some("cluster-b"));
        // A drained local tier spills entirely.
        let eps = [ep(1, "cluster-a", "r1-a", Some("r1"), Ready), ep(3, "cluster-b", "r1-b", Some("r1"), Ready)];
        let cw = parse_cluster_weights("cluster-a=0,cluster-b=1").unwrap();
        assert_eq!(share_by_tier(&weights(&eps, Some(&cw), &DEFAULT_TIERS, &node())), [0.0, 1.0, 0.0]);
    }

    #[test]
    fn a_weighted_backend_takes_32_bytes() {
        // One per backend of every frontend: a million at 100,000 services.
        assert_eq!(std::mem::size_of::<Weighted>(), 32);
    }

    #[test]
    fn cluster_selection_order_self_then_region_then_any() {
        let tiers = parse_tiers("cluster,region,any").unwrap();
        let eps = [
            ep(1, "cluster-a", "z1", None, Ready),
            ep(2, "cluster-b", "z2", Some("r1"), Ready),
            ep(3, "cluster-c", "z3", None, Ready),
        ];
        let w = weights(&eps, None, &tiers, &node());
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].addr, eps[0].addr, "cluster-a's endpoint");
        let eps = [ep(2, "cluster-b", "z2", Some("r1"), Ready), ep(3, "cluster-c", "z3", None, Ready)];
        assert_eq!(weights(&eps, None, &tiers, &node())[0].tier, 1);
    }

    #[test]
    fn parsing_errors_say_what_is_wrong() {
        assert!(parse_tiers("zone,planet").unwrap_err().contains("unknown tier \"planet\""));
        assert!(parse_tiers("zone,zone").unwrap_err().contains("twice"));
        assert!(parse_cluster_weights("a=1,b").unwrap_err().contains("\"b\" is not CLUSTER=WEIGHT"));
        assert!(parse_cluster_weights("a=-1").unwrap_err().contains("whole number"));
        assert!(parse_cluster_weights("a=1,a=2").unwrap_err().contains("twice"));
        assert_eq!(TrafficDistribution::parse(Some("PreferClose")), Some(TrafficDistribution::PreferSameZone));
        assert_eq!(TrafficDistribution::parse(Some("SomethingNew")), None);
    }
}
