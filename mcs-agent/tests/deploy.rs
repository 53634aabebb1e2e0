//! The Kubernetes manifests in deploy/: every document parses into its
//! k8s-openapi type, and the DaemonSet asks for what the agent needs and no more.

use std::path::{Path, PathBuf};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::Deserialize;
use serde_yaml::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value, path: &Path) -> T {
    serde_path_to_error::deserialize(doc.clone()).unwrap_or_else(|e| panic!("{}: {}: {}", path.display(), e.path(), e))
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let mut kinds = Vec::new();
    for dir in [deploy(), deploy().join("crds")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            for doc in documents(&path) {
                let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
                match kind.as_str() {
                    "Namespace" => drop(typed::<Namespace>(&doc, &path)),
                    "ServiceAccount" => drop(typed::<ServiceAccount>(&doc, &path)),
                    "ClusterRole" => drop(typed::<ClusterRole>(&doc, &path)),
                    "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc, &path)),
                    "DaemonSet" => drop(typed::<DaemonSet>(&doc, &path)),
                    "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(&doc, &path)),
                    "Kustomization" | "Component" => {
                        for resource in doc["resources"].as_sequence().unwrap() {
                            let file = dir.join(resource.as_str().unwrap());
                            assert!(file.exists(), "{} lists missing {}", path.display(), file.display());
                        }
                    }
                    other => panic!("{}: unexpected kind {other}", path.display()),
                }
                kinds.push(kind);
            }
        }
    }
    kinds.sort();
    for kind in ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "Namespace", "ServiceAccount"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in deploy/");
    }
    assert_eq!(kinds.iter().filter(|k| *k == "CustomResourceDefinition").count(), 3);
}

#[test]
fn the_daemonset_runs_on_every_node_with_named_capabilities_not_privileged() {
    let path = deploy().join("daemonset.yaml");
    let ds: DaemonSet = typed(&documents(&path)[0], &path);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert!(pod.tolerations.unwrap().iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    let agent = &pod.containers[0];
    let security = agent.security_context.clone().unwrap();
    assert_eq!(security.privileged, Some(false));
    let caps = security.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    assert_eq!(caps.add.unwrap(), ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]);
    let env = agent.env.clone().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(node.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "spec.nodeName");
    assert!(agent.liveness_probe.is_some() && agent.readiness_probe.is_some());
    assert!(agent.resources.as_ref().unwrap().requests.is_some());
    let mounts: Vec<&str> = agent.volume_mounts.as_ref().unwrap().iter().map(|m| m.mount_path.as_str()).collect();
    assert_eq!(mounts, ["/sys/fs/bpf", "/sys/fs/cgroup"]);
    // The args are the agent's own flags.
    let args = agent.args.clone().unwrap();
    assert_eq!(args[0], "run");
    assert!(args.iter().all(|a| a == "run" || a.starts_with("--interface-pattern=")));
}

/// (apiGroup, resource, verbs) the ClusterRole grants.
pub fn cluster_role_rules() -> Vec<(String, String, Vec<String>)> {
    let path = deploy().join("clusterrole.yaml");
    let role: ClusterRole = typed(&documents(&path)[0], &path);
    role.rules
        .unwrap()
        .into_iter()
        .flat_map(|rule| {
            let groups = rule.api_groups.unwrap_or_default();
            let resources = rule.resources.unwrap_or_default();
            groups.into_iter().flat_map(move |g| {
                let verbs = rule.verbs.clone();
                resources.clone().into_iter().map(move |r| (g.clone(), r, verbs.clone()))
            })
        })
        .collect()
}

#[test]
fn the_cluster_role_grants_reads_of_mcs_objects_and_events_and_nothing_else() {
    let mut rules = cluster_role_rules();
    rules.sort();
    let read = || vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()];
    assert_eq!(
        rules,
        [
            ("".into(), "nodes".into(), read()),
            ("about.k8s.io".into(), "clusterproperties".into(), read()),
            ("discovery.k8s.io".into(), "endpointslices".into(), read()),
            ("events.k8s.io".into(), "events".into(), vec!["create".into(), "patch".into()]),
            ("multicluster.x-k8s.io".into(), "serviceimports".into(), read()),
        ]
    );
}
