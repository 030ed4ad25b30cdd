//! What the control server asks of a mounted pool's daemon: its status,
//! what to do after a resize, and when the kernel's caches are settled.

use crate::control::{BusyVolume, OpenVolume, Status};
use crate::fuse::fs::ReflinkFs;
use crate::sys;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How long a control reply waits for the mount to drop what the kernel
/// caches of the change it made (see `ReflinkFs::sync_invalidations`).
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The daemon of one mount, as the control server sees it.
pub(super) struct DaemonState {
    pub(super) fs: Arc<ReflinkFs>,
    pub(super) mountpoint: PathBuf,
    /// The mount's id in /proc/self/mountinfo: once it is gone there (a
    /// lazy unmount), the daemon only serves the files still open.
    pub(super) mount_id: Option<u64>,
    pub(super) started: std::time::Instant,
    /// Imports begun over the control socket and not yet ended.
    pub(super) imports: crate::control::PendingImports,
}

impl DaemonState {
    /// The exported path of a volume's dirty image on the mount.
    fn exported(&self, vid: &crate::engine::ValidVid) -> PathBuf {
        self.mountpoint
            .join(vid.class())
            .join(vid.vm())
            .join(crate::engine::Names::of(vid).dirty())
    }
}

impl crate::control::Daemon for DaemonState {
    fn holders(&self, vid: &crate::engine::ValidVid) -> String {
        let file = self.exported(vid);
        let holders = super::mounts::holders_of(&file, &|p: &Path| p.display().to_string());
        match holders.is_empty() {
            true => {
                "nothing this daemon can see (a process of another PID namespace, or the kernel)"
                    .into()
            }
            false => holders.join("; "),
        }
    }

    fn imports(&self) -> &crate::control::PendingImports {
        &self.imports
    }

    fn status(&self) -> Status {
        let running = self
            .fs
            .open_handles()
            .into_iter()
            .map(|(vid, open_handles)| OpenVolume {
                vid: vid.to_string(),
                open_handles,
            })
            .collect();
        let busy = self.fs.busy_volumes();
        let commits_in_flight = busy
            .iter()
            .filter(|(_, st)| *st == crate::engine::LifeState::Committing)
            .map(|(v, _)| v.to_string())
            .collect();
        let busy = busy
            .into_iter()
            .map(|(v, st)| BusyVolume {
                vid: v.to_string(),
                state: st,
            })
            .collect();
        let held = self
            .fs
            .pool()
            .held_vids()
            .iter()
            .map(|v| v.to_string())
            .collect();
        let attached = !self.fs.session_ended()
            && super::mounts::is_attached(self.mount_id, &self.mountpoint, self.fs.pool().path());
        let shown = self.mountpoint.display().to_string();
        Status {
            pool: self.fs.pool().path().display().to_string(),
            mounted: true,
            mountpoint: attached.then(|| shown.clone()),
            detached_from: (!attached).then_some(shown),
            io_mode: Some(self.fs.io_mode()),
            pid: Some(std::process::id()),
            uptime_seconds: Some(self.started.elapsed().as_secs()),
            running,
            busy,
            waiting_for: self
                .fs
                .waiting_for()
                .iter()
                .map(|v| v.to_string())
                .collect(),
            held,
            commits_in_flight,
            protocol: Some(crate::control::protocol_version()),
            attached: self
                .fs
                .attached()
                .into_iter()
                .map(|(v, a)| crate::control::AttachedVolume::of(self.fs.pool(), &v, a))
                .collect(),
            pending: crate::control::PendingVolume::all(self.fs.pool()),
        }
    }

    fn settled(&self) {
        if !self.fs.sync_invalidations(SETTLE_LIMIT) {
            log::warn!(
                "control: answering before the mount dropped every name it caches of the change: one waits for a directory lock (an unlink or rename there waits for a volume's commit or import); the names show anew once it ends"
            );
        }
    }

    fn resized(&self, vid: &crate::engine::ValidVid) {
        let path = self.exported(vid);
        // The resize dropped the kernel's cached attributes of the file: a
        // stat through the mount fetches the new size, which the loop
        // driver then reads.
        if let Err(e) = std::fs::metadata(&path) {
            log::warn!("{vid}: stat of {} after resize: {e}", path.display());
        }
        for dev in loop_devices_backed_by(&path) {
            match File::open(&dev).and_then(|f| sys::loop_set_capacity(f.as_fd())) {
                Ok(()) => log::info!("{vid}: told {} the new capacity", dev.display()),
                Err(e) => log::error!("{vid}: LOOP_SET_CAPACITY on {}: {e}", dev.display()),
            }
        }
    }
}

/// Loop devices whose backing file is `path` (from sysfs).
fn loop_devices_backed_by(path: &Path) -> Vec<PathBuf> {
    let want = path.display().to_string();
    sys::loop_backing_files()
        .into_iter()
        .filter(|(_, backing)| *backing == want)
        .map(|(dev, _)| dev)
        .collect()
}
