//! Kubernetes Events about invalid objects, the agent's only write to the
//! API: one node reports each object, off the reconcile loop, rate-limited
//! per object, and repeats aggregated into a series by kube-rs's recorder.
//!
//! Every agent of a clusterset sees the same bad object. Were each to report
//! it, 5,000 nodes would send 5,000 Events about one typo. Each object is
//! instead reported by one agent, chosen by rendezvous hashing of the
//! object's uid over the nodes of the Ready agent pods (the DaemonSet's, in
//! `--peer-namespace`): every agent computes the same choice from the same
//! pod list, a node that leaves moves only its own share of objects, and a
//! node without a running agent (a Windows or virtual node, a crash loop)
//! is never chosen. When the Ready agents are unknown (no `--node-name` or
//! `--peer-namespace`, the pod list unreadable, or none Ready), every agent
//! reports: an Event too many is better than none.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::runtime::{
    events::{Event, EventType, Recorder},
    reflector::Store,
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// The Event reason of every problem the agent reports.
pub const REASON: &str = "InvalidObject";

/// FNV-1a of the uid and node name, then an avalanche: stable across
/// builds, platforms and processes, so that every agent agrees.
fn score(uid: &str, node: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    for &byte in uid.as_bytes().iter().chain(&[0]).chain(node.as_bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The node that reports problems of the object with `uid`: of `nodes`, the
/// one with the highest score (ties by name), `None` when there is none.
pub fn reporter<'a>(uid: &str, nodes: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    nodes.into_iter().max_by_key(|node| (score(uid, node), std::cmp::Reverse(*node)))
}

/// Whether the node `me` reports the object with `uid`, given the Ready
/// nodes (`None`: not known).
pub fn reports(uid: &str, me: Option<&str>, ready: Option<&[String]>) -> bool {
    match (me, ready) {
        (Some(me), Some(ready)) if !ready.is_empty() => reporter(uid, ready.iter().map(String::as_str)) == Some(me),
        _ => true,
    }
}

/// The nodes of the agent pods whose Ready condition is True.
pub fn ready_peers(pods: &[Arc<Pod>]) -> Vec<String> {
    let ready = |pod: &Pod| {
        let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
        conditions.into_iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
    };
    let mut nodes: Vec<String> =
        pods.iter().filter(|p| ready(p)).filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

/// How long the publisher waits for the first list of agent pods before it
/// reports without one (every agent then reports).
const PEERS_WAIT: Duration = Duration::from_secs(30);

/// A token bucket per object, as client-go's spam filter: `burst` Events at
/// once, then one per `refill`. The loop only reports problems that are new,
/// so this bounds an object whose problem comes and goes.
#[derive(Debug)]
pub struct Limiter {
    burst: f64,
    refill: Duration,
    buckets: HashMap<String, (f64, Instant)>,
    prune_at: usize,
}

/// Objects a [`Limiter`] tracks before it first forgets the quiet ones.
const PRUNE_AT: usize = 10_000;

impl Default for Limiter {
    fn default() -> Self {
        Self::new(25, Duration::from_secs(300))
    }
}

impl Limiter {
    pub fn new(burst: u32, refill: Duration) -> Self {
        Self { burst: f64::from(burst), refill, buckets: HashMap::new(), prune_at: PRUNE_AT }
    }

    fn tokens(&self, tokens: f64, since: Instant, now: Instant) -> f64 {
        let earned = now.saturating_duration_since(since).as_secs_f64() / self.refill.as_secs_f64();
        (tokens + earned).min(self.burst)
    }

    /// Takes a token for `object`; false when it has none left.
    pub fn allow(&mut self, object: &str, now: Instant) -> bool {
        if self.buckets.len() > self.prune_at {
            // Forget objects whose bucket is full again: they are as new. The
            // next prune waits until the map doubles, so pruning stays rare.
            let buckets = std::mem::take(&mut self.buckets);
            self.buckets =
                buckets.into_iter().filter(|(_, (t, since))| self.tokens(*t, *since, now) < self.burst).collect();
            self.prune_at = (self.buckets.len() * 2).max(PRUNE_AT);
        }
        let (tokens, since) = self.buckets.get(object).copied().unwrap_or((self.burst, now));
        let tokens = self.tokens(tokens, since, now);
        if tokens < 1.0 {
            self.buckets.insert(object.to_owned(), (tokens, now));
            return false;
        }
        self.buckets.insert(object.to_owned(), (tokens - 1.0, now));
        true
    }
}

/// A problem with an object, to be reported as a Warning Event.
#[derive(Clone, Debug)]
pub struct Problem {
    /// The object, with `fieldPath` set to the bad field: the recorder
    /// aggregates repeats by reference, so two problems of one object stay
    /// two Events.
    pub regarding: ObjectReference,
    pub note: String,
}

/// What became of the problems offered, for `/metrics`.
#[derive(Debug, Default)]
pub struct EventCounts {
    pub published: AtomicU64,
    pub failed: AtomicU64,
    /// Another node reports the object.
    pub other_node: AtomicU64,
    pub rate_limited: AtomicU64,
    /// The queue to the publisher was full.
    pub dropped: AtomicU64,
}

impl EventCounts {
    /// (outcome label, count) for each outcome.
    pub fn outcomes(&self) -> [(&'static str, u64); 5] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("published", get(&self.published)),
            ("failed", get(&self.failed)),
            ("other_node", get(&self.other_node)),
            ("rate_limited", get(&self.rate_limited)),
            ("dropped", get(&self.dropped)),
        ]
    }
}

/// Problems queued to the publisher at most; past it they are dropped and
/// counted (the loop never waits for the API).
const QUEUE: usize = 4096;

/// The loop's end of the publisher: [`EventSink::offer`] never blocks.
#[derive(Clone)]
pub struct EventSink {
    queue: mpsc::Sender<Problem>,
    counts: Arc<EventCounts>,
}

impl EventSink {
    /// Starts the publisher task. `peers` is the cache of agent pods and `me`
    /// this node's name; without them, this agent reports every problem.
    pub fn spawn(recorder: Recorder, me: Option<String>, peers: Option<Store<Pod>>, counts: Arc<EventCounts>) -> Self {
        let (queue, mut problems) = mpsc::channel::<Problem>(QUEUE);
        let task_counts = counts.clone();
        tokio::spawn(async move {
            let counts = task_counts;
            let mut limiter = Limiter::default();
            let mut batch = Vec::new(); // Not before the agents are known: at a restart of every agent,
            // each would otherwise report every problem.
            let listed = match &peers {
                Some(store) => tokio::time::timeout(PEERS_WAIT, store.wait_until_ready()).await.is_ok(),
                None => false,
            };
            if peers.is_some() && !listed {
                warn!("the agent pods are not listed yet: this agent reports every invalid object itself meanwhile");
            }
            while problems.recv_many(&mut batch, 256).await > 0 {
                // Read afresh for each batch; an empty list (still none Ready,
                // or never listed) means every agent reports.
                let ready = peers.as_ref().map(|store| ready_peers(&store.state()));
                for problem in batch.drain(..) {
                    let uid = problem.regarding.uid.clone().unwrap_or_default();
                    if !reports(&uid, me.as_deref(), ready.as_deref()) {
                        counts.other_node.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let object = format!(
                        "{}/{}/{}",
                        problem.regarding.kind.as_deref().unwrap_or_default(),
                        problem.regarding.namespace.as_deref().unwrap_or_default(),
                        problem.regarding.name.as_deref().unwrap_or_default()
                    );
                    if !limiter.allow(&object, Instant::now()) {
                        counts.rate_limited.fetch_add(1, Ordering::Relaxed);
                        debug!(object, "Event rate-limited");
                        continue;
                    }
                    let event = Event {
                        type_: EventType::Warning,
                        reason: REASON.into(),
                        note: Some(problem.note.clone()),
                        action: "Program".into(),
                        secondary: None,
                    };
                    match recorder.publish(&event, &problem.regarding).await {
                        Ok(()) => counts.published.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            warn!(object, error = %e, "publishing an Event failed");
                            counts.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }
        });
        Self { queue, counts }
    }

    /// Queues a problem for the publisher; a full queue drops it (counted).
    pub fn offer(&self, problem: Problem) {
        if self.queue.try_send(problem).is_err() {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn one_node_reports_each_object_and_every_node_agrees() {
        let ready = nodes(50);
        for i in 0..200 {
            let uid = format!("uid-{i}");
            let reporting: Vec<&String> =
                ready.iter().filter(|me| reports(&uid, Some(me.as_str()), Some(&ready))).collect();
            assert_eq!(reporting.len(), 1, "{uid}: {reporting:?}");
            // The order the Node list comes in does not matter.
            let mut shuffled = ready.clone();
            shuffled.reverse();
            assert_eq!(reporter(&uid, shuffled.iter().map(String::as_str)), Some(reporting[0].as_str()));
        }
    }

    #[test]
    fn objects_spread_over_the_nodes_and_a_leaving_node_moves_only_its_own() {
        let ready = nodes(10);
        let uids: Vec<String> = (0..10_000).map(|i| format!("{i:08x}-uid")).collect();
        let chosen: Vec<String> =
            uids.iter().map(|u| reporter(u, ready.iter().map(String::as_str)).unwrap().to_owned()).collect();
        for node in &ready {
            let share = chosen.iter().filter(|c| *c == node).count();
            assert!((800..1200).contains(&share), "{node} reports {share} of 10,000");
        }
        let fewer: Vec<String> = ready.iter().filter(|n| *n != "node-3").cloned().collect();
        for (uid, before) in uids.iter().zip(&chosen) {
            let after = reporter(uid, fewer.iter().map(String::as_str)).unwrap();
            if before != "node-3" {
                assert_eq!(after, before, "{uid} moved though its node stayed");
            }
        }
    }

    #[test]
    fn without_a_known_ready_node_list_every_node_reports() {
        assert!(reports("u", None, Some(&nodes(3))), "no --node-name");
        assert!(reports("u", Some("node-1"), None), "agent pods unknown");
        assert!(reports("u", Some("node-1"), Some(&[])), "no agent Ready");
        // An agent that is not Ready itself leaves its objects to Ready ones.
        let ready = nodes(3);
        assert!(!reports("u", Some("node-9"), Some(&ready)));
    }

    #[test]
    fn the_limiter_allows_a_burst_then_one_per_refill() {
        let mut limiter = Limiter::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!((0..3).all(|_| limiter.allow("a", t0)));
        assert!(!limiter.allow("a", t0), "burst spent");
        assert!(limiter.allow("b", t0), "per object");
        assert!(!limiter.allow("a", t0 + Duration::from_secs(59)));
        assert!(limiter.allow("a", t0 + Duration::from_secs(61)), "one token back after a refill");
        assert!(!limiter.allow("a", t0 + Duration::from_secs(62)));
        assert!((0..3).all(|_| limiter.allow("a", t0 + Duration::from_secs(3600))), "full again after a long quiet");
    }
}
