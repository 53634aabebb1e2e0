//! Two states -> the ordered map writes between them. Pure, and the owner of
//! every id and table region the kernel sees.
//!
//! Order makes each frontend switch atomically: new backends, then new
//! selection tables, then the one `SERVICES` entry that points at them, then
//! deletions. Backend ids and table regions released by a plan are quarantined
//! until the next plan, so a packet that read the old service entry just before
//! the flip never finds its slot or backend reused for someone else.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash as _, Hasher as _},
    net::IpAddr,
};

use mcs_common::{
    Backend, Ip4, Ip6, MapAddr, ServiceKey, ServiceValue, ip_to_map, ip6_from_map, ip6_to_map, port_to_map,
};
use thiserror::Error;

use crate::{
    desired::{DesiredState, Frontend},
    maglev,
    model::{BackendAddr, FrontendKey, Protocol},
};

mod alloc;
mod applied;
mod keys;
mod table;

use self::{
    alloc::{IdPool, Region, SlotAllocator},
    table::{ADOPTED, Table, digest, slots_digest},
};
pub use self::{keys::*, table::selection_table};

/// Map sizes the plan must fit in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            services: mcs_common::DEFAULT_MAX_SERVICES,
            backends: mcs_common::DEFAULT_MAX_BACKENDS,
            slots: mcs_common::DEFAULT_MAX_SELECTION_SLOTS,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend {
        id: u32,
        backend: FamilyBackend,
    },
    PutSlots {
        offset: u32,
        ids: Vec<u32>,
    },
    PutService {
        key: FamilyKey,
        value: ServiceValue,
        /// The service id is newly allocated: its counters start from zero.
        fresh: bool,
    },
    DeleteService {
        key: FamilyKey,
    },
    /// Forget ClientIP affinity of these backends (all when `None`) for a frontend.
    PurgeAffinity {
        service_id: u32,
        backend_ids: Option<Vec<u32>>,
    },
    /// Frees a backend id in its family's array.
    ClearBackend {
        id: u32,
        v6: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error(
    "ServiceImport {service} frontend {frontend}: {}, {resource} are exhausted ({capacity} in all); raise {flag}",
    if *kept { "its update is not programmed (the previous version keeps serving)" } else { "not programmed" }
)]
pub struct CapacityError {
    pub service: String,
    pub frontend: FrontendKey,
    pub resource: &'static str,
    pub capacity: u32,
    pub flag: &'static str,
    /// An earlier version of the frontend is programmed and keeps serving.
    pub kept: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct AppliedFrontend {
    service_id: u32,
    region: Region,
    /// Digest of what the table was built from; equal digests, equal tables.
    /// `ADOPTED` for a table found in the kernel at start, whose input is unknown.
    digest: u64,
    /// For an adopted table: a hash of its slots' backend ids, so the first
    /// plan keeps it as it is when it would build the very same table.
    adopted_slots: Option<u64>,
    /// Distinct backends in the table, sorted.
    members: Vec<BackendAddr>,
    affinity_timeout_secs: u32,
}

#[derive(Clone, Debug, Default)]
struct Quarantine {
    service_ids: Vec<u32>,
    backend_ids: Vec<u32>,
    regions: Vec<Region>,
}

/// A programmed backend's id and the tables naming it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BackendId {
    id: u32,
    refs: u32,
}

/// What the kernel holds, as far as the agent has programmed it.
#[derive(Clone, Debug)]
pub struct Applied {
    capacity: Capacity,
    frontends: BTreeMap<FrontendKey, AppliedFrontend>,
    /// Each backend's id, and how many frontends' tables name it (at zero
    /// its id is freed). One map: two keyed by address cost 4 MB each at
    /// 10,000 services.
    backends: BTreeMap<BackendAddr, BackendId>,
    service_pool: IdPool,
    backend_pool: IdPool,
    slots: SlotAllocator,
    quarantine: Quarantine,
}

/// The result of [`Applied::plan`]: apply `ops` in order, then adopt `next`.
#[derive(Debug)]
pub struct Plan {
    pub ops: Vec<MapOp>,
    pub next: Applied,
    pub errors: Vec<CapacityError>,
}

impl Plan {
    pub fn summary(&self) -> PlanSummary {
        PlanSummary::of(&self.ops)
    }
}

impl PlanSummary {
    pub fn of(ops: &[MapOp]) -> Self {
        let mut s = PlanSummary::default();
        for op in ops {
            match op {
                MapOp::PutBackend { .. } => s.backends_added += 1,
                MapOp::PutSlots { ids, .. } => s.slots_written += ids.len(),
                MapOp::PutService { .. } => s.services_written += 1,
                MapOp::DeleteService { .. } => s.services_deleted += 1,
                MapOp::PurgeAffinity { .. } => {}
                MapOp::ClearBackend { .. } => s.backends_removed += 1,
            }
        }
        s
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanSummary {
    pub services_written: usize,
    pub services_deleted: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub slots_written: usize,
}

impl PlanSummary {
    pub fn plus(self, o: Self) -> Self {
        Self {
            services_written: self.services_written + o.services_written,
            services_deleted: self.services_deleted + o.services_deleted,
            backends_added: self.backends_added + o.backends_added,
            backends_removed: self.backends_removed + o.backends_removed,
            slots_written: self.slots_written + o.slots_written,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        locality::Weighted,
        model::Protocol,
        reconcile::{KernelMaps as _, memory::Maps},
    };

    /// Small prime tables keep the expectations readable.
    const SIZE: u32 = 7;

    fn key(last: u8, port: u16) -> FrontendKey {
        FrontendKey { vip: Ipv4Addr::new(10, 96, 0, last).into(), port, protocol: Protocol::Tcp }
    }

    fn addr(last: u8) -> BackendAddr {
        BackendAddr { ip: Ipv4Addr::new(10, 1, 0, last).into(), port: 80 }
    }

    fn frontend(backends: &[u8]) -> Frontend {
        let weights: Vec<Weighted> = backends
            .iter()
            .map(|&last| Weighted { addr: addr(last), share: 1.0 / backends.len() as f64, tier: 0 })
            .collect();
        Frontend {
            service: "demo/web".into(),
            port_name: "http".into(),
            endpoints: Vec::new(),
            tiers: vec![],
            table_size: if weights.is_empty() { 0 } else { SIZE },
            weights,
            affinity_timeout_secs: 0,
        }
    }

    fn with_affinity(mut f: Frontend) -> Frontend {
        f.affinity_timeout_secs = 10_800;
        f
    }

    fn desired(frontends: &[(FrontendKey, Frontend)]) -> DesiredState {
        DesiredState { frontends: frontends.iter().cloned().collect() }
    }

    /// What an agent restarted on `kernel` (the maps as a sequence of plans
    /// left them) would adopt.
    fn adopt(kernel: &Maps, capacity: Capacity) -> (Applied, Vec<String>) {
        let services: Vec<_> = kernel.services.iter().map(|(k, v)| (Ok(*k), *v)).collect();
        let backends: Vec<_> = kernel.backends.iter().map(|(k, v)| (*k, *v)).collect();
        Applied::adopt(capacity, &services, &backends, |i| Some(kernel.slots.get(&i).copied().unwrap_or(0)))
    }

    #[test]
    fn a_restarted_agent_adopts_the_kernel_state_and_writes_nothing_for_it() {
        let capacity = Capacity { services: 16, backends: 16, slots: 64 };
        let state = desired(&[(key(1, 80), frontend(&[1, 2, 3])), (key(2, 53), with_affinity(frontend(&[2, 4])))]);
        let mut kernel = Maps::default();
        let first = Applied::new(capacity).plan(&state);
        kernel.apply(&first.ops).expect("applied");
        // Something the old agent had quarantined is released by now.
        let second = first.next.plan(&desired(&[(key(1, 80), frontend(&[1, 2, 3]))]));
        kernel.apply(&second.ops).expect("applied");
        let third = second.next.plan(&state);
        kernel.apply(&third.ops).expect("applied");

        let (adopted, problems) = adopt(&kernel, capacity);
        assert!(problems.is_empty(), "{problems:?}");
        let again = adopted.plan(&state);
        assert!(again.ops.is_empty(), "an unchanged state writes nothing: {:?}", kinds(&again.ops));
        assert!(again.errors.is_empty());

        // A change after adoption touches only its frontend, in fresh slots and ids.
        let changed = desired(&[(key(1, 80), frontend(&[1, 2, 3, 5])), (key(2, 53), with_affinity(frontend(&[2, 4])))]);
        let plan = again.next.plan(&changed);
        assert_eq!(kinds(&plan.ops), ["backend", "slots", "service"]);
        let used: BTreeSet<u32> = kernel.backends.keys().copied().collect();
        let MapOp::PutBackend { id, .. } = plan.ops[0] else { unreachable!() };
        assert!(!used.contains(&id), "new backend id {id} collides with an adopted one {used:?}");
        let MapOp::PutSlots { offset, ref ids } = plan.ops[1] else { unreachable!() };
        for v in kernel.services.values() {
            let (a, b) = (v.slot_offset, v.slot_offset + v.slot_count);
            assert!(offset + ids.len() as u32 <= a || offset >= b, "new table overlaps an adopted one");
        }
    }

    #[test]
    fn adoption_rebuilds_what_it_cannot_trust() {
        let capacity = Capacity { services: 16, backends: 16, slots: 64 };
        let state = desired(&[(key(1, 80), frontend(&[1, 2]))]);
        let mut kernel = Maps::default();
        kernel.apply(&Applied::new(capacity).plan(&state).ops).expect("applied");
        // A backend the table names has vanished.
        let first_backend = *kernel.backends.keys().next().unwrap();
        kernel.backends.remove(&first_backend);
        let (adopted, problems) = adopt(&kernel, capacity);
        assert_eq!(problems.len(), 1, "{problems:?}");
        let plan = adopted.plan(&state);
        assert!(kinds(&plan.ops).contains(&"service"), "the frontend is rewritten: {:?}", kinds(&plan.ops));
    }

    fn kinds(ops: &[MapOp]) -> Vec<&'static str> {
        ops.iter()
            .map(|op| match op {
                MapOp::PutBackend { .. } => "backend",
                MapOp::PutSlots { .. } => "slots",
                MapOp::PutService { .. } => "service",
                MapOp::DeleteService { .. } => "delete",
                MapOp::PurgeAffinity { .. } => "purge",
                MapOp::ClearBackend { .. } => "clear",
            })
            .collect()
    }

    fn slots(op: &MapOp) -> (u32, BTreeSet<u32>) {
        let MapOp::PutSlots { offset, ids } = op else { panic!("{op:?}") };
        assert_eq!(ids.len(), SIZE as usize);
        (*offset, ids.iter().copied().collect())
    }

    #[test]
    fn a_new_service_is_written_backends_then_table_then_flip() {
        let plan = Applied::new(Capacity::default()).plan(&desired(&[(key(1, 80), frontend(&[2, 3]))]));
        assert!(plan.errors.is_empty());
        assert_eq!(kinds(&plan.ops), ["backend", "backend", "slots", "service"]);
        assert_eq!(slots(&plan.ops[2]), (0, BTreeSet::from([1, 2])));
        let MapOp::PutService { value, .. } = &plan.ops[3] else { panic!() };
        assert_eq!((value.service_id, value.slot_offset, value.slot_count), (1, 0, SIZE));
    }

    #[test]
    fn an_unchanged_state_plans_nothing() {
        let state = desired(&[(key(1, 80), frontend(&[2]))]);
        let first = Applied::new(Capacity::default()).plan(&state);
        assert!(first.next.plan(&state).ops.is_empty());
    }

    #[test]
    fn an_update_writes_a_new_region_and_frees_the_old_one_a_plan_later() {
        let first = Applied::new(Capacity::default()).plan(&desired(&[(key(1, 80), frontend(&[2, 3]))]));
        let second = first.next.plan(&desired(&[(key(1, 80), frontend(&[2, 4]))]));
        assert_eq!(kinds(&second.ops), ["backend", "slots", "service", "clear"]);
        // The old region is still quarantined: the new table lands after it.
        assert_eq!(slots(&second.ops[1]), (SIZE, BTreeSet::from([1, 3])));
        // 10.1.0.3 (id 2) is cleared now but its id is not reused yet.
        assert_eq!(second.ops[3], MapOp::ClearBackend { id: 2, v6: false });
        let third = second.next.plan(&desired(&[(key(1, 80), frontend(&[5]))]));
        assert_eq!(third.ops[0], MapOp::PutBackend { id: 2, backend: backend_value(&addr(5)) });
        assert_eq!(slots(&third.ops[1]), (0, BTreeSet::from([2])));
    }

    #[test]
    fn a_removed_service_is_deleted_and_its_backends_cleared() {
        let first = Applied::new(Capacity::default())
            .plan(&desired(&[(key(1, 80), frontend(&[2])), (key(2, 80), frontend(&[2, 3]))]));
        // Both frontends share 10.1.0.2:80, which gets one id.
        assert_eq!(first.next.backend_count(), 2);
        let second = first.next.plan(&desired(&[(key(1, 80), frontend(&[2]))]));
        assert_eq!(kinds(&second.ops), ["delete", "clear"]);
        assert_eq!(second.next.frontend_count(), 1);
        let third = second.next.plan(&desired(&[]));
        assert_eq!(kinds(&third.ops), ["delete", "clear"]);
        assert_eq!((third.next.frontend_count(), third.next.backend_count()), (0, 0));
    }

    #[test]
    fn a_service_without_ready_backends_gets_an_empty_table() {
        let plan = Applied::new(Capacity::default()).plan(&desired(&[(key(1, 80), frontend(&[]))]));
        assert_eq!(kinds(&plan.ops), ["service"]);
        let MapOp::PutService { value, .. } = &plan.ops[0] else { panic!() };
        assert_eq!(value.slot_count, 0);
    }

    #[test]
    fn capacity_limits_reject_only_what_does_not_fit_and_say_which_flag() {
        let capacity = Capacity { services: 1, backends: 3, slots: 3 * SIZE };
        let plan = Applied::new(capacity).plan(&desired(&[(key(1, 80), frontend(&[2])), (key(2, 80), frontend(&[3]))]));
        assert_eq!(plan.next.frontend_count(), 1);
        assert_eq!(plan.errors.len(), 1);
        let text = plan.errors[0].to_string();
        assert!(text.contains("10.96.0.2:80/TCP") && text.contains("--max-services"), "{text}");

        let capacity = Capacity { services: 8, backends: 3, slots: 16 };
        let plan = Applied::new(capacity).plan(&desired(&[(key(1, 80), frontend(&[2, 3, 4]))]));
        assert!(plan.ops.is_empty());
        assert!(plan.errors[0].to_string().contains("--max-backends"));

        let capacity = Capacity { services: 8, backends: 16, slots: SIZE - 1 };
        let plan = Applied::new(capacity).plan(&desired(&[(key(1, 80), frontend(&[2, 3]))]));
        assert!(plan.ops.is_empty());
        assert!(plan.errors[0].to_string().contains("--max-selection-slots"));
    }

    #[test]
    fn a_failed_update_keeps_the_old_version_serving() {
        let capacity = Capacity { services: 8, backends: 16, slots: SIZE + 2 };
        let first = Applied::new(capacity).plan(&desired(&[(key(1, 80), frontend(&[2]))]));
        let mut bigger = frontend(&[2, 3, 4]);
        bigger.table_size = 11;
        let second = first.next.plan(&desired(&[(key(1, 80), bigger)]));
        assert_eq!(second.errors.len(), 1);
        let text = second.errors[0].to_string();
        assert!(text.contains("the previous version keeps serving"), "{text}");
        assert!(second.ops.is_empty(), "{:?}", second.ops);
        assert_eq!(second.next.backend_count(), 1);
    }

    /// The capacity freeze: with every slot taken, a change to a programmed
    /// frontend must still be applied (its table rewritten where it is).
    #[test]
    fn with_no_room_for_a_second_table_an_update_is_rewritten_in_place() {
        let capacity = Capacity { services: 8, backends: 16, slots: SIZE };
        let first = Applied::new(capacity).plan(&desired(&[(key(1, 80), frontend(&[2]))]));
        let second = first.next.plan(&desired(&[(key(1, 80), frontend(&[2, 3, 4]))]));
        assert!(second.errors.is_empty(), "{:?}", second.errors);
        assert_eq!(kinds(&second.ops), ["backend", "backend", "slots", "service"]);
        let (offset, ids) = slots(&second.ops[2]);
        assert_eq!((offset, ids.len()), (0, 3), "the same region, now over three backends");
        let third = second.next.plan(&desired(&[(key(1, 80), frontend(&[3]))]));
        assert!(third.errors.is_empty(), "{:?}", third.errors);
        assert_eq!(kinds(&third.ops), ["slots", "service", "clear", "clear"]);
        assert_eq!(third.next.backend_count(), 1);
    }

    /// Planning only the frontends a change touched gives what planning all does.
    #[test]
    fn planning_touched_frontends_matches_planning_all() {
        let start =
            desired(&[(key(1, 80), frontend(&[2, 3])), (key(2, 80), frontend(&[3, 4])), (key(3, 80), frontend(&[5]))]);
        let base = Applied::new(Capacity::default()).plan(&start).next;
        let mut changed = start.clone();
        changed.frontends.insert(key(1, 80), frontend(&[2, 6]));
        changed.frontends.remove(&key(3, 80));
        let all = base.plan(&changed);
        let touched = base.plan_keys(&changed, &BTreeSet::from([key(1, 80), key(3, 80)]));
        assert_eq!(all.ops, touched.ops);
        assert_eq!(kinds(&touched.ops), ["backend", "slots", "service", "delete", "clear"]);
        assert_eq!(touched.next.backend_count(), 4, "3 is still used by 10.96.0.2, 5 is cleared");
    }

    #[test]
    fn a_backend_leaving_an_affinity_service_purges_its_affinity() {
        let first = Applied::new(Capacity::default()).plan(&desired(&[(key(1, 80), with_affinity(frontend(&[2, 3])))]));
        let MapOp::PutService { value, .. } = &first.ops[3] else { panic!() };
        assert_eq!(value.affinity_timeout_secs, 10_800);
        let second = first.next.plan(&desired(&[(key(1, 80), with_affinity(frontend(&[2])))]));
        assert_eq!(kinds(&second.ops), ["slots", "service", "purge", "clear"]);
        assert_eq!(second.ops[2], MapOp::PurgeAffinity { service_id: 1, backend_ids: Some(vec![2]) });
        let third = second.next.plan(&desired(&[]));
        assert_eq!(kinds(&third.ops), ["delete", "purge", "clear"]);
        assert_eq!(third.ops[1], MapOp::PurgeAffinity { service_id: 1, backend_ids: None });
    }

    #[test]
    fn weights_shape_the_table() {
        let mut f = frontend(&[2, 3]);
        f.table_size = 251;
        f.weights[0].share = 0.9;
        f.weights[1].share = 0.1;
        let table = selection_table(&f);
        let heavy = table.iter().filter(|a| **a == addr(2)).count();
        assert!((224..=228).contains(&heavy), "{heavy} of 251 slots for a 90 % backend");
    }

    #[test]
    fn slot_regions_coalesce_when_released() {
        let mut slots = SlotAllocator::new(10);
        let a = slots.alloc(3).unwrap();
        let b = slots.alloc(3).unwrap();
        let c = slots.alloc(4).unwrap();
        assert!(slots.alloc(1).is_none());
        slots.release(a);
        slots.release(c);
        slots.release(b);
        assert_eq!(slots.largest_free(), 10);
        assert_eq!(slots.alloc(10), Some(Region { offset: 0, len: 10 }));
    }
}
