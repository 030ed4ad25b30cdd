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

mod extents;
mod fsinfo;
mod fusedev;
mod loopdev;
mod process;

pub use extents::*;
pub use fsinfo::*;
pub use fusedev::*;
pub use loopdev::*;
pub use process::*;

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

/// The soft limit on open files (`RLIMIT_NOFILE`), or `None` when it
/// cannot be read.
pub fn open_files_limit() -> Option<u64> {
    let mut r = std::mem::MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: getrlimit writes the struct behind a valid pointer.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, r.as_mut_ptr()) }).ok()?;
    // SAFETY: getrlimit succeeded, so the struct is initialised.
    Some(unsafe { r.assume_init() }.rlim_cur)
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

/// `fchownat(dir, name, uid, gid, AT_SYMLINK_NOFOLLOW)`: changes the owner
/// of the entry `name` itself, never what a symlink there points to.
pub fn chown_entry(dir: BorrowedFd<'_>, name: &str, uid: u32, gid: u32) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: `c` is a valid C string and `dir` an open fd.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            c.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
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
    lseek(fd, off as i64, libc::SEEK_HOLE).map(|r| r as u64)
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

/// Lists the names in a directory, without `.` and `..`.
pub fn read_dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    // Read through a new open file description of the same directory: a
    // duplicated fd would share the caller's position, and one directory
    // fd kept open for the mount's lookups is listed by several threads
    // at once.
    // SAFETY: the name is a NUL-terminated literal; plain syscall on an
    // open fd.
    let dup = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c".".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
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

/// The path through which `name` in the open directory `dir` is reached
/// without resolving the directory's own path again:
/// `/proc/self/fd/N/name`. For calls that take only a path (bind and
/// connect of a Unix socket): a directory swapped for a symlink after it
/// was opened is not followed.
pub fn path_in_dir_fd(dir: BorrowedFd<'_>, name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_directory_fd_can_be_listed_by_several_threads_at_once() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..300 {
            std::fs::write(d.path().join(format!("f{i}")), b"").unwrap();
        }
        let dir = std::sync::Arc::new(open_dir_path(d.path()).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        assert_eq!(read_dir_names(dir.as_fd()).unwrap().len(), 300);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
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
