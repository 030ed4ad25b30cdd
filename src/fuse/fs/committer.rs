//! The committer threads: the stops the last releases ask for run here,
//! so that ten VMs shutting down at once never take a FUSE worker.

use super::*;

/// Threads that run the stops the last releases ask for, so that ten VMs
/// shutting down at once never take a FUSE worker.
pub(super) struct Committer {
    tx: Mutex<Option<std::sync::mpsc::Sender<PendingStop>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
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
        Committer {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        }
    }

    /// A committer thread: runs the queued stops until the queue closes.
    fn commit_loop(pool: &Pool, rx: &Mutex<std::sync::mpsc::Receiver<PendingStop>>) {
        loop {
            let next = rx.lock().recv();
            let Ok(p) = next else { return };
            let vid = p.vid.clone();
            match pool.finish_stop(p) {
                Ok(None) => log::debug!("{vid}: opened again before its stop; it runs on"),
                // The engine said at WARN what holds it; the daemon commits
                // it once that lets go (`retry_held`).
                Ok(Some(StopOutcome::Held { .. })) => {}
                Ok(Some(outcome)) => log::info!("{vid}: last close: {outcome:?}"),
                Err(e) => log::error!("{vid}: stop at the last close failed: {e}; the dirty image is kept and will be committed at the next start or pool open"),
            }
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

    /// Lets the queued stops finish and ends the threads.
    pub(super) fn drain(&self) {
        drop(self.tx.lock().take());
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}
