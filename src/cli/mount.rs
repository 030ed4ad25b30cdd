//! `reflinkfs unmount`: refused while the mount is busy, naming what holds
//! it; waits for the daemon to commit and let go (or says which held
//! volumes it still waits for). (`reflinkfs mount` is
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
    // A holder can be fleeting: a loop device a moment after its detach, a
    // process's child between its fork and its exec (which has every file
    // of the parent for that while). A busy mount is tried again briefly
    // before the refusal, which names what still holds it.
    let mut tries = 0;
    loop {
        match sys::umount2(&mnt, 0) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 10 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(Error::MountBusy {
                    holders: who_holds(&mnt, &open_volumes(&pool)),
                    mountpoint: mnt,
                })
            }
            Err(e) => return Err(Error::io(format!("unmounting {}", mnt.display()), e)),
        }
    }
    // The daemon gives the pool's lock up before it has closed its last
    // files (its log, the pool directory): wait until it has exited, so
    // that the filesystem under the pool can be unmounted as soon as this
    // returns. Without its PID, the lock is all there is to wait for. A
    // daemon that waits for held volumes says so, and is not waited for.
    if let Some(pid) = daemon {
        if let Some(held) = wait_for_exit(pid, &pool) {
            println!(
                "unmounted {} (pool {}); its daemon (process {pid}) exits once it has committed {}, whose dirty image is still open for writing outside reflinkfs (`reflinkfs status --pool {}` says which)",
                mnt.display(),
                pool.display(),
                held.join(", "),
                pool.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
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

/// The status of a mounted pool's daemon (none when it does not answer).
fn daemon_status(pool: &Path) -> Option<Box<crate::control::Status>> {
    let s = client::connect(pool).ok().flatten()?;
    match client::call(s, &Request::Status, None).ok()? {
        Response::Status(st) => Some(st),
        _ => None,
    }
}

/// The volumes open on a mounted pool, from its daemon's status.
fn open_volumes(pool: &Path) -> Vec<(String, usize)> {
    daemon_status(pool).map_or_else(Vec::new, |st| {
        st.running
            .into_iter()
            .map(|r| (r.vid, r.open_handles))
            .collect()
    })
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

/// Waits (up to a minute) until process `pid` has exited; returns early
/// with the volumes it waits for when its status says it waits to commit
/// held volumes.
fn wait_for_exit(pid: u32, pool: &Path) -> Option<Vec<String>> {
    for i in 0..3000 {
        if !sys::process_running(pid) {
            return None;
        }
        if i % 10 == 9 {
            let waiting = waiting_for(pool);
            if !waiting.is_empty() {
                return Some(waiting);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    log::warn!("the daemon (process {pid}) is still running a minute after the unmount");
    None
}

/// The held volumes a daemon whose mount is gone waits for, from its
/// status (none when it does not answer).
fn waiting_for(pool: &Path) -> Vec<String> {
    daemon_status(pool).map_or_else(Vec::new, |st| st.waiting_for)
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
