//! ServiceImports and EndpointSlices shaped as each MCS implementation writes
//! them (`tests/recorded/`), through the same parsing and decision code as
//! the running agent.

use std::{net::Ipv4Addr, path::Path};

use mcs_agent::{
    desired::{self, DesiredState, Policy},
    locality::NodeLocality,
    model::{FrontendKey, Origin, Protocol},
    source::manifests::parse_documents,
};

fn load(file: &str, policy: &Policy) -> DesiredState {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/recorded").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let (snapshot, parse_errors) = parse_documents(&Origin(file.into()), &text);
    assert!(parse_errors.is_empty(), "{parse_errors:?}");
    let (state, errors) = desired::compute(&snapshot, policy);
    assert!(errors.is_empty(), "{file}: {errors:?}");
    state
}

fn key(vip: [u8; 4], port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey { vip: Ipv4Addr::from(vip).into(), port, protocol }
}

fn serving(state: &DesiredState, key: &FrontendKey) -> Vec<String> {
    state.frontends[key].backends().map(ToString::to_string).collect()
}

#[test]
fn mcs_api_controller_slices_map_named_ports_per_cluster_and_skip_terminating() {
    let state = load("mcs-api-controller.yaml", &Policy::default());
    // cluster-a's http is 8080, cluster-b's is 8081: ports map by name, per slice.
    assert_eq!(serving(&state, &key([10, 96, 101, 7], 80, Protocol::Tcp)), ["10.244.1.5:8080", "10.245.0.4:8081"]);
    assert_eq!(serving(&state, &key([10, 96, 101, 7], 9090, Protocol::Tcp)), ["10.244.1.5:9090", "10.245.0.4:9090"]);
    // The derived Service is left to kube-proxy only when asked.
    let skip = Policy { skip_derived: true, ..Policy::default() };
    assert!(load("mcs-api-controller.yaml", &skip).frontends.is_empty());
}

#[test]
fn lighthouse_synthetic_endpoints_are_one_backend_per_cluster() {
    let state = load("lighthouse.yaml", &Policy::default());
    assert_eq!(serving(&state, &key([243, 0, 0, 12], 80, Protocol::Tcp)), ["100.1.45.17:80", "100.2.19.203:80"]);
    assert_eq!(serving(&state, &key([243, 0, 0, 12], 53, Protocol::Udp)), ["100.1.45.17:53", "100.2.19.203:53"]);
}

#[test]
fn cilium_shapes_keep_affinity_locality_and_ignore_ipv6_slices() {
    let policy = Policy {
        node: NodeLocality { zone: Some("eu-central-1a".into()), ..NodeLocality::default() },
        ..Policy::default()
    };
    let state = load("cilium.yaml", &policy);
    let frontend = &state.frontends[&key([10, 100, 12, 33], 50051, Protocol::Tcp)];
    assert_eq!(frontend.affinity_timeout_secs, 300);
    assert_eq!(frontend.endpoints.len(), 2, "the IPv6 slice is not served");
    assert_eq!(serving(&state, &key([10, 100, 12, 33], 50051, Protocol::Tcp)), ["10.1.0.11:50051"], "same zone first");
}

#[test]
fn aws_cloud_map_unnamed_single_ports_match() {
    let state = load("aws-cloud-map.yaml", &Policy::default());
    assert_eq!(serving(&state, &key([172, 20, 80, 119], 80, Protocol::Tcp)), ["10.10.66.181:80", "10.10.78.125:80"]);
}

#[test]
fn gke_imports_in_their_own_group_are_not_read() {
    assert!(load("gke.yaml", &Policy::default()).frontends.is_empty());
}
