//! A small Kubernetes API server of our own for the agent's Kubernetes mode:
//! discovery, paginated lists, watch streams, 410 Gone, 403 Forbidden, and
//! going away and coming back on the same port. It serves only what the
//! agent asks for (ServiceImports, EndpointSlices, Nodes, ClusterProperties,
//! Services, ServiceCIDRs, the agents' pods, Events), from memory, on a
//! loopback address inside a test's namespace.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Frame, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};

use crate::netns::Netns;

pub const IMPORTS: &str = "/apis/multicluster.x-k8s.io/v1beta1/serviceimports";
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const NODES: &str = "/api/v1/nodes";
pub const PROPERTIES: &str = "/apis/about.k8s.io/v1beta1/clusterproperties";
pub const SERVICES: &str = "/api/v1/services";
pub const SERVICE_CIDRS: &str = "/apis/networking.k8s.io/v1/servicecidrs";
/// The agents' own pods (`--peer-namespace mcs-system`).
pub const AGENT_PODS: &str = "/api/v1/namespaces/mcs-system/pods";
const RESOURCES: [&str; 7] = [IMPORTS, SLICES, NODES, PROPERTIES, SERVICES, SERVICE_CIDRS, AGENT_PODS];

/// How one resource answers list and watch requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// 403 Forbidden, as with RBAC that lacks the verb.
    Forbidden,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// resource -> name -> object
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// resource -> (resourceVersion, type, object), in order
    events: BTreeMap<&'static str, Vec<(u64, &'static str, Value)>>,
    modes: BTreeMap<&'static str, Mode>,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch (the client must re-watch).
    watch_epoch: u64,
    requests: Vec<String>,
    /// Events created (POST), as sent.
    events_posted: Vec<Value>,
    /// Event series updates (PATCH), as sent.
    events_patched: Vec<Value>,
    /// Most objects on one page of a list (2 unless set).
    page_limit: Option<usize>,
}

/// The server's data, shared across stops and starts.
#[derive(Clone, Default)]
pub struct Api {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

fn name_of(object: &Value) -> String {
    let meta = &object["metadata"];
    match meta["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", meta["name"].as_str().unwrap_or_default()),
        None => meta["name"].as_str().unwrap_or_default().to_owned(),
    }
}

impl Api {
    /// Adds or replaces an object of `resource` (one of the path constants).
    pub fn put(&self, resource: &'static str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{}", name_of(&object)));
        object["metadata"].as_object_mut().unwrap().entry("creationTimestamp").or_insert(json!("2026-01-01T00:00:00Z"));
        let kind = if state.objects.entry(resource).or_default().insert(name_of(&object), object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.events.entry(resource).or_default().push((rv, kind, object));
        drop(state);
        self.changed.notify_waiters();
    }

    pub fn delete(&self, resource: &'static str, name: &str) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version;
        if let Some(mut object) = state.objects.entry(resource).or_default().remove(name) {
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            state.events.entry(resource).or_default().push((rv, "DELETED", object));
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Lists answer with pages of at most `limit` objects (and at most what
    /// the client asks for). By default 2, so tests see clients follow
    /// `continue`; a benchmark of thousands of objects wants hundreds.
    pub fn set_page_limit(&self, limit: usize) {
        self.state.lock().unwrap().page_limit = Some(limit.max(1));
    }

    pub fn set_mode(&self, resource: &'static str, mode: Mode) {
        self.state.lock().unwrap().modes.insert(resource, mode);
    }

    /// Ends every open watch; with `gone`, the next watches from any earlier
    /// resourceVersion get 410 Gone, so clients must list again.
    pub fn drop_watches(&self, gone: bool) {
        let mut state = self.state.lock().unwrap();
        state.watch_epoch += 1;
        if gone {
            state.compacted = state.resource_version + 1;
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Every Event the agents created, in order.
    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events_posted.clone()
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Serves on `127.0.0.1:port` inside `ns` (port 0: any) until the server is dropped.
    pub fn serve(&self, ns: &Netns, port: u16) -> Server {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let api = self.clone();
        let thread = ns.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the fake API");
                ready_tx.send(listener.local_addr().expect("local addr")).expect("report the address");
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else { continue };
                        let api = api.clone();
                        tokio::spawn(async move {
                            let service = service_fn(move |request| {
                                let api = api.clone();
                                async move { Ok::<_, Infallible>(api.answer(request).await) }
                            });
                            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime ends every connection: the API is gone.
        });
        let addr = ready_rx.recv_timeout(Duration::from_secs(5)).expect("the fake API started");
        Server { addr, stop: Some(stop_tx), thread: Some(thread) }
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
        let path = request.uri().path().to_owned();
        let query: BTreeMap<String, String> =
            request.uri().query().map(|q| url_pairs(q).into_iter().collect()).unwrap_or_default();
        self.state.lock().unwrap().requests.push(format!("{} {}", request.method(), request.uri()));
        let group = |version: &str, resource: &str, kind: &str, namespaced: bool| {
            json_response(
                200,
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": version,
                "resources": [{"name": resource, "singularName": "", "namespaced": namespaced, "kind": kind,
                "verbs": ["get", "list", "watch"]}]}),
            )
        };
        match path.as_str() {
            "/apis/multicluster.x-k8s.io/v1beta1" => {
                return group("multicluster.x-k8s.io/v1beta1", "serviceimports", "ServiceImport", true);
            }
            "/apis/about.k8s.io/v1beta1" => {
                return group("about.k8s.io/v1beta1", "clusterproperties", "ClusterProperty", false);
            }
            "/apis/networking.k8s.io/v1" => {
                return group("networking.k8s.io/v1", "servicecidrs", "ServiceCIDR", false);
            }
            p if p.ends_with("/events") && request.method() == hyper::Method::POST => {
                let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let event: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
                self.state.lock().unwrap().events_posted.push(event.clone());
                return json_response(201, &event);
            }
            p if p.contains("/events/") && request.method() == hyper::Method::PATCH => {
                // A repeat the recorder folds into the Event's series.
                let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let patch: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
                self.state.lock().unwrap().events_patched.push(patch.clone());
                return json_response(200, &patch);
            }
            _ => {}
        }
        let Some(resource) = RESOURCES.into_iter().find(|r| *r == path) else {
            return status(404, "NotFound", &format!("{path} is not served by this fake"));
        };
        if self.state.lock().unwrap().modes.get(resource).copied() == Some(Mode::Forbidden) {
            return status(403, "Forbidden", &format!("{path} is forbidden"));
        }
        if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            return self.watch(resource, from);
        }
        self.list(resource, &query)
    }

    /// A page of at most two objects (or the page limit): clients must follow `continue`.
    fn list(&self, resource: &'static str, query: &BTreeMap<String, String>) -> Response<BoxBody<Bytes, Infallible>> {
        let state = self.state.lock().unwrap();
        let all: Vec<&Value> = state.objects.get(resource).map(|o| o.values().collect()).unwrap_or_default();
        let start: usize = query.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
        let limit = query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(usize::MAX)
            .min(state.page_limit.unwrap_or(2));
        let page: Vec<&Value> = all.iter().skip(start).take(limit).copied().collect();
        let next = start + page.len();
        let mut metadata = json!({"resourceVersion": state.resource_version.to_string()});
        if next < all.len() {
            metadata["continue"] = json!(next.to_string());
        }
        json_response(200, &json!({"kind": "List", "apiVersion": "v1", "metadata": metadata, "items": page}))
    }

    fn watch(&self, resource: &'static str, from: u64) -> Response<BoxBody<Bytes, Infallible>> {
        let (epoch, compacted) = {
            let state = self.state.lock().unwrap();
            (state.watch_epoch, state.compacted)
        };
        if from < compacted {
            self.state.lock().unwrap().requests.push(format!("410 Gone to a watch of {resource} from {from}"));
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "Expired", "code": 410, "message": format!("too old resource version: {from} ({compacted})")}});
            let mut line = serde_json::to_vec(&gone).unwrap();
            line.push(b'\n');
            return Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(line)).boxed())
                .unwrap();
        }
        let api = self.clone();
        // Events after `sent`, as JSON lines, until the epoch changes.
        let stream = futures::stream::unfold((api, from, false), move |(api, mut sent, done)| async move {
            if done {
                return None;
            }
            loop {
                let notified = api.changed.notified();
                {
                    let state = api.state.lock().unwrap();
                    if state.watch_epoch != epoch {
                        return None;
                    }
                    let pending: Vec<Value> = state
                        .events
                        .get(resource)
                        .into_iter()
                        .flatten()
                        .filter(|(rv, _, _)| *rv > sent)
                        .map(|(_, kind, object)| json!({"type": kind, "object": object}))
                        .collect();
                    if !pending.is_empty() {
                        sent = state.resource_version;
                        let mut chunk = Vec::new();
                        for event in pending {
                            chunk.extend(serde_json::to_vec(&event).unwrap());
                            chunk.push(b'\n');
                        }
                        return Some((
                            Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))),
                            (api.clone(), sent, false),
                        ));
                    }
                }
                if tokio::time::timeout(Duration::from_secs(30), notified).await.is_err() {
                    return None;
                }
            }
        });
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed())
            .unwrap()
    }
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k.to_owned(), v.replace("%3D", "=").replace("%2F", "/"))
        })
        .collect()
}

fn json_response(code: u16, body: &Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<BoxBody<Bytes, Infallible>> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message}),
    )
}

/// A running server; dropping it takes the API away (connections refused).
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// A kubeconfig that points at this server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        kubeconfig(dir, self.addr.port())
    }
}

/// A kubeconfig for `http://127.0.0.1:port`, whether or not a server listens there.
pub fn kubeconfig(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://127.0.0.1:{port}\"}}\nusers:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: agent}}\ncurrent-context: fake\n"
    );
    std::fs::write(&path, yaml).expect("writing the kubeconfig");
    path
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
