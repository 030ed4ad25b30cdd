//! Pinned revisions, and the changes queued for the end of a run:
//! `volume revisions pin|unpin`, `volume discard-changes`, a revert of a
//! running volume, and `volume cancel-pending` (SEMANTICS, "Pinned
//! revisions" and "Dropping a running volume's changes").
//!
//! Both live in the volume's config, which is written atomically before a
//! request is answered: a pin survives every prune, and a queued change
//! survives a crash, after which recovery applies it instead of committing
//! the run's dirty image.

use super::config::{Pending, Pin, VolumeConfig, VolumeKind};
use super::failpoint;
use super::fsops::Dir;
use super::lifecycle::{io_ctx, open_image, regular_entry, StopOutcome};
use super::pool::{Names, Pool};
use super::revision::{now_utc, pick_revision, Revision};
use super::vid::ValidVid;
use super::volume::{OpName, Volume};
use crate::error::{refused, Cause, Error, Result};
use std::sync::Arc;

/// What `volume revert` did: at once, or queued for the end of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevertOutcome {
    /// The committed image is revision `revision` now; the previous one
    /// was kept as `saved_as`.
    Done {
        revision: String,
        saved_as: Option<u64>,
    },
    /// The volume runs: the revert happens at its stop, and the run's
    /// writes are dropped.
    Queued { revision: String },
}

impl Pool {
    /// Pins revision `which` of `vid`, with an optional note; pinning a
    /// pinned revision replaces its note. Running or not.
    /// Gives whether it was not pinned before.
    pub fn pin_revision(
        &self,
        vid: &ValidVid,
        which: &str,
        note: Option<String>,
    ) -> Result<(Revision, bool)> {
        if let Some(n) = &note {
            if n.len() > 1024 || n.chars().any(char::is_control) {
                return Err(Error::InvalidValue {
                    property: "note".into(),
                    reason: "a note is one line of at most 1024 bytes".into(),
                });
            }
        }
        let (claim, rev) = self.claim_revision(vid, which)?;
        let pin = Pin {
            pinned_at: now_utc(),
            note,
        };
        let new = self.update_config(&claim.volume, |cfg| {
            Ok(cfg.pins.insert(rev.id.to_string(), pin).is_none())
        })?;
        log::info!("{vid}: pinned revision {} ({})", rev.id, rev.file_name);
        Ok((rev, new))
    }

    /// Unpins revision `which`; false when it was not pinned. The next
    /// prune counts it again.
    pub fn unpin_revision(&self, vid: &ValidVid, which: &str) -> Result<(Revision, bool)> {
        let (claim, rev) = self.claim_revision(vid, which)?;
        let was = self.update_config(&claim.volume, |cfg| {
            Ok(cfg.pins.remove(&rev.id.to_string()).is_some())
        })?;
        if was {
            log::info!("{vid}: unpinned revision {}", rev.id);
        }
        Ok((rev, was))
    }

    /// Claims a volume, running or not, to change what its config says of
    /// revision `which`: the claim and the revision.
    fn claim_revision(
        &self,
        vid: &ValidVid,
        which: &str,
    ) -> Result<(super::volume::Claim, Revision)> {
        let claim = self.volume(vid)?.claim(OpName::Set, |_| Ok(()))?;
        let dir = self.vm_dir(vid, false)?;
        let revs = self.list_revisions(vid, Some(&dir))?;
        let rev = pick_revision(vid, &revs, Some(which))?.clone();
        Ok((claim, rev))
    }

    /// `volume discard-changes`: the current run ends without a commit,
    /// and the volume comes back as it was at the run's start.
    pub fn discard_changes(&self, vid: &ValidVid) -> Result<()> {
        self.queue(vid, "discarding its changes", |_| Ok(Pending::Discard))
            .map(drop)
    }

    /// `volume revert` of a volume: at once when it is stopped, queued
    /// for the end of its run when it runs.
    pub fn revert_or_queue(&self, vid: &ValidVid, which: Option<&str>) -> Result<RevertOutcome> {
        if self.volume(vid)?.snapshot().running {
            let queued = self.queue(vid, "reverting it", |pool| {
                let dir = pool.vm_dir(vid, false)?;
                let revs = pool.list_revisions(vid, Some(&dir))?;
                let rev = pick_revision(vid, &revs, which)?;
                Ok(Pending::Revert {
                    revision: rev.file_name.clone(),
                })
            });
            match queued {
                Ok(Pending::Revert { revision }) => return Ok(RevertOutcome::Queued { revision }),
                Ok(Pending::Discard) => unreachable!("a revert was queued"),
                // It stopped meanwhile: the revert runs now.
                Err(Error::Because {
                    cause: Cause::NotRunning,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        let (revision, saved_as) = self.revert_to(vid, which)?;
        Ok(RevertOutcome::Done { revision, saved_as })
    }

    /// Stores `make`'s change for the end of the running volume's run.
    fn queue(
        &self,
        vid: &ValidVid,
        doing: &str,
        make: impl FnOnce(&Pool) -> Result<Pending>,
    ) -> Result<Pending> {
        let claim = self.volume(vid)?.claim(OpName::Set, |_| Ok(()))?;
        let cfg = claim.config();
        match cfg.kind() {
            VolumeKind::Origin => {}
            k => {
                return Err(refused(
                    vid,
                    format!(
                        "a {} volume never commits its runs, so there is nothing to drop: its changes go at every stop",
                        k.as_str()
                    ),
                ))
            }
        }
        if cfg.revisions_to_keep == -1 {
            return Err(refused(
                vid,
                format!("with revisions_to_keep=-1 its running image is its only copy; {doing} at stop would lose it all"),
            ));
        }
        if claim.lock().run().is_none() {
            return Err(Error::because(
                vid,
                Cause::NotRunning,
                format!("it is not running, so there is no run to end by {doing}"),
            ));
        }
        let pending = make(self)?;
        self.update_config(&claim.volume, |cfg| {
            if let Some(old) = &cfg.pending {
                log::info!("{vid}: replacing the queued change ({})", old.describe());
            }
            cfg.pending = Some(pending.clone());
            Ok(())
        })?;
        failpoint::hit!("pending.stored");
        log::info!("{vid}: queued: {}", pending.describe());
        Ok(pending)
    }

    /// The volumes with a queued change. Reads each volume's config (no
    /// waiting).
    pub fn pending_changes(&self) -> Vec<(ValidVid, Pending)> {
        let vols: Vec<Arc<Volume>> = self.table.all();
        vols.iter()
            .filter_map(|v| v.config().pending.clone().map(|p| (v.vid.clone(), p)))
            .collect()
    }

    /// `volume cancel-pending`: withdraws the queued change; false when
    /// there was none (or the run already ended and applied it).
    pub fn cancel_pending(&self, vid: &ValidVid) -> Result<bool> {
        let claim = self.volume(vid)?.claim(OpName::Set, |_| Ok(()))?;
        let Some(old) = self.update_config(&claim.volume, |cfg| Ok(cfg.pending.take()))? else {
            return Ok(false);
        };
        log::info!("{vid}: withdrew the queued change ({})", old.describe());
        Ok(true)
    }

    /// Applies a queued change instead of committing the dirty image of
    /// `vol` (whose caller owns the volume: a stop, a start's leftover, or
    /// recovery). The dirty image goes first, so a crash at any point
    /// leaves the volume as it was or as requested, never with the dropped
    /// writes: the request stays stored until the change is made.
    pub(crate) fn apply_pending(
        &self,
        vol: &Volume,
        dir: &Dir,
        pending: &Pending,
    ) -> Result<StopOutcome> {
        let vid = &vol.vid;
        let v = vid.to_string();
        let n = Names::of(vid);
        if regular_entry(dir, vid, &n.dirty())?.is_some() {
            dir.remove(&v, &n.dirty())
                .map_err(io_ctx(dir, "removing", &n.dirty()))?;
            dir.sync().map_err(io_ctx(dir, "syncing", ""))?;
            log::info!(
                "{vid}: dropped the run's changes ({})",
                dir.shown(&n.dirty()).display()
            );
        }
        failpoint::hit!("pending.dropped");
        match pending {
            Pending::Discard => {
                self.update_config(vol, clear_pending)?;
                // The start took the precache: the next start needs one.
                self.refresh_precache(vol, dir);
                Ok(StopOutcome::Discarded)
            }
            Pending::Revert { revision } if regular_entry(dir, vid, revision)?.is_none() => {
                // Protected from prunes and unlinking, so only a hand could
                // have removed it: the run is dropped all the same.
                log::error!(
                    "{vid}: the queued revert's target {} is gone; the run's changes were dropped, the committed image is as before",
                    dir.shown(revision).display()
                );
                self.update_config(vol, clear_pending)?;
                Ok(StopOutcome::Discarded)
            }
            Pending::Revert { revision } => {
                let saved_as = self.revert_in_place(vol, dir, revision)?;
                Ok(StopOutcome::Reverted {
                    revision: revision.clone(),
                    saved_as,
                })
            }
        }
    }

    /// Clears a queued change found at the start of a new run (the caller
    /// owns the volume, Starting): it was for a run that is over.
    pub(crate) fn withdraw_stale_pending(&self, vol: &Volume) -> Result<()> {
        if let Some(p) = self.update_config(vol, |cfg| Ok(cfg.pending.take()))? {
            log::warn!(
                "{}: withdrew a queued change ({}) left from an earlier run",
                vol.vid,
                p.describe()
            );
        }
        Ok(())
    }

    /// Makes revision `file_name` the committed image of an origin volume
    /// the caller owns, in constant time: a hard link of the revision,
    /// renamed over `N.img` (images are never written in place, so the
    /// two names can share one file). The revision stays, pinned or not.
    pub(crate) fn revert_in_place(
        &self,
        vol: &Volume,
        dir: &Dir,
        file_name: &str,
    ) -> Result<Option<u64>> {
        let vid = &vol.vid;
        let v = vid.to_string();
        let n = Names::of(vid);
        // Already the committed image (reverted to before, by a link): a
        // rename between two names of one file does nothing (POSIX), so
        // nothing is to be done, and no copy of it is saved.
        let target = regular_entry(dir, vid, file_name)?;
        let img = regular_entry(dir, vid, &n.img())?;
        if let (Some(t), Some(i)) = (target, img) {
            if t.same_inode(&i) {
                log::info!("{vid}: {file_name} already is the committed image");
                return Ok(None);
            }
        }
        let tmp = n.img_tmp("revert");
        dir.remove_if_exists(&v, &tmp)
            .map_err(io_ctx(dir, "removing", &tmp))?;
        dir.link(&v, file_name, &tmp)
            .map_err(io_ctx(dir, "linking", file_name))?;
        failpoint::hit!("revert.copied");
        let f =
            open_image(dir, vid, &tmp, libc::O_RDONLY).inspect_err(|_| dir.remove_tmp(&v, &tmp))?;
        let saved = self
            .replace_committed(vol, dir, &f, &tmp, "revert", Some(file_name))
            .inspect_err(|_| dir.remove_tmp(&v, &tmp))?;
        // The revision gone back to stays beyond revisions_to_keep until the
        // next commit, so the revert can be undone; the one just saved is
        // the newest, so it stays too.
        self.prune_revisions(&vol.config(), dir)?;
        Ok(saved)
    }

    /// The revisions of a volume with their pins, and for each pinned one
    /// the bytes only it holds (what unpinning and pruning it would free).
    pub(crate) fn annotate_revisions(
        &self,
        cfg: &VolumeConfig,
        dir: Option<&Dir>,
        mut revs: Vec<Revision>,
        with_usage: bool,
    ) -> Vec<Revision> {
        for r in &mut revs {
            r.pin = cfg.pins.get(&r.id.to_string()).cloned();
            r.rev_id = dir
                .and_then(|d| d.open(&r.file_name, libc::O_RDONLY).ok())
                .and_then(|f| super::delta::ids::read_id(&f).ok().flatten())
                .map(|id| id.to_string());
            if let (Some(_), Some(d), true) = (&r.pin, dir, with_usage) {
                r.exclusive = self.revision_exclusive(cfg, d, r);
            }
        }
        revs
    }

    /// The bytes a revision's file holds that no other file does: 0 when
    /// its file has another name too (`N.img` after a revert by link, or
    /// another revision), since removing this one frees nothing.
    fn revision_exclusive(&self, cfg: &VolumeConfig, dir: &Dir, r: &Revision) -> Option<u64> {
        let own = regular_entry(dir, &cfg.vid, &r.file_name).ok()??;
        if own.nlink > 1 {
            return Some(0);
        }
        super::report::exclusive_bytes(dir, &r.file_name).ok()
    }
}

/// A queued change done with (the run it was for was dropped).
fn clear_pending(cfg: &mut VolumeConfig) -> Result<()> {
    cfg.pending = None;
    cfg.dirty_size = None;
    Ok(())
}
