//! The FUSE mounts of this mount namespace, from /proc/self/mountinfo.

use std::path::{Path, PathBuf};

/// One FUSE mount of /proc/self/mountinfo: its id, mountpoint and source.
pub(crate) struct FuseMount {
    pub id: u64,
    pub mountpoint: String,
    pub source: String,
}

/// The FUSE mounts of this mount namespace.
pub(crate) fn fuse_mounts() -> Vec<FuseMount> {
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

/// The pool (FUSE source) of a reflinkfs mount, from /proc/self/mountinfo.
pub fn pool_of_mount(mnt: &Path) -> Option<PathBuf> {
    let want = mnt.to_str()?;
    fuse_mounts()
        .into_iter()
        .filter(|m| m.mountpoint == want)
        .map(|m| PathBuf::from(m.source))
        // Ours when the source is a pool (fuser mounts as plain "fuse").
        .find(|source| {
            source
                .join(crate::engine::pool::META_DIR)
                .join(crate::engine::pool::POOL_JSON)
                .exists()
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }
}
