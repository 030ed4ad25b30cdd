//! Open files: the opens of images (a lease on a volume's run for
//! `N-dirty.img`), their releases, and the I/O the daemon serves when
//! passthrough does not.

use super::*;

/// What the mount attaches to a run at its start: the passthrough
/// registration (shared by every open of the run: the kernel allows one
/// backing file per inode) and the lock of daemon-mode writes.
pub(super) struct RunIo<B> {
    pub(super) backing: Option<Arc<B>>,
    /// Daemon-mode writes to the image take this lock (see `write`).
    pub(super) write_lock: Mutex<()>,
}

/// One open file handle.
pub(super) struct Handle<B> {
    /// The inode it was opened on: a release works with the number, never
    /// the node, so it cannot put back an inode the kernel has forgotten
    /// (the kernel may FORGET it as soon as RELEASE is answered).
    pub(super) ino: u64,
    pub(super) node: Node,
    pub(super) file: Arc<File>,
    pub(super) writable: bool,
    /// A dirty image's run: its lease, size limit and write lock.
    pub(super) lease: Option<Lease>,
    pub(super) run_io: Option<Arc<RunIo<B>>>,
    /// Keeps the passthrough registration alive while this handle exists.
    pub(super) _backing: Option<Arc<B>>,
}

impl<B> Handle<B> {
    /// How many of `len` bytes at `offset` fit before the volume's end.
    /// A volume's size is its contract: writes the daemon sees never grow
    /// it. Like a write against a file size limit (RLIMIT_FSIZE), a write
    /// that starts inside is cut short at the end, and one that starts at
    /// or past the end fails with EFBIG ("file too large").
    pub(super) fn room(&self, offset: u64, len: u64) -> FsResult<u64> {
        let Some(lease) = &self.lease else {
            return Ok(len);
        };
        let end = lease.limit.load(Ordering::SeqCst);
        if len > 0 && offset >= end {
            return Err(fail(
                libc::EFBIG,
                format_args!(
                    "{}: refused a write of {len} bytes at {offset}: the volume ends at {end}; resize it to grow it",
                    lease.vid
                ),
            ));
        }
        Ok(len.min(end.saturating_sub(offset)))
    }
}

/// Where a write goes: the file, how many bytes fit before the volume's
/// end, and the run's write lock.
pub(super) struct WriteTarget<B> {
    pub(super) file: Arc<File>,
    pub(super) room: u64,
    pub(super) run_io: Option<Arc<RunIo<B>>>,
}

/// What `open` hands to the adapter.
pub struct Opened<B> {
    pub fh: u64,
    /// `Some` when the open is served by passthrough.
    pub backing: Option<Arc<B>>,
}

/// Why a request that may wait (an open, a truncate, an unlink, a
/// rename) did not complete on the calling thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryError {
    Errno(Errno),
    /// It would have to wait on this volume (a start, the commit of the
    /// last run, an operation in progress) or on the disk (a copy, an
    /// fsync): do it again with `may_wait` on a thread of the waiting pool
    /// ([`ReflinkFs::defer`]).
    WouldWait(ValidVid),
}

impl From<Errno> for TryError {
    fn from(e: Errno) -> Self {
        TryError::Errno(e)
    }
}

impl<B: Send + Sync + 'static> ReflinkFs<B> {
    pub(super) fn add_handle(&self, h: Handle<B>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::SeqCst);
        self.handles.lock().insert(fh, h);
        fh
    }

    /// Opens a node. `register` makes a passthrough backing registration
    /// for a file; it is only called when passthrough is on. Without
    /// `may_wait`, an open that would have to wait for a start or a commit
    /// returns [`TryError::WouldWait`] at once, for the adapter to do it
    /// again on a thread of the waiting pool: a FUSE worker never waits on
    /// a volume.
    pub fn open(
        &self,
        ino: u64,
        flags: i32,
        register: &dyn Fn(&File) -> std::io::Result<B>,
        may_wait: bool,
    ) -> Result<Opened<B>, TryError> {
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
                let lease = match self.pool.try_acquire(vid, writable) {
                    Ok(Some(lease)) => lease,
                    Ok(None) if !may_wait => return Err(TryError::WouldWait(vid.clone())),
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
                    ino,
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
    pub(super) fn attach(
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

    pub(super) fn open_ro(
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
            ino,
            node,
            file: Arc::new(file),
            writable: false,
            lease: None,
            run_io: None,
            _backing: backing.clone(),
        });
        Opened { fh, backing }
    }

    pub(super) fn ro_backing_for(
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
    /// It never touches the inode table: the kernel may have forgotten the
    /// inode already.
    pub fn release(&self, fh: u64) {
        let Some(h) = self.handles.lock().remove(&fh) else {
            log::error!("release of unknown handle {fh}");
            return;
        };
        let Handle {
            ino,
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
                    match self.pool.unmodified(&p) {
                        true => self.committer.submit_later(&self.pool, p),
                        false => self.committer.submit(&self.pool, p),
                    }
                }
            }
            None => {
                let mut map = self.ro_backing.lock();
                if map.get(&ino).is_some_and(|w| w.strong_count() == 0) {
                    map.remove(&ino);
                }
            }
        }
    }

    pub(super) fn handle_file(&self, fh: u64) -> FsResult<Arc<File>> {
        let handles = self.handles.lock();
        Ok(handles.get(&fh).ok_or(libc::EBADF)?.file.clone())
    }

    /// The file of a writable handle, with the room a write of `len` at
    /// `offset` has before the volume's end, and the run's write lock.
    pub(super) fn write_target(&self, fh: u64, offset: u64, len: u64) -> FsResult<WriteTarget<B>> {
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
        let file = self.handle_file(fh)?;
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

    /// fsync goes to the backing file: never a silent success.
    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let file = self.handle_file(fh)?;
        let r = if datasync {
            sys::fdatasync(file.as_fd())
        } else {
            sys::fsync(file.as_fd())
        };
        r.map_err(|e| io_errno("fsync", e))
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
            return Err(fail(
                libc::EOPNOTSUPP,
                format_args!("refused fallocate mode {mode:#x}: it changes the volume's size (use `reflinkfs volume resize`)"),
            ));
        }
        let WriteTarget { file, room, .. } = self.write_target(fh, offset, length)?;
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && room < length {
            return Err(fail(
                libc::EFBIG,
                format_args!("refused fallocate of {length} bytes at {offset}: it would grow the volume past its end"),
            ));
        }
        sys::fallocate(file.as_fd(), mode, offset, length).map_err(|e| io_errno("fallocate", e))
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let file = self.handle_file(fh)?;
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
        let src = self.handle_file(fh_in)?;
        let WriteTarget {
            file: dst, room, ..
        } = self.write_target(fh_out, off_out, len.min(u32::MAX as u64 & !0xfff))?;
        sys::copy_file_range(src.as_fd(), off_in, dst.as_fd(), off_out, room as usize)
            .map(|n| n as u32)
            .map_err(|e| io_errno("copy_file_range", e))
    }
}
