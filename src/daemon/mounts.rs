//! The FUSE mounts of this mount namespace, from /proc/self/mountinfo.

use crate::error::Error;
use std::path::{Path, PathBuf};

/// One FUSE mount of /proc/self/mountinfo: its id, mountpoint and source.
pub struct FuseMount {
    pub id: u64,
    pub mountpoint: String,
    pub source: String,
}

/// The FUSE mounts of this mount namespace.
pub fn fuse_mounts() -> Vec<FuseMount> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let fstype = fields.get(sep + 1).copied().unwrap_or("");
        if fstype != "fuse" && fstype != "fuse.reflinkfs" {
            continue;
        }
        let (Some(id), Some(mp), Some(src)) = (
            fields.first().and_then(|f| f.parse().ok()),
            fields.get(4),
            fields.get(sep + 2),
        ) else {
            continue;
        };
        out.push(FuseMount {
            id,
            mountpoint: unescape_mount(mp),
            source: unescape_mount(src),
        });
    }
    out
}

/// The id of the FUSE mount of `pool` on `mnt` (read once it is mounted),
/// to tell later whether it is still attached.
pub(crate) fn mount_id(mnt: &Path, pool: &Path) -> Option<u64> {
    let (mnt, pool) = (mnt.to_str()?, pool.to_str()?);
    fuse_mounts()
        .into_iter()
        .filter(|m| m.mountpoint == mnt && m.source == pool)
        .map(|m| m.id)
        .max()
}

/// Whether the mount of `pool` on `mnt` with this id (see [`mount_id`]) is
/// still attached: once it is gone from /proc/self/mountinfo (a lazy
/// unmount), the daemon only serves the files still open. The kernel
/// reuses the ids of mounts that are gone, so the mountpoint and source
/// must match too. True when the id is unknown.
pub(crate) fn is_attached(id: Option<u64>, mnt: &Path, pool: &Path) -> bool {
    let (Some(id), Some(mnt), Some(pool)) = (id, mnt.to_str(), pool.to_str()) else {
        return true;
    };
    fuse_mounts()
        .iter()
        .any(|m| m.id == id && m.mountpoint == mnt && m.source == pool)
}

/// The pool (FUSE source) of a reflinkfs mount, from /proc/self/mountinfo.
pub fn pool_of_mount(mnt: &Path) -> Option<PathBuf> {
    let want = mnt.to_str()?;
    fuse_mounts()
        .into_iter()
        .filter(|m| m.mountpoint == want)
        .map(|m| PathBuf::from(m.source))
        // Ours when the source is a pool (fuser mounts as plain "fuse").
        .find(|source| is_pool(source))
}

/// The reflinkfs mount that `path` is on (its mountpoint or a directory
/// in it): the mountpoint and the pool, which the daemon mounts as the
/// FUSE source. `None` when the innermost FUSE mount above `path` is not
/// one of a pool, or `path` is on no FUSE mount. A path that does not
/// exist yet is looked up by its nearest existing ancestor.
pub fn reflinkfs_mount_of(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let real = path
        .ancestors()
        .find_map(|p| std::fs::canonicalize(p).ok())?;
    fuse_mounts()
        .into_iter()
        .filter(|m| real.starts_with(&m.mountpoint))
        // The innermost; of mounts on the same point, the last (on top).
        .max_by_key(|m| m.mountpoint.len())
        .map(|m| (PathBuf::from(m.mountpoint), PathBuf::from(m.source)))
        .filter(|(_, source)| is_pool(source))
}

/// Whether `dir` holds a pool's metadata.
fn is_pool(dir: &Path) -> bool {
    dir.join(crate::engine::pool::META_DIR)
        .join(crate::engine::pool::POOL_JSON)
        .exists()
}

/// The error for `path` given as a pool when it is a reflinkfs mount or
/// in one: it names the mount's pool, and `hint` says what to do with it.
/// `None` when `path` is on no reflinkfs mount.
pub fn mount_given_as_pool(path: &Path, hint: impl FnOnce(&Path) -> String) -> Option<Error> {
    let (mountpoint, pool) = reflinkfs_mount_of(path)?;
    let shown = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let place = match std::fs::canonicalize(path) {
        Ok(real) if real == mountpoint => "a reflinkfs mount".to_owned(),
        _ => format!("in {}, a reflinkfs mount", mountpoint.display()),
    };
    Some(Error::MountGivenAsPool {
        path: shown,
        place,
        hint: hint(&pool),
        pool,
    })
}

/// `e`, but when it says that a directory of a reflinkfs mount is not a
/// pool (the mountpoint given for the pool), the error that names the
/// mount's pool ([`mount_given_as_pool`]).
pub fn explain_not_a_pool(e: Error, hint: impl FnOnce(&Path) -> String) -> Error {
    match &e {
        Error::NotAPool { path } => mount_given_as_pool(path, hint).unwrap_or(e),
        _ => e,
    }
}

/// Undoes the octal escapes (`\040` for a space) of /proc/self/mountinfo.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The loop devices and processes that hold a file at or under `path`,
/// each as a phrase (`loop device /dev/loop3 on X`, `qemu (PID 7) has X
/// open`), with paths shown by `shown`.
pub fn holders_of(path: &Path, shown: &dyn Fn(&Path) -> String) -> Vec<String> {
    let mut holders = Vec::new();
    for (dev, backing) in crate::sys::loop_backing_files() {
        if Path::new(&backing).starts_with(path) {
            holders.push(format!(
                "loop device {} on {}",
                dev.display(),
                shown(Path::new(&backing))
            ));
        }
    }
    for u in crate::sys::processes_using(path) {
        let what = match u.how {
            "open" => format!("has {} open", shown(&u.path)),
            "cwd" => format!("has its working directory in {}", shown(&u.path)),
            _ => format!("has its root directory in {}", shown(&u.path)),
        };
        holders.push(format!("{} (PID {}) {what}", u.command, u.pid));
    }
    holders
}

/// What keeps a mount busy, for a person: the volumes open on it (from
/// the daemon) and who holds files there: loop devices, and processes with
/// a file open or their working directory on it.
pub fn who_holds(mnt: &Path, open: &[(String, usize)]) -> String {
    let shown = |p: &Path| match p.strip_prefix(mnt) {
        Ok(rel) if rel.as_os_str().is_empty() => ".".to_owned(),
        Ok(rel) => rel.display().to_string(),
        Err(_) => p.display().to_string(),
    };
    let mut out = String::new();
    if !open.is_empty() {
        let list: Vec<String> = open
            .iter()
            .map(|(vid, n)| format!("{vid} ({n} open file(s))"))
            .collect();
        out = format!("{} volume(s) open: {}; ", open.len(), list.join(", "));
    }
    let holders = holders_of(mnt, &shown);
    if holders.is_empty() {
        out.push_str("held by something this command cannot see (a process of another PID namespace, or the kernel)");
    } else {
        out.push_str(&format!("held by {}", holders.join("; ")));
    }
    out.push_str("; stop them (shut the VMs down, `losetup -d` the loop devices, leave the directory) and unmount again");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }
}
