//! Passthrough registrations of a FUSE connection: the `/dev/fuse` ioctl
//! that takes a backing file back from the kernel (fuser makes them).

use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong =
    (1 << 30) | ((size_of::<u32>() as libc::c_ulong) << 16) | (229 << 8) | 2;

/// Takes back the passthrough registration `id` of the connection that
/// `dev` (a `/dev/fuse` descriptor, or a duplicate or clone of one)
/// serves: the kernel then lets go of the backing file once no open file
/// uses it. Works on any descriptor of that connection, also after it was
/// unmounted or aborted. Errors: `ENOENT` for an id that is not
/// registered, `EPERM` without CAP_SYS_ADMIN.
pub fn fuse_backing_close(dev: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    // SAFETY: the ioctl reads one u32 from the pointer, which points to a
    // live one; the descriptor is open.
    cvt(unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            FUSE_DEV_IOC_BACKING_CLOSE as _,
            &id as *const u32,
        )
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_number_is_that_of_linux_fuse_h() {
        // As the kernel headers spell it out on x86_64 and arm64.
        assert_eq!(FUSE_DEV_IOC_BACKING_CLOSE, 0x4004_e502);
    }
}
