//! When the maps grow, and to what: capacity that follows the cluster.
//!
//! The maps start at [`initial`] sizes (what a few thousand services need)
//! and grow, while serving, when the desired state comes near a map's size:
//! the agent builds a second datapath of the same layout with the larger
//! maps, programs it, and takes over from the first as an upgrade does
//! (flows carried, programs swapped in front, the old ones retired). The
//! `--max-*` flags bound the growth; past them a frontend is refused, as
//! before. Decisions only here (no kernel), tested in milliseconds.

use crate::plan::Capacity;

/// What the desired state needs of each map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Frontends (service ids are one space over both families).
    pub services: u64,
    /// Distinct backend addresses (backend ids are one space too).
    pub backends: u64,
    /// Selection slots the tables need: what they take, or, when that comes
    /// near the budget, what they take at the slot budget's smallest size
    /// (the budget shrinks them before the map must grow).
    pub slots: u64,
}

/// The sizes a datapath starts with: the historical defaults, within the bounds.
pub const INITIAL: Capacity = Capacity {
    services: mcs_common::DEFAULT_MAX_SERVICES,
    backends: mcs_common::DEFAULT_MAX_BACKENDS,
    slots: mcs_common::DEFAULT_MAX_SELECTION_SLOTS,
};

/// The default bounds (`--max-*`): 1M frontends, 4M backends, 128M slots.
/// Each is a bound, not a size: a node pays for what its cluster needs.
pub const BOUNDS: Capacity = Capacity { services: 1 << 20, backends: 1 << 22, slots: 1 << 27 };

/// Sizes at start: `initial` (default [`INITIAL`]) within `bounds`.
pub fn initial(initial: Capacity, bounds: Capacity) -> Capacity {
    Capacity {
        services: initial.services.min(bounds.services).max(1),
        backends: initial.backends.min(bounds.backends).max(2),
        slots: even(initial.slots.min(bounds.slots).max(2)),
    }
}

/// A map grows once its demand passes this share of it: before it is full,
/// so a burst of new imports is programmed while the larger maps are built.
const TRIGGER: (u64, u64) = (7, 8);
/// To this multiple of the demand: the next growth is far off (demand is
/// then two thirds of the map, under the trigger's seven eighths).
const TARGET: (u64, u64) = (3, 2);

/// The capacity to grow to, or `None` when no map needs to (or none may:
/// every map that needs it is at its bound). Maps that do not need to grow
/// keep their size; none ever shrinks.
pub fn grown(current: Capacity, demand: Demand, bounds: Capacity) -> Option<Capacity> {
    let over = |usable: u64, wanted: u64| wanted * TRIGGER.1 > usable * TRIGGER.0;
    let target = |wanted: u64| wanted * TARGET.0 / TARGET.1;
    let mut next = current;
    // Service ids 1..=services.
    if over(u64::from(current.services), demand.services) {
        next.services = step(target(demand.services), 4096, current.services, bounds.services);
    }
    // Backend id 0 is NO_BACKEND: `backends - 1` ids.
    if over(u64::from(current.backends).saturating_sub(1), demand.backends) {
        next.backends = step(target(demand.backends) + 1, 65_536, current.backends, bounds.backends);
    }
    // Tables may take 7/8 of the slots (the rest lets a table be written
    // beside the one it replaces): a slot demand is met by 8/7 of it.
    let budget = |slots: u32| u64::from(slots) - u64::from(slots) / 8;
    if over(budget(current.slots), demand.slots) {
        next.slots = even(step(target(demand.slots) * 8 / 7, 1 << 20, current.slots, bounds.slots));
    }
    (next != current).then_some(next)
}

/// `wanted` rounded up to a multiple of `unit`, within `[current, bound]`.
fn step(wanted: u64, unit: u64, current: u32, bound: u32) -> u32 {
    let rounded = wanted.div_ceil(unit).saturating_mul(unit);
    u32::try_from(rounded).unwrap_or(u32::MAX).min(bound).max(current)
}

/// The selection map holds two slots per entry.
fn even(slots: u32) -> u32 {
    slots & !1
}

/// Kernel memory the maps sized by `capacity` take, roughly (hash maps
/// preallocate an element with its key, value and bookkeeping; arrays
/// take their values; per-CPU counters are capped by `--stats-entries`
/// and counted apart). For the check that a growth fits the node.
pub fn kernel_bytes(capacity: Capacity) -> u64 {
    // SERVICES + SERVICES6, as the kernel charges them (`inspect maps`
    // at 151,552 entries: 15.6 and 17.9 MiB).
    let services = u64::from(capacity.services) * 232;
    // BACKENDS (8 B) + BACKENDS6 (24 B) + HEALTH (32 B).
    let backends = u64::from(capacity.backends) * 64;
    let slots = u64::from(capacity.slots) * 4;
    services + backends + slots
}

/// Whether a second datapath of `bytes` (every map of it, the grown ones
/// at their new size) leaves the node enough memory: both datapaths exist
/// while one takes over from the other, and the new one may take half of
/// what is available.
pub fn fits_memory(bytes: u64, available_bytes: u64) -> bool {
    bytes <= available_bytes / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Capacity = Capacity { services: 1024, backends: 4096, slots: 1 << 20 };

    #[test]
    fn a_demand_under_seven_eighths_grows_nothing() {
        let demand = Demand { services: 896, backends: 3583, slots: 802_816 };
        assert_eq!(grown(SMALL, demand, BOUNDS), None);
    }

    #[test]
    fn only_the_map_past_its_trigger_grows_to_half_again_its_demand() {
        let demand = Demand { services: 897, backends: 10, slots: 10 };
        let next = grown(SMALL, demand, BOUNDS).expect("services grow");
        assert_eq!(next.services, 4096, "897 * 3/2 = 1345, rounded up to a step of 4096");
        assert_eq!((next.backends, next.slots), (SMALL.backends, SMALL.slots));
        // Past the trigger by a lot: the whole demand and half again.
        let next = grown(SMALL, Demand { backends: 1_000_000, ..Demand::default() }, BOUNDS).unwrap();
        assert_eq!(next.backends, 1_507_328);
        assert!(u64::from(next.backends - 1) * 2 >= 1_000_000 * 3);
    }

    #[test]
    fn a_hundred_thousand_services_of_ten_fit_the_default_bounds_and_then_rest() {
        let demand = Demand { services: 100_000, backends: 1_000_000, slots: 100_000 * 101 };
        let start = initial(INITIAL, BOUNDS);
        let next = grown(start, demand, BOUNDS).expect("the defaults are too small");
        assert!(u64::from(next.services) >= demand.services);
        assert!(u64::from(next.backends) > demand.backends);
        assert!(u64::from(next.slots) - u64::from(next.slots) / 8 >= demand.slots);
        assert_eq!(next.slots % 2, 0);
        assert_eq!(grown(next, demand, BOUNDS), None, "grown once, the same demand asks nothing more");
        assert!(fits_memory(kernel_bytes(next), 4 << 30), "{} bytes with 4 GiB available", kernel_bytes(next));
    }

    #[test]
    fn bounds_cap_growth_and_a_map_at_its_bound_asks_nothing() {
        let bounds = Capacity { services: 1024, backends: 8192, slots: 1 << 20 };
        let demand = Demand { services: 5000, backends: 5000, slots: 10 };
        let next = grown(SMALL, demand, bounds).expect("backends may still grow");
        assert_eq!(next.services, 1024, "at its bound");
        assert_eq!(next.backends, 8192, "7501 wanted, capped");
        assert_eq!(grown(next, demand, bounds), None);
    }

    #[test]
    fn initial_sizes_keep_within_small_bounds() {
        let bounds = Capacity { services: 16, backends: 64, slots: 1001 };
        assert_eq!(initial(INITIAL, bounds), Capacity { services: 16, backends: 64, slots: 1000 });
        assert_eq!(initial(INITIAL, BOUNDS), INITIAL);
    }

    #[test]
    fn growth_that_the_node_cannot_hold_twice_is_refused() {
        let next = Capacity { services: 1 << 20, backends: 1 << 22, slots: 1 << 27 };
        assert!(!fits_memory(kernel_bytes(next), 1 << 30));
        assert!(fits_memory(kernel_bytes(next), 8 << 30));
    }
}
