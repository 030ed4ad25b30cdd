//! Start, stop, commit, prune and recovery (SPEC §4).

use super::config::{VolumeConfig, VolumeKind};
use super::failpoint;
use super::fsops::{Dir, Entry, FileSig};
use super::pool::{Names, Pool, RunState, VolumeState};
use super::revision::{format_utc, revision_file_name, RevisionId};
use super::vid::ValidVid;
use crate::error::{Error, Result};
use crate::sys;
use std::fs::File;
use std::os::fd::AsFd;

/// What a stop did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// The dirty image became the committed image; `revision` is the K the
    /// previous image was saved as, if one was kept.
    Committed { revision: Option<u64> },
    /// The dirty image was not modified since start and was dropped.
    Unchanged,
    /// Snapshot and volatile volumes: the dirty image was deleted.
    Discarded,
}

/// How far a source chain may go before it is called a loop.
const MAX_SOURCE_DEPTH: usize = 32;

pub(crate) fn io_ctx(dir: &Dir, what: &str, name: &str) -> impl FnOnce(std::io::Error) -> Error {
    let ctx = format!("{what} {}", dir.shown(name).display());
    move |e| Error::io(ctx, e)
}

/// Maps the error of opening an image: a symlink or other planted file
/// becomes [`Error::NotRegular`], a missing file [`Error::MissingImage`].
pub(crate) fn open_image(
    dir: &Dir,
    vid: &ValidVid,
    name: &str,
    flags: libc::c_int,
) -> Result<File> {
    dir.open(name, flags).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::EINVAL) | Some(libc::ENXIO) => Error::NotRegular {
            what: format!("image of {vid}"),
            path: dir.shown(name),
        },
        Some(libc::ENOENT) => Error::MissingImage {
            vid: vid.to_string(),
            path: dir.shown(name),
        },
        _ => Error::io(format!("opening {}", dir.shown(name).display()), e),
    })
}

/// The regular-file signature of `name`, `None` when missing, an error for
/// a symlink or other planted file.
pub(crate) fn regular_entry(dir: &Dir, vid: &ValidVid, name: &str) -> Result<Option<FileSig>> {
    match dir.entry(name).map_err(io_ctx(dir, "examining", name))? {
        Entry::Missing => Ok(None),
        Entry::Regular(sig) => Ok(Some(sig)),
        Entry::Other => Err(Error::NotRegular {
            what: format!("image of {vid}"),
            path: dir.shown(name),
        }),
    }
}

impl Pool {
    /// Starts a volume (the first open of its `-dirty.img`) and returns the
    /// dirty image opened read-write. The FUSE layer calls this once per
    /// first open and [`Pool::stop`] once per last release.
    pub fn start(&self, vid: &ValidVid) -> Result<File> {
        let slot = self.slot(vid)?;
        let mut st = slot.lock();
        if st.run.is_some() {
            return Err(Error::Busy {
                vid: vid.to_string(),
                reason: "already running".into(),
            });
        }
        let dir = self.vm_dir(vid, true)?;
        let n = Names::of(vid);
        let kind = st.config.kind();

        // A dirty image left by a stop that failed is committed (origin) or
        // dropped (snapshot, volatile) before a new start.
        if regular_entry(&dir, vid, &n.dirty())?.is_some() {
            if kind == VolumeKind::Origin {
                log::warn!(
                    "{vid}: committing the dirty image left by an earlier stop before starting"
                );
                self.commit_dirty(&mut st, &dir, None)?;
            } else {
                dir.remove(&vid.to_string(), &n.dirty()).map_err(io_ctx(
                    &dir,
                    "removing",
                    &n.dirty(),
                ))?;
            }
        }
        if dir
            .remove_if_exists(&vid.to_string(), &n.dirty_tmp())
            .map_err(io_ctx(&dir, "removing", &n.dirty_tmp()))?
        {
            log::warn!(
                "{vid}: removed a leftover {}",
                dir.shown(&n.dirty_tmp()).display()
            );
        }

        let v = vid.to_string();
        let mut started_from = None;
        match kind {
            VolumeKind::Origin if st.config.revisions_to_keep == -1 => {
                // Snapshots disabled: the committed image itself becomes the
                // dirty image, and stop renames it back.
                if regular_entry(&dir, vid, &n.img())?.is_none() {
                    return Err(Error::MissingImage {
                        vid: v,
                        path: dir.shown(&n.img()),
                    });
                }
                failpoint::hit("start.copied");
                dir.rename(&v, &n.img(), &n.dirty())
                    .map_err(io_ctx(&dir, "renaming", &n.img()))?;
            }
            VolumeKind::Origin => {
                let src = open_image(&dir, vid, &n.img(), libc::O_RDONLY)?;
                self.copy_to_dirty(vid, &dir, &src, &dir.shown(&n.img()), None)?;
            }
            VolumeKind::Snapshot => {
                let (origin, generation, sdir, src) = self.open_source_image(vid, &st.config)?;
                let shown = sdir.shown(&Names::of(&origin).img());
                self.copy_to_dirty(vid, &dir, &src, &shown, Some(st.config.size))?;
                started_from = Some((origin, generation));
            }
            VolumeKind::Volatile => {
                dir.create_sparse(&v, &n.dirty_tmp(), st.config.size)
                    .map_err(io_ctx(&dir, "creating", &n.dirty_tmp()))?;
                failpoint::hit("start.copied");
                dir.rename(&v, &n.dirty_tmp(), &n.dirty()).map_err(io_ctx(
                    &dir,
                    "renaming",
                    &n.dirty_tmp(),
                ))?;
            }
        }
        failpoint::hit("start.renamed");
        dir.sync().map_err(io_ctx(&dir, "syncing", ""))?;
        let file = open_image(&dir, vid, &n.dirty(), libc::O_RDWR)?;
        let started_sig = FileSig::from_stat(&sys::fstat(file.as_fd()).map_err(io_ctx(
            &dir,
            "examining",
            &n.dirty(),
        ))?);
        log::info!("{vid}: started ({})", kind.as_str());
        st.run = Some(RunState {
            started_sig,
            started_from,
        });
        Ok(file)
    }

    /// Copies `src` to `N-dirty.img~tmp`, grows it to `min_size` if given,
    /// and renames it to `N-dirty.img`.
    fn copy_to_dirty(
        &self,
        vid: &ValidVid,
        dir: &Dir,
        src: &File,
        src_shown: &std::path::Path,
        min_size: Option<u64>,
    ) -> Result<()> {
        let n = Names::of(vid);
        let v = vid.to_string();
        let (tmp, _) = dir
            .copy_from(&v, src, src_shown, &n.dirty_tmp(), self.copy_strategy())
            .map_err(|e| {
                Error::io(
                    format!(
                        "{vid}: copying {} to {}",
                        src_shown.display(),
                        dir.shown(&n.dirty_tmp()).display()
                    ),
                    e,
                )
            })?;
        if let Some(min) = min_size {
            let len = sys::fstat(tmp.as_fd())
                .map_err(io_ctx(dir, "examining", &n.dirty_tmp()))?
                .st_size as u64;
            if min > len {
                sys::ftruncate(tmp.as_fd(), min).map_err(io_ctx(dir, "growing", &n.dirty_tmp()))?;
            }
        }
        failpoint::hit("start.copied");
        dir.rename(&v, &n.dirty_tmp(), &n.dirty())
            .map_err(io_ctx(dir, "renaming", &n.dirty_tmp()))
    }

    /// Follows a snapshot volume's source chain down to an origin volume
    /// (SPEC §2.2). The only place sources are resolved.
    pub fn resolve_source(&self, config: &VolumeConfig) -> Result<ValidVid> {
        let mut cur = config.source.clone().ok_or_else(|| Error::Refused {
            vid: config.vid.to_string(),
            reason: format!("a {} volume has no source", config.kind().as_str()),
        })?;
        for _ in 0..MAX_SOURCE_DEPTH {
            if cur == config.vid {
                break;
            }
            let slot = self.slot(&cur).map_err(|e| match e {
                Error::NoSuchVolume(_) => {
                    Error::NoSuchVolume(format!("{cur} (the source of {})", config.vid))
                }
                other => other,
            })?;
            let next = {
                let s = slot.lock();
                match s.config.kind() {
                    VolumeKind::Origin => return Ok(cur),
                    VolumeKind::Snapshot => s.config.source.clone().expect("validated"),
                    VolumeKind::Volatile => {
                        return Err(Error::Refused {
                            vid: config.vid.to_string(),
                            reason: format!(
                            "its source {cur} is a volatile volume, which has no committed image"
                        ),
                        })
                    }
                }
            };
            cur = next;
        }
        Err(Error::Refused {
            vid: config.vid.to_string(),
            reason: format!("its source chain is longer than {MAX_SOURCE_DEPTH} or loops"),
        })
    }

    /// Opens the committed image a snapshot volume starts from, together
    /// with the generation it has, read under the origin's lock so the two
    /// match.
    pub(crate) fn open_source_image(
        &self,
        vid: &ValidVid,
        config: &VolumeConfig,
    ) -> Result<(ValidVid, u64, Dir, File)> {
        let origin = self.resolve_source(config)?;
        let slot = self.slot(&origin)?;
        let ost = slot.lock();
        if ost.run.is_some() && ost.config.revisions_to_keep == -1 {
            return Err(Error::Busy {
                vid: vid.to_string(),
                reason: format!("its source {origin} is running with revisions_to_keep=-1, so it has no committed image now"),
            });
        }
        let dir = self.vm_dir(&origin, false)?;
        let file = open_image(&dir, &origin, &Names::of(&origin).img(), libc::O_RDONLY)?;
        Ok((origin, ost.config.generation, dir, file))
    }

    /// Stops a running volume (the last release of its `-dirty.img`):
    /// commits an origin volume, discards the others. On error the dirty
    /// image is kept, and the next start or recovery commits it.
    pub fn stop(&self, vid: &ValidVid) -> Result<StopOutcome> {
        let slot = self.slot(vid)?;
        let mut st = slot.lock();
        let Some(run) = st.run.take() else {
            return Err(Error::Refused {
                vid: vid.to_string(),
                reason: "it is not running".into(),
            });
        };
        let dir = self.vm_dir(vid, false)?;
        let n = Names::of(vid);
        let outcome = match st.config.kind() {
            VolumeKind::Origin => self.commit_dirty(&mut st, &dir, Some(run.started_sig))?,
            kind => {
                if kind == VolumeKind::Volatile {
                    // A running resize of a volatile volume persists.
                    if let Some(sig) = regular_entry(&dir, vid, &n.dirty())? {
                        if sig.size != st.config.size {
                            let mut cfg = st.config.clone();
                            cfg.size = sig.size;
                            self.store_volume(&cfg)?;
                            st.config = cfg;
                        }
                    }
                }
                dir.remove(&vid.to_string(), &n.dirty()).map_err(io_ctx(
                    &dir,
                    "removing",
                    &n.dirty(),
                ))?;
                dir.sync().map_err(io_ctx(&dir, "syncing", ""))?;
                StopOutcome::Discarded
            }
        };
        log::info!("{vid}: stopped ({outcome:?})");
        Ok(outcome)
    }

    /// Commits `N-dirty.img` of an origin volume (SPEC §4.2). With
    /// `started`, an image unmodified since start is dropped instead.
    pub(crate) fn commit_dirty(
        &self,
        st: &mut VolumeState,
        dir: &Dir,
        started: Option<FileSig>,
    ) -> Result<StopOutcome> {
        let vid = st.config.vid.clone();
        let n = Names::of(&vid);
        let dirty = open_image(dir, &vid, &n.dirty(), libc::O_RDONLY)?;
        let sig = FileSig::from_stat(&sys::fstat(dirty.as_fd()).map_err(io_ctx(
            dir,
            "examining",
            &n.dirty(),
        ))?);
        let img = regular_entry(dir, &vid, &n.img())?;
        let keeps_snapshots = st.config.revisions_to_keep != -1;
        if let (Some(started), Some(_)) = (started, img) {
            // Never with revisions_to_keep=-1: there the dirty image is the
            // only copy of the data.
            if keeps_snapshots && sig.unchanged_since(&started) {
                drop(dirty);
                dir.remove(&vid.to_string(), &n.dirty()).map_err(io_ctx(
                    dir,
                    "removing",
                    &n.dirty(),
                ))?;
                dir.sync().map_err(io_ctx(dir, "syncing", ""))?;
                log::info!("{vid}: the dirty image was not modified; no new revision");
                return Ok(StopOutcome::Unchanged);
            }
        }
        self.replace_committed(st, dir, &dirty, &n.dirty(), "commit", true)
            .map(|revision| StopOutcome::Committed { revision })
    }

    /// Makes the file `new_name` (open as `new`) the committed image of an
    /// origin volume: fsync it, save the current image as a revision when
    /// revisions are kept, rename it over `N.img`, fsync the directory,
    /// and prune unless told not to. Shared by commit, revert, import and
    /// clone, whose failpoints are `OP.synced`, `OP.config`, `OP.linked`
    /// and `OP.renamed`. Returns the new revision's K.
    pub(crate) fn replace_committed(
        &self,
        st: &mut VolumeState,
        dir: &Dir,
        new: &File,
        new_name: &str,
        op: &str,
        prune: bool,
    ) -> Result<Option<u64>> {
        let vid = st.config.vid.clone();
        let v = vid.to_string();
        let n = Names::of(&vid);
        sys::fsync(new.as_fd()).map_err(io_ctx(dir, "syncing", new_name))?;
        let new_size = sys::fstat(new.as_fd())
            .map_err(io_ctx(dir, "examining", new_name))?
            .st_size as u64;
        failpoint::hit(&format!("{op}.synced"));

        let img = regular_entry(dir, &vid, &n.img())?;
        let mut cfg = st.config.clone();
        let revision = match img {
            Some(_) if cfg.revisions_to_keep > 0 => Some(self.next_revision_number(&cfg, dir)?),
            _ => None,
        };
        if let Some(k) = revision {
            cfg.next_revision = k + 1;
        }
        cfg.size = new_size;
        cfg.generation += 1;
        // The counter is stored before the revision exists, so a crash can
        // skip a K but never reuse one.
        self.store_volume(&cfg)?;
        st.config = cfg;
        failpoint::hit(&format!("{op}.config"));

        if let (Some(k), Some(img_sig)) = (revision, img) {
            // The timestamp is when the old content was committed: the
            // ctime its rename into place gave it.
            let name = revision_file_name(vid.name(), k, &format_utc(img_sig.ctime.0));
            dir.link(&v, &n.img(), &name)
                .map_err(io_ctx(dir, "saving revision", &name))?;
            dir.sync().map_err(io_ctx(dir, "syncing", ""))?;
            failpoint::hit(&format!("{op}.linked"));
        }
        dir.rename(&v, new_name, &n.img())
            .map_err(io_ctx(dir, "renaming", new_name))?;
        failpoint::hit(&format!("{op}.renamed"));
        dir.sync().map_err(io_ctx(dir, "syncing", ""))?;
        log::info!(
            "{vid}: {op} done{}",
            revision
                .map(|k| format!(", previous image kept as revision {k}"))
                .unwrap_or_default()
        );
        if prune {
            self.prune_revisions(&st.config, dir)?;
        }
        Ok(revision)
    }

    /// The K for a new revision: never below the stored counter, and never
    /// equal to one on disk (a pool adopted or edited by hand).
    pub(crate) fn next_revision_number(&self, cfg: &VolumeConfig, dir: &Dir) -> Result<u64> {
        let on_disk = self
            .list_revisions(&cfg.vid, Some(dir))?
            .iter()
            .filter_map(|r| match r.id {
                RevisionId::Numbered(k) => Some(k + 1),
                RevisionId::Legacy(_) => None,
            })
            .max()
            .unwrap_or(1);
        Ok(cfg.next_revision.max(on_disk).max(1))
    }

    /// Deletes the oldest revisions beyond `revisions_to_keep`. Revisions
    /// are separate files (hard links made before the image was replaced),
    /// so this never removes the committed image.
    pub(crate) fn prune_revisions(&self, cfg: &VolumeConfig, dir: &Dir) -> Result<usize> {
        self.prune_revisions_to(cfg, dir, cfg.revisions_to_keep.max(0) as usize, &[])
    }

    /// Deletes the oldest revisions until at most `keep` remain, never one
    /// named in `exempt`.
    pub(crate) fn prune_revisions_to(
        &self,
        cfg: &VolumeConfig,
        dir: &Dir,
        keep: usize,
        exempt: &[RevisionId],
    ) -> Result<usize> {
        let revs = self.list_revisions(&cfg.vid, Some(dir))?;
        if revs.len() <= keep {
            return Ok(0);
        }
        let excess = revs.len() - keep;
        let doomed: Vec<_> = revs
            .iter()
            .filter(|r| !exempt.contains(&r.id))
            .take(excess)
            .collect();
        for r in &doomed {
            dir.remove(&cfg.vid.to_string(), &r.file_name)
                .map_err(io_ctx(dir, "pruning", &r.file_name))?;
            failpoint::hit("prune.removed");
        }
        dir.sync().map_err(io_ctx(dir, "syncing", ""))?;
        log::info!(
            "{}: pruned {} revision(s), keeping {keep}",
            cfg.vid,
            doomed.len()
        );
        Ok(doomed.len())
    }

    /// Recovery of every volume (SPEC §4.4). A volume whose recovery fails
    /// is logged and left for `check`; the pool still opens.
    pub(crate) fn recover_all(&self) -> Result<()> {
        let slots: Vec<_> = self.volumes.read().values().cloned().collect();
        for slot in slots {
            let mut st = slot.lock();
            if let Err(e) = self.recover_volume(&mut st) {
                log::error!("{}: recovery failed: {e}", st.config.vid);
            }
        }
        Ok(())
    }

    fn recover_volume(&self, st: &mut VolumeState) -> Result<()> {
        let vid = st.config.vid.clone();
        let v = vid.to_string();
        let Some(dir) = self.vm_dir_if_exists(&vid)? else {
            return Ok(());
        };
        let n = Names::of(&vid);
        let files = dir.names().map_err(io_ctx(&dir, "listing", ""))?;
        for f in files.iter().filter(|f| n.is_temp(f) || **f == n.import()) {
            log::warn!(
                "{vid}: recovery: removing unfinished {}",
                dir.shown(f).display()
            );
            dir.remove(&v, f).map_err(io_ctx(&dir, "removing", f))?;
        }
        let kind = st.config.kind();
        if kind == VolumeKind::Origin {
            if let Some(img) = regular_entry(&dir, &vid, &n.img())? {
                for r in self.list_revisions(&vid, Some(&dir))? {
                    if let Some(rs) = regular_entry(&dir, &vid, &r.file_name)? {
                        if rs.same_inode(&img) {
                            log::warn!(
                                "{vid}: recovery: removing {}, the same file as {} (an interrupted commit)",
                                dir.shown(&r.file_name).display(),
                                dir.shown(&n.img()).display()
                            );
                            dir.remove(&v, &r.file_name).map_err(io_ctx(
                                &dir,
                                "removing",
                                &r.file_name,
                            ))?;
                        }
                    }
                }
            }
        }
        if regular_entry(&dir, &vid, &n.dirty())?.is_some() {
            if kind == VolumeKind::Origin {
                log::warn!(
                    "{vid}: recovery: committing the leftover {}",
                    dir.shown(&n.dirty()).display()
                );
                self.commit_dirty(st, &dir, None)?;
            } else {
                log::warn!(
                    "{vid}: recovery: removing the leftover {} of a {} volume",
                    dir.shown(&n.dirty()).display(),
                    kind.as_str()
                );
                dir.remove(&v, &n.dirty())
                    .map_err(io_ctx(&dir, "removing", &n.dirty()))?;
            }
        }
        if kind == VolumeKind::Origin {
            if let Some(img) = regular_entry(&dir, &vid, &n.img())? {
                if img.size != st.config.size {
                    log::warn!(
                        "{vid}: recovery: the size in the config ({}) differs from {} ({}); taking the image's",
                        st.config.size,
                        dir.shown(&n.img()).display(),
                        img.size
                    );
                    let mut cfg = st.config.clone();
                    cfg.size = img.size;
                    self.store_volume(&cfg)?;
                    st.config = cfg;
                }
            }
            // No pruning here: a revert legitimately leaves one revision more
            // than revisions_to_keep (the one it went back to) until the next
            // commit prunes.
        }
        dir.sync().map_err(io_ctx(&dir, "syncing", ""))?;
        Ok(())
    }
}
