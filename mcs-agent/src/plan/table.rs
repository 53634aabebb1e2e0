//! A frontend's weighted Maglev table, and the digests that say when it
//! must be rebuilt.

use super::*;

/// A backend's share as an integer Maglev weight (parts per million, at least 1).
pub(super) fn weight_units(share: f64) -> u32 {
    (share * 1_000_000.0).round().max(1.0) as u32
}

/// The weighted Maglev table of a frontend, one backend address per slot.
pub fn selection_table(frontend: &Frontend) -> Vec<BackendAddr> {
    let table = Table::build(frontend);
    table.slots.iter().map(|&i| table.members[i as usize]).collect()
}

/// A frontend's selection table: its distinct members, sorted, and per slot
/// an index into them.
#[derive(Debug, Default)]
pub(super) struct Table {
    pub(super) members: Vec<BackendAddr>,
    pub(super) slots: Vec<u32>,
}

impl Table {
    pub(super) fn build(frontend: &Frontend) -> Self {
        let mut input: Vec<(BackendAddr, u32)> =
            frontend.weights.iter().map(|w| (w.addr, weight_units(w.share))).collect();
        if input.is_empty() || frontend.table_size == 0 {
            return Self::default();
        }
        input.sort_by_key(|(addr, _)| *addr);
        let raw = maglev::build(&input, frontend.table_size);
        let mut index = vec![u32::MAX; input.len()];
        for &i in &raw {
            index[i as usize] = 0;
        }
        let mut members = Vec::new();
        for (i, slot) in index.iter_mut().enumerate() {
            if *slot == 0 {
                *slot = members.len() as u32;
                members.push(input[i].0);
            }
        }
        let slots = raw.iter().map(|&i| index[i as usize]).collect();
        Self { members, slots }
    }

    /// Tables of many frontends, on every CPU: at cold start there are
    /// tens of thousands.
    pub(super) fn build_all<'a>(frontends: Vec<(&'a FrontendKey, &'a Frontend)>) -> BTreeMap<FrontendKey, Table> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        if frontends.len() < 256 || workers == 1 {
            return frontends.into_iter().map(|(k, f)| (*k, Self::build(f))).collect();
        }
        let chunk = frontends.len().div_ceil(workers);
        std::thread::scope(|scope| {
            let handles: Vec<_> = frontends
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().map(|(k, f)| (**k, Self::build(f))).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("a table builder panicked")).collect()
        })
    }
}

/// The digest of a table adopted from the kernel, whose input is unknown.
pub(super) const ADOPTED: u64 = 0;

pub(super) fn slots_digest(ids: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ids.hash(&mut h);
    h.finish()
}

pub(super) fn digest(frontend: &Frontend) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    frontend.table_size.hash(&mut h);
    frontend.affinity_timeout_secs.hash(&mut h);
    for w in &frontend.weights {
        w.addr.hash(&mut h);
        weight_units(w.share).hash(&mut h);
    }
    h.finish()
}
