//! What the mounted filesystem needs from the engine: a cheap view of a
//! volume's files, and the opens of its committed image and revisions.

use super::config::{VolumeConfig, VolumeKind};
use super::fsops::FileSig;
use super::lifecycle::{open_image, regular_entry};
use super::pool::{Names, Pool, VolumeState};
use super::vid::ValidVid;
use crate::error::{Error, Result};
use crate::sys::{self, FsStats};
use std::fs::File;

/// A volume as the mount shows it.
#[derive(Debug, Clone)]
pub struct VolumeView {
    pub config: VolumeConfig,
    pub running: bool,
    /// The run is over but not committed: the dirty image is still open
    /// for writing outside reflinkfs.
    pub held: bool,
    /// Bumped whenever the committed image is replaced.
    pub generation: u64,
    /// The committed image, for origin volumes that have one.
    pub img: Option<FileSig>,
    /// The dirty image, while the volume runs (or waits to be committed).
    pub dirty: Option<FileSig>,
    /// The size `N-dirty.img` shows while stopped.
    pub nominal_size: u64,
}

impl Pool {
    /// The view of one volume: config, state and the signatures of its
    /// files. Planted symlinks and other non-regular files show as absent.
    pub fn volume_view(&self, vid: &ValidVid) -> Result<VolumeView> {
        let slot = self.slot(vid)?;
        let st = slot.lock();
        let n = Names::of(vid);
        let dir = self.vm_dir_if_exists(vid)?;
        let (img, dirty) = match &dir {
            Some(d) => (
                regular_entry(d, vid, &n.img()).ok().flatten(),
                regular_entry(d, vid, &n.dirty()).ok().flatten(),
            ),
            None => (None, None),
        };
        let config = st.config.clone();
        let running = st.run.is_some();
        let held = st.run.as_ref().is_some_and(|r| r.held.is_some());
        drop(st);
        Ok(VolumeView {
            nominal_size: self.nominal_size(&config),
            generation: config.generation,
            img: if config.kind() == VolumeKind::Origin {
                img
            } else {
                None
            },
            dirty,
            running,
            held,
            config,
        })
    }

    /// Opens the committed image of an origin volume read-only, with the
    /// generation it belongs to (read under the volume's lock, so the two
    /// match).
    pub fn open_committed(&self, vid: &ValidVid) -> Result<(File, u64)> {
        let slot = self.slot(vid)?;
        let st = slot.lock();
        if st.config.kind() != VolumeKind::Origin {
            return Err(Error::MissingImage {
                vid: vid.to_string(),
                path: self
                    .path()
                    .join(vid.class())
                    .join(vid.vm())
                    .join(Names::of(vid).img()),
            });
        }
        let dir = self.vm_dir(vid, false)?;
        let f = open_image(&dir, vid, &Names::of(vid).img(), libc::O_RDONLY)?;
        Ok((f, st.config.generation))
    }

    /// Opens a revision file read-only, by its file name.
    pub fn open_revision(&self, vid: &ValidVid, file_name: &str) -> Result<File> {
        let slot = self.slot(vid)?;
        let _st = slot.lock();
        let dir = self.vm_dir(vid, false)?;
        let known = self
            .list_revisions(vid, Some(&dir))?
            .iter()
            .any(|r| r.file_name == file_name);
        if !known {
            return Err(Error::UnknownRevision {
                vid: vid.to_string(),
                wanted: file_name.to_owned(),
                valid: String::new(),
            });
        }
        open_image(&dir, vid, file_name, libc::O_RDONLY)
    }

    /// Snapshot volumes: whether the source committed since this volume
    /// started (`None` for other types). Cheap: no file is read.
    pub fn is_outdated(&self, vid: &ValidVid) -> Result<Option<bool>> {
        let slot = self.slot(vid)?;
        let st = slot.lock();
        Ok(self.outdated(&st))
    }

    /// `is_outdated` of a locked volume. Locks the origin briefly, which the
    /// lock order (a snapshot before its source) allows.
    pub(crate) fn outdated(&self, st: &VolumeState) -> Option<bool> {
        if st.config.kind() != VolumeKind::Snapshot {
            return None;
        }
        let Some((origin, generation)) = st.run.as_ref().and_then(|r| r.started_from.as_ref())
        else {
            return Some(false);
        };
        let current = self.slot(origin).map(|s| s.lock().config.generation);
        Some(current.map_or(true, |g| g != *generation))
    }

    /// Whether the mount shows a volume: all but corrupt ones and optional
    /// volumes without an image (SPEC §1.3). Only those look at the disk.
    pub fn is_shown(&self, vid: &ValidVid) -> bool {
        let Ok(slot) = self.slot(vid) else {
            return false;
        };
        let st = slot.lock();
        if !st.config.optional || st.config.kind() != VolumeKind::Origin || st.run.is_some() {
            return true;
        }
        drop(st);
        self.vm_dir_if_exists(vid)
            .ok()
            .flatten()
            .is_some_and(|d| matches!(regular_entry(&d, vid, &Names::of(vid).img()), Ok(Some(_))))
    }

    /// Whether a volume runs.
    pub fn is_running(&self, vid: &ValidVid) -> Result<bool> {
        Ok(self.slot(vid)?.lock().run.is_some())
    }

    /// The backing filesystem's numbers, for statfs.
    pub fn fs_stats(&self) -> Result<FsStats> {
        sys::fstatvfs(self.root.fd())
            .map_err(|e| Error::io(format!("statvfs of {}", self.path().display()), e))
    }
}
