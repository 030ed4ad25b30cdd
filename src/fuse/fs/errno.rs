//! How a failed operation answers: its errno, logged once at the level
//! it deserves.

use super::*;

/// Logs a refused change and names the command to use instead.
pub(super) fn refuse(what: &str, instead: &str) -> Errno {
    log::warn!("refused {what}: use `{instead}` instead");
    libc::EPERM
}

/// The errno of an open whose start failed. EIO for all but the few
/// errors a caller can act on: EROFS (a read-only volume), EBUSY, ENOSPC,
/// ENOENT. The reason is logged.
pub(super) fn start_errno(vid: &ValidVid, e: &Error) -> Errno {
    let errno = match e {
        Error::ReadOnly { .. } => libc::EROFS,
        e => match e.errno() {
            e @ (libc::EBUSY | libc::ENOSPC | libc::EDQUOT | libc::ENOENT) => e,
            _ => libc::EIO,
        },
    };
    match errno {
        libc::EROFS | libc::EBUSY => log::warn!("{vid}: open refused: {e}"),
        _ => log::error!("{vid}: cannot start: {e}"),
    }
    errno
}

/// The errno of an engine error, logged at the level it deserves.
pub(super) fn errno_of(op: &str, e: &Error) -> Errno {
    let errno = e.errno();
    match errno {
        libc::ENOENT => log::debug!("{op}: {e}"),
        libc::EBUSY | libc::EROFS | libc::EINVAL => log::warn!("{op}: {e}"),
        _ => log::error!("{op}: {e} (errno {errno})"),
    }
    errno
}

pub(super) fn io_errno(op: &str, e: std::io::Error) -> Errno {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    log::debug!("{op}: {e}");
    errno
}
