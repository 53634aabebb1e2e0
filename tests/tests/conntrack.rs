//! The conntrack collector against the real kernel maps: a million live
//! flows keep their entries while the expired ones go, pair by pair, and a
//! flow that reused an expired flow's tuple is left alone. Needs root (loads
//! the eBPF programs for their maps).

use std::time::Instant;

use mcs_agent::{
    batch,
    conntrack::{Collector, CollectorStats, Timeouts},
    datapath::{Datapath, Sizes},
    plan::Capacity,
};
use mcs_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_REPLIED, CT_F_RST, CT_F_SYNACK, CtKey, CtValue, IPPROTO_TCP, IPPROTO_UDP,
};

/// A synthetic CLOCK_MONOTONIC instant for the pass: entries are written
/// relative to it, whatever the machine's uptime.
const NOW: u64 = 1_000_000 * 1_000_000_000;
const S: u64 = 1_000_000_000;

/// Flow `n`'s two entries: client 10.1.x.y:port -> VIP 10.96.0.10:80,
/// backend 10.2.0.(n % 200 + 1):8080.
fn pair(n: u32, proto: u8, flags: u8, idle_secs: u64) -> [(CtKey, CtValue); 2] {
    let client = u32::from(std::net::Ipv4Addr::new(10, 1, 0, 0)) + (n >> 14);
    let key = CtKey {
        src: client.to_be(),
        dst: u32::from(std::net::Ipv4Addr::new(10, 96, 0, 10)).to_be(),
        src_port: (1024 + (n & 0x3fff) as u16).to_be(),
        dst_port: 80u16.to_be(),
        proto,
        dir: CT_DIR_ORIGINAL,
        _pad: [0; 2],
    };
    let backend = u32::from(std::net::Ipv4Addr::new(10, 2, 0, (n % 200 + 1) as u8)).to_be();
    let last = NOW - idle_secs * S;
    let value = CtValue {
        addr: backend,
        port: 8080u16.to_be(),
        flags,
        backend_id: n % 200 + 1,
        service_id: 1,
        created_ns: last,
        paired_ns: last,
        ..CtValue::default()
    };
    let (reply_key, reply_value) = key.sibling(&value);
    [(key, value), (reply_key, reply_value)]
}

fn write(fd: std::os::fd::BorrowedFd<'_>, entries: &[(CtKey, CtValue)]) {
    for chunk in entries.chunks(65_536) {
        let keys: Vec<CtKey> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<CtValue> = chunk.iter().map(|(_, v)| *v).collect();
        batch::update(fd, bytemuck::cast_slice(&keys), bytemuck::cast_slice(&values), chunk.len())
            .expect("batch write");
    }
}

#[test]
fn the_collector_empties_expired_flows_while_a_million_live_ones_keep_theirs() {
    let sizes = Sizes {
        capacity: Capacity { services: 64, backends: 256, slots: 1 << 16 },
        conntrack: 1_200_000,
        stats_entries: 64,
        ..Sizes::default()
    };
    let dp = Datapath::load(sizes, None).expect("loading the datapath (needs root)");
    let (ct, ct6) = dp.conntrack_fds().unwrap();
    use std::os::fd::AsFd as _;
    let fd = ct.as_fd();

    const LIVE: u32 = 1_000_000;
    let mut entries = Vec::with_capacity(2_300_000);
    // Live: busy TCP and UDP flows, and idle ones still within their timeout.
    for n in 0..LIVE {
        let (proto, flags, idle) = match n % 4 {
            0 => (IPPROTO_TCP, CT_F_SYNACK, 3600), // established, an hour idle
            1 => (IPPROTO_UDP, CT_F_REPLIED, 100), // a stream, 100 s idle
            2 => (IPPROTO_UDP, 0, 25),             // unanswered, 25 s idle
            _ => (IPPROTO_TCP, 0, 5),              // a SYN in flight
        };
        let [original, mut reply] = pair(n, proto, 0, idle);
        reply.1.flags = flags;
        entries.extend([original, reply]);
    }
    // Expired, one kind each.
    let mut expired = 0u32;
    let mut add_expired = |entries: &mut Vec<_>, proto: u8, reply_flags: u8, idle: u64, closed: Option<u64>| {
        let [mut original, mut reply] = pair(LIVE + expired, proto, 0, idle);
        reply.1.flags = reply_flags;
        if let Some(ago) = closed {
            original.1.closed_ns = NOW - ago * S;
            reply.1.closed_ns = NOW - ago * S;
        }
        entries.extend([original, reply]);
        expired += 1;
    };
    for _ in 0..25_000 {
        add_expired(&mut entries, IPPROTO_UDP, 0, 45, None); // unanswered UDP past 30 s (+10 s)
        add_expired(&mut entries, IPPROTO_UDP, CT_F_REPLIED, 200, None); // a stream past 120 s
        add_expired(&mut entries, IPPROTO_TCP, 0, 100, None); // a SYN nobody answered, past 60 s
        add_expired(&mut entries, IPPROTO_TCP, CT_F_SYNACK | CT_F_RST, 1, Some(15)); // reset 15 s ago
    }
    // An original entry whose reply was evicted, idle past every UDP timeout.
    let [orphan, _] = pair(LIVE + expired, IPPROTO_UDP, 0, 300);
    entries.push(orphan);
    // A client that reused an expired flow's tuple: the expired reply entry
    // derives this live original key, which belongs to a new flow (another
    // backend) and must stay.
    let [old_original, old_reply] = pair(LIVE + expired + 1, IPPROTO_UDP, 0, 600);
    let mut reused = old_original;
    reused.1.addr = u32::from(std::net::Ipv4Addr::new(10, 2, 9, 9)).to_be();
    reused.1.paired_ns = NOW - S;
    entries.extend([reused, old_reply]);

    let started = Instant::now();
    write(fd, &entries);
    let wrote = started.elapsed();
    assert_eq!(dp.conntrack_len() as u32, LIVE + expired + 2, "every flow written, none evicted");

    let stats = std::sync::Arc::new(CollectorStats::default());
    let collector = Collector::new(ct, ct6, Timeouts::default(), stats.clone());
    let pass = collector.pass_at(NOW).expect("a collector pass");
    eprintln!(
        "wrote {} entries in {wrote:.1?}; the pass took {:.1?}: {} live, {} expired",
        entries.len(),
        pass.took,
        pass.live,
        pass.expired
    );
    assert_eq!(pass.expired, u64::from(expired) + 2, "each expired flow, the orphan and the old reply");
    assert_eq!(pass.live, u64::from(LIVE) + 1, "the live flows and the reused tuple");
    assert_eq!(stats.live.load(std::sync::atomic::Ordering::Relaxed), pass.live, "what /metrics reports");

    // What is left is exactly the live flows' entries.
    let originals = dp.conntrack_entries(CT_DIR_ORIGINAL);
    let replies = dp.conntrack_entries(CT_DIR_REPLY);
    assert_eq!((originals.len(), replies.len()), (LIVE as usize + 1, LIVE as usize));
    assert!(
        originals.iter().any(|(k, v)| *k == reused.0 && v.addr == reused.1.addr),
        "the reused tuple's new flow stays"
    );
    let live_pair = pair(7, IPPROTO_TCP, 0, 0);
    assert!(originals.iter().any(|(k, _)| *k == live_pair[0].0));
    let gone = pair(LIVE + 3, IPPROTO_TCP, 0, 0);
    assert!(!originals.iter().any(|(k, _)| *k == gone[0].0) && !replies.iter().any(|(k, _)| *k == gone[1].0));

    // A second pass finds nothing more to do.
    let again = collector.pass_at(NOW).unwrap();
    assert_eq!((again.live, again.expired), (u64::from(LIVE) + 1, 0));
}
