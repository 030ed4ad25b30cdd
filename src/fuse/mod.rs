//! The FUSE mount: a thin adapter from fuser's calls to [`fs::ReflinkFs`].
//! It translates arguments, calls the filesystem, and maps `Err` to an
//! errno; all behaviour lives in `fs.rs`.
//!
//! Two things only this layer can do:
//! - every request runs under `catch_unwind`: a panic fails that request
//!   with EIO (fuser answers a reply dropped unsent with EIO), is logged,
//!   and the mount keeps serving every other volume;
//! - an open that would wait for a volume (its start, or the commit of its
//!   last run) moves, with its reply, to a thread of its own, so that no
//!   FUSE worker ever waits on a volume: a mount with `threads=1` serves
//!   every other VM while one volume starts or commits.

pub mod fs;
pub mod inodes;

use fs::{Attr, Kind, ReflinkFs};
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Files are looked up and stat'ed afresh every time: their backing files
/// change under them at every commit. Directories change rarely.
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

pub struct Adapter {
    pub fs: Arc<ReflinkFs>,
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

fn opened(reply: ReplyOpen, o: &fs::Opened<fuser::BackingId>) {
    match &o.backing {
        Some(b) => reply.opened_passthrough(FileHandle(o.fh), FopenFlags::empty(), b),
        // No FOPEN_KEEP_CACHE: the kernel drops the inode's page cache
        // at open, since a restarted volume has a new dirty image.
        None => reply.opened(FileHandle(o.fh), FopenFlags::empty()),
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
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
        kind: match a.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
        },
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
    /// How long the kernel may cache an entry's name -> inode mapping.
    fn entry_ttl(&self, a: &Attr) -> Duration {
        match (self.fs.caching(), a.kind) {
            (true, _) => CACHE_TTL,
            (false, Kind::Dir) => DIR_TTL,
            (false, Kind::File) => Duration::ZERO,
        }
    }

    /// How long the kernel may cache attributes.
    fn attr_ttl(&self, a: &Attr) -> Duration {
        match (self.fs.caching(), a.kind, a.cacheable) {
            (_, _, false) => Duration::ZERO,
            (true, _, true) => CACHE_TTL,
            (false, Kind::Dir, true) => DIR_TTL,
            (false, Kind::File, true) => Duration::ZERO,
        }
    }
}

fn name_str(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::ENOENT)
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(
            InitFlags::FUSE_ASYNC_DIO
                | InitFlags::FUSE_PARALLEL_DIROPS
                | InitFlags::FUSE_ATOMIC_O_TRUNC,
        );
        // readdirplus: a listing carries the attributes, so `ls -l` of a VM
        // directory is one request, not one per file.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        // HANDLE_KILLPRIV_V2 makes the kernel mark the superblock SB_NOSEC,
        // so after one check an inode without suid bits or capabilities is
        // flagged S_NOSEC and writes stop asking the daemon for
        // security.capability: without it, every write, passthrough ones
        // included, cost a round trip to the daemon. The images never carry
        // suid bits or capabilities, so there is nothing for the daemon to
        // kill on write.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        let _ = config.set_max_write(MAX_WRITE);
        let mut on = false;
        if self.fs.wants_passthrough() {
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) => {
                    // Backing files live on a local filesystem (depth 0), so
                    // this mount is depth 1.
                    on = config.set_max_stack_depth(1).is_ok();
                    if !on {
                        log::warn!("the kernel refused max_stack_depth=1; passthrough is off");
                    }
                }
                Err(_) => log::warn!(
                    "the kernel does not offer FUSE passthrough (Linux >= 6.9 and CAP_SYS_ADMIN are needed); reads and writes are served by the daemon"
                ),
            }
        }
        self.fs.set_passthrough(on);
        Ok(())
    }

    fn destroy(&mut self) {
        self.fs.shutdown();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.guard("lookup", || {
            let r = name_str(name).and_then(|n| self.fs.lookup(parent.0, n).map_err(errno));
            match r {
                Ok(a) => reply.entry_with_ttls(
                    &self.entry_ttl(&a),
                    &self.attr_ttl(&a),
                    &file_attr(&a),
                    Generation(0),
                ),
                Err(e) => reply.error(e),
            }
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.guard("getattr", || {
            match self.fs.getattr(ino.0, fh.map(|f| f.0)) {
                Ok(a) => reply.attr(&self.attr_ttl(&a), &file_attr(&a)),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            log::warn!("refused setattr of mode, owner or times on inode {}: images take their attributes from the pool", ino.0);
            return reply.error(Errno::EPERM);
        }
        self.guard("setattr", || {
            let r = match size {
                Some(s) => self.fs.set_size(ino.0, s),
                None => self.fs.getattr(ino.0, None),
            };
            match r {
                Ok(a) => reply.attr(&self.attr_ttl(&a), &file_attr(&a)),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        self.guard("mknod", || {
            log::warn!("refused mknod of {name:?}: use `reflinkfs volume create`");
            reply.error(Errno::EPERM);
        })
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.guard("mkdir", || {
            log::warn!("refused mkdir of {name:?}: VM directories appear with their volumes (`reflinkfs volume create`)");
            reply.error(Errno::EPERM);
        })
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.guard("unlink", || {
            match name_str(name).and_then(|n| self.fs.unlink(parent.0, n).map_err(errno)) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.guard("rmdir", || {
            log::warn!("refused rmdir of {name:?}: use `reflinkfs volume remove`");
            reply.error(Errno::EPERM);
        })
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        self.guard("symlink", || {
            log::warn!("refused symlink {link_name:?}: the pool holds only volumes");
            reply.error(Errno::EPERM);
        })
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.guard("rename", || {
            let r = name_str(name).and_then(|n| {
                let nn = name_str(newname)?;
                self.fs
                    .rename(parent.0, n, newparent.0, nn, flags.bits())
                    .map_err(errno)
            });
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.guard("link", || {
            log::warn!("refused link {newname:?}: use `reflinkfs volume clone`");
            reply.error(Errno::EPERM);
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let quick = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let register = |f: &std::fs::File| reply.open_backing(f);
            self.fs.open(ino.0, flags.0, &register, false)
        }));
        match quick {
            Ok(Ok(o)) => opened(reply, &o),
            Ok(Err(fs::OpenError::Errno(e))) => reply.error(errno(e)),
            Ok(Err(fs::OpenError::WouldWait)) => {
                // A start or a commit is ahead: the open and its reply go
                // to a thread that may wait, and this worker serves on.
                let fs = self.fs.clone();
                let spawned = std::thread::Builder::new()
                    .name("open".into())
                    .spawn(move || {
                        // A start copies (in copy mode, the whole image):
                        // it yields the CPU to the threads answering requests.
                        crate::sys::lower_thread_priority(10);
                        let a = Adapter { fs };
                        a.guard("open", || {
                            let register = |f: &std::fs::File| reply.open_backing(f);
                            match a.fs.open(ino.0, flags.0, &register, true) {
                                Ok(o) => opened(reply, &o),
                                Err(fs::OpenError::Errno(e)) => reply.error(errno(e)),
                                Err(fs::OpenError::WouldWait) => reply.error(Errno::EIO),
                            }
                        })
                    });
                if let Err(e) = spawned {
                    log::error!("open: cannot start a thread ({e}); answered EIO");
                }
            }
            Err(_) => {
                self.fs.stats.panics.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "open: the request panicked; it was answered EIO, and the mount serves on"
                );
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.guard("read", || {
            let mut reply = Some(reply);
            let sent = self.fs.read(fh.0, offset, size, |d| {
                if let Some(r) = reply.take() {
                    r.data(d);
                }
            });
            if let (Err(e), Some(r)) = (sent, reply) {
                r.error(errno(e));
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.guard("write", || match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.guard("flush", || {
            // Writes go straight to the backing file; there is nothing to flush.
            reply.ok();
        })
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.guard("release", || {
            // Answer first: the kernel does not wait for RELEASE, and a commit
            // may take a while. A new open of the volume waits for it.
            reply.ok();
            self.fs.release(fh.0);
        })
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.guard("fsync", || match self.fs.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.guard("opendir", || {
            // With invalidation (the daemon always has it), ENOSYS tells the
            // kernel to open directories by itself from now on, and then it
            // keeps each listing cached (FOPEN_CACHE_DIR, its default without
            // OPENDIR) until a change of one of its volumes drops it: `ls -lR`
            // of a large pool costs no OPENDIR, READDIR or RELEASEDIR round
            // trips once it has been read.
            if self.fs.caching() {
                return reply.error(Errno::ENOSYS);
            }
            match self.fs.getattr(ino.0, None) {
                Ok(a) if a.kind == Kind::Dir => reply.opened(FileHandle(0), FopenFlags::empty()),
                Ok(_) => reply.error(Errno::ENOTDIR),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.guard("readdir", || {
            let entries = match self.fs.readdir(ino.0) {
                Ok(e) => e,
                Err(e) => return reply.error(errno(e)),
            };
            let dots = [
                (ino.0, Kind::Dir, ".".to_owned()),
                (ino.0, Kind::Dir, "..".to_owned()),
            ];
            for (i, (eino, kind, name)) in dots
                .into_iter()
                .chain(entries)
                .enumerate()
                .skip(offset as usize)
            {
                let kind = match kind {
                    Kind::Dir => FileType::Directory,
                    Kind::File => FileType::RegularFile,
                };
                if reply.add(INodeNo(eino), (i + 1) as u64, kind, &name) {
                    break;
                }
            }
            reply.ok();
        })
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.guard("readdirplus", || {
            let entries = match self.fs.readdir_plus(ino.0) {
                Ok(e) => e,
                Err(e) => return reply.error(errno(e)),
            };
            let dir = match self.fs.getattr(ino.0, None) {
                Ok(a) => a,
                Err(e) => return reply.error(errno(e)),
            };
            let dots = [
                (Kind::Dir, ".".to_owned(), dir),
                (Kind::Dir, "..".to_owned(), dir),
            ];
            for (i, (_, name, a)) in dots
                .into_iter()
                .chain(entries)
                .enumerate()
                .skip(offset as usize)
            {
                let full = reply.add(
                    INodeNo(a.ino),
                    (i + 1) as u64,
                    &name,
                    &self.attr_ttl(&a).min(self.entry_ttl(&a)),
                    &file_attr(&a),
                    Generation(0),
                );
                if full {
                    break;
                }
                // The kernel takes every entry but . and .. as a lookup.
                if i >= 2 {
                    self.fs.looked_up(a.ino);
                }
            }
            reply.ok();
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.guard("statfs", || {
            match self.fs.statfs() {
                // f_bsize 4096: a loop device takes its discard granularity
                // from it.
                Ok((blocks, bfree, bavail)) => {
                    reply.statfs(blocks, bfree, bavail, 0, 0, 4096, 255, 4096)
                }
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.guard("setxattr", || {
            log::warn!("refused setxattr {name:?}: properties are set with `reflinkfs volume set`");
            reply.error(Errno::EPERM);
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.guard("getxattr", || {
            self.fs
                .stats
                .getxattrs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Anything not ours is answered at once. The security and system
            // namespaces (SELinux labels, POSIX ACLs, capabilities) are not
            // supported at all: EOPNOTSUPP says so, and `ls -l` then stops
            // asking for every file of the mount (it remembers that per
            // device), instead of costing two round trips per file. The
            // kernel's security.capability check on the write path takes
            // any error as "no capabilities".
            let n = name.as_encoded_bytes();
            if !n.starts_with(b"user.reflinkfs.") {
                let unsupported = n.starts_with(b"security.")
                    || n.starts_with(b"system.")
                    || n.starts_with(b"trusted.");
                return reply.error(if unsupported {
                    Errno::EOPNOTSUPP
                } else {
                    Errno::NO_XATTR
                });
            }
            let attrs = match self.fs.xattrs(ino.0) {
                Ok(a) => a,
                Err(e) => return reply.error(errno(e)),
            };
            let Some((_, value)) = attrs.iter().find(|(k, _)| OsStr::new(k) == name) else {
                return reply.error(Errno::NO_XATTR);
            };
            xattr_reply(value.as_bytes(), size, reply);
        })
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.guard("listxattr", || {
            let attrs = match self.fs.xattrs(ino.0) {
                Ok(a) => a,
                Err(e) => return reply.error(errno(e)),
            };
            let mut buf = Vec::new();
            for (k, _) in attrs {
                buf.extend_from_slice(k.as_bytes());
                buf.push(0);
            }
            xattr_reply(&buf, size, reply);
        })
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.guard("removexattr", || {
            log::warn!("refused removexattr {name:?}: the xattrs show volume properties");
            reply.error(Errno::EPERM);
        })
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        self.guard("access", || {
            // default_permissions makes the kernel check modes itself.
            reply.ok();
        })
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.guard("create", || {
            log::warn!("refused create of {name:?}: use `reflinkfs volume create`");
            reply.error(Errno::EPERM);
        })
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.guard("fallocate", || {
            match self.fs.fallocate(ino.0, fh.0, offset, length, mode) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.guard("lseek", || match self.fs.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.guard("copy_file_range", || {
            match self
                .fs
                .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
            {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(e)),
            }
        })
    }
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
