//! list, info and usage (SPEC §1.5, §5): read-only reports whose
//! serialised form is the stable `--json` output. `pool check` is in
//! `check.rs`.

use super::config::VolumeKind;
use super::fsops::{Dir, Entry};
use super::lifecycle::regular_entry;
use super::pool::{Names, Pool};
use super::revision::Revision;
use super::vid::ValidVid;
use super::volume::{LifeState, OpName, Snapshot};
use crate::error::{Error, Result};
use crate::sys;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::os::fd::AsFd;

/// The state of a volume, in `volume list` and `info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeStateName {
    Stopped,
    Running,
    /// Its first open is making the dirty image (a copy, in copy mode).
    Starting,
    /// Its last run's commit (or discard) is in progress.
    Committing,
    /// An operation is in progress.
    Busy(OpName),
    /// Closed, but not committed: its dirty image is still open for
    /// writing outside reflinkfs (a loop device or program that outlived a
    /// daemon, or a mapping); it is committed once that lets go.
    Held,
    /// A dirty image waits to be committed (a stop failed).
    Dirty,
    /// Its image is missing; its own operations fail, the pool works.
    Missing,
    /// Its config file cannot be read.
    Corrupt,
    /// A state this build does not know (sent by a newer daemon).
    Unknown,
}

impl VolumeStateName {
    /// The state `info` shows for a start, commit, hold or operation in
    /// progress; `None` for a volume running or stopped (the files say
    /// more) or removed.
    fn of_busy(s: LifeState) -> Option<VolumeStateName> {
        Some(match s {
            LifeState::Starting => VolumeStateName::Starting,
            LifeState::Committing => VolumeStateName::Committing,
            LifeState::Held => VolumeStateName::Held,
            LifeState::Busy(op) => VolumeStateName::Busy(op),
            LifeState::Stopped | LifeState::Running | LifeState::Removed | LifeState::Unknown => {
                return None
            }
        })
    }

    /// Every state but `Unknown`.
    pub fn all() -> impl Iterator<Item = VolumeStateName> {
        use VolumeStateName::*;
        [
            Stopped, Running, Starting, Committing, Held, Dirty, Missing, Corrupt,
        ]
        .into_iter()
        .chain(OpName::ALL.map(Busy))
    }

    /// Its name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeStateName::Stopped => "stopped",
            VolumeStateName::Running => "running",
            VolumeStateName::Starting => "starting",
            VolumeStateName::Committing => "committing",
            VolumeStateName::Busy(op) => op.as_str(),
            VolumeStateName::Held => "held",
            VolumeStateName::Dirty => "dirty",
            VolumeStateName::Missing => "missing",
            VolumeStateName::Corrupt => "corrupt",
            VolumeStateName::Unknown => "unknown",
        }
    }
}

crate::error::display_as_str!(VolumeStateName);
crate::error::serde_as_str!(VolumeStateName);

/// Bytes held by the files of a volume (SPEC §1.5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes allocated on disk.
    pub allocated: u64,
    /// Of those, bytes in extents shared with other files (reflinks).
    pub shared: u64,
    /// Bytes only this volume's files hold: what deleting them would free.
    pub exclusive: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        self.allocated += o.allocated;
        self.shared += o.shared;
        self.exclusive += o.exclusive;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileUsage {
    pub file: String,
    pub size: u64,
    #[serde(flatten)]
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub vid: String,
    #[serde(rename = "type")]
    pub kind: Option<VolumeKind>,
    pub state: VolumeStateName,
    pub size: u64,
    pub rw: bool,
    pub revisions_to_keep: i64,
    pub snap_on_start: bool,
    pub save_on_stop: bool,
    pub source: Option<String>,
    /// The origin volume a snapshot's chain ends at.
    pub resolved_source: Option<String>,
    pub optional: bool,
    pub running: bool,
    /// Snapshot volumes only: whether the source committed after start.
    pub is_outdated: Option<bool>,
    pub next_revision: u64,
    pub revisions: Vec<Revision>,
    /// A change queued for the end of the run (`discard-changes`, a
    /// revert of the running volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<super::config::Pending>,
    /// The committed image in the pool.
    pub image: String,
    /// Present in `info`, absent in `list`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<VolumeUsage>,
    /// Why the volume is corrupt or missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeUsage {
    pub total: Usage,
    pub files: Vec<FileUsage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsUsage {
    pub filesystem: String,
    pub size: u64,
    pub used: u64,
    pub free: u64,
    pub available: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolInfo {
    pub path: String,
    pub format: u32,
    pub copy_mode: bool,
    pub read_only: bool,
    pub revisions_to_keep: i64,
    pub created: String,
    pub volumes: usize,
    pub running: usize,
    pub backing: FsUsage,
    /// Bytes allocated by all images and revisions, each inode once.
    pub pool_allocated: u64,
    /// Of those, bytes shared between files (reflinks).
    pub pool_shared: u64,
}

/// One problem found by `check`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problem {
    pub vid: Option<String>,
    pub path: String,
    pub problem: String,
}

/// The bytes of file `name` that no other file shares (FIEMAP).
pub(crate) fn exclusive_bytes(dir: &Dir, name: &str) -> Result<u64> {
    file_usage(dir, name).map(|u| u.usage.exclusive)
}

/// The usage of a volume's files (each inode once): its images, its
/// precache and its revisions.
fn volume_usage(d: &Dir, n: &Names<'_>, revisions: &[Revision]) -> Result<VolumeUsage> {
    let mut files = Vec::new();
    let mut seen = BTreeSet::new();
    let names = [n.img(), n.dirty(), n.precache()]
        .into_iter()
        .chain(revisions.iter().map(|r| r.file_name.clone()));
    for name in names {
        if let Entry::Regular(sig) = d.entry(&name).unwrap_or(Entry::Missing) {
            if seen.insert((sig.dev, sig.ino)) {
                files.push(file_usage(d, &name)?);
            }
        }
    }
    let mut total = Usage::default();
    for f in &files {
        total += f.usage;
    }
    Ok(VolumeUsage { total, files })
}

fn file_usage(dir: &Dir, name: &str) -> Result<FileUsage> {
    let f = dir
        .open(name, libc::O_RDONLY)
        .map_err(|e| Error::io(format!("opening {}", dir.shown(name).display()), e))?;
    let st = sys::fstat(f.as_fd())
        .map_err(|e| Error::io(format!("examining {}", dir.shown(name).display()), e))?;
    let allocated = st.st_blocks as u64 * 512;
    let shared = match sys::fiemap(f.as_fd()) {
        Ok(extents) => extents
            .iter()
            .filter(|e| e.shared)
            .map(|e| e.length)
            .sum::<u64>()
            .min(allocated),
        Err(e) => {
            log::debug!("FIEMAP of {} failed: {e}", dir.shown(name).display());
            0
        }
    };
    Ok(FileUsage {
        file: dir.shown(name).display().to_string(),
        size: st.st_size as u64,
        usage: Usage {
            allocated,
            shared,
            exclusive: allocated - shared,
        },
    })
}

impl Pool {
    /// The info of a volume from a snapshot of its state: the files are
    /// read after, with no lock held, so `info` and `list` never wait on a
    /// volume's I/O.
    fn volume_info(&self, snap: &Snapshot, with_usage: bool) -> Result<VolumeInfo> {
        let cfg = &*snap.config;
        let vid = &cfg.vid;
        let n = Names::of(vid);
        // A planted symlink in place of the VM directory makes this volume
        // unusable, not the whole listing.
        let (dir, dir_problem) = match self.vm_dir_if_exists(vid) {
            Ok(d) => (d, None),
            Err(e @ Error::NotRegular { .. }) => (None, Some(e.to_string())),
            Err(e) => return Err(e),
        };
        let kind = cfg.kind();
        let img = match &dir {
            Some(d) => d
                .entry(&n.img())
                .map_err(|e| Error::io(format!("examining {}", d.shown(&n.img()).display()), e))?,
            None => Entry::Missing,
        };
        let dirty = match &dir {
            Some(d) => matches!(d.entry(&n.dirty()), Ok(Entry::Regular(_))),
            None => false,
        };
        let running = snap.running;
        let mut problem = None;
        let state = if let Some(b) = VolumeStateName::of_busy(snap.state) {
            b
        } else if running {
            VolumeStateName::Running
        } else if dirty && kind == VolumeKind::Origin {
            VolumeStateName::Dirty
        } else if kind == VolumeKind::Origin && !matches!(img, Entry::Regular(_)) {
            problem = Some(match img {
                Entry::Other => "the image is not a regular file".to_owned(),
                _ => "the image is missing".to_owned(),
            });
            VolumeStateName::Missing
        } else if let Some((path, p)) = self.source_image_problem(cfg) {
            problem = Some(format!("{p} ({path})"));
            VolumeStateName::Missing
        } else {
            VolumeStateName::Stopped
        };
        let resolved_source = if kind == VolumeKind::Snapshot {
            match self.resolve_source(cfg) {
                Ok(s) => Some(s.to_string()),
                Err(e) => {
                    problem = Some(e.to_string());
                    None
                }
            }
        } else {
            None
        };
        let is_outdated = self.outdated(snap);
        let size = if running {
            dir.as_ref()
                .and_then(|d| regular_entry(d, vid, &n.dirty()).ok().flatten())
                .map(|s| s.size)
                .unwrap_or(cfg.size)
        } else {
            self.nominal_size(cfg)
        };
        let revisions = self.list_revisions(vid, dir.as_ref())?;
        let revisions = self.annotate_revisions(cfg, dir.as_ref(), revisions, with_usage);
        if dir_problem.is_some() {
            problem = dir_problem;
        }
        let usage = match (&dir, with_usage) {
            (Some(d), true) => Some(volume_usage(d, &n, &revisions)?),
            _ => None,
        };
        Ok(VolumeInfo {
            vid: vid.to_string(),
            kind: Some(kind),
            state,
            size,
            rw: cfg.rw,
            revisions_to_keep: cfg.revisions_to_keep,
            snap_on_start: cfg.snap_on_start,
            save_on_stop: cfg.save_on_stop,
            source: cfg.source.as_ref().map(|s| s.to_string()),
            resolved_source,
            optional: cfg.optional,
            running,
            is_outdated,
            next_revision: cfg.next_revision,
            revisions,
            pending: cfg.pending.clone(),
            image: self
                .path()
                .join(vid.class())
                .join(vid.vm())
                .join(n.img())
                .display()
                .to_string(),
            usage,
            problem,
        })
    }

    fn corrupt_info(&self, vid: &ValidVid) -> Option<VolumeInfo> {
        let (path, reason) = self.table.corrupt(vid)?;
        Some(VolumeInfo {
            vid: vid.to_string(),
            kind: None,
            state: VolumeStateName::Corrupt,
            size: 0,
            rw: false,
            revisions_to_keep: 0,
            snap_on_start: false,
            save_on_stop: false,
            source: None,
            resolved_source: None,
            optional: false,
            running: false,
            is_outdated: None,
            next_revision: 0,
            revisions: Vec::new(),
            pending: None,
            image: String::new(),
            usage: None,
            problem: Some(format!("{}: {reason}", path.display())),
        })
    }

    /// Every volume, sorted by vid. Optional volumes without an image are
    /// left out (SPEC §1.3).
    pub fn list(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for vid in self.vids() {
            if let Some(info) = self.corrupt_info(&vid) {
                out.push(info);
                continue;
            }
            let Ok(vol) = self.volume(&vid) else { continue };
            let info = self.volume_info(&vol.snapshot(), false)?;
            if info.optional && info.state == VolumeStateName::Missing {
                continue;
            }
            out.push(info);
        }
        Ok(out)
    }

    /// All properties and derived values of one volume, with usage.
    pub fn info(&self, vid: &ValidVid) -> Result<VolumeInfo> {
        let snap = self.volume(vid)?.snapshot();
        self.volume_info(&snap, true)
    }

    /// The info of one volume without its usage (no FIEMAP of its files):
    /// what a client that asks often (qubesd's `size`, `is_dirty`) needs.
    pub fn info_brief(&self, vid: &ValidVid) -> Result<VolumeInfo> {
        let snap = self.volume(vid)?.snapshot();
        self.volume_info(&snap, false)
    }

    /// The pool's properties and usage.
    pub fn pool_info(&self) -> Result<PoolInfo> {
        let fs = sys::fstatvfs(self.root.fd())
            .map_err(|e| Error::io(format!("statvfs of {}", self.path().display()), e))?;
        let magic = sys::fs_type(self.root.fd()).unwrap_or(0);
        let mut seen = BTreeSet::new();
        let (mut allocated, mut shared, mut running) = (0u64, 0u64, 0usize);
        let vids = self.vids();
        for vid in &vids {
            let Ok(vol) = self.volume(vid) else { continue };
            running += usize::from(vol.snapshot().running);
            let Ok(Some(dir)) = self.vm_dir_if_exists(vid) else {
                continue;
            };
            let n = Names::of(vid);
            for name in dir
                .names()
                .map_err(|e| Error::io(format!("listing {}", dir.path().display()), e))?
            {
                if !n.owns(&name) {
                    continue;
                }
                if let Ok(Entry::Regular(sig)) = dir.entry(&name) {
                    if seen.insert((sig.dev, sig.ino)) {
                        let u = file_usage(&dir, &name)?;
                        allocated += u.usage.allocated;
                        shared += u.usage.shared;
                    }
                }
            }
        }
        let c = &self.config();
        Ok(PoolInfo {
            path: self.path().display().to_string(),
            format: c.format,
            copy_mode: c.copy_mode,
            read_only: c.read_only,
            revisions_to_keep: c.revisions_to_keep,
            created: c.created.clone(),
            volumes: vids.len(),
            running,
            backing: FsUsage {
                filesystem: sys::fs_type_name(magic).to_owned(),
                size: fs.blocks * fs.block_size,
                used: (fs.blocks - fs.blocks_free) * fs.block_size,
                free: fs.blocks_free * fs.block_size,
                available: fs.blocks_avail * fs.block_size,
            },
            pool_allocated: allocated,
            pool_shared: shared,
        })
    }

    /// Why a stopped snapshot volume cannot start because of its source:
    /// the committed image of the origin its chain ends at is missing (or
    /// not a regular file). `None` for other volumes, and while that origin
    /// runs with `revisions_to_keep=-1` (its image is then its dirty image).
    pub(super) fn source_image_problem(
        &self,
        cfg: &super::config::VolumeConfig,
    ) -> Option<(String, String)> {
        if cfg.kind() != VolumeKind::Snapshot {
            return None;
        }
        let origin = self.resolve_source(cfg).ok()?;
        let src = self.volume(&origin).ok()?.snapshot();
        if src.running && src.config.revisions_to_keep == -1 {
            return None;
        }
        let img = Names::of(&origin).img();
        let path = self
            .path()
            .join(origin.class())
            .join(origin.vm())
            .join(&img);
        let entry = match self.vm_dir_if_exists(&origin) {
            Ok(Some(d)) => d.entry(&img).unwrap_or(Entry::Missing),
            _ => Entry::Missing,
        };
        match entry {
            Entry::Regular(_) => None,
            _ => Some((
                path.display().to_string(),
                format!("the image of its source {origin} is missing: it cannot start"),
            )),
        }
    }
}
