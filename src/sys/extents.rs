//! What the incremental export needs from the kernel: a file's extents
//! with their physical addresses and flags (FIEMAP), and the extended
//! attribute that carries an image's revision id.

use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// One extent as FIEMAP reports it, physical address and flags included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhysExtent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

pub const FIEMAP_EXTENT_LAST: u32 = 0x1;
pub const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
pub const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
pub const FIEMAP_EXTENT_ENCODED: u32 = 0x8;
pub const FIEMAP_EXTENT_DATA_ENCRYPTED: u32 = 0x80;
pub const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
pub const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;
pub const FIEMAP_EXTENT_DATA_TAIL: u32 = 0x400;
pub const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;

/// All extents of a file, with physical addresses, through
/// `ioctl(FS_IOC_FIEMAP)`. With `sync`, `FIEMAP_FLAG_SYNC` writes dirty
/// pages back first, so no delayed allocation is left to report.
/// Errors: `EOPNOTSUPP` on filesystems without FIEMAP.
pub fn fiemap_physical(fd: BorrowedFd<'_>, sync: bool) -> io::Result<Vec<PhysExtent>> {
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 0x1;
    const BATCH: usize = 512;

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct RawExtent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    #[repr(C)]
    struct Request {
        start: u64,
        length: u64,
        flags: u32,
        mapped_extents: u32,
        extent_count: u32,
        reserved: u32,
        extents: [RawExtent; BATCH],
    }

    let mut out = Vec::new();
    let mut start = 0u64;
    let mut flags = if sync { FIEMAP_FLAG_SYNC } else { 0 };
    loop {
        let mut req = Box::new(Request {
            start,
            length: u64::MAX - start,
            flags,
            mapped_extents: 0,
            extent_count: BATCH as u32,
            reserved: 0,
            extents: [RawExtent::default(); BATCH],
        });
        // SAFETY: `req` is a correctly laid out `struct fiemap` followed by
        // room for `extent_count` extents, and lives across the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FIEMAP as _, &mut *req) })?;
        flags = 0;
        let n = req.mapped_extents as usize;
        if n == 0 {
            return Ok(out);
        }
        let mut last = false;
        for e in &req.extents[..n] {
            out.push(PhysExtent {
                logical: e.logical,
                physical: e.physical,
                length: e.length,
                flags: e.flags,
            });
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
        }
        let tail = req.extents[n - 1];
        if last || n < BATCH {
            return Ok(out);
        }
        start = tail.logical + tail.length;
    }
}

/// `fgetxattr(fd, name)`: the value, or `None` when the file has no such
/// attribute (or the filesystem has no extended attributes).
pub fn xattr_get(fd: BorrowedFd<'_>, name: &str) -> io::Result<Option<Vec<u8>>> {
    let cname = super::c_name(name)?;
    let mut buf = [0u8; 256];
    // SAFETY: `cname` is NUL-terminated; `buf` is writable for its length.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA | libc::EOPNOTSUPP) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(buf[..n as usize].to_vec()))
}

/// `fsetxattr(fd, name, value, flags)`; `create_only` fails with `EEXIST`
/// when the attribute is already set (`XATTR_CREATE`).
pub fn xattr_set(
    fd: BorrowedFd<'_>,
    name: &str,
    value: &[u8],
    create_only: bool,
) -> io::Result<()> {
    let cname = super::c_name(name)?;
    let flags = if create_only { libc::XATTR_CREATE } else { 0 };
    // SAFETY: `cname` is NUL-terminated; `value` is readable for its length.
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `fremovexattr(fd, name)`; a missing attribute is not an error.
pub fn xattr_remove(fd: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let cname = super::c_name(name)?;
    // SAFETY: `cname` is NUL-terminated.
    match cvt(unsafe { libc::fremovexattr(fd.as_raw_fd(), cname.as_ptr()) }) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: `len` bytes at `off` read as zeros
/// and hold no space.
pub fn punch_hole(fd: BorrowedFd<'_>, off: u64, len: u64) -> io::Result<()> {
    super::fallocate(
        fd,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}
