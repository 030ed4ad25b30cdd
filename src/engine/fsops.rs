//! File operations on the pool's backing directories.
//!
//! Every operation is relative to an open directory fd and takes one file
//! name, so no path is resolved through a symlink. Every copy, reflink,
//! rename, link and remove is logged at INFO with the volume and the paths
//! (SPEC §7).

use crate::sys;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Mode of every file reflinkfs creates.
pub const FILE_MODE: libc::mode_t = 0o600;
/// Mode of every directory reflinkfs creates.
pub const DIR_MODE: libc::mode_t = 0o700;

/// How copies are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyStrategy {
    /// FICLONE, falling back to a sparse copy when the kernel says no
    /// (EXDEV across filesystems, EOPNOTSUPP).
    Reflink,
    /// Always a sparse copy (copy-mode pools).
    Sparse,
    /// FICLONE or nothing: a copy whose only point is to be instant (the
    /// precache) fails rather than copy every byte.
    ReflinkOnly,
}

/// What a copy turned out to be, for logs and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Reflink,
    SparseCopy,
}

impl CopyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyKind::Reflink => "reflink",
            CopyKind::SparseCopy => "sparse copy",
        }
    }
}

/// A directory inside the pool, opened without following symlinks, with
/// the path it is shown as in logs and errors.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Whether a directory entry exists, and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Missing,
    Regular(FileSig),
    /// A symlink, directory, device or other non-regular file.
    Other,
}

/// Identity and change signature of a regular file, used to detect that a
/// dirty image was not modified, and that two names are the same inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileSig {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// The permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub blocks: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub nlink: u64,
}

impl FileSig {
    pub fn from_stat(st: &libc::stat) -> FileSig {
        FileSig {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mode: st.st_mode & 0o7777,
            blocks: st.st_blocks as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
            nlink: st.st_nlink,
        }
    }

    pub fn same_inode(&self, other: &FileSig) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }

    /// Same size, mtime and ctime: the content was not changed (§4.2).
    pub fn unchanged_since(&self, earlier: &FileSig) -> bool {
        self.same_inode(earlier)
            && self.size == earlier.size
            && self.mtime == earlier.mtime
            && self.ctime == earlier.ctime
    }
}

impl Dir {
    pub fn from_fd(fd: OwnedFd, path: PathBuf) -> Dir {
        Dir { fd, path }
    }

    pub fn open_path(path: &Path) -> io::Result<Dir> {
        Ok(Dir {
            fd: sys::open_dir_path(path)?,
            path: path.to_owned(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory, for messages.
    pub fn shown(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Opens a subdirectory, never through a symlink. With `create`, makes
    /// it (mode 0700) when missing.
    pub fn subdir(&self, name: &str, create: bool) -> io::Result<Dir> {
        match sys::open_subdir(self.fd(), name) {
            Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {
                match sys::mkdirat(self.fd(), name, DIR_MODE) {
                    Ok(()) => {
                        log::info!("created directory {}", self.shown(name).display());
                        self.sync()?;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e),
                }
                self.subdir(name, false)
            }
            Err(e) => Err(e),
            Ok(fd) => Ok(Dir {
                fd,
                path: self.shown(name),
            }),
        }
    }

    pub fn entry(&self, name: &str) -> io::Result<Entry> {
        match sys::lstatat(self.fd(), name) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                Ok(Entry::Regular(FileSig::from_stat(&st)))
            }
            Ok(_) => Ok(Entry::Other),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Entry::Missing),
            Err(e) => Err(e),
        }
    }

    pub fn names(&self) -> io::Result<Vec<String>> {
        sys::read_dir_names(self.fd())
    }

    /// Opens a regular file. `O_NOFOLLOW` makes a planted symlink fail with
    /// ELOOP; a FIFO or device is refused with EINVAL after the open.
    pub fn open(&self, name: &str, flags: libc::c_int) -> io::Result<File> {
        // O_NONBLOCK keeps a planted FIFO from blocking the open.
        let fd = sys::openat(self.fd(), name, flags | libc::O_NONBLOCK, 0)?;
        let st = sys::fstat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        sys::clear_nonblock(fd.as_fd())?;
        Ok(File::from(fd))
    }

    /// Creates a new file (mode 0600), failing if the name exists.
    pub fn create_new(&self, name: &str) -> io::Result<File> {
        let fd = sys::openat(
            self.fd(),
            name,
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            FILE_MODE,
        )?;
        // The umask may have narrowed the mode; it can only have narrowed it.
        Ok(File::from(fd))
    }

    /// Creates a new sparse file of `size` bytes (mode 0600).
    pub fn create_sparse(&self, vid: &str, name: &str, size: u64) -> io::Result<File> {
        let f = self.create_new(name)?;
        sys::ftruncate(f.as_fd(), size)?;
        log::info!(
            "{vid}: created sparse image {} ({size} bytes)",
            self.shown(name).display()
        );
        Ok(f)
    }

    pub fn rename(&self, vid: &str, from: &str, to: &str) -> io::Result<()> {
        sys::renameat(self.fd(), from, to)?;
        self.log_move(vid, "renamed", from, to);
        Ok(())
    }

    pub fn link(&self, vid: &str, from: &str, to: &str) -> io::Result<()> {
        sys::linkat(self.fd(), from, to)?;
        self.log_move(vid, "linked", from, to);
        Ok(())
    }

    /// The log line of a rename or link: `VID: renamed FROM -> TO`.
    fn log_move(&self, vid: &str, what: &str, from: &str, to: &str) {
        let (from, to) = (self.shown(from), self.shown(to));
        log::info!("{vid}: {what} {} -> {}", from.display(), to.display());
    }

    pub fn remove(&self, vid: &str, name: &str) -> io::Result<()> {
        sys::unlinkat(self.fd(), name)?;
        log::info!("{vid}: removed {}", self.shown(name).display());
        Ok(())
    }

    /// Removes `name` if it exists; returns whether it did.
    pub fn remove_if_exists(&self, vid: &str, name: &str) -> io::Result<bool> {
        match self.remove(vid, name) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes the temporary file a failed operation was making, as best
    /// it can, and never fails: a leftover is removed at the next pool
    /// open (recovery).
    pub fn remove_tmp(&self, vid: &str, name: &str) {
        match self.remove_if_exists(vid, name) {
            Ok(_) => {
                let _ = self.sync();
            }
            Err(e) => log::warn!(
                "{vid}: removing {}: {e}; the next pool open removes it",
                self.shown(name).display()
            ),
        }
    }

    /// fsync of the directory, making renames, links and unlinks durable.
    pub fn sync(&self) -> io::Result<()> {
        sys::fsync(self.fd())
    }

    /// Copies the open file `src` into a new file `dst` of this directory:
    /// reflink when `strategy` allows and the kernel agrees, else a sparse
    /// copy. On error the partial `dst` is removed. The copy is fsynced and
    /// keeps the source's mtime.
    pub fn copy_from(
        &self,
        vid: &str,
        src: &File,
        src_shown: &Path,
        dst: &str,
        strategy: CopyStrategy,
    ) -> io::Result<(File, CopyKind)> {
        let out = self.create_new(dst)?;
        let result = copy_into(src, &out, strategy).and_then(|kind| {
            let st = sys::fstat(src.as_fd())?;
            sys::set_mtime(out.as_fd(), st.st_mtime, st.st_mtime_nsec)?;
            sys::fsync(out.as_fd())?;
            Ok(kind)
        });
        match result {
            Ok(kind) => {
                log::info!(
                    "{vid}: {} {} -> {}",
                    kind.as_str(),
                    src_shown.display(),
                    self.shown(dst).display()
                );
                Ok((out, kind))
            }
            Err(e) => {
                drop(out);
                if let Err(e2) = sys::unlinkat(self.fd(), dst) {
                    log::error!(
                        "{vid}: could not remove partial copy {}: {e2}",
                        self.shown(dst).display()
                    );
                } else {
                    log::info!(
                        "{vid}: removed partial copy {} after: {e}",
                        self.shown(dst).display()
                    );
                }
                Err(e)
            }
        }
    }
}

/// Copies all of `src` into the empty file `dst`.
pub fn copy_into(src: &File, dst: &File, strategy: CopyStrategy) -> io::Result<CopyKind> {
    if strategy != CopyStrategy::Sparse {
        match sys::ficlone(dst.as_fd(), src.as_fd()) {
            Ok(()) => return Ok(CopyKind::Reflink),
            Err(e) if sys::is_reflink_unsupported(&e) && strategy == CopyStrategy::Reflink => {
                log::debug!("FICLONE unavailable ({e}); making a sparse copy");
            }
            Err(e) => return Err(e),
        }
    }
    let len = sys::fstat(src.as_fd())?.st_size as u64;
    sparse_copy(src, dst, len)?;
    Ok(CopyKind::SparseCopy)
}

/// Copies the data regions of `src` (found with SEEK_DATA/SEEK_HOLE) to the
/// same offsets of `dst`, and sets `dst`'s length to `len`, so holes stay
/// holes. Uses copy_file_range, or pread/pwrite where that is refused.
pub fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    sys::ftruncate(dst.as_fd(), len)?;
    let mut off = 0u64;
    while off < len {
        let Some(data) = sys::seek_data(src.as_fd(), off)? else {
            break;
        };
        if data >= len {
            break;
        }
        let hole = match sys::seek_hole(src.as_fd(), data) {
            Ok(h) => h.min(len),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => len,
            Err(e) => return Err(e),
        };
        copy_range(src, dst, data, hole - data)?;
        off = hole;
    }
    Ok(())
}

/// Copies `len` bytes at `off` from `src` to the same offset of `dst`.
pub fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    let mut use_cfr = true;
    let mut buf = Vec::new();
    while done < len {
        let chunk = (len - done).min(1 << 30) as usize;
        if use_cfr {
            match sys::copy_file_range(src.as_fd(), off + done, dst.as_fd(), off + done, chunk) {
                Ok(0) => return Err(short_source()),
                Ok(n) => {
                    done += n as u64;
                    continue;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                    ) =>
                {
                    use_cfr = false;
                    buf = vec![0u8; 1 << 20];
                }
                Err(e) => return Err(e),
            }
        }
        let want = chunk.min(buf.len());
        let n = sys::pread(src.as_fd(), &mut buf[..want], off + done)?;
        if n == 0 {
            return Err(short_source());
        }
        write_all_at(dst, &buf[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

fn short_source() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the source file shrank during the copy",
    )
}

pub fn write_all_at(f: &File, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = sys::pwrite(f.as_fd(), buf, off)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// Writes `bytes` to `dir/name` atomically: a temp file in the same
/// directory, fsync, rename over `name`, fsync of the directory.
pub fn write_file_atomic(dir: BorrowedFd<'_>, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = format!("{name}~tmp");
    match sys::unlinkat(dir, &tmp) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
    }
    let fd = sys::openat(
        dir,
        &tmp,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        FILE_MODE,
    )?;
    let f = File::from(fd);
    let res = write_all_at(&f, bytes, 0)
        .and_then(|()| sys::fsync(f.as_fd()))
        .and_then(|()| sys::renameat(dir, &tmp, name));
    if let Err(e) = res {
        let _ = sys::unlinkat(dir, &tmp);
        return Err(e);
    }
    sys::fsync(dir)
}

/// Reads a whole small file (metadata) without following a symlink.
pub fn read_small_file(dir: &Dir, name: &str) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = dir.open(name, libc::O_RDONLY)?;
    let mut out = Vec::new();
    (&mut f).take(16 << 20).read_to_end(&mut out)?;
    Ok(out)
}
