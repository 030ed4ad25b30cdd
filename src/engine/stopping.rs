//! When a run ends: whether it may linger for a next open (qemu's probe
//! opens), ending a linger early, and waiting for a run's commit (what
//! qubesd's `stop()` needs).

use super::fsops::FileSig;
use super::lifecycle::held_reason;
use super::pool::Pool;
use super::vid::ValidVid;
use super::volume::{PendingStop, Phase};
use crate::error::{Cause, Error, Result};
use crate::sys;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

impl Pool {
    /// Whether the run a last release gave back was not modified since its
    /// start (its dirty image as the start made it): such a run may linger
    /// for a next open (qemu's probe opens) before its stop.
    pub fn unmodified(&self, p: &PendingStop) -> bool {
        let life = p.volume.lock();
        let Some(run) = life.run() else { return false };
        match (run.file(), run.started_sig, run.leases) {
            (Some(f), Some(started), 0) => sys::fstat(f.as_fd())
                .is_ok_and(|st| FileSig::from_stat(&st).unchanged_since(&started)),
            _ => false,
        }
    }

    /// Ends the linger of an unmodified run nobody uses: an explicit stop,
    /// or an operation that needs the volume stopped, does not wait for
    /// the timer.
    pub(crate) fn end_linger(&self, vid: &ValidVid) -> Result<()> {
        let vol = self.volume(vid)?;
        let idle = vol.snapshot();
        if idle.running && idle.leases == 0 && idle.held.is_none() && idle.state == "running" {
            // As a last release's stop: nothing happens if an open came
            // meanwhile.
            self.finish_stop(PendingStop {
                vid: vid.clone(),
                volume: vol,
            })?;
        }
        Ok(())
    }

    /// Volumes whose run is held by a writer outside reflinkfs.
    /// Waits until `vid`'s run is over: committed (durably) or discarded.
    /// At once for a volume that is not running (qubesd asks after every
    /// VM stop, and for every halted VM when it starts). A run still open
    /// at `timeout` (its VM's loop device not detached), or held (written
    /// outside reflinkfs), is an error that says which.
    pub fn wait_stopped(&self, vid: &ValidVid, timeout: Duration) -> Result<()> {
        let vol = self.volume(vid)?;
        let deadline = Instant::now() + timeout;
        let mut life = vol.lock();
        loop {
            match &life.phase {
                Phase::Stopped => return Ok(()),
                Phase::Removed => return Err(Error::NoSuchVolume(vid.to_string())),
                Phase::Running(run) => {
                    if let Some(holders) = run.held() {
                        return Err(Error::because(vid, Cause::Held, held_reason(holders)));
                    }
                    // Its last lease went meanwhile: a lingering run stops
                    // now rather than when its linger ends.
                    if run.leases == 0 && life.op.is_none() {
                        drop(life);
                        self.finish_stop(PendingStop {
                            vid: vid.clone(),
                            volume: vol.clone(),
                        })?;
                        life = vol.lock();
                        continue;
                    }
                }
                Phase::Starting | Phase::Committing => {}
            }
            if vol.wait_until(&mut life, deadline) {
                let open = life.run().map_or(0, |r| r.leases);
                return Err(Error::because(
                    vid,
                    Cause::TimedOut,
                    format!(
                        "still {} after {} s, with {open} open file(s) on its -dirty.img",
                        life.state_name(),
                        timeout.as_secs_f64()
                    ),
                ));
            }
        }
    }
}
