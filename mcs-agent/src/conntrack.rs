//! Conntrack expiry: idle timeouts per protocol and state, and the collector
//! that removes expired flows from `CT` and `CT6` in the background.
//!
//! The kernel side keeps no timer: an LRU map forgets flows only when it is
//! full, so idle flows used to stay until evicted, pushing live ones out,
//! and a UDP client that kept its source port stayed on its backend forever.
//! The collector walks both maps in batches (`BPF_MAP_LOOKUP_BATCH`) on a
//! thread of its own, removes each expired flow's two entries, and counts the
//! live flows it saw, which is what `/metrics` reports (no walk on the loop).
//!
//! When a flow was last used: each entry's `paired_ns` is refreshed by a
//! packet at most once per [`CT_PAIR_CHECK_NS`] (the pair check touches the
//! sibling too), so a flow's last packet is at most that long after it. A
//! flow is expired when `paired_ns` (or `created_ns`) is older than its
//! timeout plus that check interval: never early, at most 10 s late, plus
//! the collector's interval.
//!
//! Which timeout: the reply entry knows whether the backend answered (TCP
//! `CT_F_SYNACK`, UDP `CT_F_REPLIED`) and decides for the pair. The original
//! entry alone (its reply evicted) waits for the longest timeout of its
//! protocol. A closed TCP connection goes after the kernel's grace time.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytemuck::{Pod, Zeroable};
use mcs_common::{
    CT_CLOSE_GRACE_NS, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_REPLIED, CT_F_SYNACK, CT_PAIR_CHECK_NS, CtKey, CtValue,
    IPPROTO_TCP, Ip4, Ip6, MapAddr, NatValue,
};
use tracing::{debug, warn};

use crate::batch;

/// Idle timeouts, by protocol and state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A UDP flow the backend has not answered (Linux: `udp_timeout`, 30 s).
    pub udp: Duration,
    /// A UDP flow seen in both directions (Linux: `udp_timeout_stream`, 120 s).
    pub udp_stream: Duration,
    /// A TCP connection whose SYN the backend has not answered.
    pub tcp_syn: Duration,
    /// An established TCP connection (Cilium's default, 6 hours; Linux keeps
    /// 5 days, kube-proxy sets 24 hours).
    pub tcp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
            tcp_syn: Duration::from_secs(60),
            tcp: Duration::from_secs(6 * 3600),
        }
    }
}

impl Timeouts {
    /// No idle flow ever expires (closed ones still go after their grace time).
    pub fn never() -> Self {
        Self { udp: Duration::MAX, udp_stream: Duration::MAX, tcp_syn: Duration::MAX, tcp: Duration::MAX }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether the flow this entry belongs to has expired at `now` (the
/// kernel's CLOCK_MONOTONIC, nanoseconds). Pure: see the module docs.
pub fn expired<A: MapAddr>(key: &CtKey<A>, value: &CtValue<A>, now: u64, timeouts: &Timeouts) -> bool {
    let times = Times { closed: value.closed_ns, last: value.paired_ns, created: value.created_ns, flags: value.flags };
    expired_at(key, times, now, timeouts)
}

/// [`expired`] for a flow from outside (`XNAT_CT`): the same rules, its
/// idle clock `seen_ns`.
pub fn expired_nat<A: MapAddr>(key: &CtKey<A>, value: &NatValue<A>, now: u64, timeouts: &Timeouts) -> bool {
    let times = Times { closed: value.closed_ns, last: value.seen_ns, created: value.created_ns, flags: value.flags };
    expired_at(key, times, now, timeouts)
}

/// What an entry says of its flow's age and state.
struct Times {
    closed: u64,
    last: u64,
    created: u64,
    flags: u8,
}

fn expired_at<A: MapAddr>(key: &CtKey<A>, times: Times, now: u64, timeouts: &Timeouts) -> bool {
    let Times { closed, last: paired, created, flags } = times;
    if closed != 0 {
        return now.saturating_sub(closed) > CT_CLOSE_GRACE_NS;
    }
    let tcp = key.proto == IPPROTO_TCP;
    let answered = flags & (CT_F_SYNACK | CT_F_REPLIED) != 0;
    let timeout = match (tcp, key.dir == CT_DIR_REPLY, answered) {
        (true, true, true) => timeouts.tcp,
        (true, true, false) => timeouts.tcp_syn,
        (true, false, _) => timeouts.tcp.max(timeouts.tcp_syn),
        (false, true, true) => timeouts.udp_stream,
        (false, true, false) => timeouts.udp,
        (false, false, _) => timeouts.udp_stream.max(timeouts.udp),
    };
    let last = paired.max(created);
    now.saturating_sub(last) > nanos(timeout).saturating_add(CT_PAIR_CHECK_NS)
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// What the collector has done, shared with `/metrics`.
#[derive(Debug, Default)]
pub struct CollectorStats {
    /// Flows (original entries) alive at the end of the last pass.
    pub live: AtomicU64,
    /// Flows removed as expired since the agent started.
    pub expired: AtomicU64,
    /// Completed passes.
    pub passes: AtomicU64,
    /// Duration of the last pass, in microseconds.
    pub last_pass_us: AtomicU64,
}

/// One pass's outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub live: u64,
    pub expired: u64,
    pub took: Duration,
}

/// Elements read per `BPF_MAP_LOOKUP_BATCH`: large enough for any bucket.
const BATCH: usize = 4096;

/// Every entry of `map`, in batches (`BPF_MAP_LOOKUP_BATCH`).
///
/// # Safety
/// `map`'s keys and values must be `K` and `V`.
unsafe fn walk<K: Pod, V: Pod>(map: &OwnedFd, mut each: impl FnMut(&K, &V)) -> io::Result<()> {
    let mut keys = vec![K::zeroed(); BATCH];
    let mut values = vec![V::zeroed(); BATCH];
    let mut cursor = batch::Cursor::default();
    while !cursor.done() {
        // SAFETY: the caller's promise.
        let n = unsafe {
            batch::lookup(
                map.as_fd(),
                &mut cursor,
                bytemuck::cast_slice_mut(&mut keys),
                size_of::<K>(),
                bytemuck::cast_slice_mut(&mut values),
                size_of::<V>(),
            )
        }?;
        for (key, value) in keys[..n].iter().zip(&values[..n]) {
            each(key, value);
        }
    }
    Ok(())
}

/// Removes expired flows from one conntrack map; returns (live, expired).
/// `map` must be a conntrack map of family `A` (`CT` with [`Ip4`], `CT6`
/// with [`Ip6`]).
fn sweep<A: MapAddr + Pod>(map: &OwnedFd, now: u64, timeouts: &Timeouts) -> io::Result<(u64, u64)>
where
    CtKey<A>: Pod,
    CtValue<A>: Pod,
{
    let mut doomed: Vec<(CtKey<A>, CtValue<A>)> = Vec::new();
    let (mut live, mut expired_flows) = (0u64, 0u64);
    // SAFETY: `map` is a conntrack map of this family (the caller's
    // promise): its keys and values are `CtKey<A>` and `CtValue<A>`.
    unsafe {
        walk(map, |key: &CtKey<A>, value: &CtValue<A>| {
            if expired(key, value, now, timeouts) {
                doomed.push((*key, *value));
            } else if key.dir == CT_DIR_ORIGINAL {
                live += 1;
            }
        })
    }?;
    // After the walk: deleting while the kernel walks buckets would skip some.
    for (key, seen) in doomed {
        let mut value = CtValue::<A>::zeroed();
        let mut found = CtValue::<A>::zeroed();
        let mut removed = false;
        // SAFETY: as above, typed keys and values of this map.
        unsafe {
            // Judged during the walk, which takes a while at a million flows:
            // the flow may have been used since, or a new flow may hold the
            // key now (a reused client port). Only the same, still expired
            // entry goes; a missing one went with its sibling already.
            if !batch::get(map.as_fd(), bytemuck::bytes_of(&key), bytemuck::bytes_of_mut(&mut value))? {
                continue;
            }
            if { value.created_ns } != { seen.created_ns } || !expired(&key, &value, now, timeouts) {
                // Alive after all: count it as the walk would have.
                live += u64::from(key.dir == CT_DIR_ORIGINAL);
                continue;
            }
            // The other entry, only if it is this flow's: a client that
            // reused its port may have a new flow under that key.
            let sibling = key.sibling_key(&value);
            if batch::get(map.as_fd(), bytemuck::bytes_of(&sibling), bytemuck::bytes_of_mut(&mut found))?
                && sibling.sibling_key(&found) == key
                && batch::delete(map.as_fd(), bytemuck::bytes_of(&sibling))?
            {
                removed = true;
                // An original entry waits for its reply's verdict: the walk
                // counted it live unless it had expired by its own rule.
                if sibling.dir == CT_DIR_ORIGINAL && !expired(&sibling, &found, now, timeouts) {
                    live = live.saturating_sub(1);
                }
            }
            removed |= batch::delete(map.as_fd(), bytemuck::bytes_of(&key))?;
        }
        // Both entries may have been judged expired: the first removes the pair.
        if removed {
            expired_flows += 1;
        }
    }
    Ok((live, expired_flows))
}

/// Removes expired flows from one map of flows from outside (`XNAT_CT`
/// with [`Ip4`], `XNAT_CT6` with [`Ip6`]); returns (live, expired). Its
/// ports return to the source NAT range with them.
fn sweep_nat<A: MapAddr + Pod>(map: &OwnedFd, now: u64, timeouts: &Timeouts) -> io::Result<(u64, u64)>
where
    CtKey<A>: Pod,
    NatValue<A>: Pod,
{
    let mut doomed: Vec<(CtKey<A>, NatValue<A>)> = Vec::new();
    let mut live = 0u64;
    // SAFETY: `map` is a map of flows from outside of this family (the
    // caller's promise): its keys and values are `CtKey<A>` and `NatValue<A>`.
    unsafe {
        walk(map, |key: &CtKey<A>, value: &NatValue<A>| {
            if expired_nat(key, value, now, timeouts) {
                doomed.push((*key, *value));
            } else if key.dir == CT_DIR_ORIGINAL {
                live += 1;
            }
        })
    }?;
    let mut expired_flows = 0;
    for (key, seen) in doomed {
        let mut value = NatValue::<A>::zeroed();
        let mut found = NatValue::<A>::zeroed();
        // SAFETY: as above.
        unsafe {
            // Only the same entry, still expired (a port reused meanwhile
            // is another flow's now); its sibling only if it points back.
            if !batch::get(map.as_fd(), bytemuck::bytes_of(&key), bytemuck::bytes_of_mut(&mut value))? {
                continue;
            }
            if value.created_ns != seen.created_ns || !expired_nat(&key, &value, now, timeouts) {
                // Alive after all: count it as the walk would have.
                live += u64::from(key.dir == CT_DIR_ORIGINAL);
                continue;
            }
            let sibling = value.sibling_key(key.proto, key.dir);
            if batch::get(map.as_fd(), bytemuck::bytes_of(&sibling), bytemuck::bytes_of_mut(&mut found))?
                && found.sibling_key(sibling.proto, sibling.dir) == key
                && batch::delete(map.as_fd(), bytemuck::bytes_of(&sibling))?
                && sibling.dir == CT_DIR_ORIGINAL
                && !expired_nat(&sibling, &found, now, timeouts)
            {
                // The walk counted it live.
                live = live.saturating_sub(1);
            }
            if batch::delete(map.as_fd(), bytemuck::bytes_of(&key))? {
                expired_flows += 1;
            }
        }
    }
    Ok((live, expired_flows))
}

/// The background collector of `CT` and `CT6`.
pub struct Collector {
    ct: OwnedFd,
    ct6: OwnedFd,
    /// `XNAT_CT`, `XNAT_CT6`: flows from outside (see [`Collector::with_xnat`]).
    xnat: Option<(OwnedFd, OwnedFd)>,
    timeouts: Timeouts,
    stats: Arc<CollectorStats>,
}

impl Collector {
    pub fn new(ct: OwnedFd, ct6: OwnedFd, timeouts: Timeouts, stats: Arc<CollectorStats>) -> Self {
        Self { ct, ct6, xnat: None, timeouts, stats }
    }

    /// Also collects the flows from outside (their count joins the live flows).
    pub fn with_xnat(mut self, xnat: OwnedFd, xnat6: OwnedFd) -> Self {
        self.xnat = Some((xnat, xnat6));
        self
    }

    /// One pass over both maps at `now` (CLOCK_MONOTONIC nanoseconds).
    pub fn pass_at(&self, now: u64) -> io::Result<Pass> {
        let started = Instant::now();
        let (live4, expired4) = sweep::<Ip4>(&self.ct, now, &self.timeouts)?;
        let (live6, expired6) = sweep::<Ip6>(&self.ct6, now, &self.timeouts)?;
        let (mut live, mut expired) = (live4 + live6, expired4 + expired6);
        if let Some((xnat, xnat6)) = &self.xnat {
            for (l, e) in [sweep_nat::<Ip4>(xnat, now, &self.timeouts)?, sweep_nat::<Ip6>(xnat6, now, &self.timeouts)?]
            {
                live += l;
                expired += e;
            }
        }
        let pass = Pass { live, expired, took: started.elapsed() };
        self.stats.live.store(pass.live, Ordering::Relaxed);
        self.stats.expired.fetch_add(pass.expired, Ordering::Relaxed);
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        self.stats.last_pass_us.store(pass.took.as_micros() as u64, Ordering::Relaxed);
        Ok(pass)
    }

    /// Runs a pass every `interval` on a low-priority thread until the
    /// returned handle is dropped.
    pub fn spawn(self, interval: Duration) -> io::Result<Running> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("ct-collector".into()).spawn(move || {
            let stop = flag;
            crate::background_thread();
            while !stop.load(Ordering::Relaxed) {
                match self.pass_at(monotonic_ns()) {
                    Ok(pass) if pass.expired > 0 => {
                        debug!(live = pass.live, expired = pass.expired, took = ?pass.took, "conntrack collected");
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "conntrack collector pass failed; retrying next interval"),
                }
                // At most about 5 % of a CPU: a pass over a million flows
                // takes hundreds of milliseconds, so big tables wait longer.
                let took = Duration::from_micros(self.stats.last_pass_us.load(Ordering::Relaxed));
                let until = Instant::now() + interval.max(took * 20);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(100).min(interval));
                }
            }
        })?;
        Ok(Running { stop, thread: Some(thread) })
    }
}

/// The collector's thread: dropping this stops it (after the pass in progress).
pub struct Running {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use mcs_common::{CT_F_RST, IPPROTO_UDP};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn entry(proto: u8, dir: u8, flags: u8, last: u64) -> (CtKey, CtValue) {
        let key = CtKey { proto, dir, ..CtKey::default() };
        (key, CtValue { flags, created_ns: 1, paired_ns: last, ..CtValue::default() })
    }

    fn expires_after(proto: u8, dir: u8, flags: u8) -> u64 {
        let t = Timeouts::default();
        let (key, value) = entry(proto, dir, flags, 1000 * S);
        let idle = (0..=30_000).find(|idle| expired(&key, &value, (1000 + idle) * S, &t)).expect("expires");
        idle - 1
    }

    #[test]
    fn each_protocol_and_state_idles_out_after_its_timeout_plus_the_pair_check() {
        let check = CT_PAIR_CHECK_NS / S;
        assert_eq!(expires_after(IPPROTO_UDP, CT_DIR_REPLY, 0), 30 + check, "UDP, not answered");
        assert_eq!(expires_after(IPPROTO_UDP, CT_DIR_REPLY, CT_F_REPLIED), 120 + check, "UDP, both ways");
        assert_eq!(expires_after(IPPROTO_TCP, CT_DIR_REPLY, 0), 60 + check, "TCP, SYN not answered");
        assert_eq!(expires_after(IPPROTO_TCP, CT_DIR_REPLY, CT_F_SYNACK), 6 * 3600 + check, "TCP established");
        // An original entry does not know whether the backend answered: the
        // reply entry decides; alone, it waits for the longest.
        assert_eq!(expires_after(IPPROTO_UDP, CT_DIR_ORIGINAL, 0), 120 + check);
        assert_eq!(expires_after(IPPROTO_TCP, CT_DIR_ORIGINAL, 0), 6 * 3600 + check);
    }

    #[test]
    fn a_flow_from_outside_idles_out_by_its_seen_clock_as_a_pod_flow_does() {
        let t = Timeouts::default();
        let key: CtKey = CtKey { proto: IPPROTO_UDP, dir: CT_DIR_REPLY, ..CtKey::default() };
        let value = NatValue { created_ns: S, seen_ns: 1000 * S, ..NatValue::default() };
        let check = CT_PAIR_CHECK_NS;
        assert!(!expired_nat(&key, &value, 1000 * S + 30 * S + check, &t), "30 s idle plus the check: kept");
        assert!(expired_nat(&key, &value, 1000 * S + 30 * S + check + 1, &t), "then gone, its port free");
        let answered = NatValue { flags: CT_F_REPLIED, ..value };
        assert!(!expired_nat(&key, &answered, 1000 * S + 120 * S + check, &t), "answered: the stream timeout");
        let closed = NatValue { closed_ns: 1000 * S, ..value };
        assert!(expired_nat(&key, &closed, 1000 * S + CT_CLOSE_GRACE_NS + 1, &Timeouts::never()));
    }

    #[test]
    fn with_expiry_off_only_closed_connections_go() {
        let never = Timeouts::never();
        let (key, value) = entry(IPPROTO_UDP, CT_DIR_REPLY, 0, S);
        assert!(!expired(&key, &value, u64::MAX, &never));
        let (key, mut value) = entry(IPPROTO_TCP, CT_DIR_REPLY, CT_F_RST, S);
        value.closed_ns = S;
        assert!(expired(&key, &value, S + CT_CLOSE_GRACE_NS + 1, &never));
    }

    #[test]
    fn a_closed_connection_goes_after_the_grace_time_whatever_its_last_packet() {
        let t = Timeouts::default();
        let (key, mut value) = entry(IPPROTO_TCP, CT_DIR_REPLY, CT_F_SYNACK | CT_F_RST, 1000 * S);
        value.closed_ns = 1000 * S;
        assert!(!expired(&key, &value, 1000 * S + CT_CLOSE_GRACE_NS, &t));
        assert!(expired(&key, &value, 1000 * S + CT_CLOSE_GRACE_NS + 1, &t));
    }

    #[test]
    fn a_busy_flow_never_expires_and_the_clock_before_creation_is_no_age() {
        let t = Timeouts::default();
        let (key, value) = entry(IPPROTO_UDP, CT_DIR_REPLY, 0, 1000 * S);
        // A packet every 5 s refreshes paired_ns at least every 10 s.
        assert!(!expired(&key, &value, 1000 * S + CT_PAIR_CHECK_NS, &t));
        // Created after `now` was read (the collector's clock read first).
        let (key, value) = entry(IPPROTO_UDP, CT_DIR_REPLY, 0, 2000 * S);
        assert!(!expired(&key, &value, 1000 * S, &t));
    }
}
