//! Weighted Maglev selection tables (Eisenbud et al., NSDI 2016). Pure and
//! deterministic: the same backends and weights give the same table on every
//! node, whatever order they arrive in.
//!
//! Table size: the smallest size in [`TABLE_SIZES`] with at least
//! [`SLOTS_PER_BACKEND`] slots per backend, capped by the configured maximum
//! (65,521 by default, reached at 66 backends). Measured (see the tests): a
//! one-backend change moves at most 1 % of the slots beyond the removed
//! backend's own share from 3 to 300 backends, and each backend's share is
//! within 1 % of its weight. Fewer slots per backend save memory (4 bytes a
//! slot) at the price of more disruption: about 1.3 % extra at 160 slots per
//! backend, 2-3 % at 40. A change that crosses a size step rebuilds the table
//! from scratch; established flows do not notice (conntrack pins them), only
//! new flows hash differently.

use crate::model::BackendAddr;

/// Primes, roughly doubling.
pub const TABLE_SIZES: [u32; 13] = [13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];
pub const DEFAULT_MAX_TABLE_SIZE: u32 = 65521;
pub const SLOTS_PER_BACKEND: u32 = 1000;
/// Slots per backend the slot budget steps down through when the tables of
/// every frontend would not fit (`--max-selection-slots`): each step roughly
/// halves kernel memory, at the price of more disruption (see ARCHITECTURE.md).
pub const SLOT_LADDER: [u32; 9] = [1000, 500, 250, 100, 50, 20, 10, 5, 2];

pub fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d: &u32| u64::from(*d) * u64::from(*d) <= u64::from(n)).all(|d| !n.is_multiple_of(d))
}

/// Table size for `backends` backends.
pub fn table_size(backends: usize, max: u32) -> u32 {
    table_size_for(backends, max, SLOTS_PER_BACKEND)
}

/// Table size for `backends` backends at `per_backend` slots each: the
/// smallest size of the ladder with that many, and never fewer slots than
/// backends (or the largest size `max` allows).
pub fn table_size_for(backends: usize, max: u32, per_backend: u32) -> u32 {
    let want = (backends as u64 * u64::from(per_backend.max(1))).max(backends as u64);
    let fitting = TABLE_SIZES.iter().copied().filter(|&m| m <= max);
    fitting.clone().find(|&m| u64::from(m) >= want).or_else(|| fitting.max()).unwrap_or(max)
}

/// The most slots per backend (a step of [`SLOT_LADDER`]) at which tables for
/// frontends of these backend counts fit in `budget` slots, with the total
/// they take; the last step when even that does not fit.
pub fn fit_budget(backend_counts: &[usize], max: u32, budget: u64) -> (u32, u64) {
    let total = |per: u32| -> u64 {
        backend_counts.iter().filter(|&&n| n > 0).map(|&n| u64::from(table_size_for(n, max, per))).sum()
    };
    for per in SLOT_LADDER {
        let t = total(per);
        if t <= budget {
            return (per, t);
        }
    }
    let last = SLOT_LADDER[SLOT_LADDER.len() - 1];
    (last, total(last))
}

/// FNV-1a, seeded: stable across builds, platforms and processes.
fn hash(addr: &BackendAddr, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    let (v4, v6);
    let ip: &[u8] = match addr.ip {
        std::net::IpAddr::V4(ip) => {
            v4 = ip.octets();
            &v4
        }
        std::net::IpAddr::V6(ip) => {
            v6 = ip.octets();
            &v6
        }
    };
    for &byte in ip.iter().chain(&addr.port.to_be_bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV mixes its last bytes poorly; finish with a murmur-style avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Builds a table of `size` slots (a prime) over backends with positive
/// integer weights. Returns, per slot, an index into `backends`.
///
/// Each backend walks its own permutation of the slots (offset, skip from two
/// hashes of its address) and claims the next free slot whenever its weight
/// credit reaches the largest weight, so claims are proportional to weight.
pub fn build(backends: &[(BackendAddr, u32)], size: u32) -> Vec<u32> {
    assert!(is_prime(size), "Maglev table size {size} must be prime");
    let m = u64::from(size);
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
    if order.is_empty() {
        return Vec::new();
    }
    // Input order must not matter.
    order.sort_by_key(|&i| backends[i].0);
    let perm: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let addr = &backends[i].0;
            (hash(addr, 0x6d61_676c) % m, hash(addr, 0x6576_0001) % (m - 1) + 1)
        })
        .collect();
    let weight_max = order.iter().map(|&i| u64::from(backends[i].1)).max().unwrap_or(1);
    // Each backend's next slot in its permutation, `(offset + j * skip) % m`
    // for its j-th probe, advanced by one addition: a division per probe was
    // most of a cold start's table building.
    let mut next: Vec<u64> = perm.iter().map(|&(offset, _)| offset).collect();
    let mut credit = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    while filled < m {
        for (k, &i) in order.iter().enumerate() {
            credit[k] += u64::from(backends[i].1);
            if credit[k] < weight_max {
                continue;
            }
            credit[k] -= weight_max;
            let skip = perm[k].1;
            let mut pos = next[k];
            loop {
                let slot = pos as usize;
                // skip < m, so one subtraction wraps it.
                pos += skip;
                if pos >= m {
                    pos -= m;
                }
                if table[slot] == u32::MAX {
                    table[slot] = i as u32;
                    filled += 1;
                    break;
                }
            }
            next[k] = pos;
            if filled == m {
                break;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn backends(n: usize) -> Vec<(BackendAddr, u32)> {
        (0..n)
            .map(|i| {
                (BackendAddr { ip: Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 1).into(), port: 8080 }, 1)
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        table.iter().for_each(|&i| counts[i as usize] += 1);
        counts.iter().map(|&c| c as f64 / table.len() as f64).collect()
    }

    /// Fraction of slots whose backend changed, beyond those that had to move.
    fn extra_disruption(before: &[BackendAddr], after: &[BackendAddr], removed: &BackendAddr) -> f64 {
        let moved = before.iter().zip(after).filter(|(b, a)| b != a && *b != removed).count();
        moved as f64 / before.len() as f64
    }

    fn as_addrs(table: &[u32], input: &[(BackendAddr, u32)]) -> Vec<BackendAddr> {
        table.iter().map(|&i| input[i as usize].0).collect()
    }

    #[test]
    fn the_ladder_is_prime_and_sizes_follow_the_backend_count() {
        assert!(TABLE_SIZES.iter().all(|&m| is_prime(m)));
        assert!(!is_prime(16383));
        assert_eq!(table_size(1, DEFAULT_MAX_TABLE_SIZE), 1021);
        assert_eq!(table_size(10, DEFAULT_MAX_TABLE_SIZE), 16381);
        assert_eq!(table_size(100, DEFAULT_MAX_TABLE_SIZE), 65521);
        assert_eq!(table_size(400, DEFAULT_MAX_TABLE_SIZE), 65521, "capped");
        assert_eq!(table_size(10, 4093), 4093);
    }

    #[test]
    fn uniform_weights_give_each_backend_its_share_within_one_percent() {
        for n in [2, 3, 10, 50, 100] {
            let input = backends(n);
            let size = table_size(n, DEFAULT_MAX_TABLE_SIZE);
            let table = build(&input, size);
            assert_eq!(table.len(), size as usize);
            for (i, share) in shares(&table, n).iter().enumerate() {
                let want = 1.0 / n as f64;
                assert!(
                    (share - want).abs() <= want * 0.01 + 1.0 / f64::from(size),
                    "n={n} backend {i}: {share} vs {want}"
                );
            }
        }
    }

    #[test]
    fn weights_are_honoured_within_one_percent() {
        let mut input = backends(3);
        input[0].1 = 900_000;
        input[1].1 = 50_000;
        input[2].1 = 50_000;
        let size = DEFAULT_MAX_TABLE_SIZE;
        let s = shares(&build(&input, size), 3);
        for (share, want) in s.iter().zip([0.9, 0.05, 0.05]) {
            assert!((share - want).abs() <= want * 0.01 + 1.0 / f64::from(size), "{s:?}");
        }
    }

    /// Worst extra disruption over several removed backends, at the default size.
    fn worst_extra_disruption(n: usize) -> f64 {
        let input = backends(n);
        let size = table_size(n, DEFAULT_MAX_TABLE_SIZE);
        let before = as_addrs(&build(&input, size), &input);
        (0..n)
            .step_by((n / 5).max(1))
            .map(|r| {
                let removed = input[r].0;
                let rest: Vec<_> = input.iter().filter(|(a, _)| *a != removed).copied().collect();
                // Same size before and after, as long as the count stays on one size step.
                let after = as_addrs(&build(&rest, size), &rest);
                extra_disruption(&before, &after, &removed)
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn removing_one_backend_moves_its_share_and_at_most_one_percent_more() {
        for n in [3, 5, 10, 20, 50, 100, 200, 300] {
            let extra = worst_extra_disruption(n);
            assert!(extra <= 0.01, "n={n}: {:.3}% of the slots moved beyond the removed backend's", extra * 100.0);
        }
    }

    /// `cargo test -p mcs-agent --release -- --ignored disruption --nocapture`
    #[test]
    #[ignore = "a survey for the docs, not a check"]
    fn disruption_survey() {
        for n in [3, 5, 10, 20, 50, 100, 200, 300] {
            let size = table_size(n, DEFAULT_MAX_TABLE_SIZE);
            println!("n={n} size={size}: worst extra disruption {:.3}%", 100.0 * worst_extra_disruption(n));
        }
    }

    /// `cargo test -p mcs-agent --release -- --ignored budget_survey --nocapture`
    #[test]
    #[ignore = "a survey for the docs, not a check"]
    fn budget_survey() {
        let n = 10;
        let input = backends(n);
        for per in SLOT_LADDER {
            let size = table_size_for(n, DEFAULT_MAX_TABLE_SIZE, per);
            let before = as_addrs(&build(&input, size), &input);
            let worst = (0..n)
                .map(|r| {
                    let removed = input[r].0;
                    let rest: Vec<_> = input.iter().filter(|(a, _)| *a != removed).copied().collect();
                    extra_disruption(&before, &as_addrs(&build(&rest, size), &rest), &removed)
                })
                .fold(0.0, f64::max);
            println!("| {per} | {size} | {} bytes | {:.2} % |", size * 4, 100.0 * worst);
        }
    }

    #[test]
    fn the_slot_budget_steps_down_until_the_tables_fit() {
        let counts = vec![10; 10_000];
        assert_eq!(fit_budget(&counts, DEFAULT_MAX_TABLE_SIZE, u64::MAX), (1000, 10_000 * 16381));
        assert_eq!(fit_budget(&counts, DEFAULT_MAX_TABLE_SIZE, 14_680_064), (100, 10_000 * 1021));
        let counts = vec![10; 100_000];
        assert_eq!(fit_budget(&counts, DEFAULT_MAX_TABLE_SIZE, 14_680_064), (10, 100_000 * 127));
        assert_eq!(table_size_for(40, DEFAULT_MAX_TABLE_SIZE, 2), 127, "never fewer slots than backends");
        assert_eq!(table_size_for(10, DEFAULT_MAX_TABLE_SIZE, 1000), table_size(10, DEFAULT_MAX_TABLE_SIZE));
    }

    #[test]
    fn the_same_input_in_any_order_gives_the_same_table() {
        let input = backends(20);
        let mut reversed = input.clone();
        reversed.reverse();
        let size = table_size(20, DEFAULT_MAX_TABLE_SIZE);
        assert_eq!(as_addrs(&build(&input, size), &input), as_addrs(&build(&reversed, size), &reversed));
    }

    /// The permutation walk as the paper writes it, a modulo per probe: the
    /// tables must not change between agent versions (an unchanged node
    /// restarts with zero map writes, and flows keep their backends).
    fn by_the_formula(backends: &[(BackendAddr, u32)], size: u32) -> Vec<u32> {
        let m = u64::from(size);
        let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
        order.sort_by_key(|&i| backends[i].0);
        let perm: Vec<(u64, u64)> = order
            .iter()
            .map(|&i| (hash(&backends[i].0, 0x6d61_676c) % m, hash(&backends[i].0, 0x6576_0001) % (m - 1) + 1))
            .collect();
        let weight_max = order.iter().map(|&i| u64::from(backends[i].1)).max().unwrap_or(1);
        let (mut next, mut credit) = (vec![0u64; order.len()], vec![0u64; order.len()]);
        let mut table = vec![u32::MAX; size as usize];
        let mut filled = 0;
        while filled < m && !order.is_empty() {
            for (k, &i) in order.iter().enumerate() {
                credit[k] += u64::from(backends[i].1);
                if credit[k] < weight_max {
                    continue;
                }
                credit[k] -= weight_max;
                loop {
                    let slot = ((perm[k].0 + next[k] * perm[k].1) % m) as usize;
                    next[k] += 1;
                    if table[slot] == u32::MAX {
                        table[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    break;
                }
            }
        }
        if order.is_empty() { Vec::new() } else { table }
    }

    #[test]
    fn tables_are_those_of_the_formula() {
        for (n, size) in [(1, 251), (3, 251), (10, 1009), (20, table_size(20, DEFAULT_MAX_TABLE_SIZE)), (100, 16_381)] {
            let mut input = backends(n);
            assert_eq!(build(&input, size), by_the_formula(&input, size), "{n} backends, {size} slots");
            for (k, b) in input.iter_mut().enumerate() {
                b.1 = 1 + (k as u32 % 4);
            }
            assert_eq!(build(&input, size), by_the_formula(&input, size), "{n} weighted backends, {size} slots");
        }
    }

    #[test]
    fn zero_weights_and_empty_input_claim_nothing() {
        assert!(build(&[], 251).is_empty());
        let mut input = backends(2);
        input[1].1 = 0;
        assert!(build(&input, 251).iter().all(|&i| i == 0));
    }
}
