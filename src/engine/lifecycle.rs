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
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

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
    /// Not committed: the dirty image is still open for writing outside
    /// reflinkfs (`holders` says by what). The volume stays running for
    /// reflinkfs (new opens fail with EBUSY), and a later stop commits it
    /// once the writer lets go. A committed image never changes after its
    /// commit, so it is never an inode something else still writes.
    Held { holders: String },
}

/// A started run: the dirty image, opened read-write, and the run's size
/// (see [`Pool::run_limit`]).
#[derive(Debug)]
pub struct Run {
    pub file: File,
    pub limit: Arc<AtomicU64>,
}

/// How often, and how long apart, a stop looks again before it calls a
/// dirty image held: the kernel lets go of a closed passthrough file a
/// moment after the RELEASE that tells the daemon of the close.
const HOLD_PROBES: u32 = 5;
const HOLD_PROBE_GAP: std::time::Duration = std::time::Duration::from_millis(10);

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

/// Why a held volume cannot start or be changed.
pub(crate) fn held_reason(holders: &str) -> String {
    format!("its last run is not committed yet: its dirty image is still open for writing by {holders}; detach or close that first")
}

/// Names what may hold `dirty` open for writing: the loop devices whose
/// backing file it is (directly, or through a mount of the pool), else the
/// kinds of writer that can do so unseen.
fn describe_holders(dirty: &std::path::Path, vid: &ValidVid) -> String {
    let tail = format!("/{}/{}/{}", vid.class(), vid.vm(), Names::of(vid).dirty());
    let direct = dirty.display().to_string();
    let mut loops = Vec::new();
    for (dev, backing) in sys::loop_backing_files() {
        if backing == direct {
            loops.push(format!("{} (on the image itself)", dev.display()));
        } else if backing.ends_with(&tail) {
            loops.push(format!("{} (on {backing})", dev.display()));
        }
    }
    if loops.is_empty() {
        "something outside reflinkfs (a loop device or program that outlived an earlier daemon, or a shared mapping that outlived its file)".into()
    } else {
        format!("loop device {}", loops.join(", "))
    }
}

/// Cuts a dirty image back to the volume's size when writes went past the
/// end (passthrough writes do, unseen by the daemon), and rounds a size
/// that is not a multiple of 512 up, so a commit or recovery never fails on
/// it. Logs at WARN what was dropped.
fn fit_to_contract(dir: &Dir, vid: &ValidVid, name: &str, contract: u64) -> Result<()> {
    let len = regular_entry(dir, vid, name)?.map_or(0, |s| s.size);
    let want = if len > contract {
        contract
    } else if len % 512 != 0 {
        len.next_multiple_of(512)
    } else {
        return Ok(());
    };
    let f = open_image(dir, vid, name, libc::O_RDWR)?;
    sys::ftruncate(f.as_fd(), want).map_err(io_ctx(dir, "cutting back", name))?;
    if len > want {
        log::warn!(
            "{vid}: {} bytes written past the end of the volume ({contract} bytes) were dropped from {}",
            len - want,
            dir.shown(name).display()
        );
    } else {
        log::warn!(
            "{vid}: {} was {len} bytes, not a multiple of 512; grown to {want} with zeros",
            dir.shown(name).display()
        );
    }
    Ok(())
}

impl Pool {
    /// Starts a volume (the first open of its `-dirty.img`) and returns the
    /// dirty image opened read-write. The FUSE layer calls this once per
    /// first open and [`Pool::stop`] once per last release.
    pub fn start(&self, vid: &ValidVid) -> Result<File> {
        self.start_run(vid).map(|r| r.file)
    }

    /// [`Pool::start`], with the run's size limit for the FUSE layer.
    pub fn start_run(&self, vid: &ValidVid) -> Result<Run> {
        let slot = self.slot(vid)?;
        let mut st = slot.lock();
        if let Some(run) = &st.run {
            return Err(Error::Busy {
                vid: vid.to_string(),
                reason: match &run.held {
                    Some(h) => held_reason(h),
                    None => "already running".into(),
                },
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
                let contract = st.config.dirty_contract();
                if let StopOutcome::Held { holders } =
                    self.commit_dirty(&mut st, &dir, None, contract)?
                {
                    return Err(Error::Busy {
                        vid: vid.to_string(),
                        reason: held_reason(&holders),
                    });
                }
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
        let limit = Arc::new(AtomicU64::new(started_sig.size));
        st.run = Some(RunState {
            started_sig: Some(started_sig),
            started_from,
            limit: limit.clone(),
            held: None,
        });
        Ok(Run { file, limit })
    }

    /// The size limit of a running volume's run, shared with whoever does
    /// its I/O: a resize changes it.
    pub fn run_limit(&self, vid: &ValidVid) -> Result<Option<Arc<AtomicU64>>> {
        Ok(self.slot(vid)?.lock().run.as_ref().map(|r| r.limit.clone()))
    }

    /// Volumes whose run is held by a writer outside reflinkfs.
    pub fn held_vids(&self) -> Vec<ValidVid> {
        self.held.lock().iter().cloned().collect()
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
        self.stop_logged(vid, true)
    }

    /// [`Pool::stop`], trying again for up to `grace` while the dirty image
    /// is held (and saying so only at the end). At unmount the kernel lets
    /// go of the backing files of a torn-down connection a moment after
    /// the daemon learns of it.
    pub fn stop_within(&self, vid: &ValidVid, grace: std::time::Duration) -> Result<StopOutcome> {
        let end = std::time::Instant::now() + grace;
        loop {
            match self.stop_logged(vid, false)? {
                StopOutcome::Held { .. } if std::time::Instant::now() < end => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                StopOutcome::Held { holders } => {
                    log::warn!(
                        "{vid}: not committed: its dirty image is still open for writing by {holders}; the next pool open commits it once that lets go"
                    );
                    return Ok(StopOutcome::Held { holders });
                }
                outcome => return Ok(outcome),
            }
        }
    }

    fn stop_logged(&self, vid: &ValidVid, log_hold: bool) -> Result<StopOutcome> {
        let slot = self.slot(vid)?;
        let mut st = slot.lock();
        let Some(run) = st.run.take() else {
            return Err(Error::Refused {
                vid: vid.to_string(),
                reason: "it is not running".into(),
            });
        };
        let dir = match self.vm_dir(vid, false) {
            Ok(d) => d,
            Err(e) => {
                st.run = Some(run);
                return Err(e);
            }
        };
        let n = Names::of(vid);
        let was_held = run.held.is_some();
        let outcome = match st.config.kind() {
            VolumeKind::Origin => {
                match self.commit_dirty(&mut st, &dir, run.started_sig, run.limit()) {
                    Ok(StopOutcome::Held { holders }) => {
                        if !was_held && log_hold {
                            log::warn!(
                                "{vid}: not committed yet: {} is still open for writing by {holders}; it is committed once that lets go, and the volume cannot start again until then",
                                dir.shown(&n.dirty()).display()
                            );
                        }
                        self.held.lock().insert(vid.clone());
                        st.run = Some(RunState {
                            held: Some(holders.clone()),
                            ..run
                        });
                        return Ok(StopOutcome::Held { holders });
                    }
                    Ok(o) => o,
                    Err(e) => {
                        self.held.lock().remove(vid);
                        return Err(e);
                    }
                }
            }
            kind => {
                if kind == VolumeKind::Volatile && run.limit() != st.config.size {
                    // A running resize of a volatile volume persists: the
                    // run's size, never what writes past the end made of
                    // the file.
                    let mut cfg = st.config.clone();
                    cfg.size = run.limit();
                    self.store_volume(&cfg)?;
                    st.config = cfg;
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
        if was_held {
            log::info!("{vid}: the outside writer let go of its dirty image");
        }
        self.held.lock().remove(vid);
        log::info!("{vid}: stopped ({outcome:?})");
        Ok(outcome)
    }

    /// What holds a dirty image open for writing outside reflinkfs, if
    /// anything does. Looks a few times, a few milliseconds apart: the
    /// kernel drops a closed passthrough file just after it tells the
    /// daemon of the close.
    fn outside_writers(&self, vid: &ValidVid, dir: &Dir, dirty: &File) -> Option<String> {
        let name = Names::of(vid).dirty();
        for probe in 0..HOLD_PROBES {
            match sys::has_other_writers(dirty.as_fd()) {
                Ok(false) => return None,
                Ok(true) if probe + 1 < HOLD_PROBES => std::thread::sleep(HOLD_PROBE_GAP),
                Ok(true) => {}
                Err(e) => {
                    log::warn!(
                        "{vid}: cannot tell whether {} is still written outside reflinkfs ({e}: leases are off or unsupported); committing it",
                        dir.shown(&name).display()
                    );
                    return None;
                }
            }
        }
        Some(describe_holders(&dir.shown(&name), vid))
    }

    /// Commits `N-dirty.img` of an origin volume (SPEC §4.2). With
    /// `started`, an image unmodified since start is dropped instead.
    ///
    /// Never while something outside reflinkfs still has the dirty image
    /// open for writing (a loop device or program that outlived a daemon,
    /// a shared mapping that outlived its file): that gives
    /// [`StopOutcome::Held`] and changes nothing. The image is first cut
    /// back to `contract`, the volume's size, if writes went past the end.
    pub(crate) fn commit_dirty(
        &self,
        st: &mut VolumeState,
        dir: &Dir,
        started: Option<FileSig>,
        contract: u64,
    ) -> Result<StopOutcome> {
        let vid = st.config.vid.clone();
        let n = Names::of(&vid);
        let dirty = open_image(dir, &vid, &n.dirty(), libc::O_RDONLY)?;
        if let Some(holders) = self.outside_writers(&vid, dir, &dirty) {
            return Ok(StopOutcome::Held { holders });
        }
        fit_to_contract(dir, &vid, &n.dirty(), contract)?;
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
        self.replace_committed(st, dir, &dirty, &n.dirty(), "commit", None)
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
        revert_target: Option<&str>,
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
        cfg.kept_by_revert = revert_target.map(str::to_owned);
        cfg.dirty_size = None;
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
        // A revert prunes by its own rule, after this.
        if revert_target.is_none() {
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

    /// Deletes the oldest revisions beyond `revisions_to_keep`, and beyond
    /// the one the last revert went back to, which stays until the next
    /// commit. Revisions are separate files (hard links made before the
    /// image was replaced), so this never removes the committed image.
    pub(crate) fn prune_revisions(&self, cfg: &VolumeConfig, dir: &Dir) -> Result<usize> {
        let (keep, exempt) = self.revisions_allowed(cfg, dir)?;
        self.prune_revisions_to(cfg, dir, keep, &exempt)
    }

    /// How many revisions a volume may have, and which one is kept beyond
    /// `revisions_to_keep` (the target of the last revert, while it exists).
    pub(crate) fn revisions_allowed(
        &self,
        cfg: &VolumeConfig,
        dir: &Dir,
    ) -> Result<(usize, Vec<RevisionId>)> {
        let keep = cfg.revisions_to_keep.max(0) as usize;
        let Some(pinned) = &cfg.kept_by_revert else {
            return Ok((keep, Vec::new()));
        };
        Ok(
            match self
                .list_revisions(&cfg.vid, Some(dir))?
                .into_iter()
                .find(|r| &r.file_name == pinned)
            {
                Some(r) => (keep + 1, vec![r.id]),
                None => (keep, Vec::new()),
            },
        )
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
                let contract = st.config.dirty_contract();
                if let StopOutcome::Held { holders } =
                    self.commit_dirty(st, &dir, None, contract)?
                {
                    // Something that outlived the last daemon still writes
                    // it: a commit now would make N.img change after its
                    // commit. It stays a run, held, for the daemon to commit
                    // once the writer lets go.
                    log::warn!(
                        "{vid}: recovery: not committing {}: it is still open for writing by {holders}; it is committed once that lets go, and the volume cannot start again until then",
                        dir.shown(&n.dirty()).display()
                    );
                    st.run = Some(RunState {
                        started_sig: None,
                        started_from: None,
                        limit: Arc::new(AtomicU64::new(contract)),
                        held: Some(holders),
                    });
                    self.held.lock().insert(vid.clone());
                    return Ok(());
                }
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
            // Finishes the prune of a commit (or revert, import, clone, or
            // lowered revisions_to_keep) that a crash interrupted.
            let (keep, _) = self.revisions_allowed(&st.config, &dir)?;
            if self.list_revisions(&vid, Some(&dir))?.len() > keep {
                log::warn!("{vid}: recovery: pruning the revisions an interrupted operation left");
                self.prune_revisions(&st.config, &dir)?;
            }
        }
        dir.sync().map_err(io_ctx(&dir, "syncing", ""))?;
        Ok(())
    }
}
