//! `volume resize` (SPEC §5): of a running volume's dirty image (and the
//! loop device on it), of a stopped origin's committed image (a resized
//! copy renamed into place), or of a stopped snapshot or volatile volume's
//! nominal size.

use super::admin::{refused, ResizeOutcome};
use super::config::VolumeKind;
use super::failpoint;
use super::fsops::Dir;
use super::lifecycle::{io_ctx, open_image, regular_entry};
use super::pool::{Names, Pool};
use super::size::check_size;
use super::vid::ValidVid;
use super::volume::{Claim, OpName, Run};
use crate::error::{Error, Result};
use crate::sys;
use std::os::fd::AsFd;

impl Pool {
    /// Resizes a volume (SPEC §5).
    pub fn resize(&self, vid: &ValidVid, size: u64, allow_shrink: bool) -> Result<ResizeOutcome> {
        let size = check_size(size, &size.to_string())?;
        let claim = self.claim_any(vid, OpName::Resize)?;
        let cfg = claim.config();
        if !cfg.rw {
            return Err(refused(
                vid,
                "it is read-only (rw=false); resizing is refused",
            ));
        }
        let n = Names::of(vid);
        let v = vid.to_string();
        let dir = self.vm_dir(vid, true)?;
        let kind = cfg.kind();
        let running = claim.lock().run().map(|r| r.limit.clone());
        let current = if running.is_some() {
            regular_entry(&dir, vid, &n.dirty())?
                .ok_or_else(|| Error::MissingImage {
                    vid: v.clone(),
                    path: dir.shown(&n.dirty()),
                })?
                .size
        } else {
            self.check_clean(vid, Some(&dir), "resizing it")?;
            self.nominal_size(&cfg)
        };
        if size == current {
            return Ok(ResizeOutcome::Unchanged);
        }
        if size < current && !allow_shrink {
            return Err(refused(
                vid,
                format!("shrinking from {current} to {size} bytes loses data; give --allow-shrink to do it anyway"),
            ));
        }
        if let Some(limit) = running {
            self.resize_running(&claim, &dir, kind, current, size, &limit)?;
            return Ok(ResizeOutcome::Running);
        }
        if kind != VolumeKind::Origin {
            self.update_config(&claim.volume, |new| {
                new.size = size;
                Ok(())
            })?;
            log::info!("{vid}: nominal size changed from {current} to {size} bytes");
            return Ok(ResizeOutcome::Nominal);
        }
        self.resize_committed(&claim, &dir, current, size)?;
        Ok(ResizeOutcome::Committed)
    }

    /// Resizes the dirty image of a running volume, and the loop device of
    /// `volume attach` on it; the size is stored for the commit (origin)
    /// or at once (volatile).
    fn resize_running(
        &self,
        claim: &Claim,
        dir: &Dir,
        kind: VolumeKind,
        current: u64,
        size: u64,
        limit: &std::sync::atomic::AtomicU64,
    ) -> Result<()> {
        let vid = &claim.volume.vid;
        let n = Names::of(vid);
        let f = open_image(dir, vid, &n.dirty(), libc::O_RDWR)?;
        let st = sys::fstat(f.as_fd()).map_err(io_ctx(dir, "examining", &n.dirty()))?;
        // Only a device still on this image (its number may be
        // another disk's after a `losetup -d` by hand).
        let recorded = claim.lock().run().and_then(Run::attached);
        let attached =
            recorded.filter(|a| super::attach::loop_on(a.number, (st.st_dev, st.st_ino)));
        let block = attached.and_then(|a| sys::loop_block_size(a.number));
        if let (Some(a), Some(b)) = (attached, block) {
            if size % u64::from(b) != 0 {
                return Err(refused(
                    vid,
                    format!(
                        "it is attached as {} with {b}-byte blocks, and {size} bytes is not a multiple of {b}",
                        a.device().display()
                    ),
                ));
            }
        }
        sys::ftruncate(f.as_fd(), size).map_err(io_ctx(dir, "resizing", &n.dirty()))?;
        sys::fsync(f.as_fd()).map_err(io_ctx(dir, "syncing", &n.dirty()))?;
        log::info!(
            "{vid}: resized the running image {} from {current} to {size} bytes",
            dir.shown(&n.dirty()).display()
        );
        limit.store(size, std::sync::atomic::Ordering::SeqCst);
        // The loop device of `volume attach` reads the new size now.
        if let Some(a) = attached {
            let dev =
                std::fs::File::open(a.device()).and_then(|d| sys::loop_set_capacity(d.as_fd()));
            match dev {
                Ok(()) => log::info!("{vid}: told {} the new capacity", a.device().display()),
                Err(e) => {
                    log::error!("{vid}: LOOP_SET_CAPACITY on {}: {e}", a.device().display())
                }
            }
        }
        self.update_config(&claim.volume, |new| {
            match kind {
                VolumeKind::Volatile => new.size = size,
                // The commit makes it the volume's size; stored now for
                // recovery (see `VolumeConfig::dirty_size`).
                VolumeKind::Origin => new.dirty_size = Some(size),
                VolumeKind::Snapshot => {}
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Resizes a stopped origin volume: a copy of the image, resized,
    /// renamed into place, so a reader of the old image keeps reading the
    /// old bytes.
    fn resize_committed(&self, claim: &Claim, dir: &Dir, current: u64, size: u64) -> Result<()> {
        let vid = &claim.volume.vid;
        let n = Names::of(vid);
        let v = vid.to_string();
        let src = open_image(dir, vid, &n.img(), libc::O_RDONLY)?;
        let tmp = n.img_tmp("resize");
        let (f, _) = dir
            .copy_from(&v, &src, &dir.shown(&n.img()), &tmp, self.copy_strategy())
            .map_err(io_ctx(dir, "copying to", &tmp))?;
        failpoint::hit!("resize.copied");
        let done = sys::ftruncate(f.as_fd(), size)
            .and_then(|()| sys::fsync(f.as_fd()))
            .map_err(io_ctx(dir, "resizing", &tmp));
        done.inspect_err(|_| dir.remove_tmp(&v, &tmp))?;
        failpoint::hit!("resize.truncated");
        let writer = claim.volume.write_config();
        let mut new = (*writer.current()).clone();
        new.size = size;
        new.generation += 1;
        self.store_volume(&new)
            .inspect_err(|_| dir.remove_tmp(&v, &tmp))?;
        failpoint::hit!("resize.config");
        let renamed = {
            // The image and its generation change together for readers.
            let mut life = claim.lock();
            let renamed = dir.rename(&v, &tmp, &n.img());
            if renamed.is_ok() {
                writer.publish(&mut life, new);
            }
            renamed.map_err(io_ctx(dir, "renaming", &tmp))
        };
        if let Err(e) = renamed {
            // The image stays: so does the config that names its size (a
            // crash here is put right by recovery, from the image).
            self.store_back("resize", &writer.current());
            dir.remove_tmp(&v, &tmp);
            return Err(e);
        }
        drop(writer);
        failpoint::hit!("resize.renamed");
        dir.sync().map_err(io_ctx(dir, "syncing", ""))?;
        self.refresh_precache(&claim.volume, dir);
        log::info!("{vid}: resized from {current} to {size} bytes");
        Ok(())
    }
}
