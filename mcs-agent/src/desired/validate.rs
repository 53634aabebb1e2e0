//! Validation: each ServiceImport and EndpointSlice checked once when it
//! arrives, into the facts the computation of frontends reads; a bad field
//! is an [`ObjectError`] naming it.

// One module split in two: validation shares the root's types and imports.
use super::*;

#[derive(Debug)]
pub(super) struct ValidImport {
    /// Each ClusterSetIP with its index in `spec.ips` (for error messages).
    pub(super) vips: Vec<(IpAddr, usize)>,
    pub(super) ports: Vec<(FrontendKey, String)>,
    pub(super) affinity_timeout_secs: u32,
    pub(super) traffic_distribution: Option<TrafficDistribution>,
    pub(super) cluster_weights: Option<BTreeMap<String, u32>>,
    /// Ports left out (a protocol the datapath does not carry): reported,
    /// while the other ports are served.
    pub(super) skipped: Vec<ObjectError>,
}

/// Checks one ServiceImport. `Ok(None)`: valid but has no VIP to serve
/// (Headless, or no IP allocated yet).
pub(super) fn validate_import(origin: &Origin, import: &ServiceImport) -> Result<Option<ValidImport>, ObjectError> {
    let (_, name) = object_ref(&import.metadata);
    let err = ObjectError::about(origin, "ServiceImport", &import.metadata);
    if name.is_empty() {
        return Err(err("metadata.name".into(), "is required".into()));
    }
    let spec = &import.spec;
    match spec.type_.as_deref() {
        Some("ClusterSetIP") => {}
        Some("Headless") => return Ok(None),
        Some(other) => {
            return Err(err("spec.type".into(), format!("{other:?} is not ClusterSetIP or Headless")));
        }
        None => {
            return Err(err("spec.type".into(), "is required (ClusterSetIP or Headless)".into()));
        }
    }
    if spec.ips.len() > 2 {
        return Err(err(
            "spec.ips".into(),
            format!("has {} addresses; at most 2 (one per IP family) are allowed", spec.ips.len()),
        ));
    }
    let mut vips: Vec<(IpAddr, usize)> = Vec::new();
    for (i, raw) in spec.ips.iter().enumerate() {
        let ip: IpAddr =
            raw.parse().map_err(|_| err(format!("spec.ips[{i}]"), format!("{raw:?} is not an IP address")))?;
        if vips.iter().any(|(other, _)| other.is_ipv4() == ip.is_ipv4()) {
            return Err(err(
                format!("spec.ips[{i}]"),
                format!("a second {} address; one per family is allowed", family_name(ip)),
            ));
        }
        if let Some(why) = never_a_vip(ip) {
            return Err(err(format!("spec.ips[{i}]"), format!("{ip} cannot be a ClusterSetIP: {why}")));
        }
        vips.push((ip, i));
    }
    // Optional; when present it names the family of each entry of `ips`.
    if !spec.ip_families.is_empty() {
        if spec.ip_families.len() != spec.ips.len() {
            return Err(err(
                "spec.ipFamilies".into(),
                format!(
                    "lists {} families for {} addresses in spec.ips; they must match element by element",
                    spec.ip_families.len(),
                    spec.ips.len()
                ),
            ));
        }
        for (ip, i) in &vips {
            let family = &spec.ip_families[*i];
            if family != family_name(*ip) {
                return Err(err(
                    format!("spec.ipFamilies[{i}]"),
                    format!("{family:?} does not match spec.ips[{i}] {ip} ({})", family_name(*ip)),
                ));
            }
        }
    }
    let mut ports = Vec::with_capacity(spec.ports.len());
    let mut seen = BTreeSet::new();
    let mut skipped = Vec::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err(format!("spec.ports[{i}].port"), format!("{} is out of range 1-65535", port.port)))?;
        let protocol = match Protocol::parse(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(message) => {
                // Ports are independent: this one is left out, the others serve.
                skipped.push(err(format!("spec.ports[{i}].protocol"), format!("{message}; this port is not served")));
                continue;
            }
        };
        if !seen.insert((number, protocol)) {
            return Err(err(format!("spec.ports[{i}]"), format!("duplicate port {number}/{protocol}")));
        }
        ports.push((number, protocol, port.name.clone().unwrap_or_default()));
    }
    let affinity_timeout_secs = match spec.session_affinity.as_deref() {
        None | Some("" | "None") => 0,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(i64::from(DEFAULT_AFFINITY_TIMEOUT_SECS));
            if !(1..=86_400).contains(&timeout) {
                return Err(err(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                    format!("{timeout} is out of range 1-86400"),
                ));
            }
            timeout as u32
        }
        Some(other) => {
            return Err(err("spec.sessionAffinity".into(), format!("{other:?} is not ClientIP or None")));
        }
    };
    let cluster_weights = match import.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_CLUSTER_WEIGHTS)) {
        Some(value) => Some(
            locality::parse_cluster_weights(value)
                .map_err(|m| err(format!("metadata.annotations[{ANNOTATION_CLUSTER_WEIGHTS}]"), m))?,
        ),
        None => None,
    };
    if vips.is_empty() {
        return Ok(None);
    }
    let ports = ports
        .into_iter()
        .map(|(port, protocol, port_name)| {
            (FrontendKey { vip: Ipv4Addr::UNSPECIFIED.into(), port, protocol }, port_name)
        })
        .collect();
    Ok(Some(ValidImport {
        vips,
        ports,
        affinity_timeout_secs,
        traffic_distribution: TrafficDistribution::parse(spec.traffic_distribution.as_deref()),
        cluster_weights,
        skipped,
    }))
}

#[derive(Debug)]
pub(super) struct ValidSlice {
    /// Ports left out (a protocol the datapath does not carry).
    pub(super) skipped: Vec<ObjectError>,
    /// (name, protocol, port number), sorted by name and protocol: a slice
    /// has a port or two, where a map would take a node of its own.
    pub(super) ports: Vec<(String, Protocol, u16)>,
    pub(super) endpoints: Vec<(IpAddr, Arc<Locality>, Condition)>,
}

/// `IPv4` or `IPv6`, as `ipFamilies` and `addressType` spell them.
pub fn family_name(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Checks one EndpointSlice. `Ok(None)`: an FQDN slice (not served).
pub(super) fn validate_slice(origin: &Origin, slice: &EndpointSlice) -> Result<Option<ValidSlice>, ObjectError> {
    let err = ObjectError::about(origin, "EndpointSlice", &slice.metadata);
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return Ok(None),
        other => {
            return Err(err("addressType".into(), format!("{other:?} is not IPv4, IPv6 or FQDN")));
        }
    };
    let mut ports: Vec<(String, Protocol, u16)> = Vec::new();
    let mut skipped = Vec::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let protocol = match Protocol::parse(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(message) => {
                skipped.push(err(format!("ports[{i}].protocol"), format!("{message}; this port is not served")));
                continue;
            }
        };
        // A port without a number means "all ports" in the API; nothing to translate to.
        let Some(raw) = port.port else { continue };
        let number = u16::try_from(raw)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err(format!("ports[{i}].port"), format!("{raw} is out of range 1-65535")))?;
        let name = port.name.clone().unwrap_or_default();
        // A repeated name and protocol: the last one counts, as it would in a map.
        match ports.binary_search_by(|(n, p, _)| (n.as_str(), *p).cmp(&(name.as_str(), protocol))) {
            Ok(at) => ports[at].2 = number,
            Err(at) => ports.insert(at, (name, protocol, number)),
        }
    }
    ports.shrink_to_fit();
    let label = |key: &str| slice.metadata.labels.as_ref().and_then(|l| l.get(key)).cloned();
    let (cluster, region) = (label(LABEL_SOURCE_CLUSTER), label(LABEL_REGION));
    let mut endpoints = Vec::new();
    let mut localities: Vec<Arc<Locality>> = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let conditions = endpoint.conditions.as_ref();
        let condition = if conditions.and_then(|c| c.ready).unwrap_or(true) {
            Condition::Ready
        } else if conditions.and_then(|c| c.serving).unwrap_or(false)
            && conditions.and_then(|c| c.terminating).unwrap_or(false)
        {
            Condition::Terminating
        } else {
            Condition::NotReady
        };
        // Endpoints of a slice mostly share a zone (and a node, or none):
        // one allocation for each distinct locality.
        let same = |l: &&Arc<Locality>| l.zone == endpoint.zone && l.node == endpoint.node_name;
        let locality = match localities.iter().rev().find(same) {
            Some(known) => known.clone(),
            None => {
                let new = Arc::new(Locality {
                    cluster: cluster.clone(),
                    zone: endpoint.zone.clone(),
                    region: region.clone(),
                    node: endpoint.node_name.clone(),
                });
                if localities.len() < 16 {
                    localities.push(new.clone());
                }
                new
            }
        };
        for (j, raw) in endpoint.addresses.iter().enumerate() {
            let ip: IpAddr =
                if v6 { raw.parse::<Ipv6Addr>().map(IpAddr::from) } else { raw.parse::<Ipv4Addr>().map(IpAddr::from) }
                    .map_err(|_| {
                        err(
                            format!("endpoints[{i}].addresses[{j}]"),
                            format!(
                                "{raw:?} is not an {} address (addressType {})",
                                slice.address_type, slice.address_type
                            ),
                        )
                    })?;
            endpoints.push((ip, locality.clone(), condition));
        }
    }
    endpoints.shrink_to_fit();
    Ok(Some(ValidSlice { skipped, ports, endpoints }))
}

impl ValidSlice {
    /// The slice's port number for a port name and protocol.
    pub(super) fn port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        let at = self.ports.binary_search_by(|(n, p, _)| (n.as_str(), *p).cmp(&(name, protocol))).ok()?;
        Some(self.ports[at].2)
    }
}

/// `status.clusterSelectorResults` (KEP-5939): ordered sets of cluster ids.
/// `Ok(None)` when absent; `Err((field, message))` for a shape we do not know.
pub(super) fn cluster_selector_results(
    import: &ServiceImport,
) -> Result<Option<Vec<BTreeSet<String>>>, (String, String)> {
    let Some(results) = import.status.as_ref().and_then(|s| s.get("clusterSelectorResults")) else {
        return Ok(None);
    };
    let field = "status.clusterSelectorResults".to_owned();
    let list = results.as_array().ok_or_else(|| (field.clone(), "is not a list".to_owned()))?;
    list.iter()
        .enumerate()
        .map(|(i, result)| {
            let clusters = match result.get("clusters") {
                None => return Ok(BTreeSet::new()),
                Some(c) => c,
            };
            let field = format!("{field}[{i}].clusters");
            clusters
                .as_array()
                .ok_or_else(|| (field.clone(), "is not a list of cluster ids".to_owned()))?
                .iter()
                .map(|c| {
                    c.as_str().map(str::to_owned).ok_or_else(|| (field.clone(), format!("{c} is not a cluster id")))
                })
                .collect()
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Addresses that can never be a ClusterSetIP, whatever the flags say.
pub(super) fn never_a_vip(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => {
            return if ip.is_unspecified() {
                Some("the unspecified address ::")
            } else if ip.is_loopback() {
                Some("the loopback address; it would capture the pod's own traffic")
            } else if ip.is_multicast() {
                Some("a multicast address")
            } else if ip.is_unicast_link_local() {
                Some("a link-local address (fe80::/10)")
            } else if ip.to_ipv4_mapped().is_some() {
                Some("an IPv4-mapped address (::ffff:0:0/96); list the IPv4 address itself")
            } else {
                None
            };
        }
    };
    if ip.is_unspecified() || ip.octets()[0] == 0 {
        Some("an unspecified (0.0.0.0/8) address")
    } else if ip.is_loopback() {
        Some("a loopback address; it would capture the pod's own traffic")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_link_local() {
        Some("a link-local address (169.254.0.0/16, e.g. cloud metadata)")
    } else {
        None
    }
}
