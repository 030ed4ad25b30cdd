//! The filesystem logic of the mount (SPEC §6). It never touches fuser's
//! reply objects: every operation returns a value or an errno, and the
//! adapter (`mod.rs`) translates.
//!
//! A volume's lifecycle lives in the engine: an open of `N-dirty.img`
//! takes a [`Lease`], which starts the volume the first time, and its
//! release gives it back; the stop the last one asks for runs on the
//! committer threads, never on a FUSE worker. A request that would have to
//! wait (an open during a start or a commit; a truncate, an unlink or a
//! rename, which claim the volume and copy or fsync) returns
//! [`TryError::WouldWait`], and the adapter does it again on the waiting
//! pool ([`ReflinkFs::defer`], `waiters.rs`).
//!
//! Generic over `B`, the passthrough registration ([`crate::fuse::Backing`]
//! on a real mount), so that the open, release and commit paths can be tested
//! without a kernel (see the tests below).

mod changes;
mod committer;
mod errno;
mod handles;
mod invalidate;
#[cfg(test)]
mod tests;
mod tree;
mod waiters;

use self::committer::Committer;
use self::errno::{errno_of, io_errno, start_errno};
pub use self::errno::{fail, level_of, refuse};
use self::handles::Handle;
pub use self::handles::{Opened, TryError};
use self::invalidate::Notice;
pub use self::invalidate::{in_request, Invalidate};
use self::waiters::Waiters;
pub use self::waiters::{Job, IDLE_KEPT, MAX_THREADS, PER_VOLUME, QUEUED};
use super::inodes::{Inodes, Node};
use crate::engine::fsops::FileSig;
use crate::engine::view::VolumeView;
use crate::engine::{guard, Attachment, Lease, PendingStop, Pool, StopOutcome, ValidVid};
use crate::error::Error;
use crate::sys;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub type Errno = i32;
pub type FsResult<T> = Result<T, Errno>;

/// The kind of a node, for attributes and directory entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// Attributes of a node, independent of fuser's types.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub blocks: u64,
    pub perm: u16,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Whether the kernel may cache these attributes (until told that they
    /// changed): all but a running dirty image's, which its writes change.
    pub cacheable: bool,
}

/// Mount options that change behaviour.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Use kernel passthrough when the kernel offers it.
    pub passthrough: bool,
    /// Threads that run the stops (commits) of volumes.
    pub committers: usize,
}

/// Request counters, readable as xattrs of the mount's root. They prove
/// that passthrough I/O never reaches the daemon.
#[derive(Debug, Default)]
pub struct Stats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// GETXATTR requests: the kernel's security.capability checks on the
    /// write path would show up here.
    pub getxattrs: AtomicU64,
    /// Requests that panicked (answered EIO).
    pub panics: AtomicU64,
}

pub struct ReflinkFs<B: Send + Sync + 'static = crate::fuse::Backing> {
    pool: Arc<Pool>,
    opts: FsOptions,
    /// Whether the kernel granted passthrough (decided at INIT).
    passthrough: AtomicBool,
    inodes: Mutex<Inodes>,
    /// Backing registrations of committed images and revisions, by inode,
    /// shared by the opens of one inode (the kernel allows one per inode).
    ro_backing: Mutex<HashMap<u64, Weak<B>>>,
    handles: Mutex<HashMap<u64, Handle<B>>>,
    next_fh: AtomicU64,
    committer: Committer,
    /// The threads that run the requests that may wait on a volume.
    waiters: Waiters,
    /// Where invalidations go, once the daemon has a session.
    invalidator: std::sync::OnceLock<Box<dyn Invalidate>>,
    /// Invalidations made inside requests, for the notifier thread.
    notices: Mutex<Option<std::sync::mpsc::Sender<Notice>>>,
    pub stats: Stats,
    started: SystemTime,
    /// Set when the FUSE session ends: from then on the daemon only waits
    /// for its held volumes (see [`ReflinkFs::wait_held`]).
    ended: AtomicBool,
    /// Set once the unmount's grace period is over with volumes still held:
    /// the daemon waits for them.
    waiting: AtomicBool,
    /// Taken by whoever retries the held volumes, so that two never stop
    /// the same one at once.
    retrying: Mutex<()>,
}

impl<B: Send + Sync + 'static> ReflinkFs<B> {
    pub fn new(pool: Arc<Pool>, opts: FsOptions) -> ReflinkFs<B> {
        let committer = Committer::new(pool.clone(), opts.committers);
        ReflinkFs {
            pool,
            opts,
            passthrough: AtomicBool::new(false),
            inodes: Mutex::new(Inodes::default()),
            ro_backing: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            committer,
            waiters: Waiters::new(),
            invalidator: std::sync::OnceLock::new(),
            notices: Mutex::new(None),
            stats: Stats::default(),
            started: SystemTime::now(),
            ended: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            retrying: Mutex::new(()),
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn wants_passthrough(&self) -> bool {
        self.opts.passthrough
    }

    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::SeqCst);
    }

    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::SeqCst)
    }

    pub fn io_mode(&self) -> crate::engine::view::IoMode {
        use crate::engine::view::IoMode;
        if self.passthrough() {
            IoMode::Passthrough
        } else {
            IoMode::Daemon
        }
    }

    /// Running volumes with their number of open files (leases).
    pub fn open_handles(&self) -> Vec<(ValidVid, usize)> {
        self.pool.activity().open
    }

    /// The volumes open on the mount itself, with their open files: the
    /// lease of a loop device of `volume attach` does not count (that
    /// device is not on the mount, and an unmount leaves it be).
    pub fn open_on_mount(&self) -> Vec<(ValidVid, usize)> {
        let activity = self.pool.activity();
        activity
            .open
            .into_iter()
            .map(|(vid, n)| {
                let loops = activity.attached.iter().filter(|(a, _)| *a == vid).count();
                (vid, n.saturating_sub(loops))
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Volumes attached to loop devices (`volume attach`).
    pub fn attached(&self) -> Vec<(ValidVid, crate::engine::AttachedLoop)> {
        self.pool.activity().attached
    }

    /// Volumes a start, commit, hold or operation is in progress on.
    pub fn busy_volumes(&self) -> Vec<(ValidVid, crate::engine::LifeState)> {
        self.pool.activity().busy
    }

    /// How many volumes have their `N-dirty.img` open.
    pub fn open_volumes(&self) -> usize {
        self.open_handles().len()
    }

    /// How many inodes the table holds (an xattr of the root, for tests
    /// that FORGET bounds it).
    pub fn inode_count(&self) -> usize {
        self.inodes.lock().len()
    }

    pub(super) fn node(&self, ino: u64) -> FsResult<Node> {
        self.inodes.lock().node(ino).ok_or(libc::ENOENT)
    }

    pub(super) fn ino_of(&self, node: &Node) -> u64 {
        self.inodes.lock().ino_of(node)
    }

    pub(super) fn revisions(&self, vid: &ValidVid) -> FsResult<Vec<crate::engine::Revision>> {
        self.pool
            .revisions(vid)
            .map_err(|e| errno_of("revisions", &e))
    }

    pub(super) fn view(&self, vid: &ValidVid) -> FsResult<VolumeView> {
        self.pool.volume_view(vid).map_err(|e| errno_of("view", &e))
    }

    /// Commits the volumes whose stop found their dirty image still open
    /// for writing outside reflinkfs, once that has let go. The daemon
    /// calls it every second, and [`ReflinkFs::wait_held`] after the
    /// session; one caller at a time does the work.
    pub fn retry_held(&self) {
        let Some(_one) = self.retrying.try_lock() else {
            return;
        };
        for vid in self.pool.held_vids() {
            // One volume's stop that panics (its run stays held, or is
            // stopped after a few) does not keep the others waiting.
            let Some(stopped) = guard::catch(&format!("{vid}: the retry of its held stop"), || {
                self.pool.stop(&vid)
            }) else {
                continue;
            };
            match stopped {
                Ok(StopOutcome::Held { .. }) => {}
                Ok(outcome) => log::info!("{vid}: its held run is over: {outcome:?}"),
                Err(e) => log::error!("{vid}: the retry of its held stop failed: {e}; the dirty image is kept and will be committed at the next start or pool open"),
            }
        }
    }

    /// Runs `job` on the waiting pool, after the other waiting requests of
    /// `vid` (see `waiters.rs`); or calls it at once with the errno to
    /// answer (EBUSY: the queue is full; EIO: the session has ended).
    pub fn defer(&self, vid: ValidVid, job: Job) {
        self.waiters.submit(vid, job);
    }

    /// Whether the FUSE session has ended (the mount is gone): the daemon
    /// then only waits for its held volumes.
    pub fn session_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Commits every volume still open when the session ends (the kernel
    /// may drop RELEASE requests of an unmounted connection), so the daemon
    /// never exits with data only in a dirty image. The queued stops go
    /// first. A volume whose dirty image something outside reflinkfs still
    /// writes is held, and [`ReflinkFs::wait_held`] commits it later.
    /// Only the first call does anything (fuser's `destroy`, or the daemon
    /// when the session ended without it).
    pub fn shutdown(&self) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        // Before the committers go: a running open may wait for a commit.
        self.waiters.close();
        self.committer.drain();
        // Their passthrough registrations go with them (and with the runs
        // the stops below end), so the kernel keeps no descriptor of the
        // daemon's that the commits would take for an outside writer.
        self.handles.lock().clear();
        let activity = self.pool.activity();
        // One grace period for all: N volumes held by writers that outlive
        // the mount must not make the unmount wait N times.
        let end = Instant::now() + Duration::from_secs(2);
        // A stop that panics (a bug) fails alone: the other volumes are
        // still stopped, and the daemon goes on to exit cleanly.
        let stop = |vid: &ValidVid| {
            let left = end.saturating_duration_since(Instant::now());
            let Some(stopped) = guard::catch(&format!("{vid}: its stop at unmount"), || {
                self.pool.stop_within(vid, left)
            }) else {
                return;
            };
            match stopped {
                // `wait_held` says what holds it, and commits it later.
                Ok(StopOutcome::Held { .. }) => {}
                Ok(o) => log::info!("{vid}: stopped at unmount: {o:?}"),
                Err(e) => {
                    log::error!("{vid}: stop at unmount failed: {e}; recovery will commit it")
                }
            }
        };
        for (vid, _) in activity.open {
            // An attached volume runs on without the mount; its record
            // tells the next open of the pool.
            if activity.attached.iter().any(|(a, _)| *a == vid) {
                log::info!("{vid}: stays attached after the unmount");
                continue;
            }
            stop(&vid);
        }
        // The runs a last release's stop found held get the rest of the
        // grace period too: the kernel lets go of a closed passthrough
        // file a moment after it tells the daemon of the close.
        let _one = self.retrying.lock();
        for vid in self.pool.held_vids() {
            stop(&vid);
        }
    }

    /// The held volumes the daemon waits for, to commit them, before it
    /// exits: none until the session and its grace period are over.
    pub fn waiting_for(&self) -> Vec<ValidVid> {
        match self.waiting.load(Ordering::SeqCst) {
            true => self.pool.held_vids(),
            false => Vec::new(),
        }
    }

    /// After the session: retries the held volumes every second until none
    /// is left, so the daemon commits each once its outside writer lets go
    /// before it exits. Says in the log which volumes it waits for, and
    /// again whenever that changes. A writer that never lets go keeps the
    /// daemon (and the control socket, whose `status` lists them) running;
    /// a kill leaves them to the next pool open, as after a power cut.
    pub fn wait_held(&self) {
        let mut told: Vec<ValidVid> = Vec::new();
        loop {
            self.retry_held();
            let held = self.pool.held_vids();
            if held.is_empty() {
                if !told.is_empty() {
                    log::info!("every held volume is committed");
                }
                return;
            }
            self.waiting.store(true, Ordering::SeqCst);
            if held != told {
                for vid in held.iter().filter(|v| !told.contains(v)) {
                    let holders = self
                        .pool
                        .snapshot(vid)
                        .ok()
                        .and_then(|s| s.held)
                        .unwrap_or_else(|| "something outside reflinkfs".into());
                    log::warn!("{vid}: the mount is gone, but its dirty image is still open for writing by {holders}; the daemon commits it once that lets go");
                }
                let list: Vec<String> = held.iter().map(|v| v.to_string()).collect();
                log::warn!(
                    "the daemon exits once it has committed {} (`reflinkfs status` lists them; a kill leaves them to the next pool open)",
                    list.join(", ")
                );
                told = held;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}
