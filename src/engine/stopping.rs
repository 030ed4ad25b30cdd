//! When a run ends: whether it may linger for a next open (qemu's probe
//! opens), ending a linger early, and waiting for a run's commit (what
//! qubesd's `stop()` needs), and what holds a dirty image open for
//! writing outside reflinkfs (a held run).

use super::fsops::Dir;
use super::fsops::FileSig;
use super::pool::{Names, Pool};
use super::vid::ValidVid;
use super::volume::{HeldBy, LifeState, PendingStop, Phase};
use crate::error::{Cause, Error, Result};
use crate::sys;
use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// How often, and how long apart, a stop looks again before it calls a
/// dirty image held: the kernel lets go of a closed passthrough file a
/// moment after the RELEASE that tells the daemon of the close.
const HOLD_PROBES: u32 = 5;
const HOLD_PROBE_GAP: Duration = Duration::from_millis(10);

/// Why a held volume cannot start or be changed.
pub(crate) fn held_reason(by: &HeldBy) -> String {
    match by {
        HeldBy::Writers(holders) => format!("its last run is not committed yet: its dirty image is still open for writing by {holders}; detach or close that first"),
        HeldBy::InterruptedStop { .. } => "its last run is not committed yet: its stop was interrupted by an internal error (see the daemon's log); the daemon retries the stop every second".into(),
    }
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
        if idle.running
            && idle.leases == 0
            && idle.held.is_none()
            && idle.state == LifeState::Running
        {
            // As a last release's stop: nothing happens if an open came
            // meanwhile.
            self.finish_stop(PendingStop {
                vid: vid.clone(),
                volume: vol,
            })?;
        }
        Ok(())
    }

    /// Waits until `vid`'s run is over: committed (durably) or discarded.
    /// At once for a volume that is not running (qubesd asks after every
    /// VM stop, and for every halted VM when it starts). A run still open
    /// at `timeout` (its VM's loop device not detached), or held by a
    /// writer outside reflinkfs (at once), is an error that says which. A
    /// run held because its stop was interrupted is waited for: the
    /// daemon's held retry commits it.
    pub fn wait_stopped(&self, vid: &ValidVid, timeout: Duration) -> Result<()> {
        let vol = self.volume(vid)?;
        let deadline = Instant::now() + timeout;
        let mut life = vol.lock();
        loop {
            match &life.phase {
                Phase::Stopped => return Ok(()),
                Phase::Removed => return Err(Error::NoSuchVolume(vid.to_string())),
                Phase::Running(run) => {
                    match run.held() {
                        // Only its writer can end it: no use waiting.
                        Some(by @ HeldBy::Writers(_)) => {
                            return Err(Error::because(vid, Cause::Held, held_reason(by)));
                        }
                        // The daemon's held retry commits it: waited for.
                        Some(HeldBy::InterruptedStop { .. }) => {}
                        // Its last lease went meanwhile: a lingering run
                        // stops now rather than when its linger ends.
                        None if run.leases == 0 && life.op.is_none() => {
                            drop(life);
                            self.finish_stop(PendingStop {
                                vid: vid.clone(),
                                volume: vol.clone(),
                            })?;
                            life = vol.lock();
                            continue;
                        }
                        None => {}
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

    /// What holds a dirty image open for writing outside reflinkfs, if
    /// anything does. Looks a few times, a few milliseconds apart: the
    /// kernel drops a closed passthrough file just after it tells the
    /// daemon of the close.
    pub(super) fn outside_writers(
        &self,
        vid: &ValidVid,
        dir: &Dir,
        dirty: &File,
    ) -> Option<String> {
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
}
