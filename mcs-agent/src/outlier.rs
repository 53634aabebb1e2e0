//! Passive health: outlier detection at L4 from what the datapath already
//! sees. Per backend, the kernel counts connection attempts (bare SYNs), the
//! SYN-ACKs that answered them and the RSTs sent instead. Every tick the
//! agent turns the deltas into decisions, Envoy-style:
//!
//! - A SYN still unanswered a whole tick after the tick it was sent in is a
//!   failure; a RST answering a SYN is one at once. A tick with SYN-ACKs and
//!   no failure resets the count.
//! - `consecutive_failures` in a row eject the backend for `base_ejection ×
//!   ejections so far` (capped at `max_ejection`), unless that would eject
//!   more than `max_ejected_percent` of a frontend's backends.
//! - When the time is up the backend is *probing*: it gets a small share of
//!   new connections; one SYN-ACK makes it healthy, one failure ejects it
//!   again for longer. `ejections` decays by one for each `base_ejection`
//!   spent healthy.
//!
//! Ejected and probing backends count as unhealthy in their tier's health,
//! so the locality spill rule moves traffic to the next tier. Established
//! connections are never moved: only new connections follow the tables.
//! Pure: the clock is an argument.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use crate::model::BackendAddr;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// Cumulative kernel counters of one backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub syns: u64,
    pub synacks: u64,
    pub syn_rsts: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Healthy,
    Ejected { until: Instant },
    Probing,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Ejected {
        addr: BackendAddr,
        failures: u32,
        duration: Duration,
        ejections: u32,
    },
    /// Its ejection ended: it receives a probing share of new connections.
    Probing {
        addr: BackendAddr,
    },
    Recovered {
        addr: BackendAddr,
    },
    /// Would have been ejected, but its frontend is at the ejection limit.
    Spared {
        addr: BackendAddr,
        failures: u32,
    },
}

#[derive(Clone, Debug)]
struct Track {
    last: Counters,
    /// SYNs still unanswered at the end of the previous tick: this tick's
    /// SYN-ACKs answer them first, the rest are failures.
    outstanding: u64,
    consecutive: u32,
    ejections: u32,
    healthy_since: Instant,
    state: State,
}

#[derive(Clone, Debug, Default)]
pub struct Detector {
    config: OutlierConfig,
    tracks: BTreeMap<BackendAddr, Track>,
    ejections_total: u64,
}

impl Detector {
    pub fn new(config: OutlierConfig) -> Self {
        Self { config, tracks: BTreeMap::new(), ejections_total: 0 }
    }

    /// One tick. `changed`: (previous, current) cumulative counters of the
    /// backends whose counters moved since the last tick; the others are taken
    /// as unchanged. `groups`: each frontend's backends, for the ejection limit.
    pub fn observe(
        &mut self,
        now: Instant,
        changed: &BTreeMap<BackendAddr, (Counters, Counters)>,
        groups: &[Vec<BackendAddr>],
    ) -> Vec<Event> {
        let config = self.config;
        let mut events = Vec::new();
        let mut candidates = Vec::new();
        let unchanged: Vec<(BackendAddr, Counters, Counters)> =
            self.tracks.iter().filter(|(a, _)| !changed.contains_key(a)).map(|(a, t)| (*a, t.last, t.last)).collect();
        for (addr, previous, now_counters) in changed.iter().map(|(a, (p, c))| (*a, *p, *c)).chain(unchanged) {
            let (addr, now_counters) = (&addr, &now_counters);
            let track = self.tracks.entry(*addr).or_insert_with(|| Track {
                last: previous,
                outstanding: 0,
                consecutive: 0,
                ejections: 0,
                healthy_since: now,
                state: State::Healthy,
            });
            let last = track.last;
            if now_counters.syns < last.syns
                || now_counters.synacks < last.synacks
                || now_counters.syn_rsts < last.syn_rsts
            {
                // The id's counters were reset (reused): start over.
                track.last = *now_counters;
                track.outstanding = 0;
                continue;
            }
            let (syns, acks, rsts) = (
                now_counters.syns - last.syns,
                now_counters.synacks - last.synacks,
                now_counters.syn_rsts - last.syn_rsts,
            );
            track.last = *now_counters;
            let answered_old = acks.min(track.outstanding);
            let failures = track.outstanding - answered_old + rsts;
            track.outstanding = syns.saturating_sub(acks - answered_old).saturating_sub(rsts);
            let failures = u32::try_from(failures).unwrap_or(u32::MAX);
            match track.state {
                State::Ejected { until } if now >= until => {
                    track.state = State::Probing;
                    track.consecutive = 0;
                    events.push(Event::Probing { addr: *addr });
                }
                State::Ejected { .. } => {}
                State::Probing if failures > 0 => candidates.push((*addr, failures)),
                State::Probing if acks > 0 => {
                    track.state = State::Healthy;
                    track.healthy_since = now;
                    track.consecutive = 0;
                    events.push(Event::Recovered { addr: *addr });
                }
                State::Probing => {}
                State::Healthy => {
                    if failures == 0 && acks > 0 {
                        track.consecutive = 0;
                    } else if acks > 0 {
                        track.consecutive = failures;
                    } else {
                        track.consecutive = track.consecutive.saturating_add(failures);
                    }
                    if track.ejections > 0 && now.duration_since(track.healthy_since) >= config.base_ejection {
                        track.ejections -= 1;
                        track.healthy_since = now;
                    }
                    if track.consecutive >= config.consecutive_failures {
                        candidates.push((*addr, track.consecutive));
                    }
                }
            }
        }
        for (addr, failures) in candidates {
            if !self.may_eject(&addr, groups) {
                events.push(Event::Spared { addr, failures });
                continue;
            }
            let track = self.tracks.get_mut(&addr).expect("tracked above");
            track.ejections += 1;
            let duration = (config.base_ejection * track.ejections).min(config.max_ejection);
            track.state = State::Ejected { until: now + duration };
            track.consecutive = 0;
            self.ejections_total += 1;
            events.push(Event::Ejected { addr, failures, duration, ejections: track.ejections });
        }
        // Healthy and quiet: nothing to remember (the caller keeps the counters).
        self.tracks.retain(|_, t| {
            !(t.state == State::Healthy && t.consecutive == 0 && t.outstanding == 0 && t.ejections == 0)
        });
        events
    }

    /// Forgets backends no frontend lists any more.
    pub fn retain_listed(&mut self, groups: &[Vec<BackendAddr>]) {
        let listed: BTreeSet<&BackendAddr> = groups.iter().flatten().collect();
        self.retain(|addr| listed.contains(addr));
    }

    /// Forgets the backends `keep` says no.
    pub fn retain(&mut self, keep: impl Fn(&BackendAddr) -> bool) {
        self.tracks.retain(|addr, _| keep(addr));
    }

    /// Every frontend `addr` belongs to stays within the ejection limit.
    fn may_eject(&self, addr: &BackendAddr, groups: &[Vec<BackendAddr>]) -> bool {
        groups.iter().filter(|g| g.contains(addr)).all(|group| {
            let out = group.iter().filter(|a| self.is_out(a)).count();
            (out + 1) * 100 <= group.len() * self.config.max_ejected_percent as usize
        })
    }

    fn is_out(&self, addr: &BackendAddr) -> bool {
        self.tracks.get(addr).is_some_and(|t| matches!(t.state, State::Ejected { .. }))
    }

    /// Backends that get no new connections now.
    pub fn ejected(&self) -> BTreeSet<BackendAddr> {
        self.tracks.iter().filter(|(_, t)| matches!(t.state, State::Ejected { .. })).map(|(a, _)| *a).collect()
    }

    /// Backends back from an ejection, getting a probing share.
    pub fn probing(&self) -> BTreeSet<BackendAddr> {
        self.tracks.iter().filter(|(_, t)| t.state == State::Probing).map(|(a, _)| *a).collect()
    }

    pub fn ejections_total(&self) -> u64 {
        self.ejections_total
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn addr(last: u8) -> BackendAddr {
        BackendAddr { ip: Ipv4Addr::new(10, 1, 0, last).into(), port: 80 }
    }

    /// A fake world: cumulative counters per backend, advanced by hand.
    struct World {
        start: Instant,
        tick: u32,
        counters: BTreeMap<BackendAddr, Counters>,
        detector: Detector,
        groups: Vec<Vec<BackendAddr>>,
    }

    impl World {
        fn new(backends: &[u8]) -> Self {
            let counters = backends.iter().map(|b| (addr(*b), Counters::default())).collect();
            let groups = vec![backends.iter().map(|b| addr(*b)).collect()];
            Self { start: Instant::now(), tick: 0, counters, detector: Detector::new(OutlierConfig::default()), groups }
        }

        /// Advances 250 ms: each backend got `syns` attempts; `alive` answer them.
        fn step(&mut self, syns: u64, alive: &[u8]) -> Vec<Event> {
            self.tick += 1;
            let mut changed = BTreeMap::new();
            for (a, c) in &mut self.counters {
                let previous = *c;
                c.syns += syns;
                if alive.iter().any(|b| addr(*b) == *a) {
                    c.synacks += syns;
                }
                if *c != previous {
                    changed.insert(*a, (previous, *c));
                }
            }
            let now = self.start + Duration::from_millis(250) * self.tick;
            self.detector.observe(now, &changed, &self.groups)
        }

        fn at(&self) -> Duration {
            Duration::from_millis(250) * self.tick
        }
    }

    #[test]
    fn healthy_backends_are_never_ejected() {
        let mut w = World::new(&[1, 2, 3]);
        for _ in 0..100 {
            assert!(w.step(10, &[1, 2, 3]).is_empty());
        }
        assert!(w.detector.ejected().is_empty());
    }

    #[test]
    fn a_dead_backend_is_ejected_within_a_second_and_probed_after_its_time() {
        let mut w = World::new(&[1, 2, 3, 4]);
        w.step(3, &[1, 2, 3, 4]);
        let mut ejected_at = None;
        for _ in 0..8 {
            let events = w.step(3, &[1, 2, 3]);
            if events.iter().any(|e| matches!(e, Event::Ejected { addr: a, .. } if *a == addr(4))) {
                ejected_at = Some(w.at());
                break;
            }
        }
        let at = ejected_at.expect("ejected");
        assert!(at <= Duration::from_secs(1), "ejected after {at:?}");
        assert_eq!(w.detector.ejected(), BTreeSet::from([addr(4)]));
        // 30 s later it is probed; it is still dead: ejected again, for longer.
        let mut events = Vec::new();
        while !events.iter().any(|e| matches!(e, Event::Probing { .. })) {
            events = w.step(0, &[1, 2, 3]);
        }
        let probed = w.at() - at;
        assert!(probed >= Duration::from_secs(30) && probed <= Duration::from_millis(30_250), "{probed:?}");
        w.step(1, &[1, 2, 3]);
        let events = w.step(0, &[1, 2, 3]);
        let Some(Event::Ejected { duration, ejections, .. }) = events.first() else { panic!("{events:?}") };
        assert_eq!((*duration, *ejections), (Duration::from_secs(60), 2), "the second ejection lasts longer");
    }

    #[test]
    fn a_recovered_backend_returns_after_one_answered_probe() {
        let mut w = World::new(&[1, 2]);
        while w.detector.ejected().is_empty() {
            w.step(5, &[1]);
        }
        while w.detector.probing().is_empty() {
            w.step(0, &[1]);
        }
        let events = w.step(1, &[1, 2]);
        assert!(events.contains(&Event::Recovered { addr: addr(2) }), "one SYN-ACK is enough: {events:?}");
        assert!(
            w.detector.ejected().is_empty() && w.detector.probing().is_empty(),
            "{:?} {:?}",
            w.detector.ejected(),
            w.detector.probing()
        );
    }

    #[test]
    fn ejection_never_exceeds_the_configured_share_of_a_frontend() {
        let mut w = World::new(&[1, 2, 3, 4]);
        for _ in 0..20 {
            w.step(5, &[]);
        }
        assert_eq!(w.detector.ejected().len(), 2, "at most 50 % of 4 backends");
        let spared = w.step(5, &[]).iter().filter(|e| matches!(e, Event::Spared { .. })).count();
        assert!(spared >= 1);
    }

    #[test]
    fn resets_answered_syns_and_rsts_count_as_intended() {
        let mut d = Detector::new(OutlierConfig::default());
        let a = addr(1);
        let group = vec![vec![a, addr(2), addr(3)]];
        let t0 = Instant::now();
        // Five RSTs instead of SYN-ACKs: failures at once.
        let rsts = Counters { syns: 5, synacks: 0, syn_rsts: 5 };
        let c = BTreeMap::from([(a, (Counters::default(), rsts))]);
        let events = d.observe(t0 + Duration::from_millis(250), &c, &group);
        assert!(matches!(events.as_slice(), [Event::Ejected { .. }]), "{events:?}");
        // Counters going backwards (an id reused) start the tracking over.
        let c = BTreeMap::from([(a, (rsts, Counters::default()))]);
        assert!(d.observe(t0 + Duration::from_millis(500), &c, &group).is_empty());
    }
}
