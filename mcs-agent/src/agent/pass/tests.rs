//! Both sources, one result. Random ServiceImports and EndpointSlices,
//! changed a few services at a time, reach maps held in memory through the
//! manifests source (files on disk, the changed paths named) and through the
//! Kubernetes source (watch events into its stores and slice index, the
//! touched services named), each by the agent's own pass. After every
//! change both program exactly what a fresh reconciler programs from the
//! whole objects, parsed apart from either source, and both hold the state
//! and report the problems a whole-snapshot computation gives.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

use super::*;
use crate::{
    agent::sources::Source,
    desired::{DesiredState, Runtime, compute_with},
    locality::ANNOTATION_CLUSTER_WEIGHTS,
    model::{BackendAddr, Origin, ServiceImport, Snapshot},
    plan::{Applied, Capacity},
    reconcile::memory::Maps,
    source::kube::{index::Touched, offline::Feed},
    testing::Rng,
};

const SERVICES: u64 = 6;
/// ClusterSetIPs few enough that imports contend for them; the last is also
/// an endpoint's address, which no import may take.
const VIPS: [&str; 6] = ["198.18.0.1", "198.18.0.2", "198.18.0.3", "fd00:18::1", "fd00:18::2", "10.0.0.1"];
const PORT_NAMES: [&str; 3] = ["", "http", "dns"];

/// One service's objects, as the API would serve them at `version`.
fn random_service(rng: &mut Rng, i: u64, version: u64) -> Vec<Value> {
    let mut objects = Vec::new();
    if !rng.one_in(5) {
        let kind = rng.pick(&["ClusterSetIP", "ClusterSetIP", "ClusterSetIP", "ClusterSetIP", "Headless", "Bogus"]);
        let ips: Vec<&str> = (0..rng.below(3)).map(|_| rng.pick(&VIPS)).collect();
        let ports: Vec<Value> = (0..1 + rng.below(2))
            .map(|_| {
                let protocol = rng.pick(&["TCP", "TCP", "UDP", "SCTP"]);
                json!({"name": rng.pick(&PORT_NAMES), "port": rng.pick(&[53, 80, 8080]), "protocol": protocol})
            })
            .collect();
        let mut spec = json!({"type": kind, "ips": ips, "ports": ports});
        if rng.one_in(4) {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 60 + rng.below(60)}});
        }
        if rng.one_in(4) {
            spec["trafficDistribution"] = json!("PreferClose");
        }
        // What the agent does not read rides along: the Kubernetes source
        // prunes it, the manifests keep it.
        let mut metadata = json!({"name": format!("svc-{i}"), "namespace": "ns", "uid": format!("import-{i}"),
            "resourceVersion": version.to_string(), "managedFields": [{"manager": "mcs-controller"}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}});
        if !rng.one_in(3) {
            metadata["creationTimestamp"] = json!(format!("2026-01-0{}T00:00:00Z", 1 + rng.below(3)));
        }
        if rng.one_in(4) {
            metadata["annotations"][ANNOTATION_CLUSTER_WEIGHTS] = json!("east=3,west=1");
        }
        if rng.one_in(4) {
            metadata["annotations"]["multicluster.kubernetes.io/derived-service"] = json!(format!("derived-{i}"));
        }
        let mut status = json!({"clusters": [{"cluster": "east"}, {"cluster": "west"}]});
        if rng.one_in(3) {
            // KEP-5939: west first, else east.
            status["clusterSelectorResults"] = json!([{"clusters": ["west"]}, {"clusters": ["east"]}]);
        }
        objects.push(json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
            "metadata": metadata, "spec": spec, "status": status}));
    }
    for s in 0..rng.below(4) {
        let v6 = rng.one_in(3);
        let endpoints: Vec<Value> = (0..rng.below(7))
            .map(|_| {
                let n = 1 + rng.below(8);
                let address = if v6 { format!("fd00:10::{n}") } else { format!("10.0.0.{n}") };
                let mut endpoint = json!({"addresses": [address], "conditions": {"ready": !rng.one_in(4),
                    "serving": !rng.one_in(2), "terminating": rng.one_in(2)},
                    "targetRef": {"kind": "Pod", "name": format!("pod-{n}")}, "hints": {"forZones": [{"name": "z1"}]}});
                if !rng.one_in(3) {
                    endpoint["zone"] = json!(rng.pick(&["z1", "z2"]));
                }
                if rng.one_in(2) {
                    endpoint["nodeName"] = json!(rng.pick(&["n1", "n2"]));
                }
                endpoint
            })
            .collect();
        let ports: Vec<Value> = (0..1 + rng.below(3))
            .map(|_| {
                let protocol = rng.pick(&["TCP", "TCP", "UDP"]);
                json!({"name": rng.pick(&PORT_NAMES), "port": 8000 + rng.below(3), "protocol": protocol})
            })
            .collect();
        // Now and then a slice is labelled with another service's name.
        let service = if rng.one_in(8) { rng.below(SERVICES) } else { i };
        let mut labels = json!({"multicluster.kubernetes.io/service-name": format!("svc-{service}"),
            "multicluster.kubernetes.io/source-cluster": rng.pick(&["east", "west"])});
        if rng.one_in(3) {
            labels["topology.kubernetes.io/region"] = json!(rng.pick(&["r1", "r2"]));
        }
        // The API sends no endpoints as null (the Go field has no omitempty).
        let endpoints = if endpoints.is_empty() && rng.one_in(2) { Value::Null } else { json!(endpoints) };
        objects.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("svc-{i}-{s}"), "namespace": "ns", "uid": format!("slice-{i}-{s}"),
                "resourceVersion": version.to_string(), "labels": labels},
            "addressType": if v6 { "IPv6" } else { "IPv4" }, "ports": ports, "endpoints": endpoints}));
    }
    objects
}

fn is_import(object: &Value) -> bool {
    object["kind"] == "ServiceImport"
}

fn same_object(a: &Value, b: &Value) -> bool {
    a["kind"] == b["kind"] && a["metadata"]["name"] == b["metadata"]["name"]
}

fn file(dir: &Path, i: u64) -> PathBuf {
    dir.join(format!("svc-{i}.yaml"))
}

/// The whole objects, parsed as neither source parses them, each named as
/// its manifest document.
fn snapshot(dir: &Path, world: &BTreeMap<u64, Vec<Value>>) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (i, objects) in world {
        for (n, object) in objects.iter().enumerate() {
            let origin = Origin(format!("{} (document {})", file(dir, *i).display(), n + 1));
            if is_import(object) {
                let import: ServiceImport = serde_json::from_value(object.clone()).expect("an import");
                snapshot.imports.push((origin, import));
            } else {
                let slice: EndpointSlice = serde_json::from_value(object.clone()).expect("a slice");
                snapshot.slices.push((origin, slice));
            }
        }
    }
    snapshot
}

/// This node's own addresses, one of them among the ClusterSetIPs asked for.
fn node_addresses() -> BTreeSet<IpAddr> {
    BTreeSet::from(["198.18.0.3".parse().expect("an address")])
}

fn capacity() -> Capacity {
    Capacity { services: 256, backends: 256, slots: 1 << 14 }
}

/// The node is in zone z1 of cluster east: tiers and weights matter.
fn flags() -> Policy {
    let mut policy = Policy::default();
    policy.node.zone = Some("z1".into());
    policy.node.cluster = Some("east".into());
    policy
}

/// A problem as text, without where it was read (a manifest names its file
/// and document, an API object nothing).
fn without_origin(problem: &str) -> String {
    let at = ["ServiceImport ", "EndpointSlice "].iter().filter_map(|kind| problem.find(kind)).min();
    problem[at.unwrap_or(0)..].to_owned()
}

/// One agent: its source, reconciler and maps.
struct Agent {
    source: Source,
    reconciler: Reconciler,
    maps: Maps,
}

impl Agent {
    fn new(source: Source) -> Self {
        Self { source, reconciler: Reconciler::new(Applied::new(capacity()), flags()), maps: Maps::default() }
    }

    fn pass(&mut self, due: Due) {
        reconcile(&self.source, &flags(), node_addresses(), &mut self.reconciler, &mut self.maps, None, due)
            .expect("a pass");
    }

    /// Backend ids written and named by no table: a leak.
    fn unnamed_backends(&self) -> Vec<BackendAddr> {
        let named: BTreeSet<BackendAddr> = self.maps.served().into_values().flat_map(|s| s.table).collect();
        self.maps.backends.values().filter(|addr| !named.contains(addr)).copied().collect()
    }
}

/// ClusterSetIP -> the service its frontends belong to: what `held` must be.
fn holders(state: &DesiredState) -> BTreeMap<IpAddr, String> {
    state.frontends.iter().map(|(key, f)| (key.vip, f.service.clone())).collect()
}

#[test]
fn both_sources_program_what_a_fresh_pass_programs_from_the_whole_objects() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let mut seen = BTreeMap::<&str, usize>::new();
    let mut seen_relists = 0;
    for seed in 1..=20u64 {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
        for entry in std::fs::read_dir(dir.path()).expect("readable") {
            std::fs::remove_file(entry.expect("an entry").path()).expect("removed");
        }
        let mut manifests = Agent::new(Source::Manifests(dir.path().to_owned()));
        let (mut feed, kube) = Feed::new();
        let mut kube = Agent::new(Source::Kube(Box::new(kube)));
        let mut world: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
        for step in 0..40u64 {
            let held = manifests.reconciler.held().clone();
            let mut paths = BTreeSet::new();
            let mut kube_due = Due { full: step == 0, ..Due::default() };
            let relist = step > 0 && rng.one_in(10);
            for _ in 0..=rng.below(3) {
                let i = rng.below(SERVICES);
                let old = world.remove(&i).unwrap_or_default();
                let new = if rng.one_in(6) { Vec::new() } else { random_service(&mut rng, i, step + 1) };
                // Files: one per service, every object of it, replaced by a
                // rename as tools write (a rewrite in place may keep the
                // size and, within a clock tick, the mtime).
                let path = file(dir.path(), i);
                if new.is_empty() {
                    let _ = std::fs::remove_file(&path);
                } else {
                    let docs: Vec<String> = new.iter().map(|o| serde_json::to_string(o).expect("JSON")).collect();
                    let scratch = dir.path().join(".next");
                    std::fs::write(&scratch, docs.join("\n---\n")).expect("written");
                    std::fs::rename(&scratch, &path).expect("renamed");
                }
                paths.insert(path);
                // Watch events: what went away is deleted, the rest applied.
                let gone = old.iter().filter(|o| !new.iter().any(|n| same_object(n, o)));
                for (object, deleted) in gone.map(|o| (o, true)).chain(new.iter().map(|o| (o, false))) {
                    if relist {
                        break;
                    }
                    let touched = if is_import(object) {
                        feed.import(serde_json::from_value(object.clone()).expect("an import"), deleted)
                    } else {
                        feed.slice(serde_json::from_value(object.clone()).expect("a slice"), deleted)
                    };
                    match touched {
                        Touched::Services(services) => kube_due.services.extend(services),
                        other => panic!("an event outside a relist touched {other:?}"),
                    }
                }
                if !new.is_empty() {
                    world.insert(i, new);
                }
            }
            if relist {
                // The watches missed these changes and list everything anew.
                let objects = world.values().flatten();
                let imports = objects.clone().filter(|o| is_import(o)).map(|o| serde_json::from_value(o.clone()));
                let slices = objects.filter(|o| !is_import(o)).map(|o| serde_json::from_value(o.clone()));
                let listed = feed.relist(
                    imports.collect::<Result<_, _>>().expect("imports"),
                    slices.collect::<Result<_, _>>().expect("slices"),
                );
                assert_eq!(listed, [Touched::All, Touched::All], "a relist asks for a full pass");
                kube_due.full = true;
            }
            manifests.pass(Due { full: step == 0, paths, ..Due::default() });
            kube.pass(kube_due);

            // The reference: the whole objects, a fresh reconciler that knows
            // who held each ClusterSetIP before this change, empty maps.
            let snapshot = snapshot(dir.path(), &world);
            let mut policy = flags();
            policy.node_addresses = node_addresses();
            let runtime = Runtime { held: held.clone(), ..Runtime::default() };
            let (state, errors) = compute_with(&snapshot, &policy, &runtime);
            let mut fresh = Reconciler::seeded(Applied::new(capacity()), policy, held);
            let mut maps = Maps::default();
            fresh.apply_snapshot(&snapshot, Vec::new(), &mut maps).expect("a fresh pass");

            let context = || format!("seed {seed} step {step}\n{world:#?}");
            assert_eq!(manifests.reconciler.state(), &state, "manifests source: the state differs; {}", context());
            assert_eq!(kube.reconciler.state(), &state, "Kubernetes source: the state differs; {}", context());
            let served = maps.served();
            assert_eq!(manifests.maps.served(), served, "manifests source: the maps differ; {}", context());
            assert_eq!(kube.maps.served(), served, "Kubernetes source: the maps differ; {}", context());
            for agent in [&manifests, &kube] {
                assert_eq!(agent.reconciler.held(), &holders(&state), "held ClusterSetIPs; {}", context());
                assert_eq!(agent.unnamed_backends(), [], "backend ids leaked; {}", context());
            }
            // The same problems; the manifests name their file and document.
            let problems: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
            let manifest_problems: BTreeSet<String> = manifests.reconciler.problems().into_iter().collect();
            assert_eq!(manifest_problems, problems, "manifests source: the problems differ; {}", context());
            let kube_problems: BTreeSet<String> =
                kube.reconciler.problems().iter().map(|p| without_origin(p)).collect();
            let problems: BTreeSet<String> = problems.iter().map(|p| without_origin(p)).collect();
            assert_eq!(kube_problems, problems, "Kubernetes source: the problems differ; {}", context());
            seen_relists += usize::from(relist);

            let mut count = |what, n: usize| *seen.entry(what).or_default() += n;
            count("frontends", served.len());
            count("IPv6 frontends", served.keys().filter(|k| k.vip.is_ipv6()).count());
            count("with affinity", served.values().filter(|s| s.affinity_timeout_secs > 0).count());
            count(
                "weighted tables",
                served.values().filter(|s| s.table.iter().collect::<BTreeSet<_>>().len() > 1).count(),
            );
            for problem in &problems {
                let what = if problem.contains("is already the ClusterSetIP") {
                    "contended ClusterSetIPs"
                } else if problem.contains("is the address of an endpoint") {
                    "captured ClusterSetIPs"
                } else if problem.contains("is an address of this node") {
                    "the node's address"
                } else {
                    "other problems"
                };
                count(what, 1);
            }
        }
    }
    // The sequences must exercise what the sources and the services share.
    let wanted = [
        "frontends",
        "IPv6 frontends",
        "with affinity",
        "weighted tables",
        "contended ClusterSetIPs",
        "captured ClusterSetIPs",
        "the node's address",
        "other problems",
    ];
    for what in wanted {
        assert!(seen.get(what).is_some_and(|&n| n > 20), "too few {what}: {seen:?}");
    }
    assert!(seen_relists > 20, "too few relists: {seen_relists}");
}
