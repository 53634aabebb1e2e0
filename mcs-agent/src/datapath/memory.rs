//! What the kernel charges for each map, as `/proc/<pid>/fdinfo` reports it
//! (`memlock`: the map's memory, every CPU's copy for a per-CPU map). For
//! `/metrics` (the agent's own maps) and `inspect maps` (the pinned ones).

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd as _},
    path::Path,
};

use aya::maps::{MapData, MapInfo};
use serde::{Deserialize, Serialize};

/// One map, as the kernel accounts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapMemory {
    pub map: String,
    pub max_entries: u64,
    /// Kernel memory charged for it, in bytes.
    pub bytes: u64,
}

/// (map id, max_entries, memlock) from an fdinfo text; `None` for a
/// descriptor that is not a BPF map.
pub fn parse_fdinfo(text: &str) -> Option<(u32, u64, u64)> {
    let field =
        |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse::<u64>().ok());
    Some((u32::try_from(field("map_id")?).ok()?, field("max_entries")?, field("memlock")?))
}

fn of_fd(fd: impl AsFd) -> Option<(u32, u64, u64)> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
    parse_fdinfo(&std::fs::read_to_string(path).ok()?)
}

/// Every map this process holds open, once each (by id), named as the
/// kernel names it (its first 15 characters), sorted by name.
pub fn own_maps() -> Vec<MapMemory> {
    let mut by_id = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo").into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        if let Some((id, max_entries, bytes)) = parse_fdinfo(&text) {
            by_id.entry(id).or_insert((max_entries, bytes));
        }
    }
    let mut maps: Vec<MapMemory> = by_id
        .into_iter()
        .filter_map(|(id, (max_entries, bytes))| {
            let info = MapInfo::from_id(id).ok()?;
            Some(MapMemory { map: info.name_as_str()?.to_owned(), max_entries, bytes })
        })
        .collect();
    maps.sort_by(|a, b| a.map.cmp(&b.map));
    maps
}

/// The maps pinned in one layout's directory, by their pin names.
pub fn pinned_maps(dir: &Path) -> Vec<MapMemory> {
    let mut maps: Vec<MapMemory> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let data = MapData::from_pin(e.path()).ok()?;
            let (_, max_entries, bytes) = of_fd(data.fd())?;
            Some(MapMemory { map: e.file_name().to_string_lossy().into_owned(), max_entries, bytes })
        })
        .collect();
    maps.sort_by(|a, b| a.map.cmp(&b.map));
    maps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_maps_fdinfo_gives_its_id_size_and_memory() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2072\nmap_type:\t5\nkey_size:\t4\nvalue_size:\t40\nmax_entries:\t16384\nmap_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t1441792\nmap_id:\t412\nfrozen:\t0\n";
        assert_eq!(parse_fdinfo(text), Some((412, 16384, 1_441_792)));
        assert_eq!(parse_fdinfo("pos:\t0\nflags:\t0100000\nmnt_id:\t24\nino:\t3\n"), None, "not a map");
    }
}
