//! Recovery at pool open: what a crash or power cut left behind (a dirty
//! image, a half-made revision, a temporary file) is committed, finished
//! or removed, so that every volume is stopped and consistent.

use super::config::VolumeKind;
use super::fsops::{Dir, FileSig};
use super::lifecycle::*;
use super::pool::{Names, Pool};
use super::revision::{parse_revision_name, Parsed};
use super::volume::{HeldBy, Run, Volume};
use crate::error::Result;
use crate::sys;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Every bound loop device's backing file, from one walk of `/sys/block`
/// made when first asked: a recovery asks once per volume with a leftover
/// dirty image, and walks once.
#[derive(Default)]
pub(crate) struct LoopMap(std::cell::OnceCell<Vec<(std::path::PathBuf, String)>>);

impl LoopMap {
    pub fn get(&self) -> &[(std::path::PathBuf, String)] {
        self.0.get_or_init(sys::loop_backing_files)
    }
}

/// What recovery works from, for one volume: the volume, its VM
/// directory, and that directory's names, listed once for all its volumes.
pub(crate) struct Found<'a> {
    pub vol: &'a Arc<Volume>,
    pub dir: &'a Dir,
    pub names: &'a [String],
}

impl Pool {
    /// Recovery of every volume (SPEC §4.4), before anything else can use
    /// the pool. A volume whose recovery fails is logged and left for
    /// `check`; the pool still opens. Each VM directory is opened and
    /// listed once, and a volume with nothing to recover costs one lstat:
    /// opening a pool of 10,000 volumes takes well under a second.
    pub(crate) fn recover_all(&self) -> Result<()> {
        let vols: Vec<Arc<Volume>> = self.table.all();
        // One walk of the loop devices for every volume that needs it.
        let loops = LoopMap::default();
        let mut i = 0;
        while i < vols.len() {
            let (class, vm) = (vols[i].vid.class(), vols[i].vid.vm());
            let end = vols[i..]
                .iter()
                .position(|v| v.vid.class() != class || v.vid.vm() != vm)
                .map_or(vols.len(), |n| i + n);
            let group = &vols[i..end];
            i = end;
            let dir = match self.vm_dir_if_exists(&group[0].vid) {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) => {
                    log::error!("{}: recovery failed: {e}", group[0].vid);
                    continue;
                }
            };
            let names = match dir.names() {
                Ok(n) => n,
                Err(e) => {
                    log::error!("recovery: listing {} failed: {e}", dir.path().display());
                    continue;
                }
            };
            for vol in group {
                if let Err(e) = self.recover_volume(vol, &dir, &names, &loops) {
                    log::error!("{}: recovery failed: {e}", vol.vid);
                }
            }
        }
        Ok(())
    }

    /// Recovers one volume, in steps: unfinished files go, a half-made
    /// revision goes, a leftover dirty image is committed (or dropped, or
    /// its run resumed or held), a queued change is finished, the size and
    /// the revisions are put right, and a stale precache is made again.
    fn recover_volume(
        &self,
        vol: &Arc<Volume>,
        dir: &Dir,
        names: &[String],
        loops: &LoopMap,
    ) -> Result<()> {
        let vid = &vol.vid;
        let n = Names::of(vid);
        let found = Found { vol, dir, names };
        let mut changed = self.remove_unfinished(&found)?;
        let kind = vol.config().kind();
        let img = match kind {
            VolumeKind::Origin => regular_entry(dir, vid, &n.img())?,
            _ => None,
        };
        if let Some(img) = img.filter(|i| i.nlink > 1) {
            changed |= self.remove_half_made_revision(vol, dir, &img)?;
        }
        if names.contains(&n.dirty()) && regular_entry(dir, vid, &n.dirty())?.is_some() {
            match self.recover_dirty(&found, loops)? {
                Dirty::Done => changed = true,
                Dirty::RunsOn => return Ok(()),
            }
        }
        // A queued change whose dirty image was already dropped when the
        // crash came: it is finished now.
        if kind == VolumeKind::Origin && !names.contains(&n.dirty()) {
            if let Some(pending) = vol.config().pending.clone() {
                log::warn!(
                    "{vid}: recovery: finishing the queued change ({})",
                    pending.describe()
                );
                self.apply_pending(vol, dir, &pending)?;
                changed = true;
            }
        }
        if kind == VolumeKind::Origin {
            let img = if changed {
                regular_entry(dir, vid, &n.img())?
            } else {
                img
            };
            if let Some(img) = img {
                self.take_image_size(vol, dir, img.size)?;
            }
            changed |= self.finish_prune(&found, changed)?;
        }
        // A stale precache goes (a crash between a commit and its
        // record, an image replaced by hand), and is made again.
        changed |= self.recover_precache(&found, changed)?;
        if changed {
            dir.sync().map_err(io_ctx(dir, "syncing", ""))?;
        }
        Ok(())
    }

    /// Removes the temporary files and unfinished imports of a volume.
    fn remove_unfinished(&self, found: &Found) -> Result<bool> {
        let Found { vol, dir, names } = *found;
        let vid = &vol.vid;
        let n = Names::of(vid);
        let mut changed = false;
        for f in names.iter().filter(|f| n.is_temp(f) || **f == n.import()) {
            log::warn!(
                "{vid}: recovery: removing unfinished {}",
                dir.shown(f).display()
            );
            dir.remove(&vid.to_string(), f)
                .map_err(io_ctx(dir, "removing", f))?;
            changed = true;
        }
        Ok(changed)
    }

    /// A revision that is the same file as N.img (`img`, with a second
    /// link: a commit interrupted between its link and its rename) goes.
    /// Only the newest can be that: an older one sharing N.img's file is a
    /// revert's target (reverts link), which stays.
    fn remove_half_made_revision(&self, vol: &Volume, dir: &Dir, img: &FileSig) -> Result<bool> {
        let vid = &vol.vid;
        let revs = self.list_revisions(vid, Some(dir))?;
        let Some(r) = super::revision::half_made_commit_candidate(&vol.config(), revs) else {
            return Ok(false);
        };
        match regular_entry(dir, vid, &r.file_name)? {
            Some(rs) if rs.same_inode(img) => {
                log::warn!(
                    "{vid}: recovery: removing {}, the same file as {} (an interrupted commit)",
                    dir.shown(&r.file_name).display(),
                    dir.shown(&Names::of(vid).img()).display()
                );
                dir.remove(&vid.to_string(), &r.file_name).map_err(io_ctx(
                    dir,
                    "removing",
                    &r.file_name,
                ))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// A leftover dirty image: its run resumes when a loop device still
    /// writes it; else it is committed (origin; held when something that
    /// outlived the last daemon still writes it) or removed.
    fn recover_dirty(&self, found: &Found, loops: &LoopMap) -> Result<Dirty> {
        let Found { vol, dir, .. } = *found;
        let vid = &vol.vid;
        let n = Names::of(vid);
        // A loop device of `volume attach` (or of a hand-made losetup)
        // still writes it: the run goes on.
        if let Some(attached) = self.attached_loop(found, loops)? {
            self.resume_attached(vol, dir, attached)?;
            return Ok(Dirty::RunsOn);
        }
        let kind = vol.config().kind();
        if kind != VolumeKind::Origin {
            log::warn!(
                "{vid}: recovery: removing the leftover {} of a {} volume",
                dir.shown(&n.dirty()).display(),
                kind.as_str()
            );
            dir.remove(&vid.to_string(), &n.dirty()).map_err(io_ctx(
                dir,
                "removing",
                &n.dirty(),
            ))?;
            return Ok(Dirty::Done);
        }
        log::warn!(
            "{vid}: recovery: committing the leftover {}",
            dir.shown(&n.dirty()).display()
        );
        let contract = vol.config().dirty_contract();
        let StopOutcome::Held { holders } = self.commit_dirty(vol, dir, None, contract)? else {
            return Ok(Dirty::Done);
        };
        // Something that outlived the last daemon still writes it: a
        // commit now would make N.img change after its commit. It stays a
        // run, held, for the daemon to commit once the writer lets go.
        log::warn!(
            "{vid}: recovery: not committing {}: it is still open for writing by {holders}; it is committed once that lets go, and the volume cannot start again until then",
            dir.shown(&n.dirty()).display()
        );
        let held = Run::held_over(
            None,
            None,
            Arc::new(AtomicU64::new(contract)),
            HeldBy::Writers(holders),
        );
        self.table.set_phase(vid, &mut vol.lock(), held);
        Ok(Dirty::RunsOn)
    }

    /// The committed image's size is the volume's: a config that says
    /// otherwise is put right.
    fn take_image_size(&self, vol: &Volume, dir: &Dir, size: u64) -> Result<()> {
        let cfg = vol.config();
        if size == cfg.size {
            return Ok(());
        }
        log::warn!(
            "{}: recovery: the size in the config ({}) differs from {} ({size}); taking the image's",
            vol.vid,
            cfg.size,
            dir.shown(&Names::of(&vol.vid).img()).display(),
        );
        self.update_config(vol, |c| {
            c.size = size;
            Ok(())
        })
    }

    /// Finishes the prune of a commit (or revert, import, clone, or
    /// lowered revisions_to_keep) that a crash interrupted. Counted from
    /// the listing: no file is read when there is nothing to do.
    fn finish_prune(&self, found: &Found, changed: bool) -> Result<bool> {
        let Found { vol, dir, names } = *found;
        let vid = &vol.vid;
        let cfg = vol.config();
        let listed = names
            .iter()
            .filter(|f| match parse_revision_name(vid.name(), f) {
                Parsed::Revision(r) => !super::revision::is_protected(&cfg, &r),
                _ => false,
            })
            .count();
        if !changed && listed <= cfg.revisions_to_keep.max(0) as usize {
            return Ok(false);
        }
        let (keep, _) = self.revisions_allowed(&cfg, dir)?;
        let unprotected = self
            .list_revisions(vid, Some(dir))?
            .iter()
            .filter(|r| !super::revision::is_protected(&cfg, r))
            .count();
        if unprotected <= keep {
            return Ok(false);
        }
        log::warn!("{vid}: recovery: pruning the revisions an interrupted operation left");
        self.prune_revisions(&cfg, dir)?;
        Ok(true)
    }
}

/// What recovery did with a leftover dirty image.
enum Dirty {
    /// Committed or removed: the volume is stopped.
    Done,
    /// Its run goes on (attached to a loop device, or held).
    RunsOn,
}
