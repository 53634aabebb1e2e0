//! The Kubernetes manifests in deploy/: every document parses into its
//! k8s-openapi type, and the DaemonSet asks for what the agent needs and no more.

use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value, path: &Path) -> T {
    serde_path_to_error::deserialize(doc.clone()).unwrap_or_else(|e| panic!("{}: {}: {}", path.display(), e.path(), e))
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let mut kinds = Vec::new();
    for dir in [deploy(), deploy().join("crds"), deploy().join("uninstall"), deploy().join("monitoring")] {
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
                    "Role" => drop(typed::<Role>(&doc, &path)),
                    "RoleBinding" => drop(typed::<RoleBinding>(&doc, &path)),
                    "DaemonSet" => drop(typed::<DaemonSet>(&doc, &path)),
                    "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(&doc, &path)),
                    "Kustomization" | "Component" => {
                        let generated = doc["configMapGenerator"].as_array().into_iter().flatten();
                        let files = generated.flat_map(|g| g["files"].as_array().unwrap().iter());
                        for resource in doc["resources"].as_array().unwrap().iter().chain(files) {
                            let file = dir.join(resource.as_str().unwrap());
                            assert!(file.exists(), "{} lists missing {}", path.display(), file.display());
                        }
                    }
                    // Prometheus Operator objects: checked against the metrics below.
                    "PodMonitor" | "PrometheusRule" => {}
                    other => panic!("{}: unexpected kind {other}", path.display()),
                }
                kinds.push(kind);
            }
        }
    }
    kinds.sort();
    assert_eq!(kinds.iter().filter(|k| *k == "DaemonSet").count(), 2, "the agent and its uninstaller");
    for kind in ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "Namespace", "Role", "RoleBinding", "ServiceAccount"]
    {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in deploy/");
    }
    assert_eq!(kinds.iter().filter(|k| *k == "CustomResourceDefinition").count(), 3);
}

#[test]
fn the_daemonset_runs_on_every_node_with_named_capabilities_not_privileged() {
    let path = deploy().join("daemonset.yaml");
    let ds: DaemonSet = typed(&documents(&path)[0], &path);
    let spec = ds.spec.unwrap();
    let rolling = spec.update_strategy.unwrap().rolling_update.unwrap();
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)), "two agents must never share a node's maps");
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.node_selector.unwrap()["kubernetes.io/os"], "linux");
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert!(pod.tolerations.unwrap().iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    let agent = &pod.containers[0];
    let security = agent.security_context.clone().unwrap();
    assert_eq!(security.privileged, Some(false));
    assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
    assert_eq!(security.app_armor_profile.unwrap().type_, "Unconfined", "pinning writes below /sys/fs");
    let caps = security.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    assert_eq!(caps.add.unwrap(), ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]);
    let env = agent.env.clone().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(node.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "spec.nodeName");
    assert!(agent.liveness_probe.is_some() && agent.readiness_probe.is_some());
    let resources = agent.resources.as_ref().unwrap();
    assert!(resources.requests.as_ref().unwrap().contains_key("memory"));
    assert!(resources.limits.as_ref().unwrap().contains_key("memory"), "BPF maps are charged to the pod");
    let mounts = agent.volume_mounts.as_ref().unwrap();
    let paths: Vec<&str> = mounts.iter().map(|m| m.mount_path.as_str()).collect();
    assert_eq!(
        paths,
        ["/sys/fs/bpf", "/run/mcs-agent", "/host/cgroup", "/var/run/netns"],
        "bpffs, the state for inspect, the host's cgroup2 (socket LB) and pods' namespaces (ending sockets)"
    );
    assert_eq!(mounts[0].mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(mounts[2].read_only, Some(true), "attaching to a cgroup needs no write");
    assert_eq!(mounts[3].read_only, Some(true));
    // The args are the agent's own flags (that they parse: the agent's own test).
    let args = agent.args.clone().unwrap();
    assert_eq!(args[0], "run");
    assert!(
        args.iter()
            .all(|a| a == "run" || a.starts_with("--interface-pattern=") || a.starts_with("--socket-lb-cgroup="))
    );
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
    let list_watch = || vec!["list".to_owned(), "watch".to_owned()];
    assert_eq!(
        rules,
        [
            ("".into(), "nodes".into(), read()),
            ("".into(), "services".into(), list_watch()),
            ("about.k8s.io".into(), "clusterproperties".into(), read()),
            ("discovery.k8s.io".into(), "endpointslices".into(), read()),
            ("events.k8s.io".into(), "events".into(), vec!["create".into(), "patch".into()]),
            ("multicluster.x-k8s.io".into(), "serviceimports".into(), read()),
            ("networking.k8s.io".into(), "servicecidrs".into(), list_watch()),
        ]
    );
}

/// The only namespaced grant: the agents' own pods, read, in their namespace,
/// bound to the agent's service account, which the DaemonSet points at.
#[test]
fn the_role_reads_the_agents_pods_in_their_namespace_only() {
    let path = deploy().join("role.yaml");
    let role: Role = typed(&documents(&path)[0], &path);
    assert_eq!(role.metadata.namespace.as_deref(), Some("mcs-system"));
    let rules: Vec<_> = role
        .rules
        .unwrap()
        .into_iter()
        .map(|r| (r.api_groups.unwrap_or_default(), r.resources.unwrap_or_default(), r.verbs))
        .collect();
    assert_eq!(rules, [(vec![String::new()], vec!["pods".to_owned()], vec!["list".to_owned(), "watch".to_owned()])]);
    let path = deploy().join("rolebinding.yaml");
    let binding: RoleBinding = typed(&documents(&path)[0], &path);
    assert_eq!((binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()), ("Role", "mcs-agent"));
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!((subject.name.as_str(), subject.namespace.as_deref()), ("mcs-agent", Some("mcs-system")));
    let path = deploy().join("daemonset.yaml");
    let ds: DaemonSet = typed(&documents(&path)[0], &path);
    let pod = ds.spec.unwrap().template;
    assert_eq!(
        pod.metadata.unwrap().labels.unwrap()["app.kubernetes.io/name"],
        "mcs-agent",
        "the default --peer-selector"
    );
    let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
    let namespace = env.iter().find(|e| e.name == "POD_NAMESPACE").expect("POD_NAMESPACE for --peer-namespace");
    assert_eq!(namespace.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "metadata.namespace");
}

#[test]
fn the_uninstaller_runs_uninstall_on_every_node_and_is_ready_when_clean() {
    let path = deploy().join("uninstall/daemonset.yaml");
    let ds: DaemonSet = typed(&documents(&path)[0], &path);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true), "netlink filters sit on host interfaces");
    assert!(pod.tolerations.unwrap().iter().any(|t| t.operator.as_deref() == Some("Exists")));
    let container = &pod.containers[0];
    assert_eq!(container.args.clone().unwrap(), ["uninstall", "--stay"]);
    let probe = container.readiness_probe.clone().unwrap().exec.unwrap().command.unwrap();
    assert_eq!(probe[1..], ["uninstall", "--check"]);
    let mounts = container.volume_mounts.clone().unwrap();
    assert_eq!(mounts[0].mount_path, "/sys/fs/bpf");
}

/// Metric names the agent exposes, from a real rendering.
fn exposed_metrics() -> std::collections::BTreeSet<String> {
    use mcs_agent::{
        inventory::{BackendInfo, FrontendInfo, Inventory},
        metrics::{AgentMetrics, AgentView, Kernel, render},
    };
    let inventory = Inventory {
        schema: mcs_agent::inventory::SCHEMA,
        layout_version: mcs_common::LAYOUT_VERSION,
        generation: Some(1),
        frontends: vec![FrontendInfo {
            vip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: "TCP".into(),
            service: "demo/web".into(),
            port_name: "http".into(),
            service_id: 1,
            table_size: 251,
            affinity_timeout_secs: 0,
            tiers: vec!["zone".into()],
            backends: vec![BackendInfo {
                ip: "10.10.0.1".parse().unwrap(),
                port: 8080,
                backend_id: Some(1),
                cluster: Some("a".into()),
                zone: None,
                region: None,
                tier: "zone".into(),
                weight: 1.0,
                condition: "ready".into(),
                health: "ejected".into(),
            }],
        }],
    };
    let agent = AgentMetrics::default();
    agent.reconciled(std::time::Duration::from_millis(3));
    let view = AgentView {
        objects: vec![("ServiceImport", "valid", 1)],
        fill: vec![("conntrack", 1, 10)],
        ..AgentView::default()
    };
    let kernel = Kernel {
        backend: &|_| Some(mcs_common::BackendStats::default()),
        service: &|_| Some(mcs_common::ServiceStats::default()),
        xdp_backend: &|_| None,
        xdp_service: &|_| None,
        datapath: vec![(mcs_common::Stat::NoBackend, 1)],
    };
    render(&agent, &view, inventory.frontends, &kernel, false)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

/// `mcs_agent_*` identifiers used in a text.
fn referenced(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("mcs_agent_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn alerts_and_the_dashboard_use_only_metrics_the_agent_exposes() {
    let exposed = exposed_metrics();
    assert!(exposed.contains("mcs_agent_backend_new_connections_total"), "{exposed:?}");
    for file in ["monitoring/prometheusrule.yaml", "monitoring/mcs-agent-dashboard.json"] {
        let text = std::fs::read_to_string(deploy().join(file)).unwrap();
        let names = referenced(&text);
        assert!(names.len() >= 4, "{file} uses the agent's metrics");
        for name in names {
            assert!(exposed.contains(&name), "{file} uses {name}, which the agent does not expose ({exposed:?})");
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy().join("monitoring/mcs-agent-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().unwrap().len() >= 3);
}
