//! Snapshots of directories, to show that an operation changed nothing, or
//! nothing that was not its own.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Calls `f` for every entry below `root`, depth first in name order, with
/// its path relative to `root`, its full path and its lstat.
fn walk(root: &Path, f: &mut dyn FnMut(String, &Path, &Metadata)) {
    fn below(root: &Path, dir: &Path, f: &mut dyn FnMut(String, &Path, &Metadata)) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let m = std::fs::symlink_metadata(&path).unwrap();
            f(
                path.strip_prefix(root).unwrap().display().to_string(),
                &path,
                &m,
            );
            if m.is_dir() {
                below(root, &path, f);
            }
        }
    }
    below(root, root, f)
}

/// The content of a small file. Compared with memcmp, which is fast even
/// in a debug build; shown as its length and a checksum.
#[derive(Clone, PartialEq, Eq)]
pub struct Content(Vec<u8>);

impl Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sum = self
            .0
            .iter()
            .fold(0u32, |a, &b| a.rotate_left(5) ^ u32::from(b));
        write!(f, "{} bytes, checksum {sum:08x}", self.0.len())
    }
}

/// One entry of [`tree_nodes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir {
        mode: u32,
    },
    File {
        size: u64,
        mode: u32,
        ino: u64,
        mtime: (i64, i64),
        /// The content, for files of at most 4 MiB.
        content: Option<Content>,
    },
    Symlink {
        target: PathBuf,
    },
    Other {
        mode: u32,
    },
    /// `.reflinkfs/lock`: every open writes its PID there, which is not a
    /// change of the pool's data.
    LockFile,
}

/// What a refused command must leave as it was, for every entry below
/// `root`: each file's size, mode, inode, mtime and (up to 4 MiB) content,
/// each directory's mode and each symlink's target. The pool's lock file
/// is recorded by its name only.
pub fn tree_nodes(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    walk(root, &mut |rel, path, m| {
        let ft = m.file_type();
        let is_lock = path.ends_with(".reflinkfs/lock");
        let node = if ft.is_symlink() {
            Node::Symlink {
                target: std::fs::read_link(path).unwrap(),
            }
        } else if ft.is_dir() {
            Node::Dir { mode: m.mode() }
        } else if ft.is_file() && is_lock {
            Node::LockFile
        } else if ft.is_file() {
            Node::File {
                size: m.len(),
                mode: m.mode(),
                ino: m.ino(),
                mtime: (m.mtime(), m.mtime_nsec()),
                content: (m.len() <= 4 << 20).then(|| Content(std::fs::read(path).unwrap())),
            }
        } else {
            Node::Other { mode: m.mode() }
        };
        out.insert(rel, node);
    });
    out
}

/// Everything about the entries below `root` that `pool adopt` could
/// change, as text: the mode (with the type), size, inode, mtime and ctime
/// of each, a checksum of each file's bytes and each symlink's target.
pub fn tree_metadata(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, &mut |rel, path, m| {
        let mut desc = format!(
            "mode={:o} size={} ino={} mtime={}.{} ctime={}.{}",
            m.mode(),
            m.size(),
            m.ino(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        );
        if m.file_type().is_symlink() {
            desc += &format!(" -> {}", std::fs::read_link(path).unwrap().display());
        } else if m.is_file() {
            let bytes = std::fs::read(path).unwrap();
            let sum = bytes.iter().enumerate().fold(0u64, |h, (i, b)| {
                h.wrapping_mul(1_000_003) ^ (*b as u64 + i as u64)
            });
            desc += &format!(" sum={sum:x}");
        }
        out.insert(rel, desc);
    });
    out
}

/// The files of directory `dir` (not below it), with the inode and the
/// content of each.
pub fn dir_files(dir: &Path) -> BTreeMap<String, (u64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let ino = e.metadata().unwrap().ino();
        out.insert(name, (ino, std::fs::read(e.path()).unwrap()));
    }
    out
}

/// Panics, listing what was removed, changed and created, unless the two
/// snapshots are the same.
#[track_caller]
pub fn assert_same_tree<V: PartialEq + Debug>(
    before: &BTreeMap<String, V>,
    after: &BTreeMap<String, V>,
    what: &str,
) {
    if before == after {
        return;
    }
    let mut diff = String::new();
    for (k, v) in before {
        match after.get(k) {
            None => diff += &format!("  removed: {k} ({v:?})\n"),
            Some(w) if w != v => diff += &format!("  changed: {k}\n    was {v:?}\n    now {w:?}\n"),
            _ => {}
        }
    }
    for (k, v) in after.iter().filter(|(k, _)| !before.contains_key(*k)) {
        diff += &format!("  created: {k} ({v:?})\n");
    }
    panic!("{what}: the disk changed:\n{diff}");
}
