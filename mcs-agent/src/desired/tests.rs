//! The desired state's tests: frontends, ports by name, weights, VIP
//! safety, and the incremental model against the whole-snapshot pass.

use super::*;
use crate::source::manifests::parse_documents;

fn snapshot(yaml: &str) -> Snapshot {
    let (snapshot, errors) = parse_documents(&Origin("test.yaml".into()), yaml);
    assert!(errors.is_empty(), "{errors:?}");
    snapshot
}

const IMPORT: &str = r#"
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {name: web, namespace: demo}
spec:
  type: ClusterSetIP
  ips: ["10.96.0.10"]
  ports:
  - {name: http, port: 80, protocol: TCP}
  - {name: tcp2, port: 4242}
  - {name: dns, port: 53, protocol: UDP}
"#;

fn slice(name: &str, cluster: &str, endpoints: &str) -> String {
    format!(
        r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: demo
  labels:
    multicluster.kubernetes.io/service-name: web
    multicluster.kubernetes.io/source-cluster: {cluster}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: tcp2, port: 42, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints: {endpoints}
"#
    )
}

fn addrs(state: &DesiredState, vip_port: u16, protocol: Protocol) -> Vec<String> {
    let key = FrontendKey { vip: Ipv4Addr::new(10, 96, 0, 10).into(), port: vip_port, protocol };
    state.frontends[&key].backends().map(ToString::to_string).collect()
}

#[test]
fn sockets_stay_with_ready_drained_and_terminating_endpoints_only() {
    // Cluster b drained by weight; 10.1.0.2 not ready; 10.1.0.3 terminating but serving.
    let annotated = IMPORT.replace(
        "metadata: {name: web, namespace: demo}",
        "metadata: {name: web, namespace: demo, annotations: {mcs-agent.io/cluster-weights: \"a=1,b=0\"}}",
    );
    let yaml = format!(
        "{annotated}{}{}",
        slice(
            "web-a",
            "a",
            r#"[{addresses: ["10.1.0.1"]}, {addresses: ["10.1.0.2"], conditions: {ready: false}},
                   {addresses: ["10.1.0.3"], conditions: {ready: false, serving: true, terminating: true}}]"#
        ),
        slice("web-b", "b", r#"[{addresses: ["10.2.0.1"]}]"#)
    );
    let (state, _) = compute(&snapshot(&yaml), &Policy::default());
    let key = FrontendKey { vip: Ipv4Addr::new(10, 96, 0, 10).into(), port: 53, protocol: Protocol::Udp };
    let frontend = &state.frontends[&key];
    let keeps = |ip: [u8; 4]| frontend.keeps_sockets_to(&BackendAddr { ip: Ipv4Addr::from(ip).into(), port: 5353 });
    assert!(keeps([10, 1, 0, 1]), "ready");
    assert!(keeps([10, 2, 0, 1]), "drained by weight: still a member");
    assert!(keeps([10, 1, 0, 3]), "terminating but serving: draining");
    assert!(!keeps([10, 1, 0, 2]), "not ready: gone");
    assert!(!keeps([10, 9, 9, 9]), "never listed");
    assert!(!frontend.keeps_sockets_to(&BackendAddr { ip: Ipv4Addr::new(10, 1, 0, 1).into(), port: 53 }), "other port");
}

#[test]
fn ports_map_by_name_and_protocol_and_only_ready_endpoints_serve() {
    let yaml = format!(
        "{IMPORT}{}{}",
        slice(
            "web-a",
            "cluster-a",
            r#"[{addresses: ["10.1.0.2"]}, {addresses: ["10.1.0.3"], conditions: {ready: false}}]"#
        ),
        slice("web-b", "cluster-b", r#"[{addresses: ["10.2.0.2"], conditions: {ready: true}}]"#)
    );
    let (state, errors) = compute(&snapshot(&yaml), &Policy::default());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(state.frontends.len(), 3);
    assert_eq!(addrs(&state, 80, Protocol::Tcp), ["10.1.0.2:8080", "10.2.0.2:8080"]);
    assert_eq!(addrs(&state, 4242, Protocol::Tcp), ["10.1.0.2:42", "10.2.0.2:42"]);
    assert_eq!(addrs(&state, 53, Protocol::Udp), ["10.1.0.2:5353", "10.2.0.2:5353"]);
    let key = FrontendKey { vip: Ipv4Addr::new(10, 96, 0, 10).into(), port: 80, protocol: Protocol::Tcp };
    let frontend = &state.frontends[&key];
    let second = frontend.endpoint(&frontend.weights[1].addr).expect("an endpoint");
    assert_eq!(second.locality.cluster.as_deref(), Some("cluster-b"));
    assert_eq!(state.frontends[&key].endpoints.len(), 3, "the unready endpoint is kept for tier health");
}

#[test]
fn a_slice_port_listed_twice_by_name_and_protocol_takes_its_last_number() {
    // "http" twice, and an unnamed port listed after named ones: the lookup
    // is by name and protocol, whatever the order in the slice.
    let ports = "- {name: http, port: 8080, protocol: TCP}\n- {name: tcp2, port: 42, protocol: TCP}";
    let reordered = "- {name: tcp2, port: 42, protocol: TCP}\n- {name: http, port: 8080, protocol: TCP}\n- {name: http, port: 9090, protocol: TCP}\n- {name: dns, port: 5353, protocol: UDP}";
    let yaml = format!("{IMPORT}{}", slice("web-a", "a", r#"[{addresses: ["10.1.0.2"]}]"#).replace(ports, reordered));
    let (state, errors) = compute(&snapshot(&yaml), &Policy::default());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(addrs(&state, 80, Protocol::Tcp), ["10.1.0.2:9090"]);
    assert_eq!(addrs(&state, 4242, Protocol::Tcp), ["10.1.0.2:42"]);
    assert_eq!(addrs(&state, 53, Protocol::Udp), ["10.1.0.2:5353"]);
}

#[test]
fn headless_imports_and_unlabelled_or_foreign_slices_produce_nothing() {
    let yaml = IMPORT.replace("ClusterSetIP", "Headless") + &slice("web-a", "a", r#"[{addresses: ["10.1.0.2"]}]"#);
    let (state, errors) = compute(&snapshot(&yaml), &Policy::default());
    assert!(errors.is_empty() && state.frontends.is_empty());

    let orphan =
        slice("other", "a", r#"[{addresses: ["10.1.0.2"]}]"#).replace("service-name: web", "service-name: nope");
    let (state, errors) = compute(&snapshot(&format!("{IMPORT}{orphan}")), &Policy::default());
    assert!(errors.is_empty());
    assert!(state.frontends.values().all(|f| f.weights.is_empty()));
}

#[test]
fn bad_fields_are_named_and_only_that_object_is_skipped() {
    let cases = [
        (IMPORT.replace("port: 80,", "port: 70000,"), "spec.ports[0].port", "70000 is out of range"),
        (IMPORT.replace(r#"["10.96.0.10"]"#, r#"["10.96.0.x"]"#), "spec.ips[0]", "not an IP address"),
        (IMPORT.replace(r#"["10.96.0.10"]"#, r#"["10.96.0.10", "fd00::1", "fd00::2"]"#), "spec.ips", "at most 2"),
    ];
    let healthy = r#"
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {name: ok, namespace: demo}
spec: {type: ClusterSetIP, ips: ["10.96.0.11"], ports: [{port: 80}]}
"#;
    for (yaml, field, message) in cases {
        let (state, errors) = compute(&snapshot(&format!("{yaml}{healthy}")), &Policy::default());
        assert_eq!(errors.len(), 1, "{errors:?}");
        let text = errors[0].to_string();
        assert!(text.starts_with("test.yaml"), "{text}");
        assert!(text.contains("ServiceImport demo/web"), "{text}");
        assert!(text.contains(field) && text.contains(message), "{text}");
        assert_eq!(state.frontends.len(), 1, "the healthy import must still be served");
    }
}

#[test]
fn a_port_with_an_unsupported_protocol_is_skipped_and_the_other_ports_serve() {
    for (protocol, message) in [("SCTP", "SCTP is not supported"), ("ICMP", "unknown protocol")] {
        let import = IMPORT.replace("protocol: UDP", &format!("protocol: {protocol}"));
        let slice_yaml = slice("web-a", "a", r#"[{addresses: ["10.1.0.1"]}]"#)
            .replace("ports:\n", &format!("ports:\n- {{name: sctp, port: 9, protocol: {protocol}}}\n"));
        let (state, errors) = compute(&snapshot(&format!("{import}{slice_yaml}")), &Policy::default());
        let texts: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert!(
            texts.iter().any(|t| t.contains("ServiceImport demo/web: spec.ports[2].protocol")
                && t.contains(message)
                && t.contains("this port is not served")),
            "{texts:?}"
        );
        assert!(texts.iter().any(|t| t.contains("EndpointSlice demo/web-a: ports[0].protocol")), "{texts:?}");
        assert_eq!(addrs(&state, 80, Protocol::Tcp), ["10.1.0.1:8080"], "the TCP ports keep working");
        assert_eq!(state.frontends.len(), 2, "http and tcp2; not the {protocol} port");
    }
}

#[test]
fn a_bad_slice_is_skipped_and_the_others_still_serve() {
    let yaml = format!(
        "{IMPORT}{}{}",
        slice("web-a", "a", r#"[{addresses: ["10.1.0.999"]}]"#),
        slice("web-b", "b", r#"[{addresses: ["10.2.0.2"]}]"#)
    );
    let (state, errors) = compute(&snapshot(&yaml), &Policy::default());
    assert_eq!(errors.len(), 1);
    assert!(errors[0].to_string().contains("EndpointSlice demo/web-a: endpoints[0].addresses[0]"));
    assert_eq!(addrs(&state, 80, Protocol::Tcp), ["10.2.0.2:8080"]);
}

#[test]
fn addresses_that_can_never_be_a_vip_are_refused_with_the_field() {
    for (vip, why) in [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("0.0.0.0", "unspecified"),
    ] {
        let yaml = IMPORT.replace("10.96.0.10", vip);
        let (state, errors) = compute(&snapshot(&yaml), &Policy::default());
        assert!(state.frontends.is_empty(), "{vip} served");
        let message = errors[0].to_string();
        assert!(message.contains("demo/web: spec.ips[0]") && message.contains(why), "{message}");
    }
}

#[test]
fn a_vip_may_not_capture_a_pod_or_the_node() {
    // An import whose ClusterSetIP is another service's pod.
    let pod = slice("web-a", "a", r#"[{addresses: ["10.96.0.10"]}]"#);
    let (state, errors) = compute(&snapshot(&format!("{IMPORT}{pod}")), &Policy::default());
    assert!(state.frontends.is_empty());
    assert!(
        errors[0]
            .to_string()
            .contains("spec.ips[0]: 10.96.0.10 is the address of an endpoint in EndpointSlice demo/web-a"),
        "{}",
        errors[0]
    );
    // The node's own address.
    let policy = Policy { node_addresses: [Ipv4Addr::new(10, 96, 0, 10).into()].into(), ..Policy::default() };
    let (state, errors) = compute(&snapshot(IMPORT), &policy);
    assert!(state.frontends.is_empty());
    assert!(errors[0].to_string().contains("is an address of this node"), "{}", errors[0]);
}

#[test]
fn the_allow_list_bounds_clusterset_ips() {
    let policy = Policy { vip_cidrs: vec!["10.97.0.0/16".parse().unwrap()], ..Policy::default() };
    let (state, errors) = compute(&snapshot(IMPORT), &policy);
    assert!(state.frontends.is_empty());
    assert!(errors[0].to_string().contains("spec.ips[0]: 10.96.0.10 is outside --clusterset-ip-cidr 10.97.0.0/16"));
    let policy = Policy { vip_cidrs: vec!["10.96.0.0/16".parse().unwrap()], ..Policy::default() };
    let (state, errors) = compute(&snapshot(IMPORT), &policy);
    assert!(errors.is_empty() && !state.frontends.is_empty());
}

#[test]
fn the_import_holding_a_vip_keeps_it_and_else_the_oldest_wins() {
    // "aaa" sorts first, but "web" serves the VIP today: a newcomer never takes it.
    let newcomer = IMPORT.replace("name: web,", "name: aaa,");
    let yaml = format!("{IMPORT}---{newcomer}");
    let held = BTreeMap::from([(Ipv4Addr::new(10, 96, 0, 10).into(), "demo/web".to_owned())]);
    let runtime = Runtime { held, ..Runtime::default() };
    let (state, errors) = compute_with(&snapshot(&yaml), &Policy::default(), &runtime);
    assert!(state.frontends.values().all(|f| f.service == "demo/web"));
    assert!(
        errors[0].to_string().contains("demo/aaa: spec.ips[0]: 10.96.0.10 is already the ClusterSetIP of demo/web")
    );
    // Nobody holds it yet: the older object wins, whatever the names.
    let old =
        IMPORT.replace("metadata: {name: web,", "metadata: {creationTimestamp: \"2026-01-01T00:00:00Z\", name: web,");
    let young =
        newcomer.replace("metadata: {name: aaa,", "metadata: {creationTimestamp: \"2026-06-01T00:00:00Z\", name: aaa,");
    let (state, _) = compute(&snapshot(&format!("{old}---{young}")), &Policy::default());
    assert!(state.frontends.values().all(|f| f.service == "demo/web"));
}

/// Shares per cluster of the http frontend.
fn shares(state: &DesiredState) -> BTreeMap<String, f64> {
    let key = FrontendKey { vip: Ipv4Addr::new(10, 96, 0, 10).into(), port: 80, protocol: Protocol::Tcp };
    let mut by: BTreeMap<String, f64> = BTreeMap::new();
    let frontend = &state.frontends[&key];
    for w in &frontend.weights {
        let cluster = frontend.endpoint(&w.addr).and_then(|e| e.locality.cluster.clone());
        *by.entry(cluster.unwrap_or_default()).or_default() += (w.share * 1000.0).round() / 1000.0;
    }
    by
}

const SELECTOR_RESULTS: &str = "status:\n  clusterSelectorResults:\n  - clusters: [self]\n  - clusters: [self, peer]\n  - clusters: [self, peer, far]\n";

fn three_clusters(self_ready: bool, peer_ready: bool) -> String {
    let ready = |r: bool| if r { "true" } else { "false" };
    format!(
        "{IMPORT}{SELECTOR_RESULTS}{}{}{}",
        slice(
            "web-self",
            "self",
            &format!("[{{addresses: [\"10.1.0.1\"], conditions: {{ready: {}}}}}]", ready(self_ready))
        ),
        slice(
            "web-peer",
            "peer",
            &format!("[{{addresses: [\"10.2.0.1\"], conditions: {{ready: {}}}}}]", ready(peer_ready))
        ),
        slice("web-far", "far", r#"[{addresses: ["10.3.0.1"]}]"#),
    )
}

#[test]
fn kep_5939_uses_the_first_result_with_a_ready_endpoint_then_all_clusters() {
    let any = Policy { tiers: vec![locality::Tier::Any], ..Policy::default() };
    let (state, errors) = compute(&snapshot(&three_clusters(true, true)), &any);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(shares(&state), BTreeMap::from([("self".into(), 1.0)]), "the first result serves alone");
    let (state, _) = compute(&snapshot(&three_clusters(false, true)), &any);
    assert_eq!(shares(&state), BTreeMap::from([("peer".into(), 1.0)]), "self down: its region peers take over");
    // Nothing ready in any result: all clusters (here: only far is ready).
    let empty = three_clusters(false, false).replace("  - clusters: [self, peer, far]\n", "");
    let (state, _) = compute(&snapshot(&empty), &any);
    assert_eq!(shares(&state), BTreeMap::from([("far".into(), 1.0)]));
    // Selection first, then tiers: the node's own zone does not pull traffic
    // out of the selected clusters.
    let near_far = Policy {
        node: NodeLocality { cluster: Some("far".into()), ..NodeLocality::default() },
        tiers: vec![locality::Tier::Cluster, locality::Tier::Any],
        ..Policy::default()
    };
    let (state, _) = compute(&snapshot(&three_clusters(true, true)), &near_far);
    assert_eq!(shares(&state), BTreeMap::from([("self".into(), 1.0)]));
}

#[test]
fn an_ejected_cluster_counts_as_having_no_usable_endpoint() {
    let any = Policy { tiers: vec![locality::Tier::Any], ..Policy::default() };
    let self_pod = BackendAddr { ip: Ipv4Addr::new(10, 1, 0, 1).into(), port: 8080 };
    let runtime = Runtime { ejected: [self_pod].into(), ..Runtime::default() };
    let (state, _) = compute_with(&snapshot(&three_clusters(true, true)), &any, &runtime);
    assert_eq!(shares(&state), BTreeMap::from([("peer".into(), 1.0)]));
}

#[test]
fn an_unknown_selector_result_shape_is_reported_and_all_clusters_serve() {
    let yaml = format!(
        "{IMPORT}status:\n  clusterSelectorResults: [{{clusters: self}}]\n{}",
        slice("web-a", "a", r#"[{addresses: ["10.1.0.1"]}]"#)
    );
    let (state, errors) = compute(&snapshot(&yaml), &Policy::default());
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].to_string().contains("status.clusterSelectorResults[0].clusters: is not a list"),
        "{}",
        errors[0]
    );
    assert_eq!(addrs(&state, 80, Protocol::Tcp), ["10.1.0.1:8080"], "the import is still served");
}

#[test]
fn ejected_backends_spill_their_tier_and_probing_ones_get_a_small_share() {
    let policy = Policy {
        node: NodeLocality { cluster: Some("a".into()), ..NodeLocality::default() },
        tiers: vec![locality::Tier::Cluster, locality::Tier::Any],
        ..Policy::default()
    };
    let yaml = format!(
        "{IMPORT}{}{}",
        slice("web-a", "a", r#"[{addresses: ["10.1.0.1"]}, {addresses: ["10.1.0.2"]}]"#),
        slice("web-b", "b", r#"[{addresses: ["10.2.0.1"]}]"#)
    );
    let pod = |last| BackendAddr { ip: Ipv4Addr::new(10, 1, 0, last).into(), port: 8080 };
    let (state, _) = compute(&snapshot(&yaml), &policy);
    assert_eq!(shares(&state), BTreeMap::from([("a".into(), 1.0)]));
    // One of two local pods ejected: tier health 1.4 × 1/2 = 70 %.
    let ejected = Runtime { ejected: [pod(2)].into(), ..Runtime::default() };
    let (state, _) = compute_with(&snapshot(&yaml), &policy, &ejected);
    assert_eq!(shares(&state), BTreeMap::from([("a".into(), 0.7), ("b".into(), 0.3)]));
    // Back and probing: 5 % for it, the rest as before.
    let probing = Runtime { probing: [pod(2)].into(), ..Runtime::default() };
    let (state, _) = compute_with(&snapshot(&yaml), &policy, &probing);
    let key = FrontendKey { vip: Ipv4Addr::new(10, 96, 0, 10).into(), port: 80, protocol: Protocol::Tcp };
    let probe = state.frontends[&key].weights.iter().find(|w| w.addr == pod(2)).unwrap().share;
    assert!((probe - PROBE_SHARE).abs() < 1e-9, "{probe}");
    let total: f64 = state.frontends[&key].weights.iter().map(|w| w.share).sum();
    assert!((total - 1.0).abs() < 1e-9);
}

#[test]
fn a_duplicate_vip_rejects_the_later_import() {
    let second = IMPORT.replace("name: web,", "name: zzz,");
    let (state, errors) = compute(&snapshot(&format!("{IMPORT}---{second}")), &Policy::default());
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].to_string().contains("demo/zzz: spec.ips[0]: 10.96.0.10 is already the ClusterSetIP of demo/web")
    );
    assert!(state.frontends.values().all(|f| f.service == "demo/web"));
}

#[test]
fn derived_imports_are_served_unless_left_to_kube_proxy() {
    let yaml = IMPORT.replace(
            "metadata: {name: web, namespace: demo}",
            "metadata: {name: web, namespace: demo, annotations: {multicluster.kubernetes.io/derived-service: derived-abc}}",
        );
    let (state, _) = compute(&snapshot(&yaml), &Policy::default());
    assert_eq!(state.frontends.len(), 3, "served by default: our TC hook runs before kube-proxy");
    let skip = Policy { skip_derived: true, ..Policy::default() };
    assert!(compute(&snapshot(&yaml), &skip).0.frontends.is_empty());
}

fn service(namespace: &str, name: &str, owner_imports: &[&str]) -> ServiceIp {
    let owner_imports = owner_imports.iter().map(|o| (*o).to_owned()).collect();
    ServiceIp { namespace: namespace.into(), name: name.into(), owner_imports }
}

fn with_cluster_ip(yaml: &str, owner: ServiceIp) -> Snapshot {
    let mut snapshot = snapshot(yaml);
    snapshot.cluster_ips.insert(Ipv4Addr::new(10, 96, 0, 10).into(), owner);
    snapshot
}

#[test]
fn a_vip_that_is_a_services_cluster_ip_is_refused_naming_the_service() {
    let (state, errors) =
        compute(&with_cluster_ip(IMPORT, service("kube-system", "kube-dns", &[])), &Policy::default());
    assert!(state.frontends.is_empty(), "kube-dns's traffic must not be captured");
    let text = errors[0].to_string();
    assert!(
        text.contains(
            "ServiceImport demo/web: spec.ips[0]: 10.96.0.10 is the ClusterIP of Service kube-system/kube-dns"
        ),
        "{text}"
    );
    // Another import's derived Service is not this import's.
    let other = IMPORT.replace(
            "metadata: {name: web, namespace: demo}",
            "metadata: {name: web, namespace: demo, annotations: {multicluster.kubernetes.io/derived-service: derived-web}}",
        );
    let (state, errors) = compute(&with_cluster_ip(&other, service("demo", "derived-api", &[])), &Policy::default());
    assert!(state.frontends.is_empty() && errors[0].to_string().contains("Service demo/derived-api"));
    // Nor is a Service of the same name in another namespace.
    let (state, _) = compute(&with_cluster_ip(&other, service("prod", "derived-web", &[])), &Policy::default());
    assert!(state.frontends.is_empty());
}

#[test]
fn each_derived_service_convention_lets_the_import_serve_its_services_cluster_ip() {
    let ranges = Policy {
        service_ranges: vec![ServiceRange { net: "10.96.0.0/12".parse().unwrap(), source: "--service-cidr".into() }],
        ..Policy::default()
    };
    let annotated = |key: &str| {
        IMPORT.replace(
            "metadata: {name: web, namespace: demo}",
            &format!("metadata: {{name: web, namespace: demo, annotations: {{{key}: derived-abc}}}}"),
        )
    };
    let cases = [
        ("mcs-api controller and Cilium", annotated(ANNOTATION_DERIVED_SERVICE), service("demo", "derived-abc", &[])),
        ("AWS Cloud Map", annotated("multicluster.k8s.aws/derived-service"), service("demo", "derived-abc", &[])),
        ("ownerReference", IMPORT.to_owned(), service("demo", "anything", &["web"])),
    ];
    for (convention, yaml, owner) in cases {
        // Inside the Service range too: the derived Service's address is allowed there.
        let (state, errors) = compute(&with_cluster_ip(&yaml, owner), &ranges);
        assert!(errors.is_empty(), "{convention}: {errors:?}");
        assert_eq!(state.frontends.len(), 3, "{convention}: served");
    }
}

#[test]
fn a_vip_in_a_service_range_is_refused_naming_the_range() {
    let policy = Policy {
        service_ranges: vec![ServiceRange {
            net: "10.96.0.0/12".parse().unwrap(),
            source: "ServiceCIDR kubernetes".into(),
        }],
        ..Policy::default()
    };
    let (state, errors) = compute(&snapshot(IMPORT), &policy);
    assert!(state.frontends.is_empty());
    let text = errors[0].to_string();
    assert!(
        text.contains("spec.ips[0]: 10.96.0.10 lies in the Service range 10.96.0.0/12 (ServiceCIDR kubernetes)"),
        "{text}"
    );
    // Outside every range, with no Service at the address: served.
    let outside = IMPORT.replace("10.96.0.10", "198.18.0.10");
    let (state, errors) = compute(&snapshot(&outside), &policy);
    assert!(errors.is_empty() && state.frontends.len() == 3, "{errors:?}");
}

#[test]
fn a_service_that_appears_or_goes_recomputes_only_the_import_at_its_address() {
    let other = IMPORT.replace("name: web,", "name: api,").replace("10.96.0.10", "198.18.0.11");
    let (snap, errors) = parse_documents(&Origin("t.yaml".into()), &format!("{IMPORT}---{other}"));
    assert!(errors.is_empty(), "{errors:?}");
    let mut model = Model::default();
    let (policy, runtime) = (Policy::default(), Runtime::default());
    model.replace(group_snapshot(&snap), &policy, &runtime);
    assert_eq!(model.state().frontends.len(), 6);
    let dns = ClusterIps::from([(Ipv4Addr::new(10, 96, 0, 10).into(), service("kube-system", "kube-dns", &[]))]);
    let delta = model.set_cluster_ips(dns.clone(), &policy, &runtime);
    assert_eq!(delta.services, 1, "only demo/web claims 10.96.0.10");
    assert_eq!(model.state().frontends.len(), 3, "demo/web's three frontends are withdrawn");
    assert!(delta.added[0].to_string().contains("Service kube-system/kube-dns"));
    assert_eq!(model.set_cluster_ips(dns, &policy, &runtime).services, 0, "nothing changed: nothing recomputed");
    let delta = model.set_cluster_ips(ClusterIps::new(), &policy, &runtime);
    assert_eq!((delta.services, delta.removed.len()), (1, 1), "the Service went: the problem is resolved");
    assert_eq!(model.state().frontends.len(), 6);
}

#[test]
fn a_pending_import_is_valid_but_not_served() {
    let pending = IMPORT.replace(r#"ips: ["10.96.0.10"]"#, "ips: []");
    let (state, errors) = compute(&snapshot(&pending), &Policy::default());
    assert!(errors.is_empty() && state.frontends.is_empty());
}

const DUAL_STACK: &str = r#"
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {name: web, namespace: demo}
spec:
  type: ClusterSetIP
  ips: ["10.96.0.10", "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a4
  namespace: demo
  labels: {multicluster.kubernetes.io/service-name: web, multicluster.kubernetes.io/source-cluster: a}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: ["10.1.0.1"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a6
  namespace: demo
  labels: {multicluster.kubernetes.io/service-name: web, multicluster.kubernetes.io/source-cluster: a}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: ["fd00:1::1"]}, {addresses: ["fd00:1::2"]}]
"#;

#[test]
fn each_ip_of_a_dual_stack_import_is_a_frontend_over_endpoints_of_its_family() {
    let (state, errors) = compute(&snapshot(DUAL_STACK), &Policy::default());
    assert!(errors.is_empty(), "{errors:?}");
    let v4 = &state.frontends[&FrontendKey { vip: "10.96.0.10".parse().unwrap(), port: 80, protocol: Protocol::Tcp }];
    let v6 = &state.frontends[&FrontendKey { vip: "fd00:96::10".parse().unwrap(), port: 80, protocol: Protocol::Tcp }];
    assert_eq!(v4.backends().map(ToString::to_string).collect::<Vec<_>>(), ["10.1.0.1:8080"]);
    assert_eq!(v6.backends().map(ToString::to_string).collect::<Vec<_>>(), ["[fd00:1::1]:8080", "[fd00:1::2]:8080"]);
    assert_eq!(v4.service, v6.service);
}

#[test]
fn ip_families_must_match_ips_and_a_family_the_node_lacks_is_reported() {
    let swapped = DUAL_STACK.replace("ipFamilies: [IPv4, IPv6]", "ipFamilies: [IPv6, IPv4]");
    let (state, errors) = compute(&snapshot(&swapped), &Policy::default());
    assert!(state.frontends.is_empty());
    assert!(
        errors[0].to_string().contains("demo/web: spec.ipFamilies[0]: \"IPv6\" does not match spec.ips[0] 10.96.0.10"),
        "{errors:?}"
    );
    let short = DUAL_STACK.replace("ipFamilies: [IPv4, IPv6]", "ipFamilies: [IPv4]");
    let (_, errors) = compute(&snapshot(&short), &Policy::default());
    assert!(errors[0].to_string().contains("spec.ipFamilies: lists 1 families for 2 addresses"), "{errors:?}");
    let two_v4 = DUAL_STACK.replace(r#""fd00:96::10""#, r#""10.96.0.11""#).replace("ipFamilies: [IPv4, IPv6]", "");
    let (_, errors) = compute(&snapshot(&two_v4), &Policy::default());
    assert!(errors[0].to_string().contains("spec.ips[1]: a second IPv4 address"), "{errors:?}");

    let no_v6 = Policy { ipv6: false, ..Policy::default() };
    let (state, errors) = compute(&snapshot(DUAL_STACK), &no_v6);
    assert_eq!(state.frontends.len(), 1, "the IPv4 VIP is still served");
    assert!(errors[0].to_string().contains("spec.ips[1]: fd00:96::10 is IPv6 and this node has IPv6 disabled"));
}

#[test]
fn ipv6_vips_are_checked_like_ipv4_ones() {
    for (vip, why) in [("::1", "loopback"), ("fe80::1", "link-local"), ("::ffff:10.96.0.10", "IPv4-mapped")] {
        let yaml = DUAL_STACK.replace("fd00:96::10", vip);
        let (_, errors) = compute(&snapshot(&yaml), &Policy::default());
        assert!(errors[0].to_string().contains(why), "{vip}: {errors:?}");
    }
    // A pod's address, and a range per family.
    let (_, errors) = compute(&snapshot(&DUAL_STACK.replace("fd00:96::10", "fd00:1::2")), &Policy::default());
    assert!(errors[0].to_string().contains("capture that pod's traffic"), "{errors:?}");
    let policy = Policy {
        vip_cidrs: vec!["10.96.0.0/16".parse().unwrap(), "fd00:97::/112".parse().unwrap()],
        ..Policy::default()
    };
    let (state, errors) = compute(&snapshot(DUAL_STACK), &policy);
    assert_eq!(state.frontends.len(), 1);
    assert!(errors[0].to_string().contains("spec.ips[1]: fd00:96::10 is outside --clusterset-ip-cidr fd00:97::/112"));
    let slice = DUAL_STACK.replace(r#"addresses: ["fd00:1::1"]"#, r#"addresses: ["10.1.0.9"]"#);
    let (_, errors) = compute(&snapshot(&slice), &Policy::default());
    assert!(
        errors[0].to_string().contains("endpoints[0].addresses[0]: \"10.1.0.9\" is not an IPv6 address"),
        "{errors:?}"
    );
}
