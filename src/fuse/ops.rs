//! fuser's [`Filesystem`] for the [`Adapter`]: one method per FUSE
//! request, each a translation of arguments, a call of the filesystem
//! through [`Adapter::serve`] or [`Adapter::change`], and its answer.

use super::*;

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
        self.serve(
            "lookup",
            reply,
            || self.fs.lookup(parent.0, name_str(name)?),
            |r, a| {
                r.entry_with_ttls(
                    &self.entry_ttl(&a),
                    &self.attr_ttl(&a),
                    &self.attr(&a),
                    Generation(0),
                )
            },
        )
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.serve(
            "getattr",
            reply,
            || self.fs.getattr(ino.0, fh.map(|f| f.0)),
            |r, a| r.attr(&self.attr_ttl(&a), &self.attr(&a)),
        )
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
            return self.refuse(
                reply,
                format_args!("setattr of mode, owner or times on inode {}", ino.0),
                "reflinkfs volume set",
            );
        }
        let Some(size) = size else {
            let send = |r: ReplyAttr, a: Attr| r.attr(&self.attr_ttl(&a), &self.attr(&a));
            return self.serve("setattr", reply, || self.fs.getattr(ino.0, None), send);
        };
        self.serve_or_wait(
            "truncate",
            reply,
            move |a, _, may_wait| {
                a.writable("truncate")?;
                a.fs.set_size(ino.0, size, may_wait)
            },
            |a, r, attr| r.attr(&a.attr_ttl(&attr), &a.attr(&attr)),
        )
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
        self.refuse(
            reply,
            format_args!("mknod of {name:?}"),
            "reflinkfs volume create",
        )
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
        // VM directories appear with their volumes.
        self.refuse(
            reply,
            format_args!("mkdir of {name:?}"),
            "reflinkfs volume create",
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_os_string();
        self.serve_or_wait(
            "unlink",
            reply,
            move |a, _, may_wait| {
                a.writable("unlink")?;
                a.fs.unlink(parent.0, name_str(&name)?, may_wait)
            },
            |_, r, ()| r.ok(),
        )
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.refuse(
            reply,
            format_args!("rmdir of {name:?}"),
            "reflinkfs volume remove",
        )
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        // The pool holds only volumes.
        self.refuse(
            reply,
            format_args!("symlink {link_name:?}"),
            "reflinkfs volume create",
        )
    }

    fn readlink(&self, _req: &Request, _ino: INodeNo, reply: ReplyData) {
        // There are no symlinks on the mount.
        reply.error(Errno::EINVAL)
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
        let (name, newname) = (name.to_os_string(), newname.to_os_string());
        self.serve_or_wait(
            "rename",
            reply,
            move |a, _, may_wait| {
                a.writable("rename")?;
                let (n, nn) = (name_str(&name)?, name_str(&newname)?);
                a.fs.rename(parent.0, n, newparent.0, nn, flags.bits(), may_wait)
            },
            |_, r, ()| r.ok(),
        )
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.refuse(
            reply,
            format_args!("link {newname:?}"),
            "reflinkfs volume clone",
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            if let Err(e) = self.writable("an open for writing") {
                return reply.fail(e);
            }
        }
        // A start or a commit ahead: the open and its reply go to the
        // waiting pool, and this worker serves on.
        self.serve_or_wait(
            "open",
            reply,
            move |a, reply, may_wait| {
                let register = |f: &std::fs::File| Backing::register(reply, &a.conn, f);
                a.fs.open(ino.0, flags.0, &register, may_wait)
            },
            |_, r, o| opened(r, &o),
        )
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
                r.fail(e);
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
        self.answer("write", reply, || self.fs.write(fh.0, offset, data))
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes go straight to the backing file; there is nothing to flush.
        reply.ok();
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
        self.answer("fsync", reply, || self.fs.fsync(fh.0, datasync))
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // With invalidation (the daemon always has it), ENOSYS tells the
        // kernel to open directories by itself from now on, and then it
        // keeps each listing cached (FOPEN_CACHE_DIR, its default without
        // OPENDIR) until a change of one of its volumes drops it: `ls -lR`
        // of a large pool costs no OPENDIR, READDIR or RELEASEDIR round
        // trips once it has been read.
        if self.fs.caching() {
            return reply.error(Errno::ENOSYS);
        }
        self.serve(
            "opendir",
            reply,
            || match self.fs.getattr(ino.0, None)?.kind {
                Kind::Dir => Ok(()),
                Kind::File => Err(libc::ENOTDIR),
            },
            |r, ()| r.opened(FileHandle(0), FopenFlags::empty()),
        )
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directories are views of the pool, whose changes are durable when
        // they are made.
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.serve(
            "readdir",
            reply,
            || self.fs.readdir(ino.0),
            |mut reply, entries| {
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
                    if reply.add(INodeNo(eino), (i + 1) as u64, super::file_type(kind), &name) {
                        break;
                    }
                }
                reply.ok();
            },
        )
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.serve(
            "readdirplus",
            reply,
            || Ok((self.fs.readdir_plus(ino.0)?, self.fs.getattr(ino.0, None)?)),
            |mut reply, (entries, dir)| {
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
                        &self.attr_ttl(&a),
                        &self.attr(&a),
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
            },
        )
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.serve(
            "statfs",
            reply,
            || self.fs.statfs(),
            // f_bsize 4096: a loop device takes its discard granularity
            // from it.
            |r, (blocks, bfree, bavail)| r.statfs(blocks, bfree, bavail, 0, 0, 4096, 255, 4096),
        )
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
        self.refuse(
            reply,
            format_args!("setxattr {name:?}"),
            "reflinkfs volume set",
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.fs.stats.getxattrs.fetch_add(1, Ordering::Relaxed);
        // Anything not ours is answered at once. The security and system
        // namespaces (SELinux labels, POSIX ACLs, capabilities) are not
        // supported at all: EOPNOTSUPP says so, and `ls -l` then stops
        // asking for every file of the mount (it remembers that per
        // device), instead of costing two round trips per file. The
        // kernel's security.capability check on the write path takes any
        // error as "no capabilities".
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
        self.serve(
            "getxattr",
            reply,
            || {
                let attrs = self.fs.xattrs(ino.0)?;
                attrs
                    .into_iter()
                    .find(|(k, _)| OsStr::new(k) == name)
                    .map(|(_, v)| v)
                    .ok_or(libc::ENODATA)
            },
            |r, value| xattr_reply(value.as_bytes(), size, r),
        )
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.serve(
            "listxattr",
            reply,
            || self.fs.xattrs(ino.0),
            |r, attrs| {
                let mut buf = Vec::new();
                for (k, _) in attrs {
                    buf.extend_from_slice(k.as_bytes());
                    buf.push(0);
                }
                xattr_reply(&buf, size, r)
            },
        )
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.refuse(
            reply,
            format_args!("removexattr {name:?}"),
            "reflinkfs volume set",
        )
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions makes the kernel check modes itself.
        reply.ok();
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
        self.refuse(
            reply,
            format_args!("create of {name:?}"),
            "reflinkfs volume create",
        )
    }

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // The images are plain files: no ioctl means anything on them (qemu
        // probes a few at every open). ENOTTY is "not this file's ioctl".
        reply.fail(fs::fail(
            libc::ENOTTY,
            format_args!("ioctl {cmd:#x} on inode {}: not supported", ino.0),
        ))
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        // ENOSYS: the kernel stops asking and answers every poll of the
        // mount itself (a regular file is always ready).
        reply.fail(libc::ENOSYS)
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
        let f = || self.fs.fallocate(ino.0, fh.0, offset, length, mode);
        self.answer("fallocate", reply, f)
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
        self.answer("lseek", reply, || self.fs.lseek(fh.0, offset, whence))
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
        let f = || {
            self.fs
                .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        };
        self.answer("copy_file_range", reply, f)
    }
}
