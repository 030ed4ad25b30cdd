//! What the mounted filesystem needs from the engine: a cheap view of a
//! volume's files, and the opens of its committed image and revisions.

use super::config::VolumeKind;
use super::fsops::{Dir, FileSig};
use super::lifecycle::{open_image, regular_entry};
use super::pool::{Names, Pool};
use super::revision::{parse_revision_name, Parsed, Revision};
use super::vid::ValidVid;
use super::volume::{LifeState, Snapshot};
use crate::error::{Error, Result};
use crate::sys::{self, FsStats};
use std::collections::HashSet;
use std::fs::File;
use std::sync::Arc;

/// What `status` shows of the pool's volumes.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    /// Running volumes, with how many leases (open files) each has.
    pub open: Vec<(ValidVid, usize)>,
    /// Volumes a start, a commit, a hold or an operation is in progress on,
    /// with its name.
    pub busy: Vec<(ValidVid, LifeState)>,
    /// Volumes attached to a loop device (`volume attach`).
    pub attached: Vec<(ValidVid, super::config::AttachedLoop)>,
}

/// How the mount serves a volume's open dirty image: by kernel
/// passthrough to the backing file, or through the daemon. `status` sends
/// it as `io_mode`; a name this build does not know reads as `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    Passthrough,
    Daemon,
    #[serde(other)]
    Unknown,
}

impl IoMode {
    /// Its name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            IoMode::Passthrough => "passthrough",
            IoMode::Daemon => "daemon",
            IoMode::Unknown => "unknown",
        }
    }
}

crate::error::display_as_str!(IoMode);

/// One volume of a VM directory's listing ([`Pool::vm_listing`]).
#[derive(Debug, Clone)]
pub struct Listed {
    pub vid: ValidVid,
    pub view: VolumeView,
    /// Its revisions, sorted, each with its file's signature (`None` when
    /// it went since the listing, or is not a regular file).
    pub revisions: Vec<(Revision, Option<FileSig>)>,
}

/// A volume as the mount shows it.
#[derive(Debug, Clone)]
pub struct VolumeView {
    /// Its config and state (`snap.held`: the run is over but not
    /// committed, its dirty image still open for writing outside
    /// reflinkfs; `snap.config.generation`: bumped whenever the committed
    /// image is replaced).
    pub snap: Snapshot,
    /// The committed image, for origin volumes that have one.
    pub img: Option<FileSig>,
    /// The dirty image, while the volume runs (or waits to be committed).
    pub dirty: Option<FileSig>,
    /// The size `N-dirty.img` shows while stopped.
    pub nominal_size: u64,
}

impl VolumeView {
    /// Bumped whenever the committed image is replaced.
    pub fn generation(&self) -> u64 {
        self.snap.config.generation
    }
}

impl Pool {
    /// The view of one volume: a snapshot of its config and state, taken
    /// without waiting, and the signatures of its files, read after.
    /// Planted symlinks and other non-regular files show as absent. The
    /// dirty image is only looked at while the volume runs: stopped, it
    /// does not exist, and a lookup that finds that out costs a miss in
    /// the VM directory on every view.
    pub fn volume_view(&self, vid: &ValidVid) -> Result<VolumeView> {
        let snap = self.volume(vid)?.snapshot();
        let dir = self.kept_vm_dir(vid)?;
        Ok(self.view_in(vid, snap, dir.as_deref(), None))
    }

    /// A view from a snapshot, with the files looked at in `dir` (the VM
    /// directory, if it exists). With `names` (the directory's listing),
    /// a file that is not listed is not looked at.
    fn view_in(
        &self,
        vid: &ValidVid,
        snap: Snapshot,
        dir: Option<&Dir>,
        names: Option<&HashSet<&str>>,
    ) -> VolumeView {
        let n = Names::of(vid);
        let look = |want: bool, name: String| match dir {
            Some(d) if want && names.is_none_or(|l| l.contains(name.as_str())) => {
                regular_entry(d, vid, &name).ok().flatten()
            }
            _ => None,
        };
        let origin = snap.config.kind() == VolumeKind::Origin;
        let img = look(origin, n.img());
        let dirty = look(snap.running, n.dirty());
        VolumeView {
            nominal_size: self.nominal_size(&snap.config),
            img,
            dirty,
            snap,
        }
    }

    /// The shown volumes of one VM directory as the mount lists them: each
    /// one's view and its revisions with their signatures, from one open
    /// and one listing of the directory, and a stat of each file the
    /// listing has (the mount's readdir; looking each volume up on its own
    /// opened and listed the directory once per file).
    pub fn vm_listing(&self, class: &str, vm: &str) -> Result<Vec<Listed>> {
        let vids = self.shown_in_vm(class, vm);
        let Some(first) = vids.first() else {
            return Ok(Vec::new());
        };
        let dir = self.kept_vm_dir(first)?;
        let names = match &dir {
            Some(d) => d
                .names()
                .map_err(|e| Error::io(format!("listing {}", d.path().display()), e))?,
            None => Vec::new(),
        };
        let listed: HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut out = Vec::with_capacity(vids.len());
        for vid in vids {
            // A volume removed since the range query is left out.
            let Ok(vol) = self.volume(&vid) else { continue };
            let view = self.view_in(&vid, vol.snapshot(), dir.as_deref(), Some(&listed));
            let mut revisions: Vec<(Revision, Option<FileSig>)> = names
                .iter()
                .filter_map(|f| match parse_revision_name(vid.name(), f) {
                    Parsed::Revision(r) => Some(r),
                    Parsed::Malformed | Parsed::NotOurs => None,
                })
                .map(|r| {
                    let sig = dir
                        .as_ref()
                        .and_then(|d| regular_entry(d, &vid, &r.file_name).ok().flatten());
                    (r, sig)
                })
                .collect();
            revisions.sort_by(|a, b| a.0.id.cmp(&b.0.id));
            out.push(Listed {
                vid,
                view,
                revisions,
            });
        }
        Ok(out)
    }

    /// A volume's revisions by file name, id and time: one listing of its
    /// VM directory, no file opened (what the mount's lookups need;
    /// [`Pool::revisions`] also reads each one's id and usage).
    pub fn revision_files(&self, vid: &ValidVid) -> Result<Vec<Revision>> {
        self.volume(vid)?;
        let dir = self.kept_vm_dir(vid)?;
        self.list_revisions(vid, dir.as_deref())
    }

    /// The signature of a running volume's dirty image, read through the
    /// run's own descriptor (one fstat, no path walk), with its config's
    /// `rw`; `None` when it does not run (or is held).
    pub fn running_dirty(&self, vid: &ValidVid) -> Result<Option<(FileSig, bool)>> {
        let vol = self.volume(vid)?;
        let (file, rw) = {
            let life = vol.lock();
            (life.run().and_then(|r| r.file().cloned()), life.config.rw)
        };
        let Some(file) = file else { return Ok(None) };
        let st = sys::fstat(std::os::fd::AsFd::as_fd(&*file))
            .map_err(|e| Error::io(format!("examining the dirty image of {vid}"), e))?;
        Ok(Some((FileSig::from_stat(&st), rw)))
    }

    /// A snapshot of a volume's config and state, taken without waiting.
    pub fn snapshot(&self, vid: &ValidVid) -> Result<Snapshot> {
        Ok(self.volume(vid)?.snapshot())
    }

    /// Opens the committed image of an origin volume read-only, with the
    /// generation it belongs to: read under the volume's lock, which is
    /// also held around the rename that replaces the image, so the two
    /// match.
    pub fn open_committed(&self, vid: &ValidVid) -> Result<(File, u64)> {
        let vol = self.volume(vid)?;
        let dir = self.vm_dir(vid, false)?;
        let life = vol.lock();
        if life.config.kind() != VolumeKind::Origin {
            return Err(Error::MissingImage {
                vid: vid.to_string(),
                path: dir.shown(&Names::of(vid).img()),
            });
        }
        let f = open_image(&dir, vid, &Names::of(vid).img(), libc::O_RDONLY)?;
        Ok((f, life.config.generation))
    }

    /// Opens a revision file read-only, by its file name. Revisions never
    /// change; one pruned meanwhile is simply gone (ENOENT).
    pub fn open_revision(&self, vid: &ValidVid, file_name: &str) -> Result<File> {
        self.volume(vid)?;
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
        Ok(self.outdated(&self.volume(vid)?.snapshot()))
    }

    /// `is_outdated` of a snapshot. Reads the origin after the volume, never
    /// both at once.
    pub(crate) fn outdated(&self, snap: &Snapshot) -> Option<bool> {
        if snap.config.kind() != VolumeKind::Snapshot {
            return None;
        }
        let Some((origin, generation)) = snap.started_from.as_ref() else {
            return Some(false);
        };
        let current = self.volume(origin).map(|v| v.config().generation);
        Some(current.map_or(true, |g| g != *generation))
    }

    /// Whether the mount shows a volume: all but corrupt ones and optional
    /// volumes without an image (SPEC §1.3). Only those look at the disk.
    pub fn is_shown(&self, vid: &ValidVid) -> bool {
        let Ok(vol) = self.volume(vid) else {
            return false;
        };
        let snap = vol.snapshot();
        if !snap.config.optional || snap.config.kind() != VolumeKind::Origin || snap.running {
            return true;
        }
        self.kept_vm_dir(vid)
            .ok()
            .flatten()
            .is_some_and(|d| matches!(regular_entry(&d, vid, &Names::of(vid).img()), Ok(Some(_))))
    }

    /// The snapshot volumes whose chain of sources leads to `vid`: their
    /// size shows the source's. Reads every volume's config (no waiting).
    pub fn snapshots_of(&self, vid: &ValidVid) -> Vec<ValidVid> {
        let vols: Vec<Arc<super::volume::Volume>> = self.table.all();
        let sources: Vec<(ValidVid, Option<ValidVid>)> = vols
            .iter()
            .map(|v| (v.vid.clone(), v.config().source.clone()))
            .collect();
        let mut found: Vec<ValidVid> = Vec::new();
        let mut frontier = vec![vid.clone()];
        while let Some(cur) = frontier.pop() {
            for (v, src) in &sources {
                if src.as_ref() == Some(&cur) && !found.contains(v) && v != vid {
                    found.push(v.clone());
                    frontier.push(v.clone());
                }
            }
        }
        found
    }

    /// Whether a volume runs (held runs included).
    pub fn is_running(&self, vid: &ValidVid) -> Result<bool> {
        Ok(self.volume(vid)?.snapshot().running)
    }

    /// Running volumes with how many leases (open files) each has, and the
    /// volumes whose state is not plain `running` or `stopped` (a start, a
    /// commit, a hold or an operation in progress), for `status`.
    pub fn activity(&self) -> Activity {
        let vols: Vec<Arc<super::volume::Volume>> = self.table.all();
        let (mut open, mut busy, mut attached) = (Vec::new(), Vec::new(), Vec::new());
        for v in vols {
            let snap = v.snapshot();
            if snap.leases > 0 {
                open.push((v.vid.clone(), snap.leases));
            }
            if !matches!(snap.state, LifeState::Running | LifeState::Stopped) {
                busy.push((v.vid.clone(), snap.state));
            }
            if let Some(a) = snap.attached {
                attached.push((v.vid.clone(), a));
            }
        }
        Activity {
            open,
            busy,
            attached,
        }
    }

    /// The backing filesystem's numbers, for statfs.
    pub fn fs_stats(&self) -> Result<FsStats> {
        sys::fstatvfs(self.root.fd())
            .map_err(|e| Error::io(format!("statvfs of {}", self.path().display()), e))
    }
}
