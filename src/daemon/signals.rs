//! The signal thread: SIGTERM, SIGINT and SIGHUP ask for an unmount.

use crate::fuse::fs::ReflinkFs;
use crate::sys;
use std::path::Path;

/// SIGTERM, SIGINT and SIGHUP unmount when nothing is open; otherwise the
/// daemon keeps serving rather than pull a disk from under a VM.
pub(super) fn signal_loop(signals: &[libc::c_int], mnt: &Path, fs: &ReflinkFs) {
    loop {
        let sig = match sys::wait_signal(signals) {
            Ok(s) => s,
            Err(e) => {
                log::error!("waiting for signals failed: {e}");
                return;
            }
        };
        let name = sys::signal_name(sig);
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
            Ok(()) => {
                log::info!("{name}: unmounted {}", mnt.display());
                return;
            }
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
