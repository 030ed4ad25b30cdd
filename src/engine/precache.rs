//! The precache (SPEC §4.1): `N-precache.img`, a reflink of an origin
//! volume's committed image, made after every replacement of `N.img`, so
//! that a start is one rename, however many extents the image has.
//!
//! **Staleness.** The volume's config records what the precache was made
//! from ([`PrecacheRecord`]): the generation of the committed image, and
//! the identity (device, inode, size, mtime, ctime) of `N.img` and of the
//! precache, read once the precache was renamed into place. A start
//! renames the precache to `N-dirty.img` only while all of it still
//! matches: a replacement of `N.img` by reflinkfs bumps the generation,
//! one by hand gives a new inode or ctime, and a
//! write to the precache changes its mtime and ctime. Anything else is
//! stale: it is removed, never run, and the start copies `N.img` as it
//! would without a precache. After the rename, the dirty image must still
//! be the inode that was checked.
//!
//! A precache is made as `N.img~precache` (a temporary file: recovery
//! removes it), fsynced, then renamed into place, and only then recorded:
//! a crash at any point leaves at worst an unrecorded precache, which is
//! stale, and a record of an older generation, by which recovery knows to
//! make the precache again. Failing to make one (ENOSPC) is a WARN; the volume works without.
//! Copy-mode pools and `revisions_to_keep=-1` keep none, nor does a process
//! run with `REFLINKFS_PRECACHE=off` (for comparisons).

use super::config::{VolumeConfig, VolumeKind};
use super::failpoint;
use super::fsops::{CopyStrategy, Dir, Entry, FileSig};
use super::lifecycle::{io_ctx, open_image, regular_entry};
use super::pool::{Names, Pool};
use super::recovery::Found;
use super::volume::Volume;

pub use super::ident::{FileIdent, PrecacheRecord};
use crate::error::{Error, Result};
use crate::sys;
use std::os::fd::AsFd;
use std::sync::Arc;

/// The environment variable that turns the precache off for a process.
pub const ENV: &str = "REFLINKFS_PRECACHE";

fn disabled_by_env() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| {
        let off = std::env::var(ENV).is_ok_and(|v| matches!(v.as_str(), "off" | "no" | "0"));
        if off {
            log::info!("{ENV}=off: no volume keeps a precache in this process");
        }
        off
    })
}

/// Whether `copy` matches the volume's precache record, `img` being its
/// committed image now (`None`: there is none).
fn precache_matches(cfg: &VolumeConfig, img: Option<&FileSig>, copy: &FileSig) -> bool {
    match (cfg.precache, img) {
        (Some(rec), Some(img)) => rec.matches(cfg.generation, img, copy),
        _ => false,
    }
}

impl Pool {
    /// Whether a volume keeps a precache: an origin volume of a reflink
    /// pool, with snapshots (`revisions_to_keep` ≠ -1).
    pub(crate) fn keeps_precache(&self, cfg: &VolumeConfig) -> bool {
        cfg.kind() == VolumeKind::Origin
            && cfg.revisions_to_keep != -1
            && !self.config.read().copy_mode
            && !disabled_by_env()
    }

    /// Whether the volume's precache matches its record (see the module
    /// docs), from the two files' signatures.
    fn precache_valid(&self, cfg: &VolumeConfig, dir: &Dir, copy: &FileSig) -> Result<bool> {
        let img = regular_entry(dir, &cfg.vid, &Names::of(&cfg.vid).img())?;
        Ok(precache_matches(cfg, img.as_ref(), copy))
    }

    /// After `N.img` was replaced (and the rename is durable): makes the new
    /// precache, or removes one the volume should not keep. Never fails: a
    /// failure is logged, and the volume starts without a precache. The
    /// caller owns the volume.
    pub(crate) fn refresh_precache(&self, vol: &Volume, dir: &Dir) {
        let vid = &vol.vid;
        if !self.keeps_precache(&vol.config()) {
            self.forget_precache(vol, dir);
            return;
        }
        if let Err(e) = self.make_precache(vol, dir) {
            log::warn!(
                "{vid}: no precache ({e}); the next start copies {} instead",
                dir.shown(&Names::of(vid).img()).display()
            );
            self.forget_precache(vol, dir);
        }
    }

    fn make_precache(&self, vol: &Volume, dir: &Dir) -> Result<()> {
        let vid = &vol.vid;
        let v = vid.to_string();
        let n = Names::of(vid);
        let tmp = n.img_tmp("precache");
        // The old one is stale: it goes first, so no failure leaves it.
        // (Its record is of an older generation: it matches nothing.)
        dir.remove_if_exists(&v, &n.precache())
            .map_err(io_ctx(dir, "removing", &n.precache()))?;
        dir.remove_if_exists(&v, &tmp)
            .map_err(io_ctx(dir, "removing", &tmp))?;
        let src = open_image(dir, vid, &n.img(), libc::O_RDONLY)?;
        let (out, _) = dir
            .copy_from(
                &v,
                &src,
                &dir.shown(&n.img()),
                &tmp,
                CopyStrategy::ReflinkOnly,
            )
            .map_err(io_ctx(dir, "reflinking to", &tmp))?;
        failpoint::hit!("precache.made");
        dir.rename(&v, &tmp, &n.precache())
            .map_err(io_ctx(dir, "renaming", &tmp))?;
        failpoint::hit!("precache.renamed");
        let src_sig = FileSig::from_stat(&sys::fstat(src.as_fd()).map_err(io_ctx(
            dir,
            "examining",
            &n.img(),
        ))?);
        let out_sig =
            FileSig::from_stat(&sys::fstat(out.as_fd()).map_err(io_ctx(dir, "examining", &tmp))?);
        let img = regular_entry(dir, vid, &n.img())?;
        let copy = regular_entry(dir, vid, &n.precache())?;
        let (Some(img), Some(copy)) = (img, copy) else {
            return Err(Error::io(
                format!("{vid}: a file vanished while its precache was made"),
                std::io::Error::from_raw_os_error(libc::ENOENT),
            ));
        };
        // The names must still be the files just cloned (nothing swapped
        // them meanwhile), or nothing is recorded.
        if !img.same_inode(&src_sig) || !copy.same_inode(&out_sig) {
            return Err(Error::io(
                format!("{vid}: a file was replaced while its precache was made"),
                std::io::Error::from_raw_os_error(libc::ESTALE),
            ));
        }
        self.update_config(vol, |cfg| {
            cfg.precache = Some(PrecacheRecord {
                generation: cfg.generation,
                image: FileIdent::of(&img),
                copy: FileIdent::of(&copy),
            });
            Ok(())
        })
    }

    /// Removes the precache and its record (after a revert, or when the
    /// volume should keep none or it cannot be made). Never fails: a
    /// failure is logged, and a precache left behind is stale (its record
    /// is gone or of an older generation).
    pub(crate) fn forget_precache(&self, vol: &Volume, dir: &Dir) {
        if let Err(e) = self.drop_precache(vol, dir) {
            log::warn!("{}: could not remove its precache: {e}", vol.vid);
        }
    }

    /// Removes the precache's record, then the precache, if any (a file
    /// without a record is stale whatever happens next).
    fn drop_precache(&self, vol: &Volume, dir: &Dir) -> Result<()> {
        let n = Names::of(&vol.vid);
        self.update_config(vol, |cfg| {
            cfg.precache = None;
            Ok(())
        })?;
        dir.remove_if_exists(&vol.vid.to_string(), &n.precache())
            .map_err(io_ctx(dir, "removing", &n.precache()))?;
        Ok(())
    }

    /// The start of an origin volume (state Starting): renames a matching
    /// precache to `N-dirty.img` and gives `true`; `false` when there is
    /// none to use, after removing a stale one.
    pub(crate) fn start_from_precache(&self, vol: &Volume, dir: &Dir) -> Result<bool> {
        let vid = &vol.vid;
        let v = vid.to_string();
        let n = Names::of(vid);
        let cfg = vol.config();
        // Whatever is wrong with a precache, the start goes on without it.
        let unused = |why: &str| {
            log::warn!(
                "{vid}: {} {why}: not used",
                dir.shown(&n.precache()).display()
            );
            self.forget_precache(vol, dir);
            Ok(false)
        };
        let copy = match dir.entry(&n.precache()) {
            Ok(Entry::Missing) => return Ok(false),
            Ok(Entry::Regular(_)) if !self.keeps_precache(&cfg) => {
                return unused("is one this volume does not keep")
            }
            Ok(Entry::Regular(sig)) => sig,
            Ok(Entry::Other) => return unused("is not a regular file"),
            Err(e) => return unused(&format!("cannot be examined ({e})")),
        };
        if !self.precache_valid(&cfg, dir, &copy)? {
            return unused(&format!("does not match {}", dir.shown(&n.img()).display()));
        }
        failpoint::hit!("start.copied");
        dir.rename(&v, &n.precache(), &n.dirty()).map_err(io_ctx(
            dir,
            "renaming",
            &n.precache(),
        ))?;
        match regular_entry(dir, vid, &n.dirty())? {
            Some(d) if d.same_inode(&copy) && d.size == copy.size && d.mtime == copy.mtime => {
                Ok(true)
            }
            _ => {
                // Swapped between the check and the rename: not ours to run.
                log::warn!(
                    "{vid}: {} changed as it was renamed: removed, not used",
                    dir.shown(&n.precache()).display()
                );
                dir.remove(&v, &n.dirty())
                    .map_err(io_ctx(dir, "removing", &n.dirty()))?;
                Ok(false)
            }
        }
    }

    /// The stop of a run whose dirty image was not modified: when the
    /// committed image is still the one the precache record was made from,
    /// the dirty image (a copy of it, unmodified) becomes the precache
    /// again, instead of being dropped. `false` when it was not.
    pub(crate) fn recycle_dirty(&self, vol: &Volume, dir: &Dir) -> bool {
        let vid = &vol.vid;
        let n = Names::of(vid);
        let cfg = vol.config();
        let img = regular_entry(dir, vid, &n.img()).ok().flatten();
        let fits = match (cfg.precache, img) {
            (Some(rec), Some(img)) => rec.same_image(cfg.generation, &img),
            _ => false,
        };
        if !fits || !self.keeps_precache(&cfg) {
            return false;
        }
        if let Err(e) = dir.rename(&vid.to_string(), &n.dirty(), &n.precache()) {
            log::warn!("{vid}: could not keep the unmodified dirty image as precache: {e}");
            return false;
        }
        let made = regular_entry(dir, vid, &n.precache()).and_then(|copy| {
            let copy = copy.ok_or_else(|| Error::MissingImage {
                vid: vid.to_string(),
                path: dir.shown(&n.precache()),
            })?;
            self.update_config(vol, |new| {
                if let Some(rec) = &mut new.precache {
                    rec.copy = FileIdent::of(&copy);
                }
                Ok(())
            })
        });
        if let Err(e) = made {
            // Unrecorded, it is stale: no start uses it.
            log::warn!("{vid}: the precache kept from the unmodified run is not recorded: {e}");
        }
        true
    }

    /// Recovery of a volume's precache, after the rest of its recovery
    /// (`changed`: something was done): removes one that is stale or that
    /// the volume should not keep, and makes it again when it went or
    /// when an interrupted operation may have left none. Gives whether
    /// anything was removed.
    pub(crate) fn recover_precache(&self, found: &Found, changed: bool) -> Result<bool> {
        let Found { vol, dir, names } = *found;
        let n = Names::of(&vol.vid);
        let cfg = vol.config();
        // A record older than the image: the precache of a replacement was
        // not made (a crash between the rename and the precache).
        let due = cfg.precache.is_some_and(|r| r.generation != cfg.generation);
        if !changed && !due && !names.contains(&n.precache()) {
            return Ok(false);
        }
        let keeps = self.keeps_precache(&cfg);
        let entry = dir
            .entry(&n.precache())
            .map_err(io_ctx(dir, "examining", &n.precache()))?;
        let img = regular_entry(dir, &vol.vid, &n.img())?;
        let valid = match entry {
            Entry::Regular(sig) => keeps && precache_matches(&cfg, img.as_ref(), &sig),
            _ => false,
        };
        let removed = entry != Entry::Missing && !valid;
        if removed {
            log::warn!(
                "{}: recovery: removing {}: {}",
                vol.vid,
                dir.shown(&n.precache()).display(),
                if keeps {
                    "stale (it does not match the committed image)"
                } else {
                    "this volume keeps no precache"
                }
            );
            self.drop_precache(vol, dir)?;
        }
        if keeps && !valid && img.is_some() {
            self.refresh_precache(vol, dir);
        }
        Ok(removed)
    }

    /// What `check` says of a volume's precache, if anything is wrong.
    pub(crate) fn precache_problem(&self, cfg: &VolumeConfig, dir: &Dir) -> Option<String> {
        let n = Names::of(&cfg.vid);
        let img = regular_entry(dir, &cfg.vid, &n.img()).ok().flatten();
        match dir.entry(&n.precache()).ok()? {
            Entry::Missing => None,
            Entry::Other => Some("not a regular file (a symlink?)".into()),
            Entry::Regular(_) if !self.keeps_precache(cfg) => Some(
                "a precache this volume does not keep; the next pool open removes it".into(),
            ),
            // Without N.img (an optional volume's image taken away), the
            // missing image is the news; no start can use the precache, and
            // the next pool open removes it.
            Entry::Regular(_) if img.is_none() => None,
            Entry::Regular(sig) => match precache_matches(cfg, img.as_ref(), &sig) {
                true => None,
                false => Some(
                    "a stale precache (it does not match the committed image): no start uses it, and the next pool open removes it"
                        .into(),
                ),
            },
        }
    }

    /// Makes the precache of every stopped origin volume that should keep
    /// one and has none that matches (after `pool adopt`). Gives how many
    /// were made.
    pub fn make_missing_precaches(&self) -> usize {
        let vols: Vec<Arc<Volume>> = self.table.all();
        let mut made = 0;
        for vol in vols {
            let stopped = |life: &super::volume::Life| match life.run() {
                Some(_) => Err(Error::Busy {
                    vid: vol.vid.to_string(),
                    reason: "running".into(),
                }),
                None => Ok(()),
            };
            let Ok(claim) = vol.claim(super::volume::OpName::Set, stopped) else {
                continue;
            };
            let Ok(Some(dir)) = self.vm_dir_if_exists(&vol.vid) else {
                continue;
            };
            // As recovery does it: a stale one goes, a missing one is made.
            let before = claim.config().precache;
            let found = Found {
                vol: &claim.volume,
                dir: &dir,
                names: &[],
            };
            if let Err(e) = self.recover_precache(&found, true) {
                log::warn!("{}: its precache: {e}", vol.vid);
            }
            let after = claim.config().precache;
            made += usize::from(after.is_some() && after != before);
        }
        made
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(ino: u64, size: u64, mtime: i64, ctime: i64) -> FileSig {
        FileSig {
            dev: 1,
            ino,
            size,
            mode: 0o600,
            blocks: 8,
            mtime: (mtime, 0),
            ctime: (ctime, 0),
            nlink: 1,
        }
    }

    #[test]
    fn a_record_matches_only_the_files_it_was_made_from() {
        let (img, copy) = (sig(10, 4096, 100, 100), sig(11, 4096, 100, 101));
        let rec = PrecacheRecord {
            generation: 3,
            image: FileIdent::of(&img),
            copy: FileIdent::of(&copy),
        };
        assert!(rec.matches(3, &img, &copy));
        // Another generation: the committed image was replaced.
        assert!(!rec.matches(4, &img, &copy));
        // N.img replaced by hand: another inode, or the same number reused
        // (another ctime), or the same inode written (mtime).
        assert!(!rec.matches(3, &sig(12, 4096, 100, 100), &copy));
        assert!(!rec.matches(3, &sig(10, 4096, 100, 102), &copy));
        assert!(!rec.matches(3, &sig(10, 4096, 105, 105), &copy));
        assert!(!rec.matches(3, &sig(10, 8192, 100, 100), &copy));
        // The precache written or replaced.
        assert!(!rec.matches(3, &img, &sig(11, 4096, 106, 106)));
        assert!(!rec.matches(3, &img, &sig(13, 4096, 100, 101)));
        // Blocks, mode and link count are no part of the identity.
        let mut linked = img;
        linked.nlink = 2;
        linked.blocks = 16;
        assert!(rec.matches(3, &linked, &copy));
        assert!(rec.same_image(3, &img) && !rec.same_image(2, &img));
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let i = FileIdent::of(&sig(1, 512, 2, 3));
        let rec = PrecacheRecord {
            generation: 7,
            image: i,
            copy: i,
        };
        let back: PrecacheRecord =
            serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back, rec);
    }
}
