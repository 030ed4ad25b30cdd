//! The committer threads: the stops the last releases ask for run here,
//! so that ten VMs shutting down at once never take a FUSE worker.
//!
//! A run that was not modified lingers a moment before its stop: qemu (and
//! a hypervisor's block script) opens an image several times as it starts,
//! first to probe it, and a stop between those opens would make and throw
//! away a snapshot each time. An open within the linger takes the same
//! run; a modified run stops at once.

use super::*;
use crate::engine::guard;

/// Threads that run the stops the last releases ask for, so that ten VMs
/// shutting down at once never take a FUSE worker.
pub(super) struct Committer {
    tx: Mutex<Option<std::sync::mpsc::Sender<PendingStop>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Stops that wait for their linger to end, and the timer that queues
    /// them then.
    later: Arc<Later>,
}

/// How long an unmodified run lingers after its last close.
pub const LINGER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Later {
    due: Mutex<LaterState>,
    wake: parking_lot::Condvar,
}

#[derive(Default)]
struct LaterState {
    stops: Vec<(std::time::Instant, PendingStop)>,
    closed: bool,
}

impl Committer {
    pub(super) fn new(pool: Arc<Pool>, n: usize) -> Committer {
        let (tx, rx) = std::sync::mpsc::channel::<PendingStop>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let (pool, rx) = (pool.clone(), rx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("commit-{i}"))
                .spawn(move || {
                    // A commit's fsync writes a VM's data back: it yields the
                    // CPU to the threads that answer the other VMs' requests.
                    sys::lower_thread_priority(10);
                    Self::commit_loop(&pool, &rx)
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => log::error!("cannot start a committer thread: {e}"),
            }
        }
        let later = Arc::new(Later::default());
        let (l, t) = (later.clone(), tx.clone());
        let timer = std::thread::Builder::new()
            .name("linger".into())
            .spawn(move || guard::keep_running("the linger timer", || Self::linger_loop(&l, &t)));
        match timer {
            Ok(h) => threads.push(h),
            Err(e) => log::error!("cannot start the linger thread: {e}"),
        }
        Committer {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            later,
        }
    }

    /// The linger timer: queues each stop when its linger ends (all of
    /// them at once when the committer is drained).
    fn linger_loop(later: &Later, tx: &std::sync::mpsc::Sender<PendingStop>) {
        let mut st = later.due.lock();
        loop {
            let now = std::time::Instant::now();
            let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut st.stops)
                .into_iter()
                .partition(|(at, _)| *at <= now || st.closed);
            st.stops = waiting;
            for (_, p) in due {
                let _ = tx.send(p);
            }
            if st.closed {
                return;
            }
            match st.stops.iter().map(|(at, _)| *at).min() {
                Some(next) => {
                    later.wake.wait_until(&mut st, next);
                }
                None => later.wake.wait(&mut st),
            }
        }
    }

    /// Queues a stop to run once the run has lingered (`LINGER`) unused.
    pub(super) fn submit_later(&self, pool: &Pool, p: PendingStop) {
        let mut st = self.later.due.lock();
        if st.closed {
            drop(st);
            return self.submit(pool, p);
        }
        st.stops.push((std::time::Instant::now() + LINGER, p));
        self.later.wake.notify_all();
    }

    /// A committer thread: runs the queued stops until the queue closes.
    /// A stop that panics is logged and counted, and the thread goes on
    /// with the next: the volume's own guard put it back (its run held,
    /// for the held retry; see `engine/phase.rs`); a panic before the stop began
    /// leaves the run running, stopped by its next last close or unmount.
    fn commit_loop(pool: &Pool, rx: &Mutex<std::sync::mpsc::Receiver<PendingStop>>) {
        loop {
            let next = rx.lock().recv();
            let Ok(p) = next else { return };
            let vid = p.vid.clone();
            guard::catch(&format!("{vid}: the stop at its last close"), || {
                Self::run_stop(pool, p)
            });
        }
    }

    /// Runs one queued stop, saying what it did.
    fn run_stop(pool: &Pool, p: PendingStop) {
        let vid = p.vid.clone();
        crate::engine::failpoint::panic_if!("committer", vid.to_string());
        match pool.finish_stop(p) {
            Ok(None) => log::debug!("{vid}: opened again before its stop; it runs on"),
            // The engine said at WARN what holds it; the daemon commits
            // it once that lets go (`retry_held`).
            Ok(Some(StopOutcome::Held { .. })) => {}
            Ok(Some(outcome)) => log::info!("{vid}: last close: {outcome:?}"),
            Err(e) => log::error!("{vid}: stop at the last close failed: {e}; the dirty image is kept and will be committed at the next start or pool open"),
        }
    }

    /// Queues a stop; without committer threads (after shutdown) runs it
    /// here.
    pub(super) fn submit(&self, pool: &Pool, p: PendingStop) {
        let p = match &*self.tx.lock() {
            Some(tx) => match tx.send(p) {
                Ok(()) => return,
                Err(std::sync::mpsc::SendError(p)) => p,
            },
            None => p,
        };
        if let Err(e) = pool.finish_stop(p) {
            log::error!("stop at the last close failed: {e}");
        }
    }

    /// Lets the queued stops (lingering ones at once) finish and ends the
    /// threads.
    pub(super) fn drain(&self) {
        self.later.due.lock().closed = true;
        self.later.wake.notify_all();
        drop(self.tx.lock().take());
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}
