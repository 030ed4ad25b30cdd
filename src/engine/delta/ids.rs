//! Revision ids: 128 random bits drawn when an image is committed, kept in
//! an extended attribute of the image file itself, so that the id lives,
//! moves and dies with the inode (a revision is a hard link of the image it
//! was, a commit renames the new image into place, a prune unlinks it) and
//! no crash can leave an id on data it was not drawn for.

use crate::sys;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;

/// The extended attribute that holds an image's id (32 hex digits).
pub const ID_XATTR: &str = "user.reflinkfs.revid";

/// The id of one committed image: 128 random bits, shown as 32 lowercase
/// hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevId(pub u128);

impl RevId {
    pub fn random() -> RevId {
        let hi = u128::from(sys::random_u64());
        let lo = u128::from(sys::random_u64());
        RevId(hi << 64 | lo)
    }

    /// Exactly 32 hex digits (either case).
    pub fn parse(s: &str) -> Option<RevId> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(RevId)
    }
}

impl fmt::Display for RevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The id an image file carries, if any. A value that does not parse is
/// treated as no id.
pub fn read_id(f: &File) -> io::Result<Option<RevId>> {
    Ok(sys::xattr_get(f.as_fd(), ID_XATTR)?
        .and_then(|v| std::str::from_utf8(&v).ok().and_then(RevId::parse)))
}

/// Writes `id` onto a new image (not yet durable: the commit's fsync of the
/// file makes it so).
pub fn stamp(f: &File, id: RevId) -> io::Result<()> {
    sys::xattr_set(f.as_fd(), ID_XATTR, id.to_string().as_bytes(), false)
}

/// Removes any id from a file whose data is about to change.
pub fn clear(f: &File) -> io::Result<()> {
    sys::xattr_remove(f.as_fd(), ID_XATTR)
}

/// The id of a committed image or revision, drawing one now (durably) for
/// an image from before ids existed. Such an image never changes, so an id
/// given late is as true as one given at its commit. Two racing callers
/// agree: only the first write succeeds. `None` where the filesystem has no
/// extended attributes.
pub fn id_or_assign(f: &File) -> io::Result<Option<RevId>> {
    if let Some(id) = read_id(f)? {
        return Ok(Some(id));
    }
    let id = RevId::random();
    match sys::xattr_set(f.as_fd(), ID_XATTR, id.to_string().as_bytes(), true) {
        Ok(()) => {
            sys::fsync(f.as_fd())?;
            Ok(Some(id))
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => read_id(f),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_others() {
        let id = RevId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(RevId::parse(&s), Some(id));
        assert_eq!(RevId::parse(&s.to_uppercase()), Some(id));
        assert_ne!(RevId::random(), id);
        for bad in [
            "",
            "snap1",
            &s[1..],
            &format!("{s}0"),
            &format!("+{}", &s[1..]),
        ] {
            assert_eq!(RevId::parse(bad), None, "{bad:?}");
        }
    }
}
