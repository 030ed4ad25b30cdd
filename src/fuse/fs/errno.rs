//! How a failed operation answers: one mapping from what went wrong to an
//! errno, logged once, at the level the errno deserves. Every error of the
//! mount goes through [`fail`]; the adapter only sends the errno.

use super::*;
use std::fmt::Display;

/// How loud a failure is.
/// - Debug: what clients do all the time and expect to fail: a name that
///   does not exist, an xattr or ioctl the mount does not have, a stale
///   dentry the kernel retries, an interrupted call.
/// - Warn: a refusal the caller can act on: a read-only volume or mount,
///   a busy volume, a write past the volume's end, a change that has its
///   own command.
/// - Error: everything else, which means something is wrong: an I/O error
///   of the backing filesystem, no space, a start that failed.
pub fn level_of(errno: Errno) -> log::Level {
    match errno {
        libc::ENOENT
        | libc::ENODATA
        | libc::ENOTTY
        | libc::EOPNOTSUPP
        | libc::ENOSYS
        | libc::ESTALE
        | libc::EINTR
        | libc::EAGAIN
        | libc::EISDIR
        | libc::ENOTDIR
        | libc::ERANGE => log::Level::Debug,
        libc::EBUSY
        | libc::EROFS
        | libc::EINVAL
        | libc::EPERM
        | libc::EACCES
        | libc::EBADF
        | libc::EFBIG
        | libc::EEXIST
        | libc::EXDEV => log::Level::Warn,
        _ => log::Level::Error,
    }
}

/// Logs `what` at `errno`'s level and gives `errno`.
pub fn fail(errno: Errno, what: impl Display) -> Errno {
    if level_of(errno) == log::Level::Error {
        log::error!("{what} (errno {errno})");
    } else {
        log::log!(level_of(errno), "{what}");
    }
    errno
}

/// A change refused because it has its own command.
pub fn refuse(what: &str, instead: &str) -> Errno {
    fail(
        libc::EPERM,
        format_args!("refused {what}: use `{instead}` instead"),
    )
}

/// An engine error during `op`.
pub(super) fn errno_of(op: &str, e: &Error) -> Errno {
    fail(e.errno(), format_args!("{op}: {e}"))
}

/// A syscall's error during `op`.
pub(super) fn io_errno(op: &str, e: std::io::Error) -> Errno {
    fail(
        e.raw_os_error().unwrap_or(libc::EIO),
        format_args!("{op}: {e}"),
    )
}

/// An open whose start failed. EIO for all but the few errors a caller can
/// act on: EROFS (a read-only volume), EBUSY, ENOSPC, EDQUOT, ENOENT.
pub(super) fn start_errno(vid: &ValidVid, e: &Error) -> Errno {
    let errno = match e {
        Error::ReadOnly { .. } => libc::EROFS,
        e => match e.errno() {
            e @ (libc::EBUSY | libc::ENOSPC | libc::EDQUOT | libc::ENOENT) => e,
            _ => libc::EIO,
        },
    };
    match level_of(errno) {
        log::Level::Warn => fail(errno, format_args!("{vid}: open refused: {e}")),
        _ => fail(errno, format_args!("{vid}: cannot start: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routine_failures_are_quiet_and_real_ones_loud() {
        assert_eq!(level_of(libc::ENOENT), log::Level::Debug);
        assert_eq!(level_of(libc::ENOTTY), log::Level::Debug);
        assert_eq!(level_of(libc::EROFS), log::Level::Warn);
        assert_eq!(level_of(libc::EFBIG), log::Level::Warn);
        assert_eq!(level_of(libc::EIO), log::Level::Error);
        assert_eq!(level_of(libc::ENOSPC), log::Level::Error);
    }
}
