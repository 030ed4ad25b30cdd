//! `volume attach` and `volume detach`: a loop device straight on a running
//! volume's dirty image, for block consumers (Xen's `phy:`, qemu on a
//! device), with no FUSE in the data path.
//!
//! The loop device is one more lease on the volume's run: it starts the
//! volume as a first open of `N-dirty.img` does, shares the run with the
//! mount's opens, and its detach gives the lease back, which (when it was
//! the last) commits the run as the last release does. The attachment is
//! recorded in the volume's config, so that a run attached by a process
//! that has exited (an offline CLI) is found running by the next open of
//! the pool, never committed under the loop device.

use super::config::AttachedLoop;
use super::fsops::Dir;
use super::lifecycle::{io_ctx, open_image, StopOutcome};
use super::pool::{Names, Pool};
use super::recovery::{Found, LoopMap};
use super::vid::ValidVid;
use super::volume::{Lease, Phase, Run, RunState, Volume};
use crate::error::{busy, refused};
use crate::error::{Cause, Error, Result};
use crate::sys;
use std::os::fd::AsFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a detach did: the loop device it removed, and the stop of the
/// volume (`None` while the mount still has the volume open: its last
/// close commits it).
#[derive(Debug)]
pub struct Detached {
    pub attached: AttachedLoop,
    pub stop: Option<StopOutcome>,
}

/// Whether loop device `n` still has the file `(dev, ino)`. A device being
/// torn down (the kernel no longer answers for it, but sysfs still names a
/// file) counts as still having it: the kernel has not let go yet.
pub(super) fn loop_on(n: u32, (dev, ino): (u64, u64)) -> bool {
    if sys::loop_backing_path(n).is_none() {
        return false;
    }
    match sys::loop_backing(n) {
        Ok(Some(b)) => b.dev == dev && b.ino == ino,
        Ok(None) | Err(_) => true,
    }
}

impl Pool {
    /// Puts a loop device on `vid`'s dirty image, starting the volume if it
    /// is stopped. Logical blocks of `block_size` bytes (512 or 4096),
    /// direct I/O as asked (the kernel runs buffered where the file needs
    /// a larger alignment than the blocks; the result says what it does),
    /// no autoclear. Refused when the volume is already attached, or
    /// read-only and `read_only` is false.
    pub fn attach(
        &self,
        vid: &ValidVid,
        read_only: bool,
        direct_io: bool,
        block_size: u32,
    ) -> Result<AttachedLoop> {
        if block_size != 512 && block_size != 4096 {
            return Err(Error::InvalidValue {
                property: "block size".into(),
                reason: format!("{block_size}: a loop device's blocks are 512 or 4096 bytes"),
            });
        }
        let vol = self.volume(vid)?;
        if let Some(a) = vol.snapshot().attached {
            return Err(Error::because(
                vid,
                Cause::AlreadyAttached,
                format!("it is already attached as {}", a.device().display()),
            ));
        }
        let lease = self.acquire(vid, !read_only, &|_| None)?;
        // A device of 4096-byte blocks cannot reach a last partial block.
        let size = lease.file.metadata().map(|m| m.len()).unwrap_or(0);
        if size % u64::from(block_size) != 0 {
            self.give_back(lease);
            return Err(refused(
                vid,
                format!(
                    "its size, {size} bytes, is not a multiple of {block_size}: \
                     attach it with 512-byte blocks, or resize it first"
                ),
            ));
        }
        let number = match sys::loop_attach(lease.file.as_fd(), read_only, direct_io, block_size) {
            Ok(n) => n,
            Err(e) => {
                self.give_back(lease);
                return Err(Error::io(format!("{vid}: attaching a loop device"), e));
            }
        };
        let started = vol.lock().run().and_then(|r| r.started_sig);
        let attached = AttachedLoop {
            number,
            read_only,
            direct_io: direct_io && sys::loop_direct_io(number),
            started,
        };
        // The lease becomes the loop device's, unless another attach came
        // first (then this device goes again).
        if let Err(e) = self.keep_for_loop(&vol, lease, attached) {
            let _ = sys::loop_detach(number);
            return Err(e);
        }
        self.record_attached(&vol, Some(attached))?;
        log::info!(
            "{vid}: attached as {}{}, {block_size}-byte blocks, {}",
            attached.device().display(),
            if read_only { ", read-only" } else { "" },
            match (direct_io, attached.direct_io, block_size) {
                (_, true, _) => "direct I/O",
                (true, false, 512) => {
                    "buffered I/O (direct I/O on this file needs larger blocks: --block-size 4096)"
                }
                (true, false, _) => "buffered I/O (the kernel refused direct I/O on this file)",
                (false, false, _) => "buffered I/O",
            }
        );
        vol.changed();
        Ok(attached)
    }

    /// Removes the loop device of `volume attach`, waits (up to `wait`)
    /// until the kernel has let go of the dirty image, and gives its lease
    /// back: when it was the last, the volume stops (commit or discard) as
    /// at the mount's last close. Refused while the device is in use (a
    /// mount, a VM), naming who uses it, unless `force` (a VM that crashed
    /// and left it claimed).
    pub fn detach(&self, vid: &ValidVid, force: bool, wait: Duration) -> Result<Detached> {
        let vol = self.volume(vid)?;
        let attached = vol.snapshot().attached.ok_or_else(|| {
            Error::because(
                vid,
                Cause::NotAttached,
                "it is not attached (`reflinkfs volume attach` attaches it)",
            )
        })?;
        let dev = attached.device();
        // The device must still be on this volume's image: after a
        // `losetup -d` by hand its number may already be another's disk,
        // which a detach must never touch.
        let image = self.dirty_identity(&vol)?;
        let on_ours = || loop_on(attached.number, image);
        if !on_ours() {
            log::warn!(
                "{vid}: its loop device {} is no longer on its dirty image (detached outside reflinkfs?); releasing the attachment",
                dev.display()
            );
            return self.release_attachment(vid, &vol, attached);
        }
        if !force {
            let mut users: Vec<String> = sys::processes_using(&dev)
                .into_iter()
                .map(|u| format!("{} (PID {})", u.command, u.pid))
                .collect();
            if let Ok(dir) =
                std::fs::read_dir(format!("/sys/block/loop{}/holders", attached.number))
            {
                users.extend(
                    dir.flatten()
                        .map(|h| h.file_name().to_string_lossy().into_owned()),
                );
            }
            if users.is_empty() && sys::block_claimed(&dev) {
                users.push("a mount or another exclusive user".into());
            }
            if !users.is_empty() {
                return Err(Error::because(
                    vid,
                    Cause::DeviceInUse,
                    format!(
                        "its loop device {} is in use by {}; stop that first (shut the VM down, unmount), or give --force for a VM that crashed",
                        dev.display(),
                        users.join(", ")
                    ),
                ));
            }
        }
        let cleared = sys::loop_detach_if(attached.number, image)
            .map_err(|e| Error::io(format!("{vid}: detaching {}", dev.display()), e))?;
        if !cleared {
            log::warn!(
                "{vid}: {} left its dirty image while being detached (detached outside reflinkfs?)",
                dev.display()
            );
        }
        let end = Instant::now() + wait;
        // Until the kernel has let go of the image; once it has, the
        // number may at once go to another attach (then it is not ours).
        while on_ours() {
            if Instant::now() >= end {
                return Err(busy(
                    vid,
                    format!(
                        "{} still holds its dirty image {} s after the detach: something has the device open (it is cleared at its last close)",
                        dev.display(),
                        wait.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        log::info!("{vid}: detached {}", dev.display());
        self.release_attachment(vid, &vol, attached)
    }

    /// `(st_dev, st_ino)` of the volume's running dirty image.
    fn dirty_identity(&self, vol: &Volume) -> Result<(u64, u64)> {
        let vid = &vol.vid;
        let dirty = Names::of(vid).dirty();
        let file = vol.lock().run().and_then(|r| r.file().cloned());
        let dir = self.vm_dir(vid, false)?;
        let st = match file {
            Some(f) => sys::fstat(f.as_fd()),
            None => sys::fstat(open_image(&dir, vid, &dirty, libc::O_RDONLY)?.as_fd()),
        }
        .map_err(io_ctx(&dir, "examining", &dirty))?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Gives back the lease of a loop device the kernel no longer has on
    /// the image; when it was the last, the volume stops.
    fn release_attachment(
        &self,
        vid: &ValidVid,
        vol: &Arc<Volume>,
        attached: AttachedLoop,
    ) -> Result<Detached> {
        let pending = {
            let mut life = vol.lock();
            match life.run_mut() {
                Some(run) if run.attached() == Some(attached) => {
                    if let Some(slot) = run.attached_mut() {
                        *slot = None;
                    }
                    run.leases = run.leases.saturating_sub(1);
                    run.leases == 0
                }
                _ => false,
            }
        };
        // The device is gone: the stop must follow even if the record
        // cannot be written (recovery clears a record whose device is gone).
        if let Err(e) = self.record_attached(vol, None) {
            log::error!(
                "{vid}: clearing the record of {}: {e}",
                attached.device().display()
            );
        }
        let stop = match pending {
            true => self.finish_stop(super::volume::PendingStop {
                vid: vid.clone(),
                volume: vol.clone(),
            })?,
            false => None,
        };
        Ok(Detached { attached, stop })
    }

    /// Keeps a lease for the loop device: the run counts it until detach.
    fn keep_for_loop(&self, vol: &Arc<Volume>, lease: Lease, attached: AttachedLoop) -> Result<()> {
        let Lease {
            vid,
            file,
            attachment,
            ..
        } = lease;
        drop((file, attachment));
        let mut life = vol.lock();
        let Some(run) = life.run_mut() else {
            unreachable!("a lease keeps the run")
        };
        match run.attached_mut() {
            Some(slot @ None) => {
                *slot = Some(attached);
                Ok(())
            }
            other => {
                let other = other.copied().flatten().map(|a| a.device());
                run.leases = run.leases.saturating_sub(1);
                Err(busy(
                    &vid,
                    format!(
                        "it was attached meanwhile as {}",
                        other.unwrap_or_default().display()
                    ),
                ))
            }
        }
    }

    /// Gives a lease back at once (an attach that failed), stopping the
    /// volume when it was the last.
    fn give_back(&self, lease: Lease) {
        if let Some(p) = self.release(lease) {
            if let Err(e) = self.finish_stop(p) {
                log::error!("stop after a failed attach: {e}");
            }
        }
    }

    /// Stores the attachment in the volume's config (see
    /// [`super::config::VolumeConfig::attached`]).
    fn record_attached(&self, vol: &Volume, attached: Option<AttachedLoop>) -> Result<()> {
        self.update_config(vol, |cfg| {
            cfg.attached = attached;
            Ok(())
        })
    }

    /// At recovery: the loop device on `vid`'s leftover dirty image, from
    /// its record, or found by its backing file (a `losetup` of the pool's
    /// file by hand counts too). A record whose device is gone is cleared.
    pub(crate) fn attached_loop(
        &self,
        found: &Found,
        loops: &LoopMap,
    ) -> Result<Option<AttachedLoop>> {
        let Found { vol, dir, .. } = *found;
        let vid = &vol.vid;
        let dirty = Names::of(vid).dirty();
        let Ok(f) = open_image(dir, vid, &dirty, libc::O_RDONLY) else {
            return Ok(None);
        };
        let st = sys::fstat(f.as_fd()).map_err(io_ctx(dir, "examining", &dirty))?;
        let bound_here = |n: u32| {
            sys::loop_backing(n)
                .ok()
                .flatten()
                .filter(|b| b.dev == st.st_dev && b.ino == st.st_ino)
        };
        let recorded = vol.config().attached;
        if let Some(a) = recorded {
            if bound_here(a.number).is_some() {
                return Ok(Some(a));
            }
            log::warn!(
                "{vid}: recovery: its recorded loop device {} is gone",
                a.device().display()
            );
            self.record_attached(vol, None)?;
        }
        let shown = dir.shown(&dirty).display().to_string();
        for (dev, backing) in loops.get() {
            let Some(n) = sys::loop_number(dev) else {
                continue;
            };
            if *backing != shown {
                continue;
            }
            if let Some(b) = bound_here(n) {
                log::warn!(
                    "{vid}: recovery: {} has the loop device {} on it (not made by `volume attach`): it runs on as attached",
                    shown,
                    dev.display()
                );
                let found = AttachedLoop {
                    number: n,
                    read_only: b.read_only,
                    direct_io: sys::loop_direct_io(n),
                    started: None,
                };
                self.record_attached(vol, Some(found))?;
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// At recovery: makes an attached volume's run again (the loop device
    /// holds its one lease), instead of committing or removing its dirty
    /// image under a live writer.
    pub(crate) fn resume_attached(
        &self,
        vol: &Volume,
        dir: &Dir,
        attached: AttachedLoop,
    ) -> Result<()> {
        let vid = &vol.vid;
        let dirty = Names::of(vid).dirty();
        let f = open_image(dir, vid, &dirty, libc::O_RDWR)?;
        let size = sys::fstat(f.as_fd())
            .map_err(io_ctx(dir, "examining", &dirty))?
            .st_size as u64;
        // Its normal state for a volume attached by an offline command.
        log::info!(
            "{vid}: {} is attached as {}: it runs on (`reflinkfs volume detach` stops it)",
            dir.shown(&dirty).display(),
            attached.device().display()
        );
        vol.lock().phase = Phase::Running(Box::new(Run {
            leases: 1,
            // Unknown for a device found by its backing file: the detach
            // then commits whatever is there.
            started_sig: attached.started,
            started_from: None,
            limit: Arc::new(AtomicU64::new(vol.config().dirty_contract().max(size))),
            state: RunState::Live {
                file: Arc::new(f),
                attachment: None,
                attached: Some(attached),
            },
        }));
        Ok(())
    }
}
