//! The commit of a run: the dirty image becomes the committed image (the
//! previous one a revision, when revisions are kept), the volume's size
//! contract is restored, and old revisions are pruned.

use super::config::VolumeConfig;
use super::failpoint;
use super::fsops::{Dir, FileSig};
use super::lifecycle::*;
use super::pool::{Names, Pool};
use super::revision::{format_utc, revision_file_name, RevisionId};
use super::vid::ValidVid;
use super::volume::Volume;
use crate::error::Result;
use crate::sys;
use std::fs::File;
use std::os::fd::AsFd;

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
        vol: &Volume,
        dir: &Dir,
        started: Option<FileSig>,
        contract: u64,
    ) -> Result<StopOutcome> {
        let vid = &vol.vid;
        let n = Names::of(vid);
        let dirty = open_image(dir, vid, &n.dirty(), libc::O_RDONLY)?;
        if let Some(holders) = self.outside_writers(vid, dir, &dirty) {
            return Ok(StopOutcome::Held { holders });
        }
        if let Some(pending) = vol.config().pending.clone() {
            drop(dirty);
            return self.apply_pending(vol, dir, &pending);
        }
        fit_to_contract(dir, vid, &n.dirty(), contract)?;
        let sig = FileSig::from_stat(&sys::fstat(dirty.as_fd()).map_err(io_ctx(
            dir,
            "examining",
            &n.dirty(),
        ))?);
        let img = regular_entry(dir, vid, &n.img())?;
        let keeps_snapshots = vol.config().revisions_to_keep != -1;
        if let (Some(started), Some(_)) = (started, img) {
            // Never with revisions_to_keep=-1: there the dirty image is the
            // only copy of the data.
            if keeps_snapshots && sig.unchanged_since(&started) {
                drop(dirty);
                // Still a copy of N.img: it becomes the precache again
                // when it can, else it goes.
                if !self.recycle_dirty(vol, dir) {
                    dir.remove(&vid.to_string(), &n.dirty()).map_err(io_ctx(
                        dir,
                        "removing",
                        &n.dirty(),
                    ))?;
                }
                dir.sync().map_err(io_ctx(dir, "syncing", ""))?;
                log::info!("{vid}: the dirty image was not modified; no new revision");
                return Ok(StopOutcome::Unchanged);
            }
        }
        self.replace_committed(vol, dir, &dirty, &n.dirty(), "commit", None)
            .map(|revision| StopOutcome::Committed { revision })
    }

    /// Makes the file `new_name` (open as `new`) the committed image of an
    /// origin volume: fsync it, save the current image as a revision when
    /// revisions are kept, rename it over `N.img`, fsync the directory,
    /// prune (a revert prunes by its own rule), and make the precache of
    /// the new image (`precache.rs`). Shared by commit,
    /// revert, import and clone, whose failpoints are `OP.synced`,
    /// `OP.config`, `OP.linked` and `OP.renamed`. The caller owns the
    /// volume (Committing, Starting, or an operation's claim). Returns the
    /// new revision's K.
    pub(crate) fn replace_committed(
        &self,
        vol: &Volume,
        dir: &Dir,
        new: &File,
        new_name: &str,
        op: &str,
        revert_target: Option<&str>,
    ) -> Result<Option<u64>> {
        let vid = &vol.vid;
        let v = vid.to_string();
        let n = Names::of(vid);
        let new_id = self.delta_stamp(dir, vid, new, op)?;
        sys::fsync(new.as_fd()).map_err(io_ctx(dir, "syncing", new_name))?;
        let new_size = sys::fstat(new.as_fd())
            .map_err(io_ctx(dir, "examining", new_name))?
            .st_size as u64;
        failpoint::hit!(format!("{op}.synced"));
        // A revert links a revision whose changes were recorded when it was
        // committed; mapping it again would read every extent of both.
        if revert_target.is_none() {
            self.delta_record(dir, vid, new, new_id);
        }

        let img = regular_entry(dir, vid, &n.img())?;
        // Held until the new config is shown with the new image: no other
        // change of the config comes in between (and none is lost).
        let writer = vol.write_config();
        let old = writer.current();
        let mut cfg = (*old).clone();
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
        // A queued change is done with the replace it asked for (a queued
        // revert), in the same atomic write.
        cfg.pending = None;
        // The counter is stored before the revision exists, so a crash can
        // skip a K but never reuse one. In memory, the new generation goes
        // with the rename below: a reader sees an image with its own.
        self.store_volume(&cfg)?;
        writer.publish(
            &mut vol.lock(),
            VolumeConfig {
                generation: old.generation,
                ..cfg.clone()
            },
        );
        failpoint::hit!(format!("{op}.config"));

        let replaced = (|| {
            if let (Some(k), Some(img_sig)) = (revision, img) {
                // The timestamp is when the old content was committed: the
                // ctime its rename into place gave it.
                let name = revision_file_name(vid.name(), k, &format_utc(img_sig.ctime.0));
                dir.link(&v, &n.img(), &name)
                    .map_err(io_ctx(dir, "saving revision", &name))?;
                dir.sync().map_err(io_ctx(dir, "syncing", ""))?;
                failpoint::hit!(format!("{op}.linked"));
            }
            let mut life = vol.lock();
            dir.rename(&v, new_name, &n.img())
                .map_err(io_ctx(dir, "renaming", new_name))?;
            writer.publish(&mut life, cfg.clone());
            Ok::<(), crate::error::Error>(())
        })();
        if let Err(e) = replaced {
            // The image stays: so does the config that goes with it (its
            // size, its queued change), on disk and in memory, but for the
            // counter (a revision K may be linked). A crash here is put
            // right by recovery instead.
            let back = VolumeConfig {
                next_revision: cfg.next_revision,
                ..(*old).clone()
            };
            self.store_back(op, &back);
            writer.publish(&mut vol.lock(), back);
            return Err(e);
        }
        drop(writer);
        failpoint::hit!(format!("{op}.renamed"));
        dir.sync().map_err(io_ctx(dir, "syncing", ""))?;
        log::info!(
            "{vid}: {op} done{}",
            revision
                .map(|k| format!(", previous image kept as revision {k}"))
                .unwrap_or_default()
        );
        if revert_target.is_none() {
            self.prune_revisions(&cfg, dir)?;
            self.refresh_precache(vol, dir);
        } else {
            // A revert is a link, in constant time: a precache would be a
            // reflink of every extent. The next start copies N.img, and its
            // stop makes the precache again.
            self.forget_precache(vol, dir);
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
                .find(|r| &r.file_name == pinned && !super::revision::is_protected(cfg, r))
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
        // Pinned revisions (and a queued revert's target) are never pruned
        // and do not count against revisions_to_keep.
        let revs: Vec<_> = self
            .list_revisions(&cfg.vid, Some(dir))?
            .into_iter()
            .filter(|r| !super::revision::is_protected(cfg, r))
            .collect();
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
            failpoint::hit!("prune.removed");
        }
        dir.sync().map_err(io_ctx(dir, "syncing", ""))?;
        log::info!(
            "{}: pruned {} revision(s), keeping {keep}",
            cfg.vid,
            doomed.len()
        );
        Ok(doomed.len())
    }
}
