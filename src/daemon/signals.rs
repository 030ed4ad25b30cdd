//! The signal thread: SIGTERM, SIGINT and SIGHUP ask for an unmount.

use crate::fuse::fs::ReflinkFs;
use crate::sys;
use std::path::Path;

/// SIGTERM, SIGINT and SIGHUP unmount when nothing is open; otherwise the
/// daemon keeps serving rather than pull a disk from under a VM. Once the
/// mount is gone (unmounted, or lazily unmounted), they only say what the
/// daemon still waits for: it never unmounts whatever is mounted at that
/// path by then.
pub(super) fn signal_loop(
    signals: &[libc::c_int],
    mnt: &Path,
    mount_id: Option<u64>,
    fs: &ReflinkFs,
) {
    loop {
        let sig = match sys::wait_signal(signals) {
            Ok(s) => s,
            Err(e) => {
                log::error!("waiting for signals failed: {e}");
                return;
            }
        };
        let name = sys::signal_name(sig);
        if fs.session_ended() {
            let held: Vec<String> = fs
                .pool()
                .held_vids()
                .iter()
                .map(|v| v.to_string())
                .collect();
            match held.is_empty() {
                true => log::info!("{name}: {} is unmounted; the daemon is exiting", mnt.display()),
                false => log::warn!(
                    "{name}: {} is unmounted; the daemon exits once it has committed {}, whose last run is held (see `reflinkfs status`; a kill leaves it to the next pool open)",
                    mnt.display(),
                    held.join(", ")
                ),
            }
            continue;
        }
        if !super::mounts::is_attached(mount_id, mnt, fs.pool().path()) {
            log::warn!(
                "{name}: {} was lazily unmounted already; the daemon serves the files still open, commits and exits when they close",
                mnt.display()
            );
            continue;
        }
        let open: Vec<(String, usize)> = fs
            .open_on_mount()
            .into_iter()
            .map(|(v, n)| (v.to_string(), n))
            .collect();
        if !open.is_empty() {
            log::warn!(
                "{name}: not unmounting {}: {}",
                mnt.display(),
                super::mounts::who_holds(mnt, &open)
            );
            continue;
        }
        match sys::umount2(mnt, 0) {
            Ok(()) => log::info!("{name}: unmounted {}", mnt.display()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                log::warn!(
                    "{name}: not unmounting {}: {}",
                    mnt.display(),
                    super::mounts::who_holds(mnt, &[])
                )
            }
            Err(e) => log::error!("{name}: unmounting {} failed: {e}", mnt.display()),
        }
    }
}
