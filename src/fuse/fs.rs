//! The filesystem logic of the mount (SPEC §6). It never touches fuser's
//! reply objects: every operation returns a value or an errno, and the
//! adapter (`mod.rs`) translates.
//!
//! A volume's lifecycle lives in the engine: an open of `N-dirty.img`
//! takes a [`Lease`], which starts the volume the first time, and its
//! release gives it back; the stop the last one asks for runs on the
//! committer threads, never on a FUSE worker. An open that would have to
//! wait (a start, a commit) is done by the adapter on a thread of its own.
//!
//! Generic over `B`, the passthrough registration (fuser's `BackingId` on a
//! real mount), so that the open, release and commit paths can be tested
//! without a kernel (see the tests below).

use super::inodes::{Inodes, Node};
use crate::engine::fsops::FileSig;
use crate::engine::view::VolumeView;
use crate::engine::{Attachment, Lease, PendingStop, Pool, StopOutcome, ValidVid};
use crate::error::Error;
use crate::sys;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Drops what the kernel caches (the daemon gives fuser's notifier).
pub trait Invalidate: Send + Sync {
    /// The entry `name` in directory `parent`.
    fn entry(&self, parent: u64, name: &str);
    /// The attributes of `ino`.
    fn inode(&self, ino: u64);
    /// The cached listing of directory `ino` (FOPEN_CACHE_DIR).
    fn listing(&self, ino: u64);
}

thread_local! {
    /// Set while this thread runs a FUSE request: an invalidation from it
    /// is queued, never sent, since the kernel may wait for this very
    /// request to finish before it takes the notification.
    static IN_REQUEST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as (part of) a FUSE request's handler.
pub fn in_request<R>(f: impl FnOnce() -> R) -> R {
    let was = IN_REQUEST.with(|c| c.replace(true));
    let r = f();
    IN_REQUEST.with(|c| c.set(was));
    r
}

enum Notice {
    Volume(ValidVid),
    Barrier(std::sync::mpsc::Sender<()>),
}

/// Mount options that change behaviour.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Use kernel passthrough when the kernel offers it.
    pub passthrough: bool,
    /// Mounted `ro`: every volume behaves as `rw=false`.
    pub read_only: bool,
    /// Threads that run the stops (commits) of volumes.
    pub committers: usize,
}

/// What the mount attaches to a run at its start: the passthrough
/// registration (shared by every open of the run: the kernel allows one
/// backing file per inode) and the lock of daemon-mode writes.
struct RunIo<B> {
    backing: Option<Arc<B>>,
    /// Daemon-mode writes to the image take this lock (see `write`).
    write_lock: Mutex<()>,
}

/// One open file handle.
struct Handle<B> {
    node: Node,
    file: Arc<File>,
    writable: bool,
    /// A dirty image's run: its lease, size limit and write lock.
    lease: Option<Lease>,
    run_io: Option<Arc<RunIo<B>>>,
    /// Keeps the passthrough registration alive while this handle exists.
    _backing: Option<Arc<B>>,
}

impl<B> Handle<B> {
    /// How many of `len` bytes at `offset` fit before the volume's end.
    /// A volume's size is its contract: writes the daemon sees never grow
    /// it. Like a write against a file size limit (RLIMIT_FSIZE), a write
    /// that starts inside is cut short at the end, and one that starts at
    /// or past the end fails with EFBIG ("file too large").
    fn room(&self, offset: u64, len: u64) -> FsResult<u64> {
        let Some(lease) = &self.lease else {
            return Ok(len);
        };
        let end = lease.limit.load(Ordering::SeqCst);
        if len > 0 && offset >= end {
            log::warn!(
                "{}: refused a write of {len} bytes at {offset}: the volume ends at {end} (EFBIG); resize it to grow it",
                lease.vid
            );
            return Err(libc::EFBIG);
        }
        Ok(len.min(end.saturating_sub(offset)))
    }
}

/// Where a write goes: the file, how many bytes fit before the volume's
/// end, and the run's write lock.
struct WriteTarget<B> {
    file: Arc<File>,
    room: u64,
    run_io: Option<Arc<RunIo<B>>>,
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

/// What `open` hands to the adapter.
pub struct Opened<B> {
    pub fh: u64,
    /// `Some` when the open is served by passthrough.
    pub backing: Option<Arc<B>>,
}

/// Why an open did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    Errno(Errno),
    /// It would have to wait (a start, or the commit of the last run):
    /// do it again with `may_wait` on a thread that may block.
    WouldWait,
}

impl From<Errno> for OpenError {
    fn from(e: Errno) -> Self {
        OpenError::Errno(e)
    }
}

/// Threads that run the stops the last releases ask for, so that ten VMs
/// shutting down at once never take a FUSE worker.
struct Committer {
    tx: Mutex<Option<std::sync::mpsc::Sender<PendingStop>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Committer {
    fn new(pool: Arc<Pool>, n: usize) -> Committer {
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
    fn submit(&self, pool: &Pool, p: PendingStop) {
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
    fn drain(&self) {
        drop(self.tx.lock().take());
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

pub struct ReflinkFs<B: Send + Sync + 'static = fuser::BackingId> {
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
    /// Where invalidations go, once the daemon has a session.
    invalidator: std::sync::OnceLock<Box<dyn Invalidate>>,
    /// Invalidations made inside requests, for the notifier thread.
    notices: Mutex<Option<std::sync::mpsc::Sender<Notice>>>,
    pub stats: Stats,
    started: SystemTime,
}

/// Logs a refused change and names the command to use instead.
fn refuse(what: &str, instead: &str) -> Errno {
    log::warn!("refused {what}: use `{instead}` instead");
    libc::EPERM
}

/// The errno of an open whose start failed. EIO for all but the few
/// errors a caller can act on: EROFS (a read-only volume), EBUSY, ENOSPC,
/// ENOENT. The reason is logged.
fn start_errno(vid: &ValidVid, e: &Error) -> Errno {
    let errno = match e {
        Error::ReadOnly { .. } => libc::EROFS,
        e => match e.errno() {
            e @ (libc::EBUSY | libc::ENOSPC | libc::EDQUOT | libc::ENOENT) => e,
            _ => libc::EIO,
        },
    };
    match errno {
        libc::EROFS | libc::EBUSY => log::warn!("{vid}: open refused: {e}"),
        _ => log::error!("{vid}: cannot start: {e}"),
    }
    errno
}

/// The errno of an engine error, logged at the level it deserves.
fn errno_of(op: &str, e: &Error) -> Errno {
    let errno = e.errno();
    match errno {
        libc::ENOENT => log::debug!("{op}: {e}"),
        libc::EBUSY | libc::EROFS | libc::EINVAL => log::warn!("{op}: {e}"),
        _ => log::error!("{op}: {e} (errno {errno})"),
    }
    errno
}

fn io_errno(op: &str, e: std::io::Error) -> Errno {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    log::debug!("{op}: {e}");
    errno
}

fn time_of((sec, nsec): (i64, i64)) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH
    }
}

/// The attributes of an image file, from its backing file.
fn sig_attr(ino: u64, sig: &FileSig, perm: u16) -> Attr {
    Attr {
        ino,
        kind: Kind::File,
        size: sig.size,
        blocks: sig.blocks,
        perm,
        mtime: time_of(sig.mtime),
        ctime: time_of(sig.ctime),
        cacheable: true,
    }
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
            invalidator: std::sync::OnceLock::new(),
            notices: Mutex::new(None),
            stats: Stats::default(),
            started: SystemTime::now(),
        }
    }

    /// Starts caching: from now on every change of a volume (a start, a
    /// commit, an operation) drops what the kernel caches of its files,
    /// through `inv`. Without it (tests), nothing is cached that could go
    /// stale: see [`ReflinkFs::caching`].
    pub fn set_invalidator(self: &Arc<Self>, inv: Box<dyn Invalidate>) {
        if self.invalidator.set(inv).is_err() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel::<Notice>();
        *self.notices.lock() = Some(tx);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || {
                for n in rx {
                    let Some(fs) = weak.upgrade() else { return };
                    match n {
                        Notice::Volume(v) => fs.invalidate_now(&v),
                        Notice::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the invalidation thread: {e}");
        }
        let weak = Arc::downgrade(self);
        self.pool.on_change(Box::new(move |vid| {
            if let Some(fs) = weak.upgrade() {
                fs.invalidate(vid);
            }
        }));
    }

    /// Whether the kernel may cache entries and attributes (an invalidator
    /// is set).
    pub fn caching(&self) -> bool {
        self.invalidator.get().is_some()
    }

    /// A volume changed: drop what the kernel caches of its files, and of
    /// the snapshots that show its size. From inside a request it is
    /// queued for the notifier thread; elsewhere it is done at once.
    fn invalidate(&self, vid: &ValidVid) {
        if self.invalidator.get().is_none() {
            return;
        }
        if IN_REQUEST.with(|c| c.get()) {
            if let Some(tx) = &*self.notices.lock() {
                let _ = tx.send(Notice::Volume(vid.clone()));
            }
            return;
        }
        self.invalidate_now(vid);
    }

    fn invalidate_now(&self, vid: &ValidVid) {
        let Some(inv) = self.invalidator.get() else {
            return;
        };
        let mut vids = vec![vid.clone()];
        vids.extend(self.pool.snapshots_of(vid));
        for v in &vids {
            let (files, vm, class) = {
                let t = self.inodes.lock();
                (
                    t.of_volume(v),
                    t.peek(&Node::Vm(v.class().to_owned(), v.vm().to_owned())),
                    t.peek(&Node::Class(v.class().to_owned())),
                )
            };
            let incarnation = self
                .pool
                .snapshot(v)
                .ok()
                .filter(|s| s.state != "removed")
                .map(|s| s.config.incarnation);
            for (ino, parent, name, node) in files {
                inv.inode(ino);
                // `N-dirty.img` names one inode for its volume's whole life:
                // its entry stays (dropping it would make the file of a
                // loop device on it look deleted), until the volume is gone.
                let same = matches!(node, Node::Dirty(_, inc) if Some(inc) == incarnation);
                if let (Some(p), false) = (parent, same) {
                    inv.entry(p, &name);
                }
            }
            // The listings that may show it: its VM's (revisions come and
            // go with commits), its class's and the root's (a create or a
            // remove). A removed volume may also have taken its VM's or
            // class's last file, and their entries, with it. New names need
            // no entry invalidation: the mount never answers with a
            // negative entry the kernel could cache.
            if let Some(vm) = vm {
                inv.listing(vm);
            }
            if let Some(c) = class {
                inv.listing(c);
                if incarnation.is_none() {
                    inv.entry(c, v.vm());
                }
            }
            inv.listing(super::inodes::ROOT_INO);
            if incarnation.is_none() {
                inv.entry(super::inodes::ROOT_INO, v.class());
            }
        }
    }

    /// Waits until the invalidations queued so far are sent: the control
    /// socket calls it before it answers, so a client that changed a volume
    /// sees the change on the mount at once.
    pub fn sync_invalidations(&self) {
        let tx = self.notices.lock().clone();
        if let Some(tx) = tx {
            let (done, wait) = std::sync::mpsc::channel();
            if tx.send(Notice::Barrier(done)).is_ok() {
                let _ = wait.recv();
            }
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

    pub fn io_mode(&self) -> &'static str {
        if self.passthrough() {
            "passthrough"
        } else {
            "daemon"
        }
    }

    /// Running volumes with their number of open files (leases).
    pub fn open_handles(&self) -> Vec<(ValidVid, usize)> {
        self.pool.activity().open
    }

    /// Volumes a start, commit, hold or operation is in progress on.
    pub fn busy_volumes(&self) -> Vec<(ValidVid, &'static str)> {
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

    fn node(&self, ino: u64) -> FsResult<Node> {
        self.inodes.lock().node(ino).ok_or(libc::ENOENT)
    }

    fn ino_of(&self, node: &Node) -> u64 {
        self.inodes.lock().ino_of(node)
    }

    fn revisions(&self, vid: &ValidVid) -> FsResult<Vec<crate::engine::Revision>> {
        self.pool
            .revisions(vid)
            .map_err(|e| errno_of("revisions", &e))
    }

    fn view(&self, vid: &ValidVid) -> FsResult<VolumeView> {
        self.pool.volume_view(vid).map_err(|e| errno_of("view", &e))
    }

    fn dir_attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            blocks: 0,
            perm: 0o755,
            mtime: self.started,
            ctime: self.started,
            cacheable: true,
        }
    }

    fn file_perm(&self, writable: bool) -> u16 {
        if writable && !self.opts.read_only {
            0o600
        } else {
            0o400
        }
    }

    /// The attributes of a node. With `fh` (an fstat), those of the open
    /// file itself, so a reader keeps its own image's attributes; without,
    /// fresh from the backing files.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        let node = self.node(ino)?;
        if let Some(fh) = fh {
            let file = self.handles.lock().get(&fh).map(|h| h.file.clone());
            if let Some(file) = file {
                let sig = FileSig::from_stat(
                    &sys::fstat(file.as_fd()).map_err(|e| io_errno("getattr", e))?,
                );
                let perm = match &node {
                    Node::Dirty(vid, _) => self.file_perm(self.view(vid)?.config.rw),
                    _ => 0o400,
                };
                let mut a = sig_attr(ino, &sig, perm);
                a.cacheable = !matches!(node, Node::Dirty(..));
                return Ok(a);
            }
        }
        self.attr_of(ino, &node)
    }

    fn attr_of(&self, ino: u64, node: &Node) -> FsResult<Attr> {
        crate::engine::failpoint::panic_if("fuse.getattr", &format!("{node:?}"));
        match node {
            Node::Root | Node::Class(_) | Node::Vm(..) => Ok(self.dir_attr(ino)),
            Node::Dirty(vid, _) => {
                // A running volume: one fstat of its dirty image, nothing
                // else (a VM's disk is stat'ed while others load the disk).
                if let Ok(Some((sig, rw))) = self.pool.running_dirty(vid) {
                    return Ok(Attr {
                        cacheable: false,
                        ..sig_attr(ino, &sig, self.file_perm(rw))
                    });
                }
                let view = self.view(vid)?;
                let perm = self.file_perm(view.config.rw);
                match (view.running, view.dirty) {
                    (true, Some(sig)) => Ok(Attr {
                        cacheable: false,
                        ..sig_attr(ino, &sig, perm)
                    }),
                    _ => {
                        let (mtime, ctime, blocks) = view
                            .img
                            .map(|s| (time_of(s.mtime), time_of(s.ctime), s.blocks))
                            .unwrap_or((self.started, self.started, 0));
                        Ok(Attr {
                            ino,
                            kind: Kind::File,
                            size: view.nominal_size,
                            blocks,
                            perm,
                            mtime,
                            ctime,
                            cacheable: true,
                        })
                    }
                }
            }
            Node::Img(vid, _, generation) => {
                // An older generation's image never changes: it keeps the
                // attributes it had, whatever replaced the name since.
                let remembered = self.inodes.lock().sig(ino);
                let view = self.view(vid)?;
                if view.generation != *generation {
                    return remembered
                        .map(|s| sig_attr(ino, &s, 0o400))
                        .ok_or(libc::ENOENT);
                }
                let sig = view.img.ok_or(libc::ENOENT)?;
                self.inodes.lock().remember(ino, sig);
                Ok(sig_attr(ino, &sig, 0o400))
            }
            Node::Revision(vid, _, name) => {
                let f = self
                    .pool
                    .open_revision(vid, name)
                    .map_err(|e| errno_of("getattr", &e))?;
                let st = sys::fstat(f.as_fd()).map_err(|e| io_errno("getattr", e))?;
                let sig = FileSig::from_stat(&st);
                Ok(sig_attr(ino, &sig, 0o400))
            }
        }
    }

    /// Which node `name` in directory `parent` is, if it exists. One range
    /// query of the pool's sorted volumes: as cheap with 10,000 volumes as
    /// with 10.
    fn child(&self, parent: &Node, name: &str) -> FsResult<Node> {
        match parent {
            Node::Root => self
                .pool
                .class_shown(name)
                .then(|| Node::Class(name.to_owned()))
                .ok_or(libc::ENOENT),
            Node::Class(c) => (!self.pool.shown_in_vm(c, name).is_empty())
                .then(|| Node::Vm(c.clone(), name.to_owned()))
                .ok_or(libc::ENOENT),
            Node::Vm(c, vm) => {
                for v in self.pool.shown_in_vm(c, vm) {
                    let n = crate::engine::Names::of(&v);
                    if !name.starts_with(v.name()) {
                        continue;
                    }
                    if name == n.dirty() {
                        let view = self.view(&v)?;
                        return Ok(Node::Dirty(v.clone(), view.config.incarnation));
                    }
                    if name == n.img() || name.starts_with(&format!("{}.img", v.name())) {
                        let view = self.view(&v)?;
                        let inc = view.config.incarnation;
                        if name == n.img() {
                            return match view.img {
                                Some(_) => Ok(Node::Img(v.clone(), inc, view.generation)),
                                None => Err(libc::ENOENT),
                            };
                        }
                        if self.revisions(&v)?.iter().any(|r| r.file_name == name) {
                            return Ok(Node::Revision(v.clone(), inc, name.to_owned()));
                        }
                    }
                }
                Err(libc::ENOENT)
            }
            _ => Err(libc::ENOTDIR),
        }
    }

    pub fn lookup(&self, parent: u64, name: &str) -> FsResult<Attr> {
        let parent = self.node(parent)?;
        let node = self.child(&parent, name)?;
        // The number and its count are taken together: a FORGET of earlier
        // lookups that runs meanwhile on another worker cannot drop the
        // entry this reply names. FORGET balances the count.
        let ino = self.inodes.lock().looked_up(&node);
        self.attr_of(ino, &node)
            .inspect_err(|_| self.forget(ino, 1))
    }

    /// FORGET of `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.lock().forget(ino, n);
    }

    /// Drops the inode numbers handed out by readdir for files that have
    /// gone since (replaced images, removed volumes) and that the kernel
    /// does not hold. The daemon calls it now and then.
    pub fn sweep_inodes(&self) {
        let live = |n: &Node| match n {
            Node::Root | Node::Class(_) | Node::Vm(..) => true,
            Node::Dirty(v, inc) | Node::Revision(v, inc, _) => self
                .pool
                .snapshot(v)
                .is_ok_and(|s| s.config.incarnation == *inc),
            Node::Img(v, inc, generation) => self
                .pool
                .snapshot(v)
                .is_ok_and(|s| s.config.incarnation == *inc && s.config.generation == *generation),
        };
        // The liveness test reads the pool, so the table is not held during
        // it: nodes are judged first, then dropped if still unheld.
        let candidates: Vec<Node> = {
            let t = self.inodes.lock();
            t.unheld()
        };
        let dead: std::collections::HashSet<Node> =
            candidates.into_iter().filter(|n| !live(n)).collect();
        if !dead.is_empty() {
            let n = self.inodes.lock().sweep(|node| !dead.contains(node));
            log::debug!("dropped {n} inode number(s) of files that are gone");
        }
    }

    /// The entries of a directory, without `.` and `..`.
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(u64, Kind, String)>> {
        let node = self.node(ino)?;
        let mut out = Vec::new();
        match &node {
            Node::Root => {
                for c in self.pool.shown_classes() {
                    let n = Node::Class(c.clone());
                    out.push((self.ino_of(&n), Kind::Dir, c));
                }
            }
            Node::Class(c) => {
                for vm in self.pool.shown_vms(c) {
                    let n = Node::Vm(c.clone(), vm.clone());
                    out.push((self.ino_of(&n), Kind::Dir, vm));
                }
            }
            Node::Vm(c, vm) => {
                for v in self.pool.shown_in_vm(c, vm) {
                    let names = crate::engine::Names::of(&v);
                    let Ok(view) = self.pool.volume_view(&v) else {
                        continue;
                    };
                    let inc = view.config.incarnation;
                    out.push((
                        self.ino_of(&Node::Dirty(v.clone(), inc)),
                        Kind::File,
                        names.dirty(),
                    ));
                    if view.img.is_some() {
                        out.push((
                            self.ino_of(&Node::Img(v.clone(), inc, view.generation)),
                            Kind::File,
                            names.img(),
                        ));
                    }
                    for r in self.revisions(&v).unwrap_or_default() {
                        let n = Node::Revision(v.clone(), inc, r.file_name.clone());
                        out.push((self.ino_of(&n), Kind::File, r.file_name));
                    }
                }
            }
            _ => return Err(libc::ENOTDIR),
        }
        Ok(out)
    }

    /// readdirplus: the entries with their attributes. Each one the
    /// adapter sends counts as a lookup (see [`ReflinkFs::looked_up`]).
    pub fn readdir_plus(&self, ino: u64) -> FsResult<Vec<(Kind, String, Attr)>> {
        let mut out = Vec::new();
        for (eino, kind, name) in self.readdir(ino)? {
            let Some(node) = self.inodes.lock().node(eino) else {
                continue;
            };
            // An entry gone since the listing is left out.
            if let Ok(a) = self.attr_of(eino, &node) {
                out.push((kind, name, a));
            }
        }
        Ok(out)
    }

    /// An entry of a readdirplus reply went out: the kernel holds a lookup.
    pub fn looked_up(&self, ino: u64) {
        let node = self.inodes.lock().node(ino);
        if let Some(n) = node {
            self.inodes.lock().looked_up(&n);
        }
    }

    fn add_handle(&self, h: Handle<B>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::SeqCst);
        self.handles.lock().insert(fh, h);
        fh
    }

    /// Opens a node. `register` makes a passthrough backing registration
    /// for a file; it is only called when passthrough is on. Without
    /// `may_wait`, an open that would have to wait for a start or a commit
    /// returns [`OpenError::WouldWait`] at once, for the adapter to do it
    /// again on a thread that may wait: a FUSE worker never waits on a
    /// volume.
    pub fn open(
        &self,
        ino: u64,
        flags: i32,
        register: &dyn Fn(&File) -> std::io::Result<B>,
        may_wait: bool,
    ) -> Result<Opened<B>, OpenError> {
        let node = self.node(ino)?;
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        match &node {
            Node::Root | Node::Class(_) | Node::Vm(..) => Err(libc::EISDIR.into()),
            Node::Dirty(vid, _) => {
                if flags & libc::O_TRUNC != 0 {
                    return Err(refuse(
                        &format!("O_TRUNC open of {vid}-dirty.img"),
                        &format!("reflinkfs volume resize {vid} SIZE"),
                    )
                    .into());
                }
                if writable && self.opts.read_only {
                    log::warn!("{vid}: write open refused: the mount is read-only");
                    return Err(libc::EROFS.into());
                }
                let lease = match self.pool.try_acquire(vid, writable) {
                    Ok(Some(lease)) => lease,
                    Ok(None) if !may_wait => return Err(OpenError::WouldWait),
                    Ok(None) => {
                        let attach = |f: &File| self.attach(vid, f, register);
                        self.pool
                            .acquire(vid, writable, &attach)
                            .map_err(|e| start_errno(vid, &e))?
                    }
                    Err(e) => return Err(start_errno(vid, &e).into()),
                };
                let run_io = lease
                    .attachment
                    .clone()
                    .and_then(|a| a.downcast::<RunIo<B>>().ok());
                let backing = run_io.as_ref().and_then(|r| r.backing.clone());
                let fh = self.add_handle(Handle {
                    node: node.clone(),
                    file: lease.file.clone(),
                    writable,
                    lease: Some(lease),
                    run_io,
                    _backing: backing.clone(),
                });
                Ok(Opened { fh, backing })
            }
            Node::Img(vid, _, generation) => {
                if writable {
                    return Err(libc::EROFS.into());
                }
                let (file, current) = self
                    .pool
                    .open_committed(vid)
                    .map_err(|e| errno_of("open", &e))?;
                if current != *generation {
                    // A stale dentry: the kernel retries the lookup on ESTALE.
                    return Err(libc::ESTALE.into());
                }
                Ok(self.open_ro(ino, node.clone(), file, register))
            }
            Node::Revision(vid, _, name) => {
                if writable {
                    return Err(libc::EROFS.into());
                }
                let file = self
                    .pool
                    .open_revision(vid, name)
                    .map_err(|e| errno_of("open", &e))?;
                Ok(self.open_ro(ino, node.clone(), file, register))
            }
        }
    }

    /// What a run gets at its start: the passthrough registration of its
    /// dirty image (when passthrough is on) and a write lock.
    fn attach(
        &self,
        vid: &ValidVid,
        file: &File,
        register: &dyn Fn(&File) -> std::io::Result<B>,
    ) -> Option<Attachment> {
        let mut backing = None;
        if self.passthrough() {
            match register(file) {
                Ok(b) => backing = Some(Arc::new(b)),
                Err(e) => log::error!("{vid}: passthrough registration failed ({e}); serving this run's I/O in the daemon"),
            }
        }
        Some(Arc::new(RunIo {
            backing,
            write_lock: Mutex::new(()),
        }))
    }

    fn open_ro(
        &self,
        ino: u64,
        node: Node,
        file: File,
        register: &dyn Fn(&File) -> std::io::Result<B>,
    ) -> Opened<B> {
        if let Ok(st) = sys::fstat(file.as_fd()) {
            self.inodes.lock().remember(ino, FileSig::from_stat(&st));
        }
        let backing = self.ro_backing_for(ino, &file, register);
        let fh = self.add_handle(Handle {
            node,
            file: Arc::new(file),
            writable: false,
            lease: None,
            run_io: None,
            _backing: backing.clone(),
        });
        Opened { fh, backing }
    }

    fn ro_backing_for(
        &self,
        ino: u64,
        file: &File,
        register: &dyn Fn(&File) -> std::io::Result<B>,
    ) -> Option<Arc<B>> {
        if !self.passthrough() {
            return None;
        }
        let mut map = self.ro_backing.lock();
        if let Some(b) = map.get(&ino).and_then(Weak::upgrade) {
            return Some(b);
        }
        match register(file) {
            Ok(b) => {
                let b = Arc::new(b);
                map.insert(ino, Arc::downgrade(&b));
                Some(b)
            }
            Err(e) => {
                log::error!("passthrough registration of inode {ino} failed ({e}); serving it in the daemon");
                None
            }
        }
    }

    /// A RELEASE. The last release of a volume's dirty image queues its
    /// stop (commit or discard) on the committer threads: errors cannot
    /// reach the application; they are logged and the dirty image stays.
    pub fn release(&self, fh: u64) {
        let Some(h) = self.handles.lock().remove(&fh) else {
            log::error!("release of unknown handle {fh}");
            return;
        };
        let Handle {
            node,
            file,
            lease,
            run_io,
            _backing,
            ..
        } = h;
        drop((file, run_io, _backing));
        match lease {
            Some(lease) => {
                if let Some(p) = self.pool.release(lease) {
                    self.committer.submit(&self.pool, p);
                }
            }
            None => {
                let ino = self.ino_of(&node);
                let mut map = self.ro_backing.lock();
                if map.get(&ino).is_some_and(|w| w.strong_count() == 0) {
                    map.remove(&ino);
                }
            }
        }
    }

    fn handle_file(&self, fh: u64, need_write: bool) -> FsResult<Arc<File>> {
        let handles = self.handles.lock();
        let h = handles.get(&fh).ok_or(libc::EBADF)?;
        if need_write && !h.writable {
            return Err(if matches!(h.node, Node::Dirty(..)) {
                libc::EBADF
            } else {
                libc::EROFS
            });
        }
        Ok(h.file.clone())
    }

    /// The file of a writable handle, with the room a write of `len` at
    /// `offset` has before the volume's end, and the run's write lock.
    fn write_target(&self, fh: u64, offset: u64, len: u64) -> FsResult<WriteTarget<B>> {
        let handles = self.handles.lock();
        let h = handles.get(&fh).ok_or(libc::EBADF)?;
        if !h.writable {
            return Err(if matches!(h.node, Node::Dirty(..)) {
                libc::EBADF
            } else {
                libc::EROFS
            });
        }
        Ok(WriteTarget {
            file: h.file.clone(),
            room: h.room(offset, len)?,
            run_io: h.run_io.clone(),
        })
    }

    /// Daemon-mode read (passthrough reads never come here), into a
    /// per-thread buffer that is reused (never zeroed again), handed to
    /// `send` while borrowed.
    pub fn read(&self, fh: u64, offset: u64, size: u32, send: impl FnOnce(&[u8])) -> FsResult<()> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let file = self.handle_file(fh, false)?;
        BUF.with_borrow_mut(|buf| {
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let buf = &mut buf[..size as usize];
            let mut done = 0;
            while done < buf.len() {
                match sys::pread(file.as_fd(), &mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => return Err(io_errno("read", e)),
                }
            }
            self.stats
                .read_bytes
                .fetch_add(done as u64, Ordering::Relaxed);
            send(&buf[..done]);
            Ok(())
        })
    }

    /// Daemon-mode write (passthrough writes never come here).
    ///
    /// Writes to one image go one at a time. XFS, btrfs and ext4 take the
    /// inode lock exclusively for a buffered write anyway, so this costs
    /// no parallelism; but without it, the worker threads that wait for
    /// that kernel lock spin on it (rwsem optimistic spinning) and take
    /// CPU from the thread that is copying the data. A profile of 1 MiB
    /// writes at QD16 showed 27% of all CPU in `rwsem_spin_on_owner`
    /// (doc/BENCHMARKS.md). Waiters on this lock sleep instead.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        let WriteTarget { file, room, run_io } =
            self.write_target(fh, offset, data.len() as u64)?;
        let data = &data[..room as usize];
        let _one_at_a_time = run_io.as_ref().map(|r| r.write_lock.lock());
        crate::engine::fsops::write_all_at(&file, data, offset)
            .map_err(|e| io_errno("write", e))?;
        self.stats
            .write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data.len() as u32)
    }

    /// Commits the volumes whose stop found their dirty image still open
    /// for writing outside reflinkfs, once that has let go. The daemon
    /// calls it every second.
    pub fn retry_held(&self) {
        for vid in self.pool.held_vids() {
            match self.pool.stop(&vid) {
                Ok(StopOutcome::Held { .. }) => {}
                Ok(outcome) => log::info!("{vid}: committed once its outside writer let go: {outcome:?}"),
                Err(e) => log::error!("{vid}: stop after its outside writer let go failed: {e}; the dirty image is kept and will be committed at the next start or pool open"),
            }
        }
    }

    /// fsync goes to the backing file: never a silent success.
    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let file = self.handle_file(fh, false)?;
        let r = if datasync {
            sys::fdatasync(file.as_fd())
        } else {
            sys::fsync(file.as_fd())
        };
        r.map_err(|e| {
            log::error!("fsync failed: {e}");
            e.raw_os_error().unwrap_or(libc::EIO)
        })
    }

    pub fn fallocate(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> FsResult<()> {
        if !matches!(self.node(ino)?, Node::Dirty(..)) {
            return Err(libc::EROFS);
        }
        if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
            // Both move data and change the size; a volume's size changes
            // only by a resize.
            log::warn!("refused fallocate mode {mode:#x}: it changes the volume's size (use `reflinkfs volume resize`)");
            return Err(libc::EOPNOTSUPP);
        }
        let WriteTarget { file, room, .. } = self.write_target(fh, offset, length)?;
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && room < length {
            log::warn!(
                "refused fallocate of {length} bytes at {offset}: it would grow the volume past its end (EFBIG)"
            );
            return Err(libc::EFBIG);
        }
        sys::fallocate(file.as_fd(), mode, offset, length).map_err(|e| io_errno("fallocate", e))
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let file = self.handle_file(fh, false)?;
        sys::lseek(file.as_fd(), offset, whence).map_err(|e| io_errno("lseek", e))
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u32> {
        let src = self.handle_file(fh_in, false)?;
        let WriteTarget {
            file: dst, room, ..
        } = self.write_target(fh_out, off_out, len.min(u32::MAX as u64 & !0xfff))?;
        sys::copy_file_range(src.as_fd(), off_in, dst.as_fd(), off_out, room as usize)
            .map(|n| n as u32)
            .map_err(|e| io_errno("copy_file_range", e))
    }

    /// setattr: only a size change of a volume's image is allowed, which is
    /// a resize (§5). Growing only; shrinking goes through the CLI.
    pub fn set_size(&self, ino: u64, size: u64) -> FsResult<Attr> {
        let node = self.node(ino)?;
        let vid = match &node {
            Node::Dirty(v, _) | Node::Img(v, _, _) => v.clone(),
            Node::Revision(..) => return Err(libc::EROFS),
            _ => return Err(libc::EISDIR),
        };
        if self.opts.read_only {
            return Err(libc::EROFS);
        }
        let view = self.view(&vid)?;
        if matches!(node, Node::Img(..)) && view.running {
            log::warn!(
                "{vid}: truncate of N.img refused while the volume runs; truncate its -dirty.img"
            );
            return Err(libc::EBUSY);
        }
        let current = if view.running {
            view.dirty.map(|d| d.size).unwrap_or(view.nominal_size)
        } else {
            view.nominal_size
        };
        if size < current {
            return Err(refuse(
                &format!("shrinking {vid} from {current} to {size} bytes through the mount"),
                &format!("reflinkfs volume resize {vid} {size} --allow-shrink"),
            ));
        }
        self.pool
            .resize(&vid, size, false)
            .map_err(|e| errno_of("resize", &e))?;
        let node = match node {
            Node::Img(v, inc, _) => {
                let g = self.view(&v)?.generation;
                Node::Img(v, inc, g)
            }
            other => other,
        };
        let ino = self.ino_of(&node);
        self.attr_of(ino, &node)
    }

    /// unlink: deletes a revision; everything else is refused.
    pub fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        let parent = self.node(parent)?;
        match self.child(&parent, name)? {
            Node::Revision(vid, _, file) => self
                .pool
                .remove_revision(&vid, &file)
                .map_err(|e| errno_of("unlink", &e)),
            Node::Dirty(vid, _) | Node::Img(vid, _, _) => Err(refuse(
                &format!("unlink of {name}"),
                &format!("reflinkfs volume remove {vid}"),
            )),
            _ => Err(libc::EISDIR),
        }
    }

    /// rename: a revision renamed onto `N.img` of its volume reverts to it;
    /// everything else is refused.
    pub fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        flags: u32,
    ) -> FsResult<()> {
        let p = self.node(parent)?;
        if parent == newparent && flags == 0 {
            if let Node::Revision(vid, _, file) = self.child(&p, name)? {
                if newname == crate::engine::Names::of(&vid).img() {
                    return self
                        .pool
                        .revert(&vid, Some(&file))
                        .map(drop)
                        .map_err(|e| errno_of("revert", &e));
                }
            }
        }
        Err(refuse(
            &format!("rename of {name} to {newname}"),
            "reflinkfs volume revert VID REVISION",
        ))
    }

    pub fn statfs(&self) -> FsResult<(u64, u64, u64)> {
        let s = self.pool.fs_stats().map_err(|e| errno_of("statfs", &e))?;
        let scale = |n: u64| n.saturating_mul(s.block_size) / 4096;
        Ok((scale(s.blocks), scale(s.blocks_free), scale(s.blocks_avail)))
    }

    /// The `user.reflinkfs.*` xattrs of a node, in a stable order.
    pub fn xattrs(&self, ino: u64) -> FsResult<Vec<(String, String)>> {
        let node = self.node(ino)?;
        let mut out = Vec::new();
        let mut put = |k: &str, v: String| out.push((format!("user.reflinkfs.{k}"), v));
        match &node {
            Node::Root => {
                let n = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
                put("pool", self.pool.path().display().to_string());
                put("io_mode", self.io_mode().to_owned());
                put("read_requests", n(&self.stats.reads));
                put("write_requests", n(&self.stats.writes));
                put("read_bytes", n(&self.stats.read_bytes));
                put("write_bytes", n(&self.stats.write_bytes));
                put("getxattr_requests", n(&self.stats.getxattrs));
                put("panics", n(&self.stats.panics));
                put("open_volumes", self.open_volumes().to_string());
                put("inodes", self.inode_count().to_string());
            }
            Node::Class(_) | Node::Vm(..) => {}
            Node::Dirty(vid, _) | Node::Img(vid, _, _) | Node::Revision(vid, _, _) => {
                let view = self.view(vid)?;
                let c = &view.config;
                put("vid", vid.to_string());
                put("type", c.kind().as_str().to_owned());
                put("state", view.state.to_owned());
                put("size", view.nominal_size.to_string());
                put("rw", c.rw.to_string());
                put("revisions_to_keep", c.revisions_to_keep.to_string());
                put("snap_on_start", c.snap_on_start.to_string());
                put("save_on_stop", c.save_on_stop.to_string());
                if let Some(s) = &c.source {
                    put("source", s.to_string());
                }
                if let Node::Revision(_, _, file) = &node {
                    if let Some(r) = self
                        .revisions(vid)?
                        .into_iter()
                        .find(|r| &r.file_name == file)
                    {
                        put("revision", r.id.to_string());
                        put("committed", r.timestamp.clone());
                    }
                }
                if let Ok(Some(o)) = self.pool.is_outdated(vid) {
                    put("is_outdated", o.to_string());
                }
            }
        }
        Ok(out)
    }

    /// Commits every volume still open when the session ends (the kernel
    /// may drop RELEASE requests of an unmounted connection), so the daemon
    /// never exits with data only in a dirty image. The queued stops go
    /// first.
    pub fn shutdown(&self) {
        self.committer.drain();
        self.handles.lock().clear();
        for (vid, _) in self.pool.activity().open {
            match self.pool.stop_within(&vid, Duration::from_secs(2)) {
                Ok(o) => log::info!("{vid}: stopped at unmount: {o:?}"),
                Err(e) => {
                    log::error!("{vid}: stop at unmount failed: {e}; recovery will commit it")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The open, release and commit paths without a kernel: a pool in a
    //! temporary directory (copy mode), driven through the same calls the
    //! adapter makes, with a fake passthrough registration.
    use super::*;
    use crate::engine::{CreateOptions, InitOptions, Property};
    use std::os::unix::fs::FileExt;
    use std::time::Instant;

    /// What a registration would be on a real mount.
    #[derive(Debug)]
    struct FakeBacking;

    fn register(_: &File) -> std::io::Result<FakeBacking> {
        Ok(FakeBacking)
    }

    const MIB: u64 = 1 << 20;

    struct Setup {
        fs: Arc<ReflinkFs<FakeBacking>>,
        dir: tempfile::TempDir,
    }

    fn setup(volumes: &[&str], passthrough: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::init(
            &dir.path().join("pool"),
            &InitOptions {
                setup_check: false,
                revisions_to_keep: 1,
                read_only: false,
            },
        )
        .unwrap();
        for v in volumes {
            pool.create(&v.parse().unwrap(), &CreateOptions::origin(MIB))
                .unwrap();
        }
        let fs = ReflinkFs::<FakeBacking>::new(
            Arc::new(pool),
            FsOptions {
                passthrough,
                read_only: false,
                committers: 2,
            },
        );
        fs.set_passthrough(passthrough);
        Setup {
            fs: Arc::new(fs),
            dir,
        }
    }

    impl Setup {
        fn ino(&self, path: &str) -> u64 {
            let mut ino = 1;
            for part in path.split('/') {
                ino = self.fs.lookup(ino, part).unwrap().ino;
            }
            ino
        }

        fn open(&self, path: &str, may_wait: bool) -> Result<u64, OpenError> {
            let ino = self.ino(path);
            self.fs
                .open(ino, libc::O_RDWR, &register, may_wait)
                .map(|o| o.fh)
        }

        fn state(&self, vid: &str) -> &'static str {
            self.fs.pool.snapshot(&vid.parse().unwrap()).unwrap().state
        }

        fn wait_stopped(&self, vid: &str) {
            let end = Instant::now() + Duration::from_secs(30);
            while self.state(vid) != "stopped" {
                assert!(Instant::now() < end, "{vid} did not stop");
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        fn committed(&self, vid: &str, off: u64, len: usize) -> Vec<u8> {
            let f = File::open(self.dir.path().join("pool").join(format!("{vid}.img"))).unwrap();
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, off).unwrap();
            buf
        }
    }

    #[test]
    fn the_last_release_commits_on_a_committer_thread() {
        let s = setup(&["c/v/a"], true);
        let first = s.open("c/v/a-dirty.img", true).unwrap();
        let second = s
            .open("c/v/a-dirty.img", false)
            .expect("a running volume opens at once");
        assert_eq!(s.fs.write(first, 0, b"one").unwrap(), 3);
        assert_eq!(s.fs.write(second, 3, b"two").unwrap(), 3);
        s.fs.release(first);
        assert_eq!(s.state("c/v/a"), "running", "one lease is left");
        s.fs.release(second);
        s.wait_stopped("c/v/a");
        assert_eq!(s.committed("c/v/a", 0, 6), b"onetwo");
    }

    #[test]
    fn writes_stop_at_the_volumes_end() {
        let s = setup(&["c/v/a"], false);
        let fh = s.open("c/v/a-dirty.img", true).unwrap();
        assert_eq!(s.fs.write(fh, MIB - 2, b"abcd").unwrap(), 2);
        assert_eq!(s.fs.write(fh, MIB, b"x"), Err(libc::EFBIG));
        let ino = s.ino("c/v/a-dirty.img");
        assert_eq!(
            s.fs.fallocate(ino, fh, MIB - 4096, 8192, 0),
            Err(libc::EFBIG)
        );
        s.fs.release(fh);
        s.wait_stopped("c/v/a");
    }

    /// Many threads open, write and close four volumes at once: every
    /// commit lands, no volume is left running, nothing fails.
    #[test]
    fn concurrent_opens_and_closes_of_four_volumes_all_commit() {
        let vols = ["c/v/a", "c/v/b", "c/w/a", "d/x/y"];
        let s = Arc::new(setup(&vols, true));
        let mut threads = Vec::new();
        for t in 0..8u8 {
            let s = s.clone();
            threads.push(std::thread::spawn(move || {
                for round in 0..40u8 {
                    let v = vols[usize::from(round + t) % vols.len()];
                    let fh = s.open(&format!("{v}-dirty.img"), true).unwrap();
                    let data = [t ^ round; 512];
                    s.fs.write(fh, u64::from(t) * 512, &data).unwrap();
                    s.fs.release(fh);
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        for v in vols {
            s.wait_stopped(v);
        }
        // Each thread's last write to each volume is committed.
        for t in 0..8u8 {
            for (i, v) in vols.iter().enumerate() {
                let last = (0..40u8)
                    .rfind(|r| usize::from(r + t) % vols.len() == i)
                    .unwrap();
                assert_eq!(
                    s.committed(v, u64::from(t) * 512, 512),
                    vec![t ^ last; 512],
                    "{v}, thread {t}"
                );
            }
        }
    }

    /// `rw` is checked under the volume's lock at start: however opens and
    /// `set rw` interleave, a writable lease never exists while the volume
    /// is read-only.
    #[test]
    fn a_writable_open_never_races_past_set_rw_false() {
        let s = Arc::new(setup(&["c/v/a"], false));
        let vid: ValidVid = "c/v/a".parse().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let setter = {
            let (s, vid, stop) = (s.clone(), vid.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    // Refused while running; that is fine.
                    let _ = s.fs.pool.set(&vid, Property::Rw(n % 2 == 0));
                    n += 1;
                }
            })
        };
        let (mut writable, mut refused) = (0, 0);
        let end = Instant::now() + Duration::from_secs(20);
        while (writable < 20 || refused < 20) && Instant::now() < end {
            match s.open("c/v/a-dirty.img", true) {
                Ok(fh) => {
                    writable += 1;
                    assert!(
                        s.fs.pool.snapshot(&vid).unwrap().config.rw,
                        "a writable lease on a read-only volume"
                    );
                    s.fs.release(fh);
                }
                Err(OpenError::Errno(libc::EROFS)) => refused += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        stop.store(true, Ordering::SeqCst);
        setter.join().unwrap();
        assert!(
            writable > 0 && refused > 0,
            "{writable} opens, {refused} refused"
        );
    }

    #[cfg(feature = "failpoints")]
    mod paused {
        use super::*;
        use crate::engine::failpoint;

        /// A commit held in progress: an open of that volume would wait
        /// (and the adapter does it on a thread of its own), while every
        /// other volume opens, commits, lists and stats as usual.
        #[test]
        fn a_held_commit_stalls_nothing_but_its_own_volume() {
            let s = Arc::new(setup(&["c/v/apause", "c/v/b"], true));
            let a = "c/v/apause";
            let gate = failpoint::pause_for("pause.commit", a);
            let fh = s.open(&format!("{a}-dirty.img"), true).unwrap();
            s.fs.write(fh, 0, b"held").unwrap();
            s.fs.release(fh);
            failpoint::wait_paused(&gate);
            assert_eq!(s.state(a), "committing");
            assert_eq!(
                s.open(&format!("{a}-dirty.img"), false).unwrap_err(),
                OpenError::WouldWait
            );
            // Everything else goes on.
            let b = s.open("c/v/b-dirty.img", true).unwrap();
            s.fs.write(b, 0, b"free").unwrap();
            s.fs.release(b);
            s.wait_stopped("c/v/b");
            assert_eq!(s.committed("c/v/b", 0, 4), b"free");
            let vm = s.ino("c/v");
            assert_eq!(s.fs.readdir(vm).unwrap().len(), 5, "readdir of the VM");
            s.fs.getattr(s.ino(&format!("{a}-dirty.img")), None)
                .unwrap();
            s.fs.xattrs(s.ino(&format!("{a}-dirty.img"))).unwrap();
            assert!(s.fs.pool.list().is_ok());
            assert!(s.fs.pool.info(&a.parse().unwrap()).is_ok());
            // A waiting open of the held volume returns once it commits.
            let waiter = {
                let s = s.clone();
                std::thread::spawn(move || s.open(&format!("{a}-dirty.img"), true))
            };
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiter.is_finished(), "the open waits for the commit");
            failpoint::resume("pause.commit", a, &gate);
            let fh = waiter.join().unwrap().unwrap();
            s.fs.release(fh);
            s.wait_stopped(a);
            assert_eq!(s.committed(a, 0, 4), b"held");
        }

        /// An open that waits on a volume being removed fails cleanly
        /// (ENOENT) when the removal is done, and leaves no file behind.
        #[test]
        fn an_open_waiting_on_a_removal_fails_and_orphans_nothing() {
            let s = Arc::new(setup(&["c/v/rpause", "c/v/other"], true));
            let vid = "c/v/rpause";
            let ino = s.ino(&format!("{vid}-dirty.img"));
            let gate = failpoint::pause_for("pause.remove", vid);
            let remover = {
                let s = s.clone();
                std::thread::spawn(move || s.fs.pool.remove(&vid.parse().unwrap()))
            };
            failpoint::wait_paused(&gate);
            assert_eq!(s.state(vid), "removing");
            let opener = {
                let s = s.clone();
                std::thread::spawn(move || {
                    s.fs.open(ino, libc::O_RDWR, &register, true).map(|o| o.fh)
                })
            };
            std::thread::sleep(Duration::from_millis(50));
            assert!(!opener.is_finished(), "the open waits for the removal");
            failpoint::resume("pause.remove", vid, &gate);
            remover.join().unwrap().unwrap();
            assert_eq!(
                opener.join().unwrap().unwrap_err(),
                OpenError::Errno(libc::ENOENT)
            );
            let left: Vec<String> = std::fs::read_dir(s.dir.path().join("pool/c/v"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(left, vec!["other.img".to_owned()], "nothing orphaned");
        }
    }
}
