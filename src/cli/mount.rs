//! `reflinkfs mount` and `reflinkfs unmount`: the mount hands over to the
//! daemon; the unmount waits for the daemon to commit and let go.

use crate::daemon::mounts::pool_of_mount;
use crate::error::{Error, Result};
use crate::sys;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `reflinkfs mount POOL MOUNTPOINT [-o OPTIONS] [-f]`.
pub fn mount(
    pool: &Path,
    mountpoint: &Path,
    options: &[String],
    foreground: bool,
    verbose: u8,
) -> Result<ExitCode> {
    crate::daemon::mount(pool, mountpoint, options, foreground, verbose)
}

/// `reflinkfs unmount MOUNTPOINT`: refused while volumes are open; waits
/// for the daemon to commit and release the pool.
pub fn unmount(mountpoint: &Path) -> Result<ExitCode> {
    let mnt = std::fs::canonicalize(mountpoint)
        .map_err(|e| Error::io(format!("mountpoint {}", mountpoint.display()), e))?;
    let Some(pool) = pool_of_mount(&mnt) else {
        return Err(Error::NotAMount { path: mnt });
    };
    let daemon = daemon_pid(&pool);
    match sys::umount2(&mnt, 0) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(Error::Busy {
                vid: mnt.display().to_string(),
                reason: "files on the mount are open (a running volume, a loop device, or a reader); stop them first".into(),
            })
        }
        Err(e) => return Err(Error::io(format!("unmounting {}", mnt.display()), e)),
    }
    // The daemon gives the pool's lock up before it has closed its last
    // files (its log, the pool directory): wait until it has exited, so
    // that the filesystem under the pool can be unmounted as soon as this
    // returns. Without its PID, the lock is all there is to wait for.
    match daemon {
        Some(pid) => wait_for_exit(pid),
        None => wait_for_pool_release(&pool),
    }
    println!("unmounted {} (pool {})", mnt.display(), pool.display());
    Ok(ExitCode::SUCCESS)
}

fn lock_path(pool: &Path) -> PathBuf {
    pool.join(crate::engine::pool::META_DIR)
        .join(crate::engine::pool::LOCK_FILE)
}

/// The PID the mount's daemon wrote into the pool's lock file.
fn daemon_pid(pool: &Path) -> Option<u32> {
    std::fs::read_to_string(lock_path(pool))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits (up to a minute) until process `pid` has exited.
fn wait_for_exit(pid: u32) {
    for _ in 0..3000 {
        if !sys::process_running(pid) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    log::warn!("the daemon (process {pid}) is still running a minute after the unmount");
}

/// Waits (up to a minute) until no process holds the pool's lock.
fn wait_for_pool_release(pool: &Path) {
    let lock = lock_path(pool);
    for _ in 0..600 {
        match File::open(&lock) {
            Ok(f) => {
                if sys::try_lock_exclusive(f.as_fd()).unwrap_or(false) {
                    return;
                }
            }
            Err(_) => return,
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    log::warn!(
        "the daemon of {} still holds the pool after a minute",
        pool.display()
    );
}
