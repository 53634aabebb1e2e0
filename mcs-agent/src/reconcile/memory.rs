//! The kernel's maps held in memory, for tests of passes that need no
//! kernel: SERVICES (both families), BACKENDS and SELECTION as plain maps.

use std::collections::{BTreeMap, BTreeSet};

use mcs_common::ServiceValue;

use super::KernelMaps;
use crate::{
    datapath::{DatapathError, KernelState},
    model::{BackendAddr, FrontendKey},
    plan::{FamilyKey, MapOp, frontend_of},
};

/// `fail` makes the next write fail after half of its operations, as a full
/// map would.
#[derive(Default)]
pub struct Maps {
    pub services: BTreeMap<FrontendKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendAddr>,
    pub slots: BTreeMap<u32, u32>,
    pub writes: usize,
    pub fail: bool,
}

fn frontend(key: &FamilyKey) -> FrontendKey {
    match key {
        FamilyKey::V4(key) => frontend_of(key),
        FamilyKey::V6(key) => frontend_of(key),
    }
    .expect("TCP or UDP")
}

impl KernelMaps for Maps {
    fn apply(&mut self, ops: &[MapOp]) -> Result<(), DatapathError> {
        let upto = if std::mem::take(&mut self.fail) { ops.len() / 2 } else { ops.len() };
        for op in &ops[..upto] {
            self.writes += 1;
            match op {
                MapOp::PutBackend { id, backend } => {
                    self.backends.insert(*id, backend.addr());
                }
                MapOp::PutSlots { offset, ids } => {
                    for (i, id) in ids.iter().enumerate() {
                        self.slots.insert(offset + i as u32, *id);
                    }
                }
                MapOp::PutService { key, value, .. } => {
                    self.services.insert(frontend(key), *value);
                }
                MapOp::DeleteService { key } => {
                    self.services.remove(&frontend(key));
                }
                MapOp::ClearBackend { id, .. } => {
                    self.backends.remove(id);
                }
                MapOp::PurgeAffinity { .. } => {}
            }
        }
        if upto < ops.len() {
            return Err(DatapathError::MissingMap("SERVICES (a write failed half way)"));
        }
        Ok(())
    }

    fn kernel_state(&self) -> KernelState {
        KernelState {
            services: self.services.iter().map(|(k, v)| (Ok(*k), *v)).collect(),
            backends: self.backends.iter().map(|(id, addr)| (*id, *addr)).collect(),
        }
    }

    fn selection_slot(&self, slot: u32) -> Option<u32> {
        self.slots.get(&slot).copied()
    }
}

/// One frontend as a client meets it: what its entry says, and each slot's
/// backend in order. Ids and offsets are the allocator's business and left
/// out, so that two programmings of one state compare equal.
#[derive(Debug, PartialEq, Eq)]
pub struct Served {
    pub flags: u32,
    pub affinity_timeout_secs: u32,
    pub table: Vec<BackendAddr>,
}

impl Maps {
    /// The backends a frontend's table names, as the datapath would pick them.
    pub fn table(&self, vip: &str) -> BTreeSet<BackendAddr> {
        let (_, value) = self.services.iter().find(|(k, _)| k.vip.to_string() == vip).expect("the frontend");
        self.slots_of(value).collect()
    }

    /// Every frontend as served.
    pub fn served(&self) -> BTreeMap<FrontendKey, Served> {
        self.services
            .iter()
            .map(|(key, value)| {
                let table = self.slots_of(value).collect();
                let served = Served { flags: value.flags, affinity_timeout_secs: value.affinity_timeout_secs, table };
                (*key, served)
            })
            .collect()
    }

    /// Each slot's backend, in order.
    fn slots_of<'a>(&'a self, value: &ServiceValue) -> impl Iterator<Item = BackendAddr> + 'a {
        (value.slot_offset..value.slot_offset + value.slot_count).map(|s| self.backends[&self.slots[&s]])
    }
}
