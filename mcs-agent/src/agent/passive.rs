//! Passive health as the loop runs it: which backends to watch (the ready
//! backends of each programmed frontend, by backend id), reading their
//! connect counters each tick, and handing the detector's verdict to the
//! reconciler. The kernel's counters and the reconciler are behind traits,
//! so a tick is tested without either.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Instant,
};

use mcs_common::Health;
use tracing::{info, warn};

use crate::{
    datapath::Datapath,
    model::{BackendAddr, Condition, FrontendKey},
    outlier::{Counters, Detector, Event, OutlierConfig},
    reconcile::Reconciler,
};

/// The kernel's per-backend connect counters (the mmapped HEALTH map).
pub trait HealthCounters {
    /// A backend id's counters; `None` past the counted ids.
    fn health(&self, id: u32) -> Option<Health>;
    /// How many backend ids have counters.
    fn health_entries(&self) -> usize;
}

impl HealthCounters for Datapath {
    fn health(&self, id: u32) -> Option<Health> {
        Datapath::health(self, id)
    }

    fn health_entries(&self) -> usize {
        Datapath::health_entries(self)
    }
}

/// What is programmed, as passive health needs it, and where its verdict goes.
pub trait Programmed {
    /// Backend ids handed out (`Some`) or freed (`None`) since the last call;
    /// `None` when everything must be read again (the first call, a re-adoption).
    fn take_backend_changes(&mut self) -> Option<Vec<(u32, Option<BackendAddr>)>>;
    /// Every programmed backend and its id.
    fn backend_ids(&self) -> Vec<(BackendAddr, u32)>;
    /// Every desired frontend.
    fn frontend_keys(&self) -> Vec<FrontendKey>;
    /// A programmed frontend's ready backends (its ejection limit counts
    /// these); `None` when it is not programmed.
    fn ready_backends(&self, key: &FrontendKey) -> Option<Vec<BackendAddr>>;
    /// The detector's verdict; true when it changed what is programmed (a
    /// reconcile is due).
    fn set_health(&mut self, ejected: BTreeSet<BackendAddr>, probing: BTreeSet<BackendAddr>) -> bool;
}

impl Programmed for Reconciler {
    fn take_backend_changes(&mut self) -> Option<Vec<(u32, Option<BackendAddr>)>> {
        Reconciler::take_backend_changes(self)
    }

    fn backend_ids(&self) -> Vec<(BackendAddr, u32)> {
        self.applied().backends().map(|(addr, id)| (*addr, id)).collect()
    }

    fn frontend_keys(&self) -> Vec<FrontendKey> {
        self.state().frontends.keys().copied().collect()
    }

    fn ready_backends(&self, key: &FrontendKey) -> Option<Vec<BackendAddr>> {
        self.state().frontends.get(key).filter(|_| self.applied().frontend(key).is_some()).map(|f| {
            // Kept until the frontend changes: no spare capacity.
            let mut ready: Vec<BackendAddr> =
                f.endpoints.iter().filter(|e| e.condition == Condition::Ready).map(|e| e.addr).collect();
            ready.shrink_to_fit();
            ready
        })
    }

    fn set_health(&mut self, ejected: BTreeSet<BackendAddr>, probing: BTreeSet<BackendAddr>) -> bool {
        Reconciler::set_health(self, ejected, probing)
    }
}

/// Passive health's view of what is programmed, kept between ticks and
/// brought up to date with what changed only: at 100,000 services a walk of
/// everything on every tick stalled the loop for tens of milliseconds.
#[derive(Default)]
struct View {
    /// Each programmed frontend's ready backends (the ejection limit).
    groups: Vec<Vec<BackendAddr>>,
    /// The frontend of each group, and the group of each frontend.
    group_keys: Vec<FrontendKey>,
    group_of: HashMap<FrontendKey, usize>,
    /// How many groups list each backend. Passive health keeps a backend's
    /// record while a group lists it, even when the backend is out of every
    /// table (ejected).
    listed: HashMap<BackendAddr, u32>,
    /// A backend stopped being listed since the detector was last pruned.
    unlisted: bool,
    /// Backend address by id: a tick reads the health counters of these
    /// (HEALTH covers every backend id).
    ids: Vec<Option<BackendAddr>>,
    /// Counters as last read, by backend id.
    last: Vec<Health>,
    /// Backends whose id is past the counted ones: passive health cannot
    /// watch them. Shown in /metrics and warned about when it changes.
    unwatched: usize,
}

impl View {
    /// Takes in the frontends that changed and the backend ids handed out or
    /// freed since the last call (everything, the first time or after a
    /// re-adoption).
    fn update(&mut self, programmed: &mut impl Programmed, changed: &BTreeSet<FrontendKey>, detector: &mut Detector) {
        let set = |ids: &mut Vec<Option<BackendAddr>>, id: u32, addr: Option<BackendAddr>| {
            if ids.len() <= id as usize {
                ids.resize(id as usize + 1, None);
            }
            ids[id as usize] = addr;
        };
        let all = match programmed.take_backend_changes() {
            None => {
                // Sized once, exactly: grown id by id, doubling left up to
                // half of it spare (a million ids at 100,000 services).
                let backends = programmed.backend_ids();
                let len = backends.iter().map(|(_, id)| *id as usize + 1).max().unwrap_or(0);
                self.ids = vec![None; len];
                // Counters by id are another backend's once ids moved.
                self.last.clear();
                for (addr, id) in backends {
                    self.ids[id as usize] = Some(addr);
                }
                true
            }
            Some(changes) => {
                for (id, addr) in changes {
                    set(&mut self.ids, id, addr);
                }
                false
            }
        };
        let keys: Vec<FrontendKey> = if all { programmed.frontend_keys() } else { changed.iter().copied().collect() };
        if all {
            self.groups.clear();
            self.group_keys.clear();
            self.group_of.clear();
            self.listed.clear();
            self.unlisted = true;
        }
        for key in keys {
            self.set_group(programmed, key);
        }
        if std::mem::take(&mut self.unlisted) {
            // Records of backends no frontend lists any more.
            detector.retain(|addr| self.listed.contains_key(addr));
        }
    }

    fn list(&mut self, group: &[BackendAddr], add: bool) {
        for addr in group {
            if add {
                *self.listed.entry(*addr).or_default() += 1;
            } else if let Some(n) = self.listed.get_mut(addr) {
                *n -= 1;
                if *n == 0 {
                    self.listed.remove(addr);
                    self.unlisted = true;
                }
            }
        }
    }

    fn set_group(&mut self, programmed: &impl Programmed, key: FrontendKey) {
        let group = programmed.ready_backends(&key);
        if let Some(group) = &group {
            self.list(group, true);
        }
        match (self.group_of.get(&key).copied(), group) {
            (Some(i), Some(group)) => {
                let old = std::mem::replace(&mut self.groups[i], group);
                self.list(&old, false);
            }
            (None, Some(group)) => {
                self.group_of.insert(key, self.groups.len());
                self.groups.push(group);
                self.group_keys.push(key);
            }
            (Some(i), None) => {
                self.group_of.remove(&key);
                let old = self.groups.swap_remove(i);
                self.list(&old, false);
                self.group_keys.swap_remove(i);
                if let Some(moved) = self.group_keys.get(i) {
                    self.group_of.insert(*moved, i);
                }
            }
            (None, None) => {}
        }
    }
}

/// Passive health: the detector, its view of what is programmed, and the
/// frontends changed since the view was brought up to date.
pub struct PassiveHealth {
    detector: Detector,
    view: View,
    pending: BTreeSet<FrontendKey>,
    /// The next backend id a round reads; 0 between rounds.
    cursor: usize,
    /// Counters that moved in this round's steps so far: the detector sees
    /// the round whole, at its last step (seen step by step, the last
    /// step's sweep observed them again with no time gone by).
    moved: BTreeMap<BackendAddr, (Counters, Counters)>,
    /// Every backend id moved since the round began (the maps grew): it
    /// ends at its next step with what it read.
    cut: bool,
}

/// Backend ids one step reads: about a millisecond. A round over a
/// million ids (100,000 services × 10) took 7.7 ms in one piece, and a
/// change arriving meanwhile waited for all of it.
pub const STEP_IDS: usize = 131_072;

impl PassiveHealth {
    pub fn new(config: OutlierConfig) -> Self {
        Self {
            detector: Detector::new(config),
            view: View::default(),
            pending: BTreeSet::new(),
            cursor: 0,
            moved: BTreeMap::new(),
            cut: false,
        }
    }

    /// Frontends a reconcile changed: the next round looks at them again.
    /// A round in progress goes on by its view: a freed id is quarantined
    /// for a plan before it is handed out again, so what the rest of the
    /// round reads under a stale view is at worst a departed backend's
    /// (ending the round instead would starve the last ids under a steady
    /// stream of changes).
    pub fn changed(&mut self, keys: impl IntoIterator<Item = FrontendKey>) {
        self.pending.extend(keys);
    }

    /// Every backend id moved (the maps grew): a round in progress ends at
    /// its next step, and the next one reads by a view built afresh.
    pub fn ids_moved(&mut self) {
        self.cut |= self.in_round();
    }

    /// One tick: bring the view up to date (rebuilding walks only what
    /// changed since the last tick), read the connect counters of every
    /// backend id that has them (memory reads of the mmapped HEALTH map),
    /// feed the ones that moved to the detector, and hand its verdict to the
    /// reconciler. True when the verdict changed (a reconcile is due).
    pub fn tick(&mut self, now: Instant, counters: &impl HealthCounters, programmed: &mut impl Programmed) -> bool {
        let mut due = false;
        loop {
            let (verdict, done) = self.step(now, counters, programmed, usize::MAX);
            due |= verdict;
            if done {
                return due;
            }
        }
    }

    /// A round in the middle: the loop runs [`PassiveHealth::step`] again
    /// once other events had their turn.
    pub fn in_round(&self) -> bool {
        self.cursor > 0
    }

    /// Part of a tick: a round's first step brings the view up to date;
    /// each step reads the counters of at most `ids` backend ids from where
    /// the last one stopped, and hands the detector's verdict on (true when
    /// it changed). Also true when the round is done.
    pub fn step(
        &mut self,
        now: Instant,
        counters: &impl HealthCounters,
        programmed: &mut impl Programmed,
        ids: usize,
    ) -> (bool, bool) {
        if self.cursor == 0 {
            let changed = std::mem::take(&mut self.pending);
            self.view.update(programmed, &changed, &mut self.detector);
        }
        let view = &mut self.view;
        let as_counters = |h: Health| Counters { syns: h.syns, synacks: h.synacks, syn_rsts: h.syn_rsts };
        let moved = &mut self.moved;
        // One step to the ids' length (not id by id, which doubling would
        // leave up to half spare).
        let counted = view.ids.len().min(counters.health_entries());
        if view.last.len() < counted {
            view.last.resize(counted, Health::default());
        }
        let end = if std::mem::take(&mut self.cut) {
            self.cursor
        } else {
            self.cursor.saturating_add(ids).min(view.ids.len())
        };
        let mut done = end == view.ids.len() || end == self.cursor;
        for (id, addr) in view.ids.iter().enumerate().take(end).skip(self.cursor) {
            let Some(addr) = addr else { continue };
            // Past the counted ids: the rest have no counters.
            let Some(now) = counters.health(id as u32) else {
                done = true;
                break;
            };
            // Sized to the counted ids above.
            let Some(last) = view.last.get_mut(id) else {
                done = true;
                break;
            };
            if *last != now {
                moved.insert(*addr, (as_counters(*last), as_counters(now)));
                *last = now;
            }
        }
        self.cursor = if done { 0 } else { end };
        if !done {
            return (false, false);
        }
        let moved = std::mem::take(moved);
        for event in self.detector.observe(now, &moved, &view.groups) {
            match event {
                Event::Ejected { addr, failures, duration, ejections } => warn!(
                    backend = %addr, failures, seconds = duration.as_secs(), ejections,
                    "passive health: backend ejected from new connections (connect attempts failing)"
                ),
                Event::Probing { addr } => {
                    info!(backend = %addr, "passive health: ejection over, probing with a small share of new connections")
                }
                Event::Recovered { addr } => info!(backend = %addr, "passive health: backend answers again"),
                Event::Spared { addr, failures } => warn!(
                    backend = %addr, failures,
                    "passive health: backend failing but not ejected, its frontend is at --outlier-max-ejection-percent"
                ),
            }
        }
        let unwatched = view.ids.iter().skip(counters.health_entries()).filter(|a| a.is_some()).count();
        if unwatched != view.unwatched {
            if unwatched > 0 {
                warn!(
                    unwatched,
                    counted_ids = counters.health_entries(),
                    "passive health cannot watch backends whose id is past the HEALTH map's size (it should cover --max-backends); restart the agent"
                );
            } else {
                info!("passive health watches every backend again");
            }
            view.unwatched = unwatched;
        }
        (programmed.set_health(self.detector.ejected(), self.detector.probing()), true)
    }

    /// Ejections since the start (a counter in /metrics).
    pub fn ejections_total(&self) -> u64 {
        self.detector.ejections_total()
    }

    /// Programmed backends passive health cannot watch.
    pub fn unwatched(&self) -> usize {
        self.view.unwatched
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        time::Duration,
    };

    use super::*;
    use crate::model::Protocol;

    fn addr(last: u8) -> BackendAddr {
        BackendAddr { ip: IpAddr::V4(Ipv4Addr::new(10, 1, 0, last)), port: 8080 }
    }

    fn key(port: u16) -> FrontendKey {
        FrontendKey { vip: IpAddr::V4(Ipv4Addr::new(10, 250, 0, 1)), port, protocol: Protocol::Tcp }
    }

    /// The HEALTH map: counters by backend id, `entries` of them.
    struct Kernel {
        counters: Vec<Health>,
        entries: usize,
    }

    impl HealthCounters for Kernel {
        fn health(&self, id: u32) -> Option<Health> {
            ((id as usize) < self.entries).then(|| self.counters.get(id as usize).copied().unwrap_or_default())
        }

        fn health_entries(&self) -> usize {
            self.entries
        }
    }

    impl Kernel {
        fn new(entries: usize) -> Self {
            Self { counters: vec![Health::default(); entries], entries }
        }

        /// `syns` attempts to backend `id`, `acks` answered, `rsts` refused.
        fn connect(&mut self, id: u32, syns: u64, acks: u64, rsts: u64) {
            let h = &mut self.counters[id as usize];
            h.syns += syns;
            h.synacks += acks;
            h.syn_rsts += rsts;
        }
    }

    /// Programmed frontends and backend ids; records the verdict.
    #[derive(Default)]
    struct Fake {
        frontends: BTreeMap<FrontendKey, Vec<BackendAddr>>,
        ids: Vec<(BackendAddr, u32)>,
        read_all: bool,
        changes: Vec<(u32, Option<BackendAddr>)>,
        ejected: BTreeSet<BackendAddr>,
        probing: BTreeSet<BackendAddr>,
    }

    impl Programmed for Fake {
        fn take_backend_changes(&mut self) -> Option<Vec<(u32, Option<BackendAddr>)>> {
            if !std::mem::replace(&mut self.read_all, true) {
                return None;
            }
            Some(std::mem::take(&mut self.changes))
        }

        fn backend_ids(&self) -> Vec<(BackendAddr, u32)> {
            self.ids.clone()
        }

        fn frontend_keys(&self) -> Vec<FrontendKey> {
            self.frontends.keys().copied().collect()
        }

        fn ready_backends(&self, key: &FrontendKey) -> Option<Vec<BackendAddr>> {
            self.frontends.get(key).cloned()
        }

        fn set_health(&mut self, ejected: BTreeSet<BackendAddr>, probing: BTreeSet<BackendAddr>) -> bool {
            let changed = ejected != self.ejected || probing != self.probing;
            (self.ejected, self.probing) = (ejected, probing);
            changed
        }
    }

    /// One frontend over backends 1..=n, with ids 1..=n.
    fn fake(n: u8) -> Fake {
        Fake {
            ids: (1..=n).map(|i| (addr(i), u32::from(i))).collect(),
            frontends: BTreeMap::from([(key(80), (1..=n).map(addr).collect())]),
            ..Default::default()
        }
    }

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn refused_connects_eject_a_backend_then_it_probes_and_recovers() {
        let (mut health, mut kernel, mut programmed) = (PassiveHealth::new(config()), Kernel::new(16), fake(4));
        let t0 = Instant::now();
        assert!(!health.tick(t0, &kernel, &mut programmed), "nothing moved: no verdict");
        for tick in 1..=3 {
            kernel.connect(2, 1, 0, 1);
            kernel.connect(1, 4, 4, 0);
            let due = health.tick(t0 + Duration::from_millis(250 * tick), &kernel, &mut programmed);
            assert_eq!(due, tick == 3, "the third refused connect in a row ejects (tick {tick})");
        }
        assert_eq!(programmed.ejected, BTreeSet::from([addr(2)]));
        assert_eq!(health.ejections_total(), 1);
        // Its time is up at the next tick after 30 s: probing, then one answer heals it.
        let later = t0 + Duration::from_secs(31);
        kernel.connect(2, 1, 0, 0);
        assert!(health.tick(later, &kernel, &mut programmed));
        assert!(programmed.ejected.is_empty());
        assert_eq!(programmed.probing, BTreeSet::from([addr(2)]));
        kernel.connect(2, 1, 1, 0);
        assert!(health.tick(later + Duration::from_millis(250), &kernel, &mut programmed));
        assert!(programmed.probing.is_empty() && programmed.ejected.is_empty());
    }

    #[test]
    fn a_round_in_steps_reads_every_id_once_and_ejects_as_a_whole_tick_does() {
        let (mut health, mut kernel, mut programmed) = (PassiveHealth::new(config()), Kernel::new(16), fake(4));
        let t0 = Instant::now();
        health.tick(t0, &kernel, &mut programmed);
        for tick in 1..=3 {
            kernel.connect(4, 1, 0, 1);
            let at = t0 + Duration::from_millis(250 * tick);
            // Ids 0..=4 two at a time: three steps, the last ends the round.
            let steps: Vec<(bool, bool)> = (0..3).map(|_| health.step(at, &kernel, &mut programmed, 2)).collect();
            assert_eq!(steps.iter().map(|s| s.1).collect::<Vec<_>>(), [false, false, true]);
            assert!(!health.in_round());
            assert_eq!(steps[2].0, tick == 3, "id 4 is read in the last step; its third refusal ejects");
        }
        assert_eq!(programmed.ejected, BTreeSet::from([addr(4)]));
        // A frontend changed in the middle of a round waits for the next.
        let at = t0 + Duration::from_secs(1);
        health.step(at, &kernel, &mut programmed, 2);
        health.changed([key(81)]);
        health.step(at, &kernel, &mut programmed, 2);
        assert!(!health.pending.is_empty(), "taken at the start of a round only");
        assert!(health.step(at, &kernel, &mut programmed, 2).1);
        health.step(at, &kernel, &mut programmed, 2);
        assert!(health.pending.is_empty());
        // The maps grew (every id moved): the round ends with what it read.
        health.step(at, &kernel, &mut programmed, 2);
        health.ids_moved();
        assert!(health.step(at, &kernel, &mut programmed, 2).1, "cut short");
        assert!(!health.in_round());
    }

    #[test]
    fn syns_in_flight_across_a_rounds_steps_are_not_failures() {
        let (mut health, mut kernel, mut programmed) = (PassiveHealth::new(config()), Kernel::new(16), fake(4));
        let t0 = Instant::now();
        health.tick(t0, &kernel, &mut programmed);
        // Read in the round's first step with 5 SYNs unanswered, answered
        // before the next round: seen mid-round again, they were failures.
        kernel.connect(1, 5, 0, 0);
        let round = |health: &mut PassiveHealth, kernel: &Kernel, programmed: &mut Fake, at| {
            while !health.step(at, kernel, programmed, 2).1 {}
        };
        round(&mut health, &kernel, &mut programmed, t0 + Duration::from_millis(250));
        kernel.connect(1, 0, 5, 0);
        round(&mut health, &kernel, &mut programmed, t0 + Duration::from_millis(500));
        assert!(programmed.ejected.is_empty(), "a healthy backend stays");
    }

    #[test]
    fn no_more_than_the_limit_of_a_frontend_is_ejected() {
        let (mut health, mut kernel, mut programmed) = (PassiveHealth::new(config()), Kernel::new(16), fake(4));
        let t0 = Instant::now();
        for tick in 1..=3 {
            for id in 1..=4 {
                kernel.connect(id, 1, 0, 1);
            }
            health.tick(t0 + Duration::from_millis(250 * tick), &kernel, &mut programmed);
        }
        assert_eq!(programmed.ejected.len(), 2, "50 % of four backends: {:?}", programmed.ejected);
    }

    #[test]
    fn a_backend_no_frontend_lists_is_forgotten() {
        let (mut health, mut kernel, mut programmed) = (PassiveHealth::new(config()), Kernel::new(16), fake(4));
        let t0 = Instant::now();
        for tick in 1..=3 {
            kernel.connect(3, 1, 0, 1);
            health.tick(t0 + Duration::from_millis(250 * tick), &kernel, &mut programmed);
        }
        assert_eq!(programmed.ejected, BTreeSet::from([addr(3)]));
        // The frontend loses backend 3 and its id is freed.
        programmed.frontends.insert(key(80), vec![addr(1), addr(2), addr(4)]);
        programmed.changes.push((3, None));
        health.changed([key(80)]);
        assert!(health.tick(t0 + Duration::from_secs(1), &kernel, &mut programmed));
        assert!(programmed.ejected.is_empty(), "no record is kept of a backend nobody lists");
    }

    #[test]
    fn backends_past_the_counted_ids_are_counted_as_unwatched() {
        let (mut health, mut kernel, mut programmed) = (PassiveHealth::new(config()), Kernel::new(3), fake(5));
        let t0 = Instant::now();
        health.tick(t0, &kernel, &mut programmed);
        assert_eq!(health.unwatched(), 3, "ids 3, 4 and 5 have no counters");
        // And the watched ones are still watched.
        for tick in 1..=3 {
            kernel.connect(2, 1, 0, 1);
            health.tick(t0 + Duration::from_millis(250 * tick), &kernel, &mut programmed);
        }
        assert_eq!(programmed.ejected, BTreeSet::from([addr(2)]));
    }
}
