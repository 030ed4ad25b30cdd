//! The guard of a volume's transient phases (Starting, Committing): a
//! panic in their work puts the volume back instead of leaving it there.

use super::pool::{Names, Pool};
use super::volume::{Phase, Volume};
use std::cell::Cell;
use std::sync::Arc;

/// Puts a volume back when the work of a transient phase (Starting,
/// Committing) unwinds (a panic), instead of leaving it in that phase
/// until the daemon restarts: every waiter would wait for ever.
///
/// - Starting: back to Stopped; `N-dirty.img~tmp` goes, and so does
///   `N-dirty.img` when this start made it as a copy (`made_copy`: no
///   lease was handed out, so nothing wrote it). The committed image
///   itself (revisions_to_keep=-1) or a leftover is never removed: the
///   next start commits it, as after a failed stop.
/// - Committing: back to Stopped with the dirty image kept whatever the
///   commit had done: the next start (or pool open) commits it, as after
///   a stop that failed.
pub(super) struct PhaseGuard<'a> {
    pool: &'a Pool,
    vol: &'a Arc<Volume>,
    phase: Phase,
    pub made_copy: Cell<bool>,
    armed: bool,
}

impl<'a> PhaseGuard<'a> {
    pub fn new(pool: &'a Pool, vol: &'a Arc<Volume>, phase: Phase) -> Self {
        PhaseGuard {
            pool,
            vol,
            phase,
            made_copy: Cell::new(false),
            armed: true,
        }
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

impl Drop for PhaseGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let vid = &self.vol.vid;
        match self.phase {
            Phase::Starting => {
                log::error!("{vid}: its start panicked; it is stopped again");
                self.remove_half_made_start();
            }
            _ => log::error!(
                "{vid}: its stop panicked; it is stopped, and its dirty image is kept and committed at its next start or pool open"
            ),
        }
        self.pool.table.set_held(vid, false);
        self.vol.lock().phase = Phase::Stopped;
        // A hook that panics now would abort the process.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.vol.changed()));
        self.vol.notify();
    }
}
