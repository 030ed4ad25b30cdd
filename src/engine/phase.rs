//! The guard of a volume's transient phases (Starting, Committing): a
//! panic in their work puts the volume back instead of leaving it there.

use super::fsops::{Entry, FileSig};
use super::pool::{Names, Pool};
use super::vid::ValidVid;
use super::volume::{HeldBy, Phase, Run, Volume};
use std::cell::Cell;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// How many stops of one run may panic in a row before the volume is
/// put back to stopped rather than held (so a stop that panics every time
/// does not keep the daemon from exiting): its dirty image is then
/// committed at the next start or pool open.
const INTERRUPTED_STOPS: u32 = 3;

/// What a stop that panics needs to put its run back, held.
pub(super) struct StopParts {
    pub started_sig: Option<FileSig>,
    pub started_from: Option<(ValidVid, u64)>,
    pub limit: Arc<AtomicU64>,
    /// The stops of this run that panicked before this one.
    pub tries: u32,
}

/// Puts a volume back when the work of a transient phase (Starting,
/// Committing) unwinds (a panic), instead of leaving it in that phase
/// until the daemon restarts: every waiter would wait for ever.
///
/// - Starting: back to Stopped; `N-dirty.img~tmp` goes, and so does
///   `N-dirty.img` when this start made it as a copy (`made_copy`: no
///   lease was handed out, so nothing wrote it). The committed image
///   itself (revisions_to_keep=-1) or a leftover is never removed: the
///   next start commits it, as after a failed stop.
/// - Committing, with the dirty image still there: back to its run, held
///   ([`HeldBy::InterruptedStop`]): nothing waiting for the stop hears
///   "stopped" before the run is committed, and the daemon's held retry
///   commits it. After [`INTERRUPTED_STOPS`] in a row, back to Stopped,
///   and the next start (or pool open) commits it, as after a stop that
///   failed.
/// - Committing, with the dirty image gone: the commit (or the discard)
///   was done before the panic: back to Stopped. What a commit's prune
///   left is finished at the next pool open.
pub(super) struct PhaseGuard<'a> {
    pool: &'a Pool,
    vol: &'a Arc<Volume>,
    phase: Phase,
    stop: Option<StopParts>,
    pub made_copy: Cell<bool>,
    armed: bool,
}

impl<'a> PhaseGuard<'a> {
    /// The guard of a start's work.
    pub fn starting(pool: &'a Pool, vol: &'a Arc<Volume>) -> Self {
        PhaseGuard {
            pool,
            vol,
            phase: Phase::Starting,
            stop: None,
            made_copy: Cell::new(false),
            armed: true,
        }
    }

    /// The guard of a stop's work, with what puts its run back.
    pub fn committing(pool: &'a Pool, vol: &'a Arc<Volume>, parts: StopParts) -> Self {
        let mut guard = PhaseGuard::starting(pool, vol);
        guard.phase = Phase::Committing;
        guard.stop = Some(parts);
        guard
    }

    /// The work came back (done or failed): its caller sets the phase.
    pub fn disarm(mut self) {
        self.armed = false;
    }

    /// Removes what a start that unwound made, never failing.
    fn remove_half_made_start(&self) {
        let vid = &self.vol.vid;
        let Ok(dir) = self.pool.vm_dir(vid, false) else {
            return;
        };
        let n = Names::of(vid);
        let mut doomed = vec![n.dirty_tmp()];
        if self.made_copy.get() {
            doomed.push(n.dirty());
        }
        for name in doomed {
            match dir.remove_if_exists(&vid.to_string(), &name) {
                Ok(true) => log::warn!("{vid}: removed {}", dir.shown(&name).display()),
                Ok(false) => {}
                Err(e) => log::error!("{vid}: removing {}: {e}", dir.shown(&name).display()),
            }
        }
        let _ = dir.sync();
    }
}

impl PhaseGuard<'_> {
    /// The phase a stop that unwound leaves: its run, held, while the
    /// dirty image is there and the stops that panicked in a row are few.
    fn after_panicked_stop(&mut self) -> Phase {
        let vid = &self.vol.vid;
        let dirty = Names::of(vid).dirty();
        let left = match self.pool.vm_dir(vid, false).map(|d| d.entry(&dirty)) {
            Ok(Ok(Entry::Missing)) => false,
            // Unknown, or there: kept and retried.
            _ => true,
        };
        let parts = self.stop.take();
        match parts {
            Some(p) if left && p.tries + 1 < INTERRUPTED_STOPS => {
                log::error!(
                    "{vid}: its stop panicked; its dirty image is kept, and the daemon retries the stop every second (the volume cannot start until then)"
                );
                let by = HeldBy::InterruptedStop { tries: p.tries + 1 };
                Run::held_over(p.started_sig, p.started_from, p.limit, by)
            }
            _ => {
                match left {
                    true => log::error!(
                        "{vid}: its stop panicked {INTERRUPTED_STOPS} times in a row; it is stopped, and its dirty image is kept and committed at its next start or pool open"
                    ),
                    false => log::error!(
                        "{vid}: its stop panicked after its dirty image was committed or dropped; it is stopped"
                    ),
                }
                Phase::Stopped
            }
        }
    }
}

impl Drop for PhaseGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let vid = &self.vol.vid;
        let phase = match self.phase {
            Phase::Starting => {
                log::error!("{vid}: its start panicked; it is stopped again");
                self.remove_half_made_start();
                Phase::Stopped
            }
            _ => self.after_panicked_stop(),
        };
        self.pool.table.set_phase(vid, &mut self.vol.lock(), phase);
        // A hook that panics now would abort the process.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.vol.changed()));
        self.vol.notify();
    }
}
