//! The filesystem logic of the mount (SPEC §6). It never touches fuser's
//! reply objects: every operation returns a value or an errno, and
//! `super::adapter` translates.

use super::inodes::{Inodes, Node, ROOT_INO};
use crate::engine::fsops::FileSig;
use crate::engine::view::VolumeView;
use crate::engine::{Pool, StopOutcome, ValidVid};
use crate::error::Error;
use crate::sys;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub type Errno = i32;
pub type FsResult<T> = Result<T, Errno>;

/// A registered passthrough backing file. The adapter creates it (it needs
/// the FUSE connection); this layer only keeps it alive while opens exist.
pub type Backing = fuser::BackingId;

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
}

/// Mount options that change behaviour.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Use kernel passthrough when the kernel offers it.
    pub passthrough: bool,
    /// Mounted `ro`: every volume behaves as `rw=false`.
    pub read_only: bool,
}

/// An open backing file, shared by every handle of it.
struct Image {
    file: File,
    /// Daemon-mode writes to the file take this lock (see `ReflinkFs::write`).
    write_lock: Mutex<()>,
    /// A dirty image's size for this run (the engine's, shared): the
    /// writes the daemon sees stop there.
    limit: Option<Arc<AtomicU64>>,
}

impl Image {
    fn new(file: File) -> Arc<Self> {
        Arc::new(Image {
            file,
            write_lock: Mutex::new(()),
            limit: None,
        })
    }

    fn dirty(file: File, limit: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Image {
            file,
            write_lock: Mutex::new(()),
            limit: Some(limit),
        })
    }

    /// How many of `len` bytes at `offset` fit before the volume's end.
    /// A volume's size is its contract: writes the daemon sees never grow
    /// it. Like a write against a file size limit (RLIMIT_FSIZE), a write
    /// that starts inside is cut short at the end, and one that starts at
    /// or past the end fails with EFBIG ("file too large").
    fn room(&self, offset: u64, len: u64) -> FsResult<u64> {
        let Some(limit) = &self.limit else {
            return Ok(len);
        };
        let end = limit.load(Ordering::SeqCst);
        if len > 0 && offset >= end {
            log::warn!(
                "refused a write of {len} bytes at {offset}: the volume ends at {end} (EFBIG); resize it to grow it"
            );
            return Err(libc::EFBIG);
        }
        Ok(len.min(end.saturating_sub(offset)))
    }
}

impl std::ops::Deref for Image {
    type Target = File;

    fn deref(&self) -> &File {
        &self.file
    }
}

/// One open file handle.
struct Handle {
    node: Node,
    file: Arc<Image>,
    writable: bool,
    /// Keeps the passthrough registration alive while this handle exists.
    _backing: Option<Arc<Backing>>,
}

/// The open state of one volume's `N-dirty.img`.
#[derive(Default)]
struct DirtyState {
    opens: usize,
    file: Option<Arc<Image>>,
    backing: Option<Arc<Backing>>,
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
}

/// What `open` hands to the adapter.
pub struct Opened {
    pub fh: u64,
    /// `Some` when the open is served by passthrough.
    pub backing: Option<Arc<Backing>>,
}

pub struct ReflinkFs {
    pool: Arc<Pool>,
    opts: FsOptions,
    /// Whether the kernel granted passthrough (decided at INIT).
    passthrough: AtomicBool,
    inodes: Mutex<Inodes>,
    dirty: Mutex<HashMap<ValidVid, Arc<Mutex<DirtyState>>>>,
    /// Backing registrations of committed images and revisions, by inode,
    /// shared by the opens of one inode (the kernel allows one per inode).
    ro_backing: Mutex<HashMap<u64, Weak<Backing>>>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Volumes whose stop (commit) is in progress.
    committing: Mutex<BTreeSet<ValidVid>>,
    next_fh: AtomicU64,
    pub stats: Stats,
    started: SystemTime,
}

/// Logs a refused change and names the command to use instead.
fn refuse(what: &str, instead: &str) -> Errno {
    log::warn!("refused {what}: use `{instead}` instead");
    libc::EPERM
}

/// The errno of an open whose start failed. EIO for all but the few
/// errors a caller can act on: EROFS, which some errors map to elsewhere,
/// would say the volume is read-only when it is not. The reason is logged.
fn start_errno(vid: &ValidVid, e: &Error) -> Errno {
    let errno = match e.errno() {
        e @ (libc::EBUSY | libc::ENOSPC | libc::EDQUOT | libc::ENOENT) => e,
        _ => libc::EIO,
    };
    log::error!("{vid}: cannot start: {e}");
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
    }
}

impl ReflinkFs {
    pub fn new(pool: Arc<Pool>, opts: FsOptions) -> ReflinkFs {
        ReflinkFs {
            pool,
            opts,
            passthrough: AtomicBool::new(false),
            inodes: Mutex::new(Inodes::default()),
            dirty: Mutex::new(HashMap::new()),
            ro_backing: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            committing: Mutex::new(BTreeSet::new()),
            next_fh: AtomicU64::new(1),
            stats: Stats::default(),
            started: SystemTime::now(),
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

    /// Running volumes with their number of open handles.
    pub fn open_handles(&self) -> Vec<(ValidVid, usize)> {
        let mut v: Vec<(ValidVid, usize)> = self
            .dirty_states()
            .into_iter()
            .map(|(k, s)| (k, s.lock().opens))
            .filter(|(_, n)| *n > 0)
            .collect();
        v.sort();
        v
    }

    /// Volumes whose commit is in progress.
    pub fn commits_in_flight(&self) -> Vec<ValidVid> {
        self.committing.lock().iter().cloned().collect()
    }

    /// How many volumes have their `N-dirty.img` open.
    pub fn open_volumes(&self) -> usize {
        self.open_handles().len()
    }

    /// The open states, copied out so no state is locked while the map is.
    fn dirty_states(&self) -> Vec<(ValidVid, Arc<Mutex<DirtyState>>)> {
        self.dirty
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
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

    /// Volumes the mount shows: all but optional ones without an image.
    fn shown_vids(&self) -> Vec<ValidVid> {
        self.pool
            .vids()
            .into_iter()
            .filter(|v| self.pool.is_shown(v))
            .collect()
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
        }
    }

    fn file_perm(&self, writable: bool) -> u16 {
        if writable && !self.opts.read_only {
            0o600
        } else {
            0o400
        }
    }

    /// The attributes of a node, fresh from the backing files.
    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let node = self.node(ino)?;
        self.attr_of(ino, &node)
    }

    fn attr_of(&self, ino: u64, node: &Node) -> FsResult<Attr> {
        match node {
            Node::Root | Node::Class(_) | Node::Vm(..) => Ok(self.dir_attr(ino)),
            Node::Dirty(vid) => {
                let view = self.view(vid)?;
                let perm = self.file_perm(view.config.rw);
                match (view.running, view.dirty) {
                    (true, Some(sig)) => Ok(sig_attr(ino, &sig, perm)),
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
                        })
                    }
                }
            }
            Node::Img(vid, _) => {
                let view = self.view(vid)?;
                let sig = view.img.ok_or(libc::ENOENT)?;
                Ok(sig_attr(ino, &sig, 0o400))
            }
            Node::Revision(vid, name) => {
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

    /// Which node `name` in directory `parent` is, if it exists.
    fn child(&self, parent: &Node, name: &str) -> FsResult<Node> {
        let vids = self.shown_vids();
        match parent {
            Node::Root => vids
                .iter()
                .any(|v| v.class() == name)
                .then(|| Node::Class(name.to_owned()))
                .ok_or(libc::ENOENT),
            Node::Class(c) => vids
                .iter()
                .any(|v| v.class() == c && v.vm() == name)
                .then(|| Node::Vm(c.clone(), name.to_owned()))
                .ok_or(libc::ENOENT),
            Node::Vm(c, vm) => {
                for v in vids.iter().filter(|v| v.class() == c && v.vm() == vm) {
                    let n = crate::engine::Names::of(v);
                    if name == n.dirty() {
                        return Ok(Node::Dirty(v.clone()));
                    }
                    if name == n.img() || name.starts_with(&format!("{}.img", v.name())) {
                        let view = self.view(v)?;
                        if name == n.img() {
                            return match view.img {
                                Some(_) => Ok(Node::Img(v.clone(), view.generation)),
                                None => Err(libc::ENOENT),
                            };
                        }
                        if self.revisions(v)?.iter().any(|r| r.file_name == name) {
                            return Ok(Node::Revision(v.clone(), name.to_owned()));
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
        let ino = self.ino_of(&node);
        self.attr_of(ino, &node)
    }

    /// The entries of a directory, without `.` and `..`.
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(u64, Kind, String)>> {
        let node = self.node(ino)?;
        let vids = self.shown_vids();
        let mut out = Vec::new();
        match &node {
            Node::Root => {
                let classes: BTreeSet<&str> = vids.iter().map(|v| v.class()).collect();
                for c in classes {
                    let n = Node::Class(c.to_owned());
                    out.push((self.ino_of(&n), Kind::Dir, c.to_owned()));
                }
            }
            Node::Class(c) => {
                let vms: BTreeSet<&str> = vids
                    .iter()
                    .filter(|v| v.class() == c)
                    .map(|v| v.vm())
                    .collect();
                for vm in vms {
                    let n = Node::Vm(c.clone(), vm.to_owned());
                    out.push((self.ino_of(&n), Kind::Dir, vm.to_owned()));
                }
            }
            Node::Vm(c, vm) => {
                for v in vids.iter().filter(|v| v.class() == c && v.vm() == vm) {
                    let names = crate::engine::Names::of(v);
                    let Ok(view) = self.pool.volume_view(v) else {
                        continue;
                    };
                    out.push((
                        self.ino_of(&Node::Dirty(v.clone())),
                        Kind::File,
                        names.dirty(),
                    ));
                    if view.img.is_some() {
                        out.push((
                            self.ino_of(&Node::Img(v.clone(), view.generation)),
                            Kind::File,
                            names.img(),
                        ));
                    }
                    for r in self.revisions(v).unwrap_or_default() {
                        let n = Node::Revision(v.clone(), r.file_name.clone());
                        out.push((self.ino_of(&n), Kind::File, r.file_name));
                    }
                }
            }
            _ => return Err(libc::ENOTDIR),
        }
        Ok(out)
    }

    fn dirty_state(&self, vid: &ValidVid) -> Arc<Mutex<DirtyState>> {
        self.dirty.lock().entry(vid.clone()).or_default().clone()
    }

    fn add_handle(
        &self,
        node: Node,
        file: Arc<Image>,
        writable: bool,
        backing: Option<Arc<Backing>>,
    ) -> Opened {
        let fh = self.next_fh.fetch_add(1, Ordering::SeqCst);
        self.handles.lock().insert(
            fh,
            Handle {
                node,
                file,
                writable,
                _backing: backing.clone(),
            },
        );
        Opened { fh, backing }
    }

    /// Opens a node. `register` makes a passthrough backing registration
    /// for a file; it is only called when passthrough is on.
    pub fn open(
        &self,
        ino: u64,
        flags: i32,
        register: &dyn Fn(&File) -> std::io::Result<Backing>,
    ) -> FsResult<Opened> {
        let node = self.node(ino)?;
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        match &node {
            Node::Root | Node::Class(_) | Node::Vm(..) => Err(libc::EISDIR),
            Node::Dirty(vid) => {
                if flags & libc::O_TRUNC != 0 {
                    return Err(refuse(
                        &format!("O_TRUNC open of {vid}-dirty.img"),
                        &format!("reflinkfs volume resize {vid} SIZE"),
                    ));
                }
                let view = self.view(vid)?;
                if writable && (!view.config.rw || self.opts.read_only) {
                    log::warn!("{vid}: write open refused: the volume is read-only (rw=false or a ro mount)");
                    return Err(libc::EROFS);
                }
                let state = self.dirty_state(vid);
                let mut st = state.lock();
                if st.opens == 0 {
                    // The first open starts the volume; a commit of the
                    // previous run finished before this lock was free.
                    let run = self.pool.start_run(vid).map_err(|e| start_errno(vid, &e))?;
                    let file = Image::dirty(run.file, run.limit);
                    st.backing = None;
                    if self.passthrough() {
                        match register(&file) {
                            Ok(b) => st.backing = Some(Arc::new(b)),
                            Err(e) => log::error!("{vid}: passthrough registration failed ({e}); serving this run's I/O in the daemon"),
                        }
                    }
                    st.file = Some(file);
                }
                let file = st.file.clone().expect("set while opens > 0");
                st.opens += 1;
                Ok(self.add_handle(node.clone(), file, writable, st.backing.clone()))
            }
            Node::Img(vid, generation) => {
                if writable {
                    return Err(libc::EROFS);
                }
                let (file, current) = self
                    .pool
                    .open_committed(vid)
                    .map_err(|e| errno_of("open", &e))?;
                if current != *generation {
                    // A stale dentry: the kernel retries the lookup on ESTALE.
                    return Err(libc::ESTALE);
                }
                let backing = self.ro_backing_for(ino, &file, register);
                Ok(self.add_handle(node.clone(), Image::new(file), false, backing))
            }
            Node::Revision(vid, name) => {
                if writable {
                    return Err(libc::EROFS);
                }
                let file = self
                    .pool
                    .open_revision(vid, name)
                    .map_err(|e| errno_of("open", &e))?;
                let backing = self.ro_backing_for(ino, &file, register);
                Ok(self.add_handle(node.clone(), Image::new(file), false, backing))
            }
        }
    }

    fn ro_backing_for(
        &self,
        ino: u64,
        file: &File,
        register: &dyn Fn(&File) -> std::io::Result<Backing>,
    ) -> Option<Arc<Backing>> {
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

    /// The last release of a handle. For `N-dirty.img`, the last release of
    /// the volume stops it: commit or discard. Errors cannot reach the
    /// application; they are logged and the dirty image stays for recovery.
    pub fn release(&self, fh: u64) {
        let Some(h) = self.handles.lock().remove(&fh) else {
            log::error!("release of unknown handle {fh}");
            return;
        };
        if let Node::Dirty(vid) = h.node.clone() {
            let vid = &vid;
            let state = self.dirty_state(vid);
            let mut st = state.lock();
            st.opens = st.opens.saturating_sub(1);
            if st.opens == 0 {
                st.backing = None;
                st.file = None;
                drop(h);
                self.committing.lock().insert(vid.clone());
                let stopped = self.pool.stop(vid);
                self.committing.lock().remove(vid);
                match stopped {
                    // The engine said at WARN what holds it; the watcher
                    // (`retry_held`) commits it once that lets go.
                    Ok(StopOutcome::Held { .. }) => {}
                    Ok(outcome) => log::info!("{vid}: last close: {outcome:?}"),
                    Err(e) => log::error!("{vid}: stop at the last close failed: {e}; the dirty image is kept and will be committed at the next start or pool open"),
                }
            }
        } else {
            let ino = self.ino_of(&h.node);
            drop(h);
            let mut map = self.ro_backing.lock();
            if map.get(&ino).is_some_and(|w| w.strong_count() == 0) {
                map.remove(&ino);
            }
        }
    }

    fn handle_file(&self, fh: u64, need_write: bool) -> FsResult<Arc<Image>> {
        let handles = self.handles.lock();
        let h = handles.get(&fh).ok_or(libc::EBADF)?;
        if need_write && !h.writable {
            return Err(if matches!(h.node, Node::Dirty(_)) {
                libc::EBADF
            } else {
                libc::EROFS
            });
        }
        Ok(h.file.clone())
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
        let file = self.handle_file(fh, true)?;
        let n = file.room(offset, data.len() as u64)? as usize;
        let data = &data[..n];
        let _one_at_a_time = file.write_lock.lock();
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
        if !matches!(self.node(ino)?, Node::Dirty(_)) {
            return Err(libc::EROFS);
        }
        let file = self.handle_file(fh, true)?;
        if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
            // Both move data and change the size; a volume's size changes
            // only by a resize.
            log::warn!("refused fallocate mode {mode:#x}: it changes the volume's size (use `reflinkfs volume resize`)");
            return Err(libc::EOPNOTSUPP);
        }
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && file.room(offset, length)? < length {
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
        let dst = self.handle_file(fh_out, true)?;
        let len = dst.room(off_out, len.min(u32::MAX as u64 & !0xfff))? as usize;
        sys::copy_file_range(src.as_fd(), off_in, dst.as_fd(), off_out, len)
            .map(|n| n as u32)
            .map_err(|e| io_errno("copy_file_range", e))
    }

    /// setattr: only a size change of a volume's image is allowed, which is
    /// a resize (§5). Growing only; shrinking goes through the CLI.
    pub fn set_size(&self, ino: u64, size: u64) -> FsResult<Attr> {
        let node = self.node(ino)?;
        let vid = match &node {
            Node::Dirty(v) | Node::Img(v, _) => v.clone(),
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
        // Serialise with opens and releases of the volume.
        let state = self.dirty_state(&vid);
        let _st = state.lock();
        self.pool
            .resize(&vid, size, false)
            .map_err(|e| errno_of("resize", &e))?;
        let node = match node {
            Node::Img(v, _) => Node::Img(v.clone(), self.view(&v)?.generation),
            other => other,
        };
        let ino = self.ino_of(&node);
        self.attr_of(ino, &node)
    }

    /// unlink: deletes a revision; everything else is refused.
    pub fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        let parent = self.node(parent)?;
        match self.child(&parent, name)? {
            Node::Revision(vid, file) => self
                .pool
                .remove_revision(&vid, &file)
                .map_err(|e| errno_of("unlink", &e)),
            Node::Dirty(vid) | Node::Img(vid, _) => Err(refuse(
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
            if let Node::Revision(vid, file) = self.child(&p, name)? {
                if newname == crate::engine::Names::of(&vid).img() {
                    let state = self.dirty_state(&vid);
                    let _st = state.lock();
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
                put("pool", self.pool.path().display().to_string());
                put("io_mode", self.io_mode().to_owned());
                put(
                    "read_requests",
                    self.stats.reads.load(Ordering::Relaxed).to_string(),
                );
                put(
                    "write_requests",
                    self.stats.writes.load(Ordering::Relaxed).to_string(),
                );
                put(
                    "read_bytes",
                    self.stats.read_bytes.load(Ordering::Relaxed).to_string(),
                );
                put(
                    "write_bytes",
                    self.stats.write_bytes.load(Ordering::Relaxed).to_string(),
                );
                put(
                    "getxattr_requests",
                    self.stats.getxattrs.load(Ordering::Relaxed).to_string(),
                );
                put("open_volumes", self.open_volumes().to_string());
            }
            Node::Class(_) | Node::Vm(..) => {}
            Node::Dirty(vid) | Node::Img(vid, _) | Node::Revision(vid, _) => {
                let view = self.view(vid)?;
                let c = &view.config;
                put("vid", vid.to_string());
                put("type", c.kind().as_str().to_owned());
                let state = match (view.running, view.held) {
                    (true, true) => "held",
                    (true, false) => "running",
                    _ => "stopped",
                };
                put("state", state.to_owned());
                put("size", view.nominal_size.to_string());
                put("rw", c.rw.to_string());
                put("revisions_to_keep", c.revisions_to_keep.to_string());
                put("snap_on_start", c.snap_on_start.to_string());
                put("save_on_stop", c.save_on_stop.to_string());
                if let Some(s) = &c.source {
                    put("source", s.to_string());
                }
                if let Node::Revision(_, file) = &node {
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
    /// never exits with data only in a dirty image.
    pub fn shutdown(&self) {
        let states = self.dirty_states();
        self.handles.lock().clear();
        for (vid, state) in states {
            let mut st = state.lock();
            if st.opens > 0 || self.pool.is_running(&vid).unwrap_or(false) {
                st.opens = 0;
                st.backing = None;
                st.file = None;
                match self
                    .pool
                    .stop_within(&vid, std::time::Duration::from_secs(2))
                {
                    Ok(o) => log::info!("{vid}: stopped at unmount: {o:?}"),
                    Err(e) => {
                        log::error!("{vid}: stop at unmount failed: {e}; recovery will commit it")
                    }
                }
            }
        }
    }

    pub fn root_ino(&self) -> u64 {
        ROOT_INO
    }
}
