//! Start, stop, commit, prune and recovery (SPEC §4), as the transitions
//! of each volume's state machine (`volume.rs`): the lock is taken to
//! change the state, and let go for the I/O in between.

use super::config::{VolumeConfig, VolumeKind};
use super::failpoint;
use super::fsops::{Dir, Entry, FileSig};
use super::phase::{PhaseGuard, StopParts};
use super::pool::{Names, Pool};
use super::stopping::held_reason;
use super::vid::ValidVid;
use super::volume::{Attachment, HeldBy, Lease, Life, PendingStop, Phase, Run, RunState, Volume};
use crate::error::{Cause, Error, Result};
use crate::sys;
use parking_lot::MutexGuard;
use std::cell::Cell;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a stop did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// The dirty image became the committed image; `revision` is the K the
    /// previous image was saved as, if one was kept.
    Committed { revision: Option<u64> },
    /// The dirty image was not modified since start and was dropped.
    Unchanged,
    /// Snapshot and volatile volumes, or a run whose changes were to be
    /// dropped (`discard-changes`): the dirty image was deleted.
    Discarded,
    /// A revert queued while it ran: the run's changes were dropped and
    /// revision `revision` (a file name) became the committed image.
    Reverted {
        revision: String,
        saved_as: Option<u64>,
    },
    /// Not committed: the dirty image is still open for writing outside
    /// reflinkfs (`holders` says by what). The volume stays running for
    /// reflinkfs (new opens fail with EBUSY), and a later stop commits it
    /// once the writer lets go. A committed image never changes after its
    /// commit, so it is never an inode something else still writes.
    Held { holders: String },
}

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

/// What is called once per run, at its start, to attach something to it.
type AttachFn<'a> = &'a dyn Fn(&File) -> Option<Attachment>;

/// What a start made: the dirty image and what the run remembers of it.
struct Started {
    file: File,
    sig: FileSig,
    started_from: Option<(ValidVid, u64)>,
}

impl Pool {
    // ---------------------------------------------------------------
    // Leases: what the mount's opens and releases take and give back.

    /// Takes a lease on a volume's run, starting the volume when it is
    /// stopped (the first open of its `-dirty.img`). Waits while a start,
    /// a commit or a bounded operation is in progress; refuses at once
    /// (EBUSY) while an import or clone is, or while the last run is held.
    /// `attach` is called once per run, with the new dirty image, outside
    /// every lock; what it returns lives as long as the run.
    ///
    /// `rw` is checked here, under the volume's lock, so a concurrent
    /// `volume set rw false` can never hand out a writable lease.
    pub fn acquire(
        &self,
        vid: &ValidVid,
        writable: bool,
        attach: &dyn Fn(&File) -> Option<Attachment>,
    ) -> Result<Lease> {
        self.acquire_inner(vid, writable, false, Some(attach))
    }

    /// A lease on a volume that is already running, without ever waiting
    /// or starting: `None` when it is not (the caller then takes the slow
    /// path, [`Pool::acquire`], on a thread that may wait).
    pub fn try_acquire(&self, vid: &ValidVid, writable: bool) -> Result<Option<Lease>> {
        let vol = self.volume(vid)?;
        let mut life = vol.lock();
        let rw = life.config.rw;
        match &mut life.phase {
            Phase::Running(run) => {
                if writable && !rw && run.held().is_none() {
                    return Err(Error::ReadOnly {
                        vid: vid.to_string(),
                    });
                }
                Ok(lease_of(vid, &vol, run))
            }
            _ => Ok(None),
        }
    }

    fn acquire_inner(
        &self,
        vid: &ValidVid,
        writable: bool,
        exclusive: bool,
        attach: Option<AttachFn<'_>>,
    ) -> Result<Lease> {
        let vol = self.volume(vid)?;
        let mut life = vol.lock();
        loop {
            let rw = life.config.rw;
            match &mut life.phase {
                Phase::Removed => return Err(Error::NoSuchVolume(vid.to_string())),
                Phase::Starting | Phase::Committing => vol.wait(&mut life),
                Phase::Running(run) => {
                    if run.held().is_none() {
                        if exclusive {
                            return Err(Error::Busy {
                                vid: vid.to_string(),
                                reason: "already running".into(),
                            });
                        }
                        if writable && !rw {
                            return Err(Error::ReadOnly {
                                vid: vid.to_string(),
                            });
                        }
                    }
                    let lease = lease_of(vid, &vol, run);
                    return lease.ok_or_else(|| {
                        let why = run.held().map(held_reason).unwrap_or_default();
                        Error::because(vid, Cause::Held, why)
                    });
                }
                Phase::Stopped => {
                    if life.op.is_some() {
                        drop(life);
                        life = vol.wait_settled()?;
                        continue;
                    }
                    if writable && !rw {
                        return Err(Error::ReadOnly {
                            vid: vid.to_string(),
                        });
                    }
                    life.phase = Phase::Starting;
                    break;
                }
            }
        }
        drop(life);
        let guard = PhaseGuard::starting(self, &vol);
        let started = self.start_io(&vol, &guard.made_copy);
        let attachment = match (&started, attach) {
            (Ok(s), Some(f)) => f(&s.file),
            _ => None,
        };
        guard.disarm();
        vol.changed();
        let mut life = vol.lock();
        let result = match started {
            Ok(s) => {
                let file = Arc::new(s.file);
                let limit = Arc::new(AtomicU64::new(s.sig.size));
                let lease = Lease {
                    vid: vid.clone(),
                    file: file.clone(),
                    limit: limit.clone(),
                    attachment: attachment.clone(),
                    volume: vol.clone(),
                };
                life.phase = Phase::Running(Box::new(Run {
                    leases: 1,
                    started_sig: Some(s.sig),
                    started_from: s.started_from,
                    limit,
                    state: RunState::Live {
                        file,
                        attachment,
                        attached: None,
                    },
                }));
                Ok(lease)
            }
            Err(e) => {
                life.phase = Phase::Stopped;
                Err(e)
            }
        };
        drop(life);
        vol.notify();
        result
    }

    /// Gives a lease back. When it was the last, returns the stop to run
    /// (commit or discard) with [`Pool::finish_stop`]; a new lease taken
    /// before that runs cancels it.
    pub fn release(&self, lease: Lease) -> Option<PendingStop> {
        let Lease {
            vid,
            file,
            attachment,
            volume,
            ..
        } = lease;
        // Our descriptors go first: the commit looks for writers.
        drop(file);
        drop(attachment);
        let mut life = volume.lock();
        let run = life.run_mut()?;
        run.leases = run.leases.saturating_sub(1);
        if run.leases > 0 {
            return None;
        }
        drop(life);
        Some(PendingStop { vid, volume })
    }

    /// Runs the stop a last release asked for: commits an origin volume,
    /// discards the others. `Ok(None)` when there is nothing to do any more
    /// (a new lease came first). Errors keep the dirty image for the next
    /// start or recovery.
    pub fn finish_stop(&self, p: PendingStop) -> Result<Option<StopOutcome>> {
        let life = p.volume.lock();
        self.stop_run(&p.volume, life, false, true)
    }

    /// Stops a running volume however many leases it has (the mount's
    /// unmount, the engine's tests), or retries the commit of a held run.
    pub fn stop(&self, vid: &ValidVid) -> Result<StopOutcome> {
        self.stop_logged(vid, true)
    }

    /// [`Pool::stop`], trying again for up to `grace` while the dirty image
    /// is held (and saying nothing of it: the caller does). At unmount the
    /// kernel lets go of the backing files of a torn-down connection a
    /// moment after the daemon learns of it.
    pub fn stop_within(&self, vid: &ValidVid, grace: Duration) -> Result<StopOutcome> {
        let end = Instant::now() + grace;
        loop {
            match self.stop_logged(vid, false)? {
                StopOutcome::Held { .. } if Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                outcome => return Ok(outcome),
            }
        }
    }

    fn stop_logged(&self, vid: &ValidVid, log_hold: bool) -> Result<StopOutcome> {
        let vol = self.volume(vid)?;
        let mut life = vol.lock();
        while matches!(life.phase, Phase::Starting | Phase::Committing) {
            vol.wait(&mut life);
        }
        match self.stop_run(&vol, life, true, log_hold)? {
            Some(outcome) => Ok(outcome),
            None => Err(Error::Refused {
                vid: vid.to_string(),
                reason: "it is not running".into(),
            }),
        }
    }

    /// The stop transition: Running (no leases, or `force`) -> Committing
    /// -> Stopped, or back to Running, held. `None` when the volume is not
    /// in a state to stop.
    fn stop_run(
        &self,
        vol: &Arc<Volume>,
        mut life: MutexGuard<'_, Life>,
        force: bool,
        log_hold: bool,
    ) -> Result<Option<StopOutcome>> {
        loop {
            let Some(run) = life.run() else {
                return Ok(None);
            };
            if run.leases > 0 && !force {
                return Ok(None);
            }
            // Its loop device writes it: `volume detach` stops it.
            if let Some(a) = run.attached() {
                return Err(Error::Busy {
                    vid: vol.vid.to_string(),
                    reason: format!(
                        "it is attached as {}: `reflinkfs volume detach` stops it",
                        a.device().display()
                    ),
                });
            }
            // A bounded operation on the running volume (a resize)
            // finishes first.
            if life.op.is_none() {
                break;
            }
            vol.wait(&mut life);
        }
        let Phase::Running(run) = std::mem::replace(&mut life.phase, Phase::Committing) else {
            unreachable!("checked above");
        };
        let cfg = life.config.clone();
        drop(life);
        let vid = &vol.vid;
        let was_held = run.held().cloned();
        // Our descriptors go first: the commit looks for writers.
        let Run {
            started_sig,
            started_from,
            limit,
            state,
            ..
        } = *run;
        drop(state);
        let tries = match was_held {
            Some(HeldBy::InterruptedStop { tries }) => tries,
            _ => 0,
        };
        let parts = StopParts {
            started_sig,
            started_from: started_from.clone(),
            limit: limit.clone(),
            tries,
        };
        let guard = PhaseGuard::committing(self, vol, parts);
        let result = self.stop_io(vol, &cfg, started_sig, limit.load(Ordering::SeqCst));
        guard.disarm();
        vol.changed();
        let mut life = vol.lock();
        let outcome = match result {
            Ok(StopOutcome::Held { holders }) => {
                if !matches!(was_held, Some(HeldBy::Writers(_))) && log_hold {
                    log::warn!(
                        "{vid}: not committed yet: its dirty image is still open for writing by {holders}; it is committed once that lets go, and the volume cannot start again until then",
                    );
                }
                let held = HeldBy::Writers(holders.clone());
                let phase = Run::held_over(started_sig, started_from, limit, held);
                self.table.set_phase(vid, &mut life, phase);
                Ok(StopOutcome::Held { holders })
            }
            Ok(outcome) => {
                self.table.set_phase(vid, &mut life, Phase::Stopped);
                match was_held {
                    Some(HeldBy::Writers(_)) => {
                        log::info!("{vid}: the outside writer let go of its dirty image")
                    }
                    Some(HeldBy::InterruptedStop { .. }) => {
                        log::info!("{vid}: the retry of its interrupted stop went through")
                    }
                    None => {}
                }
                log::info!("{vid}: stopped ({outcome:?})");
                Ok(outcome)
            }
            Err(e) => {
                self.table.set_phase(vid, &mut life, Phase::Stopped);
                Err(e)
            }
        };
        drop(life);
        vol.notify();
        outcome.map(Some)
    }

    /// Starts a volume without a holder object (offline use and tests):
    /// a lease that [`Pool::stop`] returns. Refused (EBUSY) while running.
    /// Returns the dirty image opened read-write.
    pub fn start(&self, vid: &ValidVid) -> Result<File> {
        let lease = self.acquire_inner(vid, false, true, None)?;
        let file = lease.file.try_clone().map_err(|e| {
            Error::io(
                format!("{vid}: duplicating the dirty image's descriptor"),
                e,
            )
        })?;
        // The lease stays taken: the run keeps the count, stop() gives it up.
        drop(lease);
        Ok(file)
    }

    pub fn held_vids(&self) -> Vec<ValidVid> {
        self.table.held()
    }

    // ---------------------------------------------------------------
    // The I/O of a start and a stop, with no lock held.

    /// Makes the dirty image of a volume in state Starting. Sets
    /// `made_copy` once `N-dirty.img` is a copy this start made (not the
    /// committed image itself, not a leftover), which nobody has written.
    fn start_io(&self, vol: &Arc<Volume>, made_copy: &Cell<bool>) -> Result<Started> {
        let vid = &vol.vid;
        failpoint::pause!("pause.start", vid.to_string());
        let dir = self.vm_dir(vid, true)?;
        let n = Names::of(vid);
        let kind = vol.config().kind();

        // A dirty image left by a stop that failed is committed (origin) or
        // dropped (snapshot, volatile) before a new start.
        if regular_entry(&dir, vid, &n.dirty())?.is_some() {
            if kind == VolumeKind::Origin {
                log::warn!(
                    "{vid}: committing the dirty image left by an earlier stop before starting"
                );
                let contract = vol.config().dirty_contract();
                if let StopOutcome::Held { holders } =
                    self.commit_dirty(vol, &dir, None, contract)?
                {
                    return Err(Error::because(
                        vid,
                        Cause::Held,
                        held_reason(&HeldBy::Writers(holders)),
                    ));
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

        // A queued change belongs to the run it was asked for; one still
        // stored now (its stop failed after dropping the run) must never
        // drop this new run's writes.
        if vol.config().pending.is_some() {
            self.withdraw_stale_pending(vol)?;
        }
        let cfg = vol.config();
        let v = vid.to_string();
        let mut started_from = None;
        match kind {
            VolumeKind::Origin if cfg.revisions_to_keep == -1 => {
                // Snapshots disabled: the committed image itself becomes the
                // dirty image, and stop renames it back.
                if regular_entry(&dir, vid, &n.img())?.is_none() {
                    return Err(Error::MissingImage {
                        vid: v,
                        path: dir.shown(&n.img()),
                    });
                }
                failpoint::hit!("start.copied");
                // Under the lock: a reader of the committed image sees it
                // or its absence, never a half state.
                let _life = vol.lock();
                dir.rename(&v, &n.img(), &n.dirty())
                    .map_err(io_ctx(&dir, "renaming", &n.img()))?;
            }
            // A matching precache is renamed (constant time); else a copy.
            VolumeKind::Origin if self.start_from_precache(vol, &dir)? => {}
            VolumeKind::Origin => {
                let src = open_image(&dir, vid, &n.img(), libc::O_RDONLY)?;
                self.copy_to_dirty(vid, &dir, &src, &dir.shown(&n.img()), None)?;
            }
            VolumeKind::Snapshot => {
                let (origin, generation, sdir, src) = self.open_source_image(vid, &cfg)?;
                let shown = sdir.shown(&Names::of(&origin).img());
                self.copy_to_dirty(vid, &dir, &src, &shown, Some(cfg.size))?;
                started_from = Some((origin, generation));
            }
            VolumeKind::Volatile => {
                dir.create_sparse(&v, &n.dirty_tmp(), cfg.size)
                    .map_err(io_ctx(&dir, "creating", &n.dirty_tmp()))?;
                failpoint::hit!("start.copied");
                dir.rename(&v, &n.dirty_tmp(), &n.dirty()).map_err(io_ctx(
                    &dir,
                    "renaming",
                    &n.dirty_tmp(),
                ))?;
            }
        }
        made_copy.set(!(kind == VolumeKind::Origin && cfg.revisions_to_keep == -1));
        failpoint::hit!("start.renamed");
        failpoint::panic_if!("start.io", v);
        dir.sync().map_err(io_ctx(&dir, "syncing", ""))?;
        let file = open_image(&dir, vid, &n.dirty(), libc::O_RDWR)?;
        let sig = FileSig::from_stat(&sys::fstat(file.as_fd()).map_err(io_ctx(
            &dir,
            "examining",
            &n.dirty(),
        ))?);
        log::info!("{vid}: started ({})", kind.as_str());
        self.starts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Started {
            file,
            sig,
            started_from,
        })
    }

    /// The stop of a run taken out of its volume (state Committing), whose
    /// descriptors are closed: the dirty image is committed (origin) or
    /// discarded. `started` and `limit` are the run's.
    fn stop_io(
        &self,
        vol: &Arc<Volume>,
        cfg: &VolumeConfig,
        started: Option<FileSig>,
        limit: u64,
    ) -> Result<StopOutcome> {
        let vid = &vol.vid;
        failpoint::pause!("pause.commit", vid.to_string());
        failpoint::panic_if!("stop.io", vid.to_string());
        let dir = self.vm_dir(vid, false)?;
        let n = Names::of(vid);
        let outcome = match cfg.kind() {
            VolumeKind::Origin => self.commit_dirty(vol, &dir, started, limit)?,
            kind => {
                if kind == VolumeKind::Volatile && limit != cfg.size {
                    // A running resize of a volatile volume persists: the
                    // run's size, never what writes past the end made of
                    // the file.
                    self.update_config(vol, |c| {
                        c.size = limit;
                        Ok(())
                    })?;
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
        Ok(outcome)
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
        failpoint::hit!("start.copied");
        dir.rename(&v, &n.dirty_tmp(), &n.dirty())
            .map_err(io_ctx(dir, "renaming", &n.dirty_tmp()))
    }
}

/// A new lease on a live run; `None` for a held one.
fn lease_of(vid: &ValidVid, vol: &Arc<Volume>, run: &mut Run) -> Option<Lease> {
    let RunState::Live {
        file, attachment, ..
    } = &run.state
    else {
        return None;
    };
    let lease = Lease {
        vid: vid.clone(),
        file: file.clone(),
        limit: run.limit.clone(),
        attachment: attachment.clone(),
        volume: vol.clone(),
    };
    run.leases += 1;
    Some(lease)
}
