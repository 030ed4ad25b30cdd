//! Change maps: which ranges of an image may differ from the image it
//! replaced, found from the two files' extent maps while both are
//! quiescent (at commit), and kept under `.reflinkfs/changes/CLASS/VM/NAME/`
//! as `FROM-TO.json`, keyed by the two images' ids.
//!
//! A range is *unchanged* only where both files map it, at the same logical
//! offset, to the same physical bytes of a plain extent (none of unknown,
//! delayed, encoded, encrypted, inline, tail-packed or unwritten), or where
//! both are holes. Both then read the same bytes. Everything else is
//! reported as changed.

use super::ids::RevId;
use super::ranges::push;
use crate::engine::config::{parse_json, FORMAT_VERSION};
use crate::engine::fsops::{write_file_atomic, Dir};
use crate::engine::vid::ValidVid;
use crate::sys::{self, PhysExtent};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;

const UNSAFE_FLAGS: u32 = sys::FIEMAP_EXTENT_UNKNOWN
    | sys::FIEMAP_EXTENT_DELALLOC
    | sys::FIEMAP_EXTENT_ENCODED
    | sys::FIEMAP_EXTENT_DATA_ENCRYPTED
    | sys::FIEMAP_EXTENT_NOT_ALIGNED
    | sys::FIEMAP_EXTENT_DATA_INLINE
    | sys::FIEMAP_EXTENT_DATA_TAIL
    | sys::FIEMAP_EXTENT_UNWRITTEN;

/// What covers one offset of a file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cover {
    Hole,
    /// `physical - logical` of a plain extent.
    Plain(i128),
    Uncertain,
}

fn cover_at(ext: &[PhysExtent], i: usize, off: u64) -> (Cover, u64) {
    // The extent at index i starts at or after off, or covers it.
    match ext.get(i) {
        Some(e) if e.logical <= off => {
            let c = if e.flags & UNSAFE_FLAGS != 0 {
                Cover::Uncertain
            } else {
                Cover::Plain(i128::from(e.physical) - i128::from(e.logical))
            };
            (c, e.logical + e.length)
        }
        Some(e) => (Cover::Hole, e.logical),
        None => (Cover::Hole, u64::MAX),
    }
}

/// The ranges of `[0, b_size)` that the extent maps of `a` (`a_size` bytes)
/// and `b` do not prove equal. Both files must be quiescent.
pub fn extent_changes(a: &File, a_size: u64, b: &File, b_size: u64) -> io::Result<Vec<(u64, u64)>> {
    let ea = sys::fiemap_physical(a.as_fd(), true)?;
    let eb = sys::fiemap_physical(b.as_fd(), true)?;
    Ok(compare_extents(&ea, a_size, &eb, b_size))
}

pub(super) fn compare_extents(
    ea: &[PhysExtent],
    a_size: u64,
    eb: &[PhysExtent],
    b_size: u64,
) -> Vec<(u64, u64)> {
    let common = a_size.min(b_size);
    let (mut i, mut j) = (0usize, 0usize);
    let mut off = 0u64;
    let mut out = Vec::new();
    while off < common {
        while ea.get(i).is_some_and(|e| e.logical + e.length <= off) {
            i += 1;
        }
        while eb.get(j).is_some_and(|e| e.logical + e.length <= off) {
            j += 1;
        }
        let (ca, na) = cover_at(ea, i, off);
        let (cb, nb) = cover_at(eb, j, off);
        let next = na.min(nb).min(common).max(off + 1);
        let same = match (ca, cb) {
            (Cover::Hole, Cover::Hole) => true,
            (Cover::Plain(x), Cover::Plain(y)) => x == y,
            _ => false,
        };
        if !same {
            push(&mut out, off, next);
        }
        off = next;
    }
    push(&mut out, common, b_size);
    out
}

/// A stored change map.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    format: u32,
    from: String,
    to: String,
    from_size: u64,
    to_size: u64,
    /// Start and end of each changed range, flattened: `[s0, e0, s1, e1, …]`.
    changed: Vec<u64>,
}

/// `.reflinkfs/changes/CLASS/VM/NAME`, made when `create`.
pub fn changes_dir(meta: &Dir, vid: &ValidVid, create: bool) -> io::Result<Option<Dir>> {
    let mut d = match meta.subdir("changes", create) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !create => return Ok(None),
        Err(e) => return Err(e),
    };
    for part in [vid.class(), vid.vm(), vid.name()] {
        d = match d.subdir(part, create) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !create => return Ok(None),
            Err(e) => return Err(e),
        };
    }
    Ok(Some(d))
}

fn map_name(from: RevId, to: RevId) -> String {
    format!("{from}-{to}.json")
}

fn parse_map_name(name: &str) -> Option<(RevId, RevId)> {
    let (f, t) = name.strip_suffix(".json")?.split_once('-')?;
    Some((RevId::parse(f)?, RevId::parse(t)?))
}

/// Stores the map of the pair `from` → `to` (atomically).
pub fn store(
    dir: &Dir,
    from: RevId,
    to: RevId,
    sizes: (u64, u64),
    changed: &[(u64, u64)],
) -> io::Result<()> {
    let m = MapFile {
        format: FORMAT_VERSION,
        from: from.to_string(),
        to: to.to_string(),
        from_size: sizes.0,
        to_size: sizes.1,
        changed: changed.iter().flat_map(|&(s, e)| [s, e]).collect(),
    };
    let mut bytes = serde_json::to_vec(&m).expect("maps serialise");
    bytes.push(b'\n');
    write_file_atomic(dir.fd(), &map_name(from, to), &bytes)
}

fn load(dir: &Dir, from: RevId, to: RevId) -> Option<Vec<(u64, u64)>> {
    let name = map_name(from, to);
    let bytes = read_small_file_large(dir, &name).ok()?;
    let m: MapFile = parse_json(&bytes, &dir.shown(&name)).ok()?;
    if m.from != from.to_string() || m.to != to.to_string() || m.changed.len() % 2 != 0 {
        log::warn!(
            "ignoring change map {}: it does not describe its pair",
            dir.shown(&name).display()
        );
        return None;
    }
    Some(m.changed.chunks(2).map(|c| (c[0], c[1])).collect())
}

/// Reads a map (never through a symlink; maps of big, scattered changes
/// exceed the 16 MiB of other metadata).
fn read_small_file_large(dir: &Dir, name: &str) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = dir.open(name, libc::O_RDONLY)?;
    let mut out = Vec::new();
    (&mut f).take(1 << 30).read_to_end(&mut out)?;
    Ok(out)
}

fn edges(dir: &Dir) -> io::Result<HashMap<RevId, Vec<RevId>>> {
    let mut out: HashMap<RevId, Vec<RevId>> = HashMap::new();
    for name in dir.names()? {
        if let Some((f, t)) = parse_map_name(&name) {
            out.entry(f).or_default().push(t);
        }
    }
    Ok(out)
}

/// The changed ranges from `from` to `to` along a chain of stored maps (the
/// union of every step's), or `None` when no chain joins them.
pub fn chain(dir: &Dir, from: RevId, to: RevId) -> Option<Vec<Vec<(u64, u64)>>> {
    let next = edges(dir).ok()?;
    let mut prev: HashMap<RevId, RevId> = HashMap::new();
    let mut queue = VecDeque::from([from]);
    while let Some(x) = queue.pop_front() {
        if x == to {
            break;
        }
        for &y in next.get(&x).into_iter().flatten() {
            if y != from && !prev.contains_key(&y) {
                prev.insert(y, x);
                queue.push_back(y);
            }
        }
    }
    let mut steps = Vec::new();
    let mut at = to;
    while at != from {
        let p = *prev.get(&at)?;
        steps.push(load(dir, p, at)?);
        at = p;
    }
    Some(steps)
}

/// Removes the maps no chain from a live id reaches (their images are all
/// pruned), and leftover temp files.
pub fn collect_garbage(dir: &Dir, live: &[RevId]) -> io::Result<usize> {
    let next = edges(dir)?;
    let mut reached: HashSet<RevId> = live.iter().copied().collect();
    let mut queue: VecDeque<RevId> = live.iter().copied().collect();
    while let Some(x) = queue.pop_front() {
        for &y in next.get(&x).into_iter().flatten() {
            if reached.insert(y) {
                queue.push_back(y);
            }
        }
    }
    let mut removed = 0;
    for name in dir.names()? {
        let dead = match parse_map_name(&name) {
            Some((f, _)) => !reached.contains(&f),
            None => name.ends_with("~tmp"),
        };
        if dead {
            sys::unlinkat(dir.fd(), &name)?;
            removed += 1;
        }
    }
    if removed > 0 {
        dir.sync()?;
    }
    Ok(removed)
}

/// Removes every map of a volume (it is being removed).
pub fn remove_all(meta: &Dir, vid: &ValidVid) -> io::Result<()> {
    let Some(dir) = changes_dir(meta, vid, false)? else {
        return Ok(());
    };
    for name in dir.names()? {
        sys::unlinkat(dir.fd(), &name)?;
    }
    if let Some(vm) = changes_dir_parent(meta, vid)? {
        sys::rmdirat(vm.fd(), vid.name())?;
        let _ = vm.sync();
    }
    Ok(())
}

fn changes_dir_parent(meta: &Dir, vid: &ValidVid) -> io::Result<Option<Dir>> {
    let d = meta.subdir("changes", false)?;
    let c = d.subdir(vid.class(), false)?;
    Ok(Some(c.subdir(vid.vm(), false)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(logical: u64, physical: u64, length: u64, flags: u32) -> PhysExtent {
        PhysExtent {
            logical,
            physical,
            length,
            flags,
        }
    }

    #[test]
    fn shared_extents_are_unchanged_and_the_rest_changed() {
        let a = [e(0, 1000, 100, 0), e(200, 5000, 100, 0)];
        let b = [
            e(0, 1000, 40, 0),
            e(40, 9000, 10, 0),
            e(50, 1050, 50, 0),
            e(200, 5000, 50, sys::FIEMAP_EXTENT_UNWRITTEN),
            e(250, 5050, 50, 0),
        ];
        assert_eq!(
            compare_extents(&a, 300, &b, 400),
            vec![(40, 50), (200, 250), (300, 400)]
        );
        // Holes in both are equal; a hole against data is not.
        assert_eq!(
            compare_extents(&[], 100, &[e(10, 7, 10, 0)], 100),
            vec![(10, 20)]
        );
        // The same physical bytes at another logical offset are a change.
        assert_eq!(
            compare_extents(&[e(0, 100, 10, 0)], 10, &[e(0, 101, 10, 0)], 10),
            vec![(0, 10)]
        );
    }
}
