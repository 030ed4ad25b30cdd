//! What a filesystem, a file's extents, its writers and loop devices are:
//! statvfs, the filesystem type, FIEMAP, leases, sysfs, flock, umount.

use super::cvt;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Whether process `pid` exists and has not exited, with all its threads:
/// a zombie's files are closed, so it counts as gone, but a thread group
/// leader shows as a zombie while its other threads are still exiting (and
/// still hold the process's files, a lock among them). Reads
/// `/proc/PID/task/*/stat`.
pub fn process_running(pid: u32) -> bool {
    let alive = |stat: &str| {
        // The state follows the command name, which ends with ')'.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    };
    match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks
            .flatten()
            .any(|t| std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| alive(&s))),
        Err(_) => std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| alive(&s)),
    }
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
/// `FIEMAP_FLAG_SYNC` off (delayed allocations are reported as they are),
/// with whether each is shared with another file.
/// Errors: `EOPNOTSUPP` on filesystems without FIEMAP.
pub fn fiemap(fd: BorrowedFd<'_>) -> io::Result<Vec<Extent>> {
    const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
    Ok(super::fiemap_physical(fd, false)?
        .into_iter()
        .map(|e| Extent {
            logical: e.logical,
            length: e.length,
            shared: e.flags & FIEMAP_EXTENT_SHARED != 0,
        })
        .collect())
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

/// A process that uses a file under some directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub command: String,
    /// The file it has open, or its working or root directory.
    pub path: std::path::PathBuf,
    /// `open`, `cwd` or `root`.
    pub how: &'static str,
}

/// The processes (of this PID namespace, as far as /proc shows them) that
/// have a file under `dir` open, or their working or root directory there.
/// Reads `/proc/PID/{fd/*,cwd,root}`; processes that vanish or that this
/// user may not inspect are skipped.
pub fn processes_using(dir: &std::path::Path) -> Vec<User> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    let me = std::process::id();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = p.path();
        let command = std::fs::read_to_string(base.join("comm"))
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_default();
        let mut seen = |path: std::path::PathBuf, how: &'static str| {
            if path.starts_with(dir) && !out.iter().any(|u: &User| u.pid == pid && u.path == path) {
                out.push(User {
                    pid,
                    command: command.clone(),
                    path,
                    how,
                });
            }
        };
        for (link, how) in [("cwd", "cwd"), ("root", "root")] {
            if let Ok(t) = std::fs::read_link(base.join(link)) {
                seen(t, how);
            }
        }
        if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            for fd in fds.flatten() {
                if let Ok(t) = std::fs::read_link(fd.path()) {
                    seen(t, "open");
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.path, a.pid).cmp(&(&b.path, b.pid)));
    out
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
