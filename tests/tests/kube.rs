//! Kubernetes mode against an API server of our own (`mcs_tests::fakeapi`):
//! the real agent binary, real HTTP list/watch, and the failures a node sees
//! (no API at start, API loss, 403 on one resource, 410 Gone), with real
//! traffic through the VIP throughout.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use mcs_tests::{
    agent::{Agent, agent_binary, probe, probe_at, wait_probe, wait_probe_at},
    bpffs::ScratchBpffs,
    fakeapi::{self, AGENT_PODS, Api, IMPORTS, Mode, NODES, PROPERTIES, SERVICES, SLICES},
    netns::Netns,
    topology::Clusterset,
    traffic::{Connection, Server, tcp_request, udp_request},
};
use serde_json::{Value, json};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const READY: Duration = Duration::from_secs(30);

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn import(ports: &[(&str, u16)]) -> Value {
    let ports: Vec<Value> =
        ports.iter().map(|(name, port)| json!({"name": name, "port": port, "protocol": "TCP"})).collect();
    json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {"type": "ClusterSetIP", "ips": [VIP.to_string()], "ports": ports}})
}

fn slice(cluster: &str, pods: &[Ipv4Addr]) -> Value {
    let endpoints: Vec<Value> = pods.iter().map(|ip| json!({"addresses": [ip.to_string()]})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("web-{cluster}"), "namespace": "demo",
            "labels": {"multicluster.kubernetes.io/service-name": "web", "multicluster.kubernetes.io/source-cluster": cluster}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints})
}

struct Lab {
    set: Clusterset,
    api: Api,
    pods: Vec<Ipv4Addr>,
    port: u16,
    dir: tempfile::TempDir,
    bpffs: ScratchBpffs,
    _servers: Vec<Server>,
}

impl Lab {
    fn new() -> Self {
        let mut set = Clusterset::new(1, &["cluster-a"]);
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for k in 1..=2 {
            let ip = set.clusters[0].add_pod();
            servers.push(Server::tcp(&set.clusters[0].ns, ip, 8080, &format!("cluster-a/pod-{k}")));
            pods.push(ip);
        }
        let api = Api::default();
        api.put(IMPORTS, import(&[("http", 80)]));
        api.put(SLICES, slice("cluster-a", &pods));
        api.put(NODES, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1",
            "labels": {"topology.kubernetes.io/zone": "z1"}}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}));
        api.put(
            PROPERTIES,
            json!({"apiVersion": "about.k8s.io/v1beta1", "kind": "ClusterProperty",
            "metadata": {"name": "cluster.clusterset.k8s.io"}, "spec": {"value": "cluster-a"}}),
        );
        // A port nothing listens on yet, the same for every start of the API.
        let port = set.node.run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
        Self { set, api, pods, port, dir: tempfile::tempdir().unwrap(), bpffs: ScratchBpffs::new(), _servers: servers }
    }

    fn serve(&self) -> fakeapi::Server {
        self.api.serve(&self.set.node, self.port)
    }

    fn agent(&self) -> Agent {
        let kubeconfig = fakeapi::kubeconfig(self.dir.path(), self.port);
        let args: Vec<String> = [
            "run",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--interface",
            "pod0",
            "--node-name",
            "node-1",
            "--bpffs",
            &self.bpffs.arg(),
        ]
        .map(str::to_owned)
        .to_vec();
        Agent::spawn(&agent_binary(), &self.set.node, &args)
    }

    fn client(&self) -> &Netns {
        &self.set.clients[0].ns
    }
}

fn ready(code: u16, _: &str) -> bool {
    code == 200
}

/// Waits until every new connection through the VIP reaches `identity`.
fn only_served_by(lab: &Lab, identity: &str, what: &str) {
    let deadline = std::time::Instant::now() + READY;
    loop {
        let who: Vec<String> = (0..16).map(|_| tcp_request(lab.client(), vip()).expect("served").identity).collect();
        if who.iter().all(|w| w == identity) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} never reached the datapath: {who:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_agent_waits_for_an_unreachable_api_alive_and_serves_once_it_answers() {
    let lab = Lab::new();
    // More imports than the fake API puts on one page.
    for (name, last) in [("extra-1", 11), ("extra-2", 12)] {
        let mut extra = import(&[("http", 80)]);
        extra["metadata"]["name"] = json!(name);
        extra["spec"]["ips"] = json!([format!("10.96.0.{last}")]);
        lab.api.put(IMPORTS, extra);
    }
    let mut agent = lab.agent();
    std::thread::sleep(Duration::from_secs(3));
    assert!(agent.running(), "the agent must not exit without the API:\n{}", agent.logs().join("\n"));
    assert_eq!(probe(&lab.set.node, "/healthz").map(|a| a.0), Some(200), "alive while waiting");
    let (code, body) = probe(&lab.set.node, "/readyz").expect("the health endpoint answers at once");
    assert_eq!(code, 503, "{body}");

    let _api = lab.serve();
    wait_probe(&lab.set.node, "/readyz", READY, ready);
    let reply = tcp_request(lab.client(), vip()).expect("served once the API answered");
    assert_eq!(reply.reply_from, SocketAddr::V4(vip()));
    let requests = lab.api.requests();
    assert!(
        requests.iter().any(|r| r.contains("/about.k8s.io/v1beta1/clusterproperties")),
        "ClusterProperty v1beta1 is found by discovery: {requests:?}"
    );
    assert!(requests.iter().any(|r| r.contains("continue=")), "lists are paginated: {requests:?}");
}

#[test]
fn losing_the_api_keeps_the_datapath_and_says_stale_until_it_returns() {
    let lab = Lab::new();
    let api = lab.serve();
    let agent = lab.agent();
    wait_probe(&lab.set.node, "/readyz", READY, ready);
    let mut open = Connection::open(lab.client(), vip()).expect("a connection through the VIP");

    drop(api);
    let (_, body) = wait_probe(&lab.set.node, "/readyz", READY, |code, _| code == 503);
    assert!(body.contains("stale"), "{body}");
    assert_eq!(probe(&lab.set.node, "/healthz").map(|a| a.0), Some(200), "alive while the API is gone");
    tcp_request(lab.client(), vip()).expect("new connections are still served from the last good state");
    open.request().expect("an open connection keeps working");

    // The API returns with a change made meanwhile: only pod 2 serves now.
    lab.api.put(SLICES, slice("cluster-a", &lab.pods[1..]));
    let _api = lab.serve();
    wait_probe(&lab.set.node, "/readyz", READY, ready);
    only_served_by(&lab, "cluster-a/pod-2", "the change made while the API was away");
    drop(agent);
}

#[test]
fn a_403_on_one_resource_keeps_the_agent_stale_while_another_changes() {
    let lab = Lab::new();
    let _api = lab.serve();
    let _agent = lab.agent();
    wait_probe(&lab.set.node, "/readyz", READY, ready);

    lab.api.set_mode(SLICES, Mode::Forbidden);
    lab.api.drop_watches(false);
    let (_, body) = wait_probe(&lab.set.node, "/readyz", READY, |code, _| code == 503);
    assert!(body.contains("EndpointSlice") && body.contains("403"), "{body}");
    // ServiceImport events keep flowing; they must not clear EndpointSlice's failure.
    for port in [81, 82, 83] {
        lab.api.put(IMPORTS, import(&[("http", 80), ("alt", port)]));
        std::thread::sleep(Duration::from_millis(500));
        let (code, body) = probe(&lab.set.node, "/readyz").unwrap();
        assert_eq!(code, 503, "still stale after a ServiceImport change: {body}");
    }
    tcp_request(lab.client(), vip()).expect("served from the last good state");

    lab.api.set_mode(SLICES, Mode::Normal);
    wait_probe(&lab.set.node, "/readyz", READY, ready);
}

#[test]
fn a_410_gone_makes_the_agent_list_again_and_converge() {
    let lab = Lab::new();
    let _api = lab.serve();
    let _agent = lab.agent();
    wait_probe(&lab.set.node, "/readyz", READY, ready);

    // History is compacted while the watches are down: a watch from before it
    // gets 410 Gone, and the change below is only in a new list.
    lab.api.drop_watches(true);
    lab.api.put(SLICES, slice("cluster-a", &lab.pods[..1]));
    only_served_by(&lab, "cluster-a/pod-1", "the change made across a 410 Gone");
    let requests = lab.api.requests();
    assert!(requests.iter().any(|r| r.starts_with("410 Gone")), "the agent met a 410: {requests:?}");
}

/// After a 10 s outage, a change made meanwhile and compacted away (the
/// watches resume into 410 Gone and must list again) reaches the datapath
/// within seconds of the API's return: the retries are capped at 2 s
/// (kube's default backoff grows to 30 s; it took 15 s).
#[test]
fn after_an_outage_a_change_made_meanwhile_lands_within_seconds_of_the_apis_return() {
    let lab = Lab::new();
    let api = lab.serve();
    let _agent = lab.agent();
    wait_probe(&lab.set.node, "/readyz", READY, ready);
    tcp_request(lab.client(), vip()).expect("served");

    drop(api);
    wait_probe(&lab.set.node, "/readyz", READY, |code, _| code == 503);
    std::thread::sleep(Duration::from_secs(10));
    // History is compacted, then the change: only a new list has it.
    lab.api.drop_watches(true);
    lab.api.put(SLICES, slice("cluster-a", &lab.pods[1..]));
    let back = std::time::Instant::now();
    let _api = lab.serve();
    only_served_by(&lab, "cluster-a/pod-2", "the change made while the API was away");
    let took = back.elapsed();
    let requests = lab.api.requests();
    assert!(requests.iter().any(|r| r.starts_with("410 Gone")), "the agent met a 410: {requests:?}");
    assert!(took < Duration::from_secs(8), "the change landed {took:.1?} after the API returned");
    wait_probe(&lab.set.node, "/readyz", READY, ready);
    eprintln!("the change made during the outage landed {took:.1?} after the API returned");
}

#[test]
fn a_restart_while_the_api_is_down_keeps_serving_the_adopted_state() {
    let lab = Lab::new();
    let api = lab.serve();
    let agent = lab.agent();
    wait_probe(&lab.set.node, "/readyz", READY, ready);
    let mut open = Connection::open(lab.client(), vip()).expect("a connection through the VIP");
    let backend = open.request().unwrap().identity;

    drop(agent);
    drop(api);
    let mut agent = lab.agent();
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.running(), "{}", agent.logs().join("\n"));
    tcp_request(lab.client(), vip()).expect("the adopted state serves new connections without any API");
    assert_eq!(open.request().expect("the open connection survives").identity, backend);
    assert_eq!(probe(&lab.set.node, "/healthz").map(|a| a.0), Some(200));
    assert_eq!(probe(&lab.set.node, "/readyz").map(|a| a.0), Some(503), "not ready: nothing listed yet");

    let _api = lab.serve();
    wait_probe(&lab.set.node, "/readyz", READY, ready);
    assert_eq!(open.request().expect("and after the API returns").identity, backend);
}

/// The kube-dns case: an import whose ClusterSetIP is a Service's ClusterIP.
/// Without the agent knowing Services, every pod's DNS queries would go to
/// the import's backends.
#[test]
fn an_import_on_a_services_cluster_ip_is_refused_and_dns_keeps_reaching_the_service() {
    let mut lab = Lab::new();
    let cluster = &mut lab.set.clusters[0];
    // The Service's own backend, reached at its ClusterIP (no kube-proxy
    // here): the address lives in the cluster's namespace, routed from the node.
    cluster.ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "eth0"]);
    lab.set.node.ip(&["route", "add", &format!("{VIP}/32"), "via", "10.255.0.2"]);
    let mut servers =
        vec![Server::udp(&cluster.ns, VIP, 53, "kube-dns"), Server::tcp(&cluster.ns, VIP, 80, "kube-dns")];
    for (k, pod) in lab.pods.iter().enumerate() {
        servers.push(Server::udp(&cluster.ns, *pod, 5353, &format!("cluster-a/pod-{}", k + 1)));
    }
    let mut web = import(&[("http", 80)]);
    web["spec"]["ports"].as_array_mut().unwrap().push(json!({"name": "dns", "port": 53, "protocol": "UDP"}));
    lab.api.put(IMPORTS, web.clone());
    let mut endpoints = slice("cluster-a", &lab.pods);
    endpoints["ports"].as_array_mut().unwrap().push(json!({"name": "dns", "port": 5353, "protocol": "UDP"}));
    lab.api.put(SLICES, endpoints);
    lab.api.put(
        SERVICES,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "spec": {"clusterIP": VIP.to_string(), "clusterIPs": [VIP.to_string()],
                "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}),
    );
    let _api = lab.serve();
    let _agent = lab.agent();
    wait_probe(&lab.set.node, "/readyz", READY, ready);

    let dns = SocketAddr::new(VIP.into(), 53);
    for _ in 0..8 {
        let reply = udp_request(lab.client(), dns).expect("DNS answers");
        assert_eq!(reply.identity, "kube-dns", "DNS must keep reaching the Service, not the import's backends");
    }
    assert_eq!(tcp_request(lab.client(), vip()).expect("TCP too").identity, "kube-dns");
    let note = |event: &Value| event["note"].as_str().unwrap_or_default().to_owned();
    let deadline = std::time::Instant::now() + READY;
    let refused = loop {
        let events = lab.api.events();
        if let Some(event) =
            events.iter().find(|e| note(e).contains("is the ClusterIP of Service kube-system/kube-dns"))
        {
            break event.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no Event names the Service: {events:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(refused["regarding"]["kind"], "ServiceImport");
    assert_eq!(refused["regarding"]["name"], "web");
    assert!(note(&refused).starts_with("spec.ips[0]: 10.96.0.10"), "{refused}");

    // The import's own derived Service (created by its MCS controller and
    // owned by the import) holds the address instead: the import is served.
    lab.api.delete(SERVICES, "kube-system/kube-dns");
    lab.api.put(
        SERVICES,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "derived-k5x2q", "namespace": "demo",
                "ownerReferences": [{"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
                    "name": "web", "uid": "uid-demo/web"}]},
            "spec": {"clusterIP": VIP.to_string()}}),
    );
    let deadline = std::time::Instant::now() + READY;
    loop {
        let who: Vec<String> = (0..8)
            .map(|_| tcp_request(lab.client(), vip()).expect("served").identity)
            .chain((0..8).map(|_| udp_request(lab.client(), dns).expect("DNS answers").identity))
            .collect();
        if who.iter().all(|w| w.starts_with("cluster-a/pod-")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the derived Service's import is never served: {who:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(servers);
}

/// The agent's pod on `node`, as the DaemonSet makes it.
fn agent_pod(node: &str, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("mcs-agent-{node}"), "namespace": "mcs-system",
            "labels": {"app.kubernetes.io/name": "mcs-agent"}},
        "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "mcs-agent"}]},
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

/// Every agent sees the same bad object; one Ready agent, the same for all,
/// reports it. Three agents of three nodes share one namespace here, each on
/// its own client interface, bpffs, state directory and health port. A
/// fourth node has no running agent (as a Windows node would): it never
/// gets an object to report.
#[test]
fn three_agents_and_one_bad_object_make_one_event() {
    let mut lab = Lab::new();
    lab.set.add_client();
    lab.set.add_client();
    let names = ["node-1", "node-2", "node-3"];
    for name in names {
        lab.api.put(AGENT_PODS, agent_pod(name, true));
    }
    lab.api.put(AGENT_PODS, agent_pod("node-4", false));
    let mut bad = import(&[("http", 80)]);
    bad["metadata"]["name"] = json!("bad");
    bad["spec"]["ports"][0]["port"] = json!(70_000);
    bad["spec"]["ips"] = json!(["10.96.0.99"]);
    lab.api.put(IMPORTS, bad.clone());
    let _api = lab.serve();
    let kubeconfig = fakeapi::kubeconfig(lab.dir.path(), lab.port);
    let scratch: Vec<(ScratchBpffs, tempfile::TempDir)> =
        names.iter().map(|_| (ScratchBpffs::new(), tempfile::tempdir().unwrap())).collect();
    let health = |k: usize| format!("127.0.0.1:{}", 9881 + k);
    let _agents: Vec<Agent> = names
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let args = [
                "run".to_owned(),
                "--kubeconfig".to_owned(),
                kubeconfig.display().to_string(),
                "--interface".to_owned(),
                format!("pod{k}"),
                "--node-name".to_owned(),
                (*name).to_owned(),
                "--peer-namespace".to_owned(),
                "mcs-system".to_owned(),
                "--bpffs".to_owned(),
                scratch[k].0.arg(),
                "--state-dir".to_owned(),
                scratch[k].1.path().display().to_string(),
                "--health-addr".to_owned(),
                health(k),
                "--socket-lb".to_owned(),
                "off".to_owned(),
                "--socket-lb-host-namespace".to_owned(),
                "off".to_owned(),
            ];
            Agent::spawn(&agent_binary(), &lab.set.node, &args)
        })
        .collect();
    for k in 0..names.len() {
        wait_probe_at(&lab.set.node, &health(k), "/readyz", READY, ready);
    }

    let about = |object: &str| -> Vec<Value> {
        lab.api.events().into_iter().filter(|e| e["regarding"]["name"] == object).collect()
    };
    let wait_events = |object: &str, n: usize| {
        let deadline = std::time::Instant::now() + READY;
        while about(object).len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "fewer than {n} Event(s) about {object}: {:?}",
                lab.api.events()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // Every agent is ready and has reconciled: give stragglers time to
        // send a duplicate, were there one.
        std::thread::sleep(Duration::from_secs(3));
        about(object)
    };
    let events = wait_events("bad", 1);
    assert_eq!(events.len(), 1, "one Event from three agents: {events:#?}");
    let event = &events[0];
    assert!(event["note"].as_str().unwrap().contains("spec.ports[0].port"), "{event}");
    assert_eq!(event["regarding"]["fieldPath"], "spec.ports[0].port");
    let uid = "uid-demo/bad";
    assert_eq!(
        mcs_agent::events::reporter(uid, ["node-1", "node-2", "node-3", "node-4"]),
        Some("node-4"),
        "this object is one that hashing over every node would give to node-4, which runs no agent"
    );
    let chosen = mcs_agent::events::reporter(uid, names).unwrap();
    assert_eq!(event["reportingInstance"], chosen, "the node rendezvous hashing picks");
    let other_node = |k: usize| {
        let (_, metrics) = probe_at(&lab.set.node, &health(k), "/metrics").expect("metrics");
        metrics.contains(r#"mcs_agent_events_total{outcome="other_node"} 1"#)
    };
    let others: Vec<usize> = (0..names.len()).filter(|k| names[*k] != chosen).collect();
    assert!(others.iter().all(|k| other_node(*k)), "the other two agents say another node reports it");

    // The reporter's agent goes NotReady; a new problem of the same object is
    // reported by the agent the remaining Ready ones agree on.
    lab.api.put(AGENT_PODS, agent_pod(chosen, false));
    std::thread::sleep(Duration::from_secs(1));
    bad["spec"]["ports"][0]["port"] = json!(70_001);
    lab.api.put(IMPORTS, bad);
    let events = wait_events("bad", 2);
    assert_eq!(events.len(), 2, "{events:#?}");
    let ready: Vec<&str> = names.into_iter().filter(|n| *n != chosen).collect();
    assert_eq!(events[1]["reportingInstance"], mcs_agent::events::reporter(uid, ready).unwrap());
    assert!(events[1]["note"].as_str().unwrap().contains("70001"), "{}", events[1]);
}
