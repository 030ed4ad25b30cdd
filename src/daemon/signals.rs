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
        let open = fs.open_volumes();
        if open > 0 {
            log::warn!(
                "signal {sig}: not unmounting {}: {open} volume(s) open",
                mnt.display()
            );
            continue;
        }
        match sys::umount2(mnt, 0) {
            Ok(()) => {
                log::info!("signal {sig}: unmounted {}", mnt.display());
                return;
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                log::warn!(
                    "signal {sig}: not unmounting {}: it is busy (files are open on it)",
                    mnt.display()
                )
            }
            Err(e) => log::error!("signal {sig}: unmounting {} failed: {e}", mnt.display()),
        }
    }
}
