//! Safe wrappers around the raw syscalls reflinkfs needs.
//!
//! Every `unsafe` block of the crate that talks to the kernel lives here.
//! Each wrapper returns `io::Result` and documents the errors callers are
//! expected to handle. Paths are always a directory fd plus one file name:
//! nothing here resolves a multi-component path, and every open refuses to
//! follow a symlink in its last component (`O_NOFOLLOW`).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_ssize(ret: libc::ssize_t) -> io::Result<usize> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Turns a single path component into a C string.
///
/// Errors: `EINVAL` when the name contains a NUL byte or a `/`, or is empty,
/// `.` or `..` (a name must never reach outside its directory).
pub fn c_name(name: &str) -> io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Opens an absolute or relative path as a directory, refusing a symlink in
/// the last component. Used once per pool to get the pool's root fd.
pub fn open_dir_path(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call;
    // open() does not retain the pointer.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: open() just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`.
///
/// Errors: `ELOOP` when `name` is a symlink, `ENOENT`, `EEXIST` (with
/// `O_EXCL`), `ENOTDIR` (with `O_DIRECTORY`), `ENOSPC`, `EACCES`.
pub fn openat(
    dir: BorrowedFd<'_>,
    name: &str,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let c = c_name(name)?;
    // SAFETY: `c` is NUL-terminated and lives across the call; the kernel
    // copies the name and does not keep the pointer.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: openat() just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a subdirectory of `dir` without following a symlink.
pub fn open_subdir(dir: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// `mkdirat(dir, name, mode)`. Errors: `EEXIST`, `ENOSPC`, `EACCES`.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &str, mode: libc::mode_t) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: valid NUL-terminated name, borrowed fd is open for the call.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
}

/// `renameat(dir, from, dir, to)`: atomically replaces `to`.
/// Errors: `ENOENT` when `from` is missing, `EISDIR`, `EXDEV`.
pub fn renameat(dir: BorrowedFd<'_>, from: &str, to: &str) -> io::Result<()> {
    let f = c_name(from)?;
    let t = c_name(to)?;
    // SAFETY: both names are valid NUL-terminated strings; the fd is open.
    cvt(unsafe { libc::renameat(dir.as_raw_fd(), f.as_ptr(), dir.as_raw_fd(), t.as_ptr()) })
        .map(drop)
}

/// `linkat(dir, from, dir, to, 0)`: a new name for the same inode. Never
/// follows a symlink. Errors: `EEXIST`, `ENOENT`, `EMLINK`, `ENOSPC`.
pub fn linkat(dir: BorrowedFd<'_>, from: &str, to: &str) -> io::Result<()> {
    let f = c_name(from)?;
    let t = c_name(to)?;
    // SAFETY: both names are valid NUL-terminated strings; the fd is open.
    cvt(unsafe { libc::linkat(dir.as_raw_fd(), f.as_ptr(), dir.as_raw_fd(), t.as_ptr(), 0) })
        .map(drop)
}

/// `unlinkat(dir, name, 0)`: removes a file (or a symlink itself).
/// Errors: `ENOENT`, `EISDIR`.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: valid NUL-terminated name, open fd.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) }).map(drop)
}

/// `unlinkat(dir, name, AT_REMOVEDIR)`. Errors: `ENOTEMPTY`, `ENOENT`.
pub fn rmdirat(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: valid NUL-terminated name, open fd.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) }).map(drop)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: describes a symlink itself.
/// Errors: `ENOENT`.
pub fn lstatat(dir: BorrowedFd<'_>, name: &str) -> io::Result<libc::stat> {
    let c = c_name(name)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` points to writable memory of the right size; the kernel
    // fills it completely on success, which is the only case we read it.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so the buffer is initialised.
    Ok(unsafe { st.assume_init() })
}

/// `fstat(fd)`.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: as in `lstatat`.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so the buffer is initialised.
    Ok(unsafe { st.assume_init() })
}

/// `fsync(fd)`: also used on directory fds after a rename, link or unlink.
/// Errors: `EIO`, `ENOSPC` (delayed allocation), `EDQUOT`.
pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on an open fd.
    cvt(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

/// `ftruncate(fd, len)`. Errors: `EFBIG`, `EINVAL`, `EPERM`.
pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on an open fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// `fchmod(fd, mode)`.
pub fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: plain syscall on an open fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// Sets the modification time of an open file, leaving atime alone.
pub fn set_mtime(fd: BorrowedFd<'_>, sec: i64, nsec: i64) -> io::Result<()> {
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as _,
        },
    ];
    // SAFETY: `times` is an array of two valid timespecs that outlives the call.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

/// `ioctl(dst, FICLONE, src)`: makes `dst` share all of `src`'s extents.
///
/// Errors: `EOPNOTSUPP`/`ENOTTY`/`EINVAL` when the filesystem has no
/// reflink support, `EXDEV` across filesystems, `ENOSPC` (metadata).
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd by value as its argument; both fds
    // are open for the duration of the call.
    cvt(unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) }).map(drop)
}

/// Whether an error from `ficlone` means "no reflink here, copy instead".
pub fn is_reflink_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL | libc::EXDEV | libc::ENOSYS)
    )
}

/// `copy_file_range` with explicit offsets. Returns the bytes copied, 0 at
/// the end of the source. Errors: `EXDEV` (old kernels), `ENOSPC`, `EIO`.
pub fn copy_file_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: usize,
) -> io::Result<usize> {
    let mut off_in = src_off as libc::loff_t;
    let mut off_out = dst_off as libc::loff_t;
    // SAFETY: the offsets are valid local variables the kernel updates; the
    // fds are open for the duration of the call.
    cvt_ssize(unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    })
}

/// `lseek(fd, off, SEEK_DATA)`: the start of the next data region at or
/// after `off`, or `None` when only a hole remains (ENXIO).
pub fn seek_data(fd: BorrowedFd<'_>, off: u64) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on an open fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// `lseek(fd, off, SEEK_HOLE)`: the start of the next hole at or after
/// `off` (the end of file counts as a hole). Errors: `ENXIO` past EOF.
pub fn seek_hole(fd: BorrowedFd<'_>, off: u64) -> io::Result<u64> {
    // SAFETY: plain syscall on an open fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, libc::SEEK_HOLE) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// `lseek` with any whence, for the FUSE layer's pass-through of lseek.
pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: libc::c_int) -> io::Result<i64> {
    // SAFETY: plain syscall on an open fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, whence) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as i64)
}

/// `fallocate(fd, mode, off, len)`. Errors: `EOPNOTSUPP` for a mode the
/// filesystem lacks, `ENOSPC`, `EINVAL`.
pub fn fallocate(fd: BorrowedFd<'_>, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an open fd.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
        .map(drop)
}

/// `pread` into the whole buffer, or less at end of file.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable slice of `buf.len()` bytes.
    cvt_ssize(unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            off as libc::off_t,
        )
    })
}

/// `pwrite` of the buffer (may be partial, as the syscall).
pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<usize> {
    // SAFETY: `buf` is a valid readable slice of `buf.len()` bytes.
    cvt_ssize(unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            off as libc::off_t,
        )
    })
}

/// Whether process `pid` exists and has not exited: a zombie's files are
/// already closed, so it counts as gone. Reads `/proc/PID/stat`.
pub fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which ends with ')'.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// `flock(fd, LOCK_EX | LOCK_NB)`. Returns `Ok(false)` when another open
/// file description holds the lock.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: plain syscall on an open fd.
    let r = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(true)
}

/// Filesystem numbers from `fstatvfs`.
#[derive(Debug, Clone, Copy)]
pub struct FsStats {
    pub block_size: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
}

/// `fstatvfs(fd)`.
pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<FsStats> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is writable memory of the right size; read only on success.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded, so the buffer is initialised.
    let st = unsafe { st.assume_init() };
    Ok(FsStats {
        block_size: st.f_frsize,
        blocks: st.f_blocks,
        blocks_free: st.f_bfree,
        blocks_avail: st.f_bavail,
    })
}

/// `fstatfs(fd).f_type`: the filesystem's magic number.
pub fn fs_type(fd: BorrowedFd<'_>) -> io::Result<i64> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `st` is writable memory of the right size; read only on success.
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded, so the buffer is initialised.
    Ok(unsafe { st.assume_init() }.f_type)
}

/// Human name of a filesystem magic number, for logs and `pool info`.
pub fn fs_type_name(magic: i64) -> &'static str {
    match magic {
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0xef53 => "ext4",
        0x0102_1994 => "tmpfs",
        0x6573_5546 => "fuse",
        _ => "other",
    }
}

/// One extent reported by FIEMAP.
#[derive(Debug, Clone, Copy)]
pub struct Extent {
    pub logical: u64,
    pub length: u64,
    pub shared: bool,
}

/// All extents of a file, through `ioctl(FS_IOC_FIEMAP)` with
/// `FIEMAP_FLAG_SYNC` off (delayed allocations are reported as they are).
/// Errors: `EOPNOTSUPP` on filesystems without FIEMAP.
pub fn fiemap(fd: BorrowedFd<'_>) -> io::Result<Vec<Extent>> {
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_EXTENT_LAST: u32 = 0x1;
    const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
    const BATCH: usize = 256;

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
    loop {
        let mut req = Request {
            start,
            length: u64::MAX - start,
            flags: 0,
            mapped_extents: 0,
            extent_count: BATCH as u32,
            reserved: 0,
            extents: [RawExtent::default(); BATCH],
        };
        // SAFETY: `req` is a correctly laid out `struct fiemap` followed by
        // room for `extent_count` extents, and lives across the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FIEMAP as _, &mut req) })?;
        let n = req.mapped_extents as usize;
        if n == 0 {
            return Ok(out);
        }
        let mut last = false;
        for e in &req.extents[..n] {
            out.push(Extent {
                logical: e.logical,
                length: e.length,
                shared: e.flags & FIEMAP_EXTENT_SHARED != 0,
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

/// `ioctl(loopfd, LOOP_SET_CAPACITY, 0)`: makes a loop device re-read the
/// size of its backing file. Errors: `ENXIO` when the device is unbound.
pub fn loop_set_capacity(fd: BorrowedFd<'_>) -> io::Result<()> {
    const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
    // SAFETY: LOOP_SET_CAPACITY takes no argument; the fd is open.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), LOOP_SET_CAPACITY as _, 0) }).map(drop)
}

/// Whether any open file other than read-only ones holds the inode of
/// `fd` open for writing: a loop device, a program, or a shared writable
/// mapping, of this process or another. `fd` must be open read-only.
///
/// It asks for a read lease (`F_SETLEASE`, `F_RDLCK`), which the kernel
/// grants only when the inode is open for writing nowhere, and gives it
/// back at once. Only the file's owner or a process with `CAP_LEASE` may
/// ask. Errors: `EINVAL` when leases are disabled (`fs.leases-enable=0`)
/// or the filesystem has none, `EACCES` for another user's file.
pub fn has_other_writers(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: F_SETLEASE takes an int argument and changes only the lease
    // state of this open file; the fd is open.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(true),
            _ => Err(e),
        };
    }
    // SAFETY: as above; F_UNLCK gives the lease back.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) })?;
    Ok(false)
}

/// Every bound loop device with the path of its backing file, from sysfs
/// (`/sys/block/loopN/loop/backing_file`, as the kernel printed it when
/// asked: a deleted file ends in ` (deleted)`).
pub fn loop_backing_files() -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            let backing = backing.trim_end_matches('\n').to_owned();
            out.push((std::path::PathBuf::from("/dev").join(&name), backing));
        }
    }
    out.sort();
    out
}

/// Lists the names in a directory, without `.` and `..`.
pub fn read_dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    // Read through a duplicate so that the directory stream's position and
    // lifetime never affect the caller's fd.
    // SAFETY: plain syscall on an open fd.
    let dup = cvt(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `dup` is a fresh directory fd that fdopendir takes ownership of.
    let dirp = unsafe { libc::fdopendir(dup) };
    if dirp.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so we still own `dup` and must close it.
        unsafe { libc::close(dup) };
        return Err(e);
    }
    // SAFETY: `dirp` is a valid DIR* for the rest of this function.
    unsafe { libc::rewinddir(dirp) };
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: clearing errno is how readdir() distinguishes end from error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dirp` is valid; the returned entry stays valid until the
        // next readdir/closedir, and we copy the name out before that.
        let ent = unsafe { libc::readdir64(dirp) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: d_name is a NUL-terminated array inside the valid entry.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        match std::str::from_utf8(bytes) {
            Ok(s) => names.push(s.to_owned()),
            Err(_) => log::warn!(
                "ignoring a directory entry whose name is not UTF-8: {}",
                String::from_utf8_lossy(bytes)
            ),
        }
    };
    // SAFETY: `dirp` is valid and closed exactly once, which closes `dup`.
    unsafe { libc::closedir(dirp) };
    result.map(|()| names)
}

/// Clears `O_NONBLOCK` on an fd (set only to keep a planted FIFO from
/// blocking an open).
pub fn clear_nonblock(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL on an open fd takes no pointer argument.
    let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: F_SETFL on an open fd with an integer argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) }).map(drop)
}

/// Whether an open file has `O_APPEND` set.
pub fn is_append(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: F_GETFL on an open fd takes no pointer argument.
    let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    Ok(fl & libc::O_APPEND != 0)
}

/// `fdatasync(fd)`. Errors as `fsync`.
pub fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on an open fd.
    cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) }).map(drop)
}

/// `umount2(path, flags)`. Errors: `EBUSY` while files on the mount are
/// open (a loop device counts), `EINVAL` when `path` is not a mountpoint,
/// `EPERM` without CAP_SYS_ADMIN.
pub fn umount2(path: &std::path::Path, flags: libc::c_int) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    cvt(unsafe { libc::umount2(c.as_ptr(), flags) }).map(drop)
}

/// A pipe with both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 just returned these two fds and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The two sides of `fork()`.
pub enum Forked {
    Parent { child: libc::pid_t },
    Child,
}

/// `fork()`.
///
/// # Safety
///
/// The process must have a single thread. The child of a multi-threaded
/// process gets copies of locks (the allocator's, stdio's) held by threads
/// that do not exist in it, and may deadlock on its first allocation.
pub unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: the caller guarantees a single thread (see above).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent { child }),
    }
}

/// `setsid()`: a new session, detached from the terminal.
pub fn setsid() -> io::Result<()> {
    // SAFETY: plain syscall without arguments.
    cvt(unsafe { libc::setsid() }).map(drop)
}

/// Points stdin, stdout and stderr at `file` (`dup2` onto 0, 1 and 2).
/// Only the three standard descriptors can be replaced this way: an fd
/// that Rust code owns is never closed behind its owner's back.
pub fn redirect_stdio(file: BorrowedFd<'_>) -> io::Result<()> {
    for to in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: `file` is open; `to` is a standard descriptor, which no
        // Rust object owns, and dup2 closes and replaces it atomically.
        cvt(unsafe { libc::dup2(file.as_raw_fd(), to) })?;
    }
    Ok(())
}

/// Blocks `signals` in the calling thread (and in threads it starts later),
/// so that one thread can take them with [`wait_signal`].
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: `set` is an initialised sigset_t; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset only adds valid
    // signal numbers to the initialised set.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for &s in signals {
            libc::sigaddset(set.as_mut_ptr(), s);
        }
        set.assume_init()
    }
}

/// Waits for one of `signals` (which must be blocked) and returns it.
pub fn wait_signal(signals: &[libc::c_int]) -> io::Result<libc::c_int> {
    let set = sigset(signals);
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised and `sig` is a valid place for the result.
    let r = unsafe { libc::sigwait(&set, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}

/// Sets the process's file mode creation mask; returns the old one. The
/// mask is process-wide: call it only while no other thread creates files.
pub fn umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask cannot fail and touches no memory.
    unsafe { libc::umask(mask) }
}

/// The path through which `name` in the open directory `dir` is reached
/// without resolving the directory's own path again:
/// `/proc/self/fd/N/name`. For calls that take only a path (bind and
/// connect of a Unix socket): a directory swapped for a symlink after it
/// was opened is not followed.
pub fn path_in_dir_fd(dir: BorrowedFd<'_>, name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

/// 64 random bits from the kernel (`getrandom`), for ids that must not
/// repeat across a pool's life.
pub fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of a
        // buffer we own; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n > 0 {
            got += n as usize;
        } else if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // getrandom only fails before the entropy pool is ready, long
            // before a pool is used; fall back to the clock.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            return t ^ u64::from(std::process::id()) << 32;
        }
    }
    u64::from_ne_bytes(buf)
}

/// Lowers the calling thread's CPU priority (nice +`n`): the daemon's
/// threads that copy and commit yield the CPU to the threads that answer
/// requests. Errors (no permission to renice) leave it as it was.
pub fn lower_thread_priority(n: libc::c_int) {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority only changes the scheduling of thread `tid`, this
    // thread; who = a TID is what Linux takes for PRIO_PROCESS.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, n) };
}

/// The real user id of the process.
pub fn getuid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// The peer of a connected Unix socket (`SO_PEERCRED`): (pid, uid, gid).
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writing, and `len` holds the
    // size of `cred`, as getsockopt requires.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok((cred.pid, cred.uid, cred.gid))
}

/// Sends `data` on a Unix stream socket, with `fd` attached as SCM_RIGHTS
/// when given. Returns the bytes sent (the ancillary data goes with the
/// first byte). Errors: `EPIPE`, `ECONNRESET`.
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one fd, aligned as cmsghdr requires.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure computation on a constant size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `cbuf`, which is larger than
        // `space`; CMSG_FIRSTHDR returns a pointer inside it, and the data
        // written (one int) fits in the space CMSG_SPACE reserved.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd.as_raw_fd());
        }
    }
    // SAFETY: `msg` points at `iov` and `cbuf`, both alive for the call.
    cvt_ssize(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) })
}

/// Receives into `buf` from a Unix stream socket, with at most one fd
/// passed as SCM_RIGHTS (any more are closed). Returns the bytes read (0
/// at end of stream) and the fd.
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: `msg` points at `iov` (over `buf`) and `cbuf`, both alive and
    // writable for the call.
    let n =
        cvt_ssize(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })?;
    let mut got: Option<OwnedFd> = None;
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // cmsg headers; the CMSG_* macros walk exactly those, and each
    // SCM_RIGHTS payload holds whole ints, each a new fd we now own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            // A header whose length is shorter than a header carries no fd
            // (and must not wrap around into a huge count).
            let payload = ((*c).cmsg_len as usize).checked_sub(libc::CMSG_LEN(0) as usize);
            if let (libc::SOL_SOCKET, libc::SCM_RIGHTS, Some(payload)) =
                ((*c).cmsg_level, (*c).cmsg_type, payload)
            {
                let count = payload / std::mem::size_of::<libc::c_int>();
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if got.is_none() {
                        got = Some(fd);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, got))
}

/// Whether an fd is a terminal.
pub fn is_tty(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn c_name_rejects_path_escapes() {
        for bad in ["", ".", "..", "a/b", "/x", "a\0b"] {
            assert!(c_name(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(c_name("private.img").is_ok());
    }

    #[test]
    fn openat_refuses_symlinks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("target"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("target"), d.path().join("link")).unwrap();
        let dir = open_dir_path(d.path()).unwrap();
        let e = openat(dir.as_fd(), "link", libc::O_RDONLY, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        assert!(openat(dir.as_fd(), "target", libc::O_RDONLY, 0).is_ok());
        let mut names = read_dir_names(dir.as_fd()).unwrap();
        names.sort();
        assert_eq!(names, ["link", "target"]);
    }

    #[test]
    fn a_read_lease_tells_whether_another_writer_exists() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let ro = std::fs::File::open(&path).unwrap();
        assert!(!has_other_writers(ro.as_fd()).unwrap());
        let other_reader = std::fs::File::open(&path).unwrap();
        assert!(
            !has_other_writers(ro.as_fd()).unwrap(),
            "readers do not count"
        );
        let rw = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(has_other_writers(ro.as_fd()).unwrap());
        drop(rw);
        assert!(!has_other_writers(ro.as_fd()).unwrap());
        drop(other_reader);
    }

    #[test]
    fn seek_data_and_hole_on_sparse_file() {
        let d = tempfile::tempdir().unwrap();
        let dir = open_dir_path(d.path()).unwrap();
        let f = openat(
            dir.as_fd(),
            "f",
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
        .unwrap();
        ftruncate(f.as_fd(), 1 << 20).unwrap();
        assert_eq!(seek_data(f.as_fd(), 0).unwrap(), None);
        pwrite(f.as_fd(), &[1u8; 4096], 512 * 1024).unwrap();
        let d0 = seek_data(f.as_fd(), 0).unwrap().unwrap();
        assert!(d0 <= 512 * 1024);
        assert!(seek_hole(f.as_fd(), d0).unwrap() >= 512 * 1024 + 4096);
    }
}
