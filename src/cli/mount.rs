//! `reflinkfs unmount`: refused while the mount is busy, naming what holds
//! it; waits for the daemon to commit and let go. (`reflinkfs mount` is
//! the daemon's: `crate::daemon::mount`.)

use crate::control::{client, Request, Response};
use crate::daemon::mounts::{pool_of_mount, who_holds};
use crate::error::{Error, Result};
use crate::sys;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `reflinkfs unmount MOUNTPOINT`: refused while volumes are open; waits
/// for the daemon to commit and release the pool.
pub fn unmount(mountpoint: &Path) -> Result<ExitCode> {
    let mnt = std::fs::canonicalize(mountpoint)
        .map_err(|e| Error::io(format!("mountpoint {}", mountpoint.display()), e))?;
    let pool = pool_of_mount(&mnt);
    if sys::getuid() != 0 && (pool.is_some() || is_fuse_mount(&mnt)) {
        return Err(Error::NoAccess {
            what: "unmounting".into(),
            path: mnt.clone(),
            who: format!(
                "only root may unmount a pool, as only root may mount one; run `sudo reflinkfs unmount {}`",
                mnt.display()
            ),
        });
    }
    let Some(pool) = pool else {
        return Err(Error::NotAMount { path: mnt });
    };
    let daemon = daemon_pid(&pool);
    match sys::umount2(&mnt, 0) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(Error::MountBusy {
                holders: who_holds(&mnt, &open_volumes(&pool)),
                mountpoint: mnt,
            })
        }
        Err(e) => return Err(Error::io(format!("unmounting {}", mnt.display()), e)),
    }
    // The daemon gives the pool's lock up before it has closed its last
    // files (its log, the pool directory): wait until it has exited, so
    // that the filesystem under the pool can be unmounted as soon as this
    // returns. Without its PID, the lock is all there is to wait for.
    if let Some(pid) = daemon {
        wait_for_exit(pid);
    }
    wait_for_pool_release(&pool);
    println!("unmounted {} (pool {})", mnt.display(), pool.display());
    Ok(ExitCode::SUCCESS)
}

/// Whether `mnt` is a FUSE mount (of anyone's).
fn is_fuse_mount(mnt: &Path) -> bool {
    let want = mnt.display().to_string();
    crate::daemon::mounts::fuse_mounts()
        .iter()
        .any(|m| m.mountpoint == want)
}

/// The volumes open on a mounted pool, from its daemon's status.
fn open_volumes(pool: &Path) -> Vec<(String, usize)> {
    let status = client::connect(pool)
        .ok()
        .flatten()
        .and_then(|s| client::call(s, &Request::Status, None).ok());
    match status {
        Some(Response::Status(st)) => st
            .running
            .into_iter()
            .map(|r| (r.vid, r.open_handles))
            .collect(),
        _ => Vec::new(),
    }
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
