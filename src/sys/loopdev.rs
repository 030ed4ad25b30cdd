//! Loop devices made and removed by reflinkfs itself (`volume attach`):
//! `LOOP_CTL_GET_FREE`, `LOOP_CONFIGURE` with a file descriptor the engine
//! opened, `LOOP_GET_STATUS64`, `LOOP_CLR_FD`. The structures and numbers
//! are those of `<linux/loop.h>` (the libc crate has none of them).

use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` (Linux >= 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn zeroed_info() -> LoopInfo64 {
    // SAFETY: loop_info64 is plain data (integers and byte arrays); all
    // zeros is its "nothing set" value.
    unsafe { std::mem::zeroed() }
}

/// What a loop device is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopBacking {
    /// `st_dev` and `st_ino` of the backing file.
    pub dev: u64,
    pub ino: u64,
    pub read_only: bool,
}

/// The path of loop device `n`.
pub fn loop_path(n: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{n}"))
}

/// The number of `/dev/loopN`, if that is what `path` is.
pub fn loop_number(path: &Path) -> Option<u32> {
    path.to_str()?.strip_prefix("/dev/loop")?.parse().ok()
}

fn open_dev(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid C string; the fd returned is new and ours.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: open just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds a free loop device to `file` (its open descriptor, so no path is
/// resolved), with logical blocks of `block_size` bytes, direct I/O and
/// read-only as asked, without autoclear; gives the device's number. The
/// kernel runs buffered where direct I/O would need a larger alignment
/// than `block_size` (XFS and btrfs want 4096). Retries when another
/// process takes the free device first.
pub fn loop_attach(
    file: BorrowedFd<'_>,
    read_only: bool,
    direct_io: bool,
    block_size: u32,
) -> io::Result<u32> {
    let control = open_dev(Path::new("/dev/loop-control"), libc::O_RDWR)?;
    let mut last = io::Error::from_raw_os_error(libc::EBUSY);
    for _ in 0..32 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = cvt(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _, 0) })?;
        let dev = match open_dev(&loop_path(n as u32), libc::O_RDWR) {
            Ok(d) => d,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let mut info = zeroed_info();
        info.lo_flags = if read_only { LO_FLAGS_READ_ONLY } else { 0 }
            | if direct_io { LO_FLAGS_DIRECT_IO } else { 0 };
        let config = LoopConfig {
            fd: file.as_raw_fd() as u32,
            block_size,
            info,
            reserved: [0; 8],
        };
        // SAFETY: `config` is a valid loop_config that outlives the call;
        // the kernel takes its own reference to the file.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
        match cvt(r) {
            Ok(_) => return Ok(n as u32),
            // Taken by someone else between GET_FREE and CONFIGURE.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Opens loop device `n` and asks what it is bound to: `None` when it is
/// missing, free, or being torn down.
fn open_bound(n: u32) -> io::Result<Option<(OwnedFd, LoopBacking)>> {
    let dev = match open_dev(&loop_path(n), libc::O_RDONLY) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut info = zeroed_info();
    // SAFETY: `info` is a writable loop_info64 the kernel fills.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info) };
    match cvt(r) {
        Ok(_) => {
            let backing = LoopBacking {
                dev: info.lo_device,
                ino: info.lo_inode,
                read_only: info.lo_flags & LO_FLAGS_READ_ONLY != 0,
            };
            Ok(Some((dev, backing)))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What loop device `n` is bound to; `None` when it is free (or gone).
pub fn loop_backing(n: u32) -> io::Result<Option<LoopBacking>> {
    Ok(open_bound(n)?.map(|(_, b)| b))
}

/// Unbinds loop device `n` (`LOOP_CLR_FD`). On a device still open the
/// kernel only marks it to be cleared at its last close.
pub fn loop_detach(n: u32) -> io::Result<()> {
    let dev = open_dev(&loop_path(n), libc::O_RDONLY)?;
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is open.
    match cvt(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD as _, 0) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Unbinds loop device `n` only if it is bound to the file `(dev, ino)`:
/// the check and the `LOOP_CLR_FD` go through one open of the device, so
/// a number freed and given to another disk in between is never cleared.
/// Gives whether it was ours (a device already being torn down is not).
pub fn loop_detach_if(n: u32, (dev, ino): (u64, u64)) -> io::Result<bool> {
    let fd = match open_bound(n)? {
        Some((fd, b)) if b.dev == dev && b.ino == ino => fd,
        _ => return Ok(false),
    };
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is open.
    match cvt(unsafe { libc::ioctl(fd.as_raw_fd(), LOOP_CLR_FD as _, 0) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether something holds block device `path` exclusively (a mount, a
/// device-mapper table, Xen's blkback): an `O_EXCL` open fails with EBUSY.
pub fn block_claimed(path: &Path) -> bool {
    matches!(
        open_dev(path, libc::O_RDONLY | libc::O_EXCL),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY)
    )
}

/// The backing file of loop device `n` as sysfs names it; `None` once the
/// kernel has really let go of it (also while the device is being torn
/// down, sysfs keeps the name until then).
pub fn loop_backing_path(n: u32) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/loop{n}/loop/backing_file"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_owned())
}

/// Whether loop device `n` does direct I/O, per sysfs.
pub fn loop_direct_io(n: u32) -> bool {
    std::fs::read_to_string(format!("/sys/block/loop{n}/loop/dio")).is_ok_and(|s| s.trim() == "1")
}

/// The logical block size of loop device `n`, per sysfs.
pub fn loop_block_size(n: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/block/loop{n}/queue/logical_block_size"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The `major:minor` of loop device `n`.
pub fn loop_dev_numbers(n: u32) -> Option<(u32, u32)> {
    let s = std::fs::read_to_string(format!("/sys/block/loop{n}/dev")).ok()?;
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

thread_local! {
    static BACKING_SCANS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many times this thread listed every loop device's backing file
/// ([`loop_backing_files`]: a walk of `/sys/block`), for tests that check
/// a walk is not repeated (recovery does one, however many volumes).
pub fn loop_backing_scans() -> u64 {
    BACKING_SCANS.with(|c| c.get())
}

/// Every bound loop device with the path of its backing file, from sysfs
/// (`/sys/block/loopN/loop/backing_file`, as the kernel printed it when
/// asked: a deleted file ends in ` (deleted)`).
pub fn loop_backing_files() -> Vec<(PathBuf, String)> {
    BACKING_SCANS.with(|c| c.set(c.get() + 1));
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
            out.push((PathBuf::from("/dev").join(&name), backing));
        }
    }
    out.sort();
    out
}
