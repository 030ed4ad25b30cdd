//! The waiting pool: the requests that may wait on a volume (an open
//! whose start or commit is ahead, a truncate, an unlink of a revision, a
//! rename that reverts) run here, never on a FUSE worker.
//!
//! Threads started as needed, each serving one volume at a time: a
//! volume's waiting requests run one after the other on one thread, so one
//! held volume takes one thread however many requests wait on it, and a
//! volume with a request and no thread on it gets a new thread when none
//! is idle ([`MAX_THREADS`] at most): volumes that wait long (an import
//! waiting for its input, a copy-mode start) do not make the others wait
//! for a turn. [`IDLE_KEPT`] idle threads stay; more end. Volumes take
//! turns request by request. The queue is bounded ([`PER_VOLUME`]
//! requests of one volume, [`QUEUED`] in all): past that a request is
//! answered EBUSY at once, as a busy volume's open is.

use super::*;
use parking_lot::Condvar;
use std::collections::{HashSet, VecDeque};

/// Threads of the pool at most: as many volumes can wait at once without
/// one waiting for another's turn.
pub const MAX_THREADS: usize = 256;
/// Idle threads kept for the next requests; more end.
pub const IDLE_KEPT: usize = 8;
/// Requests that may queue on one volume.
pub const PER_VOLUME: usize = 64;
/// Requests that may queue in all.
pub const QUEUED: usize = 1024;

/// A request for the pool: called once, with `Ok` on a pool thread, or
/// with the errno to answer on the caller's (a full queue, a pool that
/// is closed).
pub type Job = Box<dyn FnOnce(Result<(), Errno>) + Send>;

pub(super) struct Waiters {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Requests not started yet, by volume, in arrival order.
    queues: HashMap<ValidVid, VecDeque<Job>>,
    /// Volumes with requests and no thread on them, in turn.
    ready: VecDeque<ValidVid>,
    /// Volumes a thread serves a request of now.
    serving: HashSet<ValidVid>,
    queued: usize,
    threads: usize,
    idle: usize,
    /// Threads started that have not taken the lock yet: they will take
    /// a ready volume as an idle one would.
    starting: usize,
    /// Requests running now (see [`Waiters::close`]).
    running: usize,
    closed: bool,
}

impl Waiters {
    pub(super) fn new() -> Waiters {
        Waiters {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
            }),
        }
    }

    /// Queues `job` behind `vid`'s other waiting requests.
    pub(super) fn submit(&self, vid: ValidVid, job: Job) {
        let mut st = self.shared.state.lock();
        let full = match st.queues.get(&vid) {
            _ if st.closed => Some(libc::EIO),
            Some(q) if q.len() >= PER_VOLUME => Some(libc::EBUSY),
            _ if st.queued >= QUEUED => Some(libc::EBUSY),
            _ => None,
        };
        if let Some(errno) = full {
            drop(st);
            let why = match errno {
                libc::EBUSY => "too many requests wait already",
                _ => "the mount is going away",
            };
            return job(Err(fail(
                errno,
                format_args!("{vid}: a request that must wait was refused: {why}"),
            )));
        }
        let q = st.queues.entry(vid.clone()).or_default();
        q.push_back(job);
        let first = q.len() == 1;
        st.queued += 1;
        if first && !st.serving.contains(&vid) {
            st.ready.push_back(vid);
        }
        let spawn = st.ready.len() > st.idle + st.starting && st.threads < MAX_THREADS;
        if !spawn {
            drop(st);
            self.shared.wake.notify_one();
            return;
        }
        // The thread's place is taken now, and it is started without the
        // lock, which every request that waits takes.
        st.threads += 1;
        st.starting += 1;
        drop(st);
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("wait".into())
            .spawn(move || {
                // A start may copy a whole image: it yields the CPU to the
                // threads answering requests.
                sys::lower_thread_priority(10);
                shared.serve();
            });
        if let Err(e) = spawned {
            log::error!("cannot start a waiting thread: {e}");
            let mut st = self.shared.state.lock();
            st.threads -= 1;
            st.starting -= 1;
            if st.threads == 0 {
                // Nothing would ever run them: answered EIO.
                let jobs: Vec<Job> = st.queues.drain().flat_map(|(_, q)| q).collect();
                st.ready.clear();
                st.queued = 0;
                drop(st);
                for j in jobs {
                    j(Err(libc::EIO));
                }
                return;
            }
        }
        self.shared.wake.notify_one();
    }

    /// At the end of the session: the requests still queued are answered
    /// EIO, later ones too, and this returns once the running ones are
    /// done (they are bounded: each waits for a start, a commit or a
    /// bounded operation).
    pub(super) fn close(&self) {
        let jobs: Vec<Job> = {
            let mut st = self.shared.state.lock();
            st.closed = true;
            st.ready.clear();
            st.queued = 0;
            st.queues.drain().flat_map(|(_, q)| q).collect()
        };
        for j in jobs {
            j(Err(libc::EIO));
        }
        self.shared.wake.notify_all();
        let mut st = self.shared.state.lock();
        while st.running > 0 {
            self.shared.wake.wait(&mut st);
        }
    }
}

impl Drop for Waiters {
    fn drop(&mut self) {
        self.shared.state.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

impl Shared {
    /// A pool thread: takes the volume whose turn it is, runs its next
    /// request, and puts it back in line if more wait on it.
    fn serve(&self) {
        let mut st = self.state.lock();
        st.starting -= 1;
        loop {
            let Some(vid) = st.ready.pop_front() else {
                if st.closed || st.idle >= IDLE_KEPT {
                    st.threads -= 1;
                    return;
                }
                st.idle += 1;
                self.wake.wait(&mut st);
                st.idle -= 1;
                continue;
            };
            let Some(job) = st.queues.get_mut(&vid).and_then(VecDeque::pop_front) else {
                continue;
            };
            st.queued -= 1;
            st.running += 1;
            st.serving.insert(vid.clone());
            drop(st);
            // The job answers its own request (a panic in it fails that
            // request alone); the thread serves on whatever happens.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Ok(()))));
            st = self.state.lock();
            st.running -= 1;
            st.serving.remove(&vid);
            match st.queues.get(&vid).map(VecDeque::is_empty) {
                Some(false) => st.ready.push_back(vid),
                Some(true) => drop(st.queues.remove(&vid)),
                None => {}
            }
            // `close` waits for the running ones.
            self.wake.notify_all();
        }
    }
}
