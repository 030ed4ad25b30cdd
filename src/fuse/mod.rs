//! The FUSE mount: a thin adapter from fuser's calls to [`fs::ReflinkFs`].
//! It translates arguments, calls the filesystem, and answers: a value, or
//! the errno the filesystem chose (and logged, once, at its level: see
//! `fs/errno.rs`). All behaviour lives in `fs/`.
//!
//! Three things only this layer does:
//! - a read-only mount (`-o ro`) refuses every change here (truncate,
//!   unlink, rename, and the open of a file for writing) before the
//!   filesystem sees it, and shows every image 0400;
//! - every request runs under `catch_unwind`: a panic fails that request
//!   with EIO (fuser answers a reply dropped unsent with EIO), is logged,
//!   and the mount keeps serving every other volume;
//! - a request that would wait on a volume or on the disk moves, with its
//!   reply, to the waiting pool ([`Adapter::serve_or_wait`], and
//!   `fs/waiters.rs`): an open whose volume starts or commits, and every
//!   truncate (a resize), unlink of a revision (its removal) and rename
//!   onto `N.img` (a revert), which claim the volume and copy or fsync.
//!   So no FUSE worker ever waits on a volume: a mount with `threads=1`
//!   serves every other VM while one volume starts, commits or changes.
//!   The pool has a few threads, one per waiting volume, and a bounded
//!   queue: a request that finds it full is answered EBUSY.

pub mod fs;
pub mod inodes;
mod ops;

use fs::{Attr, FsResult, Kind, ReflinkFs, TryError};
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, PollEvents,
    PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyPoll,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long the kernel may cache entries and attributes when the daemon
/// invalidates them at every change (a start, a commit, an operation):
/// the bound on staleness if a notification is lost in a race. A running
/// dirty image's attributes are never cached: its writes change them.
const CACHE_TTL: Duration = Duration::from_secs(10);
/// Without invalidation (no session notifier), only directories are
/// cached, briefly.
const DIR_TTL: Duration = Duration::from_secs(1);

/// Largest request the daemon asks the kernel for (the kernel caps it at
/// its `max_pages_limit`, 1 MiB by default).
const MAX_WRITE: u32 = 1 << 20;

#[derive(Clone)]
pub struct Adapter {
    pub fs: Arc<ReflinkFs>,
    /// The daemon's own descriptor of the connection, for passthrough
    /// registrations.
    pub conn: Arc<Connection>,
    /// Mounted `ro`: every volume behaves as `rw=false`.
    pub read_only: bool,
    /// Who every file and directory belongs to: the pool directory's owner
    /// and group, so that the owner of a pool that root mounted (with
    /// `allow_other`) can use their volumes.
    pub owner: (u32, u32),
}

/// The daemon's own descriptor of the mount's FUSE connection: a
/// duplicate of the session's, set once the session exists and kept until
/// the daemon exits.
///
/// Passthrough registrations are taken back through it, never through the
/// channel of the worker that served the open: fuser's worker channels
/// close when the session ends, and a registration that could not be taken
/// back then would keep the daemon's own read-write descriptor of a dirty
/// image in the kernel for as long as the connection lives, which the
/// commit's lease probe sees as a writer outside reflinkfs.
#[derive(Default)]
pub struct Connection(std::sync::OnceLock<std::os::fd::OwnedFd>);

impl Connection {
    /// Gives the connection its descriptor (once; later calls do nothing).
    pub fn set(&self, fd: std::os::fd::OwnedFd) {
        let _ = self.0.set(fd);
    }
}

/// A passthrough registration of a backing file, made through the reply
/// to an open: taken back from the kernel, through the daemon's own
/// [`Connection`], when the last open that uses it is gone.
pub struct Backing {
    /// `None` only while dropped.
    id: Option<fuser::BackingId>,
    conn: Arc<Connection>,
}

impl Backing {
    fn register(
        reply: &ReplyOpen,
        conn: &Arc<Connection>,
        file: &std::fs::File,
    ) -> std::io::Result<Backing> {
        Ok(Backing {
            id: Some(reply.open_backing(file)?),
            conn: conn.clone(),
        })
    }

    fn id(&self) -> &fuser::BackingId {
        self.id
            .as_ref()
            .expect("a registration has its id until dropped")
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        // Without the daemon's descriptor (never, once mounted), fuser
        // takes it back through the worker's channel.
        let Some(fd) = self.conn.0.get() else { return };
        let raw = id.into_raw();
        if let Err(e) = crate::sys::fuse_backing_close(fd.as_fd(), raw) {
            log::error!("taking back passthrough registration {raw} failed: {e}");
        }
    }
}

/// A reply that can carry an errno.
trait Fail {
    fn fail(self, errno: i32);
}

macro_rules! fail_by_error {
    ($($reply:ty),*) => {
        $(impl Fail for $reply {
            fn fail(self, errno: i32) {
                self.error(Errno::from_i32(errno))
            }
        })*
    };
}

fail_by_error!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyIoctl,
    ReplyLseek,
    ReplyOpen,
    ReplyPoll,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr
);

/// A reply whose answer is one plain value: what [`Adapter::answer`]
/// sends.
trait Answer<T>: Fail {
    fn answer(self, value: T);
}

impl Answer<()> for ReplyEmpty {
    fn answer(self, (): ()) {
        self.ok()
    }
}

impl Answer<u32> for ReplyWrite {
    fn answer(self, n: u32) {
        self.written(n)
    }
}

impl Answer<i64> for ReplyLseek {
    fn answer(self, offset: i64) {
        self.offset(offset)
    }
}

impl Adapter {
    /// Runs one request's handler; a panic in it fails the request (its
    /// reply, dropped unsent, answers EIO) and is logged.
    fn guard(&self, op: &str, f: impl FnOnce()) {
        let r = fs::in_request(|| std::panic::catch_unwind(AssertUnwindSafe(f)));
        if let Err(p) = r {
            self.fs.stats.panics.fetch_add(1, Ordering::Relaxed);
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            log::error!(
                "{op}: the request panicked ({msg}); it was answered EIO, and the mount serves on"
            );
        }
    }
}

/// Invalidations through fuser's notifier.
pub struct Notify(pub fuser::Notifier);

impl fs::Invalidate for Notify {
    fn entry(&self, parent: u64, name: &str) {
        // ENOENT: the kernel had nothing cached; nothing to do.
        let _ = self.0.inval_entry(INodeNo(parent), OsStr::new(name));
    }

    fn inode(&self, ino: u64) {
        // Attributes only (offset -1): the data goes through passthrough
        // or the backing file's page cache, never the mount's.
        let _ = self.0.inval_inode(INodeNo(ino), -1, 0);
    }

    fn listing(&self, ino: u64) {
        // From offset 0: the directory's cached listing goes.
        let _ = self.0.inval_inode(INodeNo(ino), 0, 0);
    }
}

fn opened(reply: ReplyOpen, o: &fs::Opened<Backing>) {
    match &o.backing {
        Some(b) => reply.opened_passthrough(FileHandle(o.fh), FopenFlags::empty(), b.id()),
        // No FOPEN_KEEP_CACHE: the kernel drops the inode's page cache
        // at open, since a restarted volume has a new dirty image.
        None => reply.opened(FileHandle(o.fh), FopenFlags::empty()),
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: if a.kind == Kind::Dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Adapter {
    /// Runs one request: `f` computes the result under [`Adapter::guard`],
    /// and `send` answers it. An error is answered with its errno, which
    /// the filesystem has logged where it arose.
    fn serve<R: Fail, T>(
        &self,
        op: &str,
        reply: R,
        f: impl FnOnce() -> FsResult<T>,
        send: impl FnOnce(R, T),
    ) {
        self.guard(op, || match f() {
            Ok(v) => send(reply, v),
            Err(e) => reply.fail(e),
        })
    }

    /// [`Adapter::serve`] for a reply that carries one plain value.
    fn answer<R: Answer<T>, T>(&self, op: &str, reply: R, f: impl FnOnce() -> FsResult<T>) {
        self.serve(op, reply, f, R::answer)
    }

    /// Runs a request that may wait on a volume (an open, a truncate, an
    /// unlink, a rename): `f` runs here first without `may_wait`; when it
    /// would wait, the request and its reply go to the waiting pool
    /// ([`ReflinkFs::defer`]), which runs `f` again with `may_wait` and
    /// answers, and this worker serves on. `f` gets the reply, which an
    /// open registers its passthrough file through.
    fn serve_or_wait<R, T>(
        &self,
        op: &'static str,
        reply: R,
        f: impl Fn(&Adapter, &R, bool) -> Result<T, TryError> + Send + 'static,
        send: impl FnOnce(&Adapter, R, T) + Send + 'static,
    ) where
        R: Fail + Send + 'static,
    {
        self.guard(op, || match f(self, &reply, false) {
            Ok(v) => send(self, reply, v),
            Err(TryError::Errno(e)) => reply.fail(e),
            Err(TryError::WouldWait(vid)) => {
                let a = self.clone();
                let job = move |admitted: FsResult<()>| match admitted {
                    Err(e) => reply.fail(e),
                    Ok(()) => a.guard(op, || match f(&a, &reply, true) {
                        Ok(v) => send(&a, reply, v),
                        Err(TryError::Errno(e)) => reply.fail(e),
                        // Never with `may_wait`.
                        Err(TryError::WouldWait(_)) => reply.fail(libc::EIO),
                    }),
                };
                self.fs.defer(vid, Box::new(job));
            }
        })
    }

    /// EROFS (logged) on a read-only mount.
    fn writable(&self, what: &str) -> FsResult<()> {
        match self.read_only {
            true => Err(fs::fail(
                libc::EROFS,
                format_args!("refused {what}: the mount is read-only"),
            )),
            false => Ok(()),
        }
    }

    /// A request the mount never does: logged, answered EPERM, with the
    /// command to use instead.
    fn refuse<R: Fail>(&self, reply: R, what: std::fmt::Arguments<'_>, instead: &str) {
        reply.fail(fs::refuse(&what.to_string(), instead));
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        let mut f = file_attr(a);
        (f.uid, f.gid) = self.owner;
        if self.read_only {
            f.perm &= !0o222;
        }
        f
    }

    /// How long the kernel may cache an entry's name -> inode mapping.
    fn entry_ttl(&self, a: &Attr) -> Duration {
        match (self.fs.caching(), a.kind) {
            (true, _) => CACHE_TTL,
            (false, Kind::Dir) => DIR_TTL,
            (false, Kind::File) => Duration::ZERO,
        }
    }

    /// How long the kernel may cache attributes: as long as the entry,
    /// unless they change without the daemon knowing (a running image).
    fn attr_ttl(&self, a: &Attr) -> Duration {
        match a.cacheable {
            true => self.entry_ttl(a),
            false => Duration::ZERO,
        }
    }
}

/// A name as the filesystem takes it: the pool's names are UTF-8, so any
/// other does not exist.
fn name_str(name: &OsStr) -> FsResult<&str> {
    name.to_str().ok_or(libc::ENOENT)
}

fn xattr_reply(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// The FUSE file type of a node kind.
pub(crate) fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
    }
}
