//! When the control loop reconciles and what each pass must do: leading-edge
//! debounce, stale-by-resource readiness, and the spacing of full recomputes.
//! Pure: the loop passes the time in.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{desired::ServiceRef, source::kube::SourceEvent};

/// What the next pass has to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Read the whole source (start, resync, a watch that restarted).
    pub full: bool,
    /// Manifest files the watcher named.
    pub paths: BTreeSet<PathBuf>,
    /// Services whose imports or slices the API changed.
    pub services: BTreeSet<ServiceRef>,
    /// Recompute every service (passive health changed, periodic check).
    pub recompute: bool,
}

impl Due {
    pub fn any(&self) -> bool {
        self.full || self.recompute || !self.paths.is_empty() || !self.services.is_empty()
    }
}

/// A resource's watch started or stopped failing: worth a log line.
#[derive(Debug, PartialEq, Eq)]
pub enum StaleChange {
    Failing { what: &'static str, message: String },
    Resumed { what: &'static str },
}

/// Every resync recomputes the whole state this often (as a check that the
/// incremental state is what a full pass gives)...
const RECOMPUTE_EVERY: u64 = 10;
/// ...but never sooner than this after the last one...
const RECOMPUTE_SPACING: Duration = Duration::from_secs(300);
/// ...nor more than this share of the time (at 100,000 services a full pass
/// takes seconds, and changes wait behind it).
const RECOMPUTE_SHARE: u32 = 1000;

/// The loop's clockwork.
#[derive(Debug)]
pub struct Schedule {
    debounce: Duration,
    last_reconcile: Instant,
    resyncs: u64,
    /// (when, how long) of the last pass that recomputed every service.
    last_full_pass: (Instant, Duration),
    /// Failing watches by resource: ready only when none fails.
    stale: BTreeMap<&'static str, String>,
    due: Due,
}

impl Schedule {
    /// `full`: a source is there to read at once.
    pub fn new(debounce: Duration, now: Instant, full: bool) -> Self {
        Self {
            debounce,
            last_reconcile: now,
            resyncs: 0,
            last_full_pass: (now, Duration::ZERO),
            stale: BTreeMap::new(),
            due: Due { full, ..Due::default() },
        }
    }

    /// How long a change arriving at `now` waits: nothing after a quiet
    /// period (a lone change is applied at once), the rest of the window
    /// after a reconcile (a burst becomes one pass per window).
    pub fn debounce_wait(&self, now: Instant) -> Duration {
        self.debounce.saturating_sub(now.saturating_duration_since(self.last_reconcile))
    }

    /// Takes in one source event.
    pub fn on_event(&mut self, event: SourceEvent) -> Option<StaleChange> {
        match event {
            SourceEvent::Error { what, message } => {
                let new = !self.stale.contains_key(what);
                self.stale.insert(what, message.clone());
                new.then_some(StaleChange::Failing { what, message })
            }
            SourceEvent::Resumed { what } => self.stale.remove(what).map(|_| StaleChange::Resumed { what }),
            SourceEvent::Changed => {
                self.due.full = true;
                None
            }
            SourceEvent::Files(paths) => {
                self.due.paths.extend(paths);
                None
            }
            SourceEvent::Services(services) => {
                self.due.services.extend(services);
                None
            }
        }
    }

    /// Why the agent is stale (`/readyz`): every failing resource, or none.
    pub fn stale(&self) -> Option<String> {
        let why: Vec<String> = self.stale.iter().map(|(what, message)| format!("{what}: {message}")).collect();
        (!why.is_empty()).then(|| why.join("; "))
    }

    pub fn is_stale(&self) -> bool {
        !self.stale.is_empty()
    }

    /// The periodic resync at `now`. Kubernetes mode re-reads its caches
    /// (manifests mode: the resync thread names changed files itself).
    pub fn on_resync(&mut self, now: Instant, kube: bool) {
        self.due.full |= kube;
        self.resyncs += 1;
        let spacing = RECOMPUTE_SPACING.max(self.last_full_pass.1 * RECOMPUTE_SHARE);
        self.due.recompute |= self.resyncs.is_multiple_of(RECOMPUTE_EVERY)
            && now.saturating_duration_since(self.last_full_pass.0) >= spacing;
    }

    /// The source became readable (Kubernetes: the API answered).
    pub fn source_ready(&mut self) {
        self.due.full = true;
    }

    /// Passive health changed a verdict: every service is recomputed.
    pub fn recompute(&mut self) {
        self.due.recompute = true;
    }

    pub fn due(&self) -> &Due {
        &self.due
    }

    /// The work of the pass about to run.
    pub fn take_due(&mut self) -> Due {
        std::mem::take(&mut self.due)
    }

    /// A pass ended at `now`; it took `took`, and `full` when it recomputed
    /// every service.
    /// A pass ended at `now`. Only one that did work (`worked`) opens a
    /// debounce window: a pass for a repeated event must not delay the next
    /// change.
    pub fn reconciled(&mut self, now: Instant, took: Duration, full: bool, worked: bool) {
        if full {
            self.last_full_pass = (now, took);
        }
        if worked {
            self.last_reconcile = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_lone_change_goes_at_once_and_a_burst_waits_for_the_window() {
        let t0 = Instant::now();
        let mut s = Schedule::new(100 * MS, t0, false);
        assert_eq!(s.debounce_wait(t0 + 500 * MS), Duration::ZERO, "after a quiet period");
        s.reconciled(t0 + 500 * MS, 5 * MS, false, true);
        assert_eq!(s.debounce_wait(t0 + 530 * MS), 70 * MS, "within the window: the rest of it");
        assert_eq!(s.debounce_wait(t0 + 600 * MS), Duration::ZERO);
        // A pass that found nothing to do (a repeated event) opens no window.
        s.reconciled(t0 + 650 * MS, MS, false, false);
        assert_eq!(s.debounce_wait(t0 + 660 * MS), Duration::ZERO, "the next change goes at once");
        // Every change of the window lands in one pass.
        s.on_event(SourceEvent::Files(vec!["a.yaml".into()]));
        s.on_event(SourceEvent::Files(vec!["b.yaml".into(), "a.yaml".into()]));
        s.on_event(SourceEvent::Services(vec![("demo".into(), "web".into())]));
        s.on_event(SourceEvent::Services(vec![("demo".into(), "web".into()), ("demo".into(), "api".into())]));
        s.on_event(SourceEvent::Changed);
        let due = s.take_due();
        assert_eq!((due.full, due.paths.len(), due.services.len()), (true, 2, 2));
        assert!(!s.due().any(), "taken");
    }

    #[test]
    fn stale_by_resource_until_that_one_resumes() {
        let t0 = Instant::now();
        let mut s = Schedule::new(100 * MS, t0, true);
        let error = |what, message: &str| SourceEvent::Error { what, message: message.into() };
        assert_eq!(
            s.on_event(error("EndpointSlice", "403 Forbidden")),
            Some(StaleChange::Failing { what: "EndpointSlice", message: "403 Forbidden".into() })
        );
        assert_eq!(s.on_event(error("EndpointSlice", "403 again")), None, "said once");
        // Another resource changing does not clear it.
        s.on_event(SourceEvent::Changed);
        s.on_event(SourceEvent::Resumed { what: "ServiceImport" });
        assert_eq!(s.stale().as_deref(), Some("EndpointSlice: 403 again"));
        s.on_event(error("Service", "connection refused"));
        assert_eq!(s.stale().as_deref(), Some("EndpointSlice: 403 again; Service: connection refused"));
        assert_eq!(
            s.on_event(SourceEvent::Resumed { what: "EndpointSlice" }),
            Some(StaleChange::Resumed { what: "EndpointSlice" })
        );
        assert!(s.is_stale(), "Service still fails");
        s.on_event(SourceEvent::Resumed { what: "Service" });
        assert_eq!(s.stale(), None);
    }

    #[test]
    fn a_full_recompute_every_tenth_resync_at_most_every_five_minutes_and_a_thousandth_of_the_time() {
        let t0 = Instant::now();
        let mut s = Schedule::new(100 * MS, t0, false);
        let resync = Duration::from_secs(30);
        let mut recomputes = Vec::new();
        for k in 1..=40u32 {
            let now = t0 + resync * k;
            s.on_resync(now, true);
            let due = s.take_due();
            assert!(due.full, "Kubernetes mode re-reads its caches every resync");
            if due.recompute {
                recomputes.push(k);
                s.reconciled(now, Duration::from_millis(200), true, true);
            }
        }
        assert_eq!(recomputes, [10, 20, 30, 40], "every tenth resync, 300 s apart");

        // A full pass of 2 s: no more than one per 2,000 s.
        let mut s = Schedule::new(100 * MS, t0, false);
        s.reconciled(t0, Duration::from_secs(2), true, true);
        let mut recomputes = Vec::new();
        for k in 1..=200u32 {
            let now = t0 + resync * k;
            s.on_resync(now, false);
            if s.take_due().recompute {
                recomputes.push(k);
                s.reconciled(now, Duration::from_secs(2), true, true);
            }
        }
        assert_eq!(recomputes, [70, 140], "the first tenth resync past 2,000 s, then again");
    }

    #[test]
    fn manifests_mode_resyncs_read_nothing_and_health_asks_for_a_recompute() {
        let t0 = Instant::now();
        let mut s = Schedule::new(100 * MS, t0, true);
        assert!(s.take_due().full, "the first pass reads everything");
        s.on_resync(t0 + Duration::from_secs(30), false);
        assert!(!s.due().any(), "the resync thread names changed files itself");
        s.recompute();
        assert_eq!(s.take_due(), Due { recompute: true, ..Due::default() });
    }
}
