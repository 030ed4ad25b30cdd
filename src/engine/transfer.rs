//! Data in and out of a pool: import of a volume's data from a file or a
//! pipe, export of an image or a revision, and clone of a volume into this
//! pool or another.

use super::admin::CreateOptions;
use super::config::VolumeKind;
use super::failpoint;
use super::fsops::Dir;
use super::fsops::{copy_into, write_all_at, CopyKind, CopyStrategy};
use super::lifecycle::{io_ctx, open_image};
use super::pool::{Names, Pool};
use super::revision::pick_revision;
use super::size::check_size;
use super::vid::ValidVid;
use super::volume::Claim;
use super::volume::OpName;
use crate::error::{busy, refused, Error, Result};
use crate::sys;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;

/// The length of a regular file to import; a pipe's length is unknown.
fn source_length(vid: &ValidVid, source: &File) -> Result<u64> {
    let st = sys::fstat(source.as_fd()).map_err(|e| Error::io("examining the source", e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Error::InvalidValue {
            property: "--size".into(),
            reason: format!(
                "{vid} is in a read-only pool, where a volume takes its data's size, and a pipe's size is unknown: give --size"
            ),
        });
    }
    let len = st.st_size as u64;
    check_size(len, &len.to_string())
}

enum FillError {
    Io(std::io::Error),
    Length(String),
}

impl From<std::io::Error> for FillError {
    fn from(e: std::io::Error) -> Self {
        FillError::Io(e)
    }
}

/// Fills the new file `out` with exactly `size` bytes from `source`.
fn fill_import(
    out: &File,
    source: &File,
    size: u64,
    strategy: CopyStrategy,
) -> Result<CopyKind, FillError> {
    let st = sys::fstat(source.as_fd())?;
    // A regular file read from its start (stdin may be a file positioned
    // past a header: that is read as a stream, from where it is).
    let at_start = sys::lseek(source.as_fd(), 0, libc::SEEK_CUR).ok() == Some(0);
    if st.st_mode & libc::S_IFMT == libc::S_IFREG && at_start {
        let len = st.st_size as u64;
        if len != size {
            return Err(FillError::Length(format!("the source file is {len} bytes long, but the volume is to be {size} bytes; nothing was changed")));
        }
        failpoint::hit!("import.partial");
        return Ok(copy_into(source, out, strategy)?);
    }
    // A stream: copy every byte, leaving all-zero blocks as holes.
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut src = source;
    let mut off = 0u64;
    while off < size {
        let want = (size - off).min(CHUNK as u64) as usize;
        let mut got = 0;
        while got < want {
            match src.read(&mut buf[got..want]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if got < want {
            return Err(FillError::Length(format!("the input ended after {} bytes, but the volume is to be {size} bytes; nothing was changed", off + got as u64)));
        }
        if buf[..got].iter().any(|&b| b != 0) {
            write_all_at(out, &buf[..got], off)?;
        }
        off += got as u64;
        failpoint::hit!("import.partial");
    }
    let mut extra = [0u8; 1];
    loop {
        match src.read(&mut extra) {
            Ok(0) => break,
            Ok(_) => {
                return Err(FillError::Length(format!(
                    "the input is longer than {size} bytes; nothing was changed"
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    sys::ftruncate(out.as_fd(), size)?;
    Ok(CopyKind::SparseCopy)
}

/// Writes all `len` bytes of `src` to a stream.
fn stream_out(src: &File, dest: &File, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut out = dest;
    let mut off = 0u64;
    while off < len {
        let want = (len - off).min(buf.len() as u64) as usize;
        let n = sys::pread(src.as_fd(), &mut buf[..want], off)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the image shrank during export",
            ));
        }
        out.write_all(&buf[..n])?;
        off += n as u64;
    }
    out.flush()
}

impl Pool {
    /// Imports `source` (a file or a stream) as the new committed image of
    /// a stopped origin volume (SPEC §5). The data must be exactly `size`
    /// bytes (default: the current size), or nothing changes. A regular
    /// file on the pool's filesystem is imported by reflink. Returns the K
    /// the previous image was saved as.
    pub fn import(&self, vid: &ValidVid, source: &File, size: Option<u64>) -> Result<Option<u64>> {
        // Claimed as an unbounded operation: while it reads its source, a
        // start or another operation on this volume is refused at once, and
        // nothing else in the pool waits for it.
        // A read-only pool's volumes are read-only for VMs; root fills
        // them (a kernel's images) by import, and there a volume's size
        // follows its image: without --size, the source's length.
        let read_only_pool = self.read_only();
        let (claim, cfg, dir) =
            self.claim_origin(vid, OpName::Import, "importing into it", !read_only_pool)?;
        let size = match size {
            Some(s) => check_size(s, &s.to_string())?,
            None if read_only_pool => source_length(vid, source)?,
            None => cfg.size,
        };
        let v = vid.to_string();
        let n = Names::of(vid);
        let tmp = n.import();
        dir.remove_if_exists(&v, &tmp)
            .map_err(io_ctx(&dir, "removing", &tmp))?;
        let f = dir
            .create_new(&tmp)
            .map_err(io_ctx(&dir, "creating", &tmp))?;
        let filled = fill_import(&f, source, size, self.copy_strategy()).map_err(|e| match e {
            FillError::Io(e) => Error::io(
                format!("{vid}: importing into {}", dir.shown(&tmp).display()),
                e,
            ),
            FillError::Length(reason) => Error::InvalidSize {
                input: size.to_string(),
                reason,
            },
        });
        let kind = filled.inspect_err(|_| dir.remove_tmp(&v, &tmp))?;
        log::info!(
            "{vid}: imported {size} bytes into {} ({})",
            dir.shown(&tmp).display(),
            kind.as_str()
        );
        failpoint::hit!("import.copied");
        self.replace_committed(&claim.volume, &dir, &f, &tmp, "import", None)
            .inspect_err(|_| dir.remove_tmp(&v, &tmp))
    }

    /// Begins an import whose data another process writes in place (qubesd
    /// `dd`s a backup into it): makes `N-import.img`, sparse and of `size`
    /// bytes (it reads as zeros), and keeps the volume claimed until
    /// [`Pool::import_end`]. Gives the path to write. A crash meanwhile
    /// leaves the volume as it was: recovery removes the import file.
    pub fn import_begin(&self, vid: &ValidVid, size: u64) -> Result<PendingImport> {
        let writes = !self.read_only();
        let (claim, _, dir) =
            self.claim_origin(vid, OpName::Import, "importing into it", writes)?;
        let size = check_size(size, &size.to_string())?;
        let v = vid.to_string();
        let tmp = Names::of(vid).import();
        dir.remove_if_exists(&v, &tmp)
            .map_err(io_ctx(&dir, "removing", &tmp))?;
        let file = dir
            .create_sparse(&v, &tmp, size)
            .map_err(io_ctx(&dir, "creating", &tmp))?;
        dir.sync().map_err(io_ctx(&dir, "syncing", ""))?;
        let path = dir.shown(&tmp);
        log::info!(
            "{vid}: import begun: {} bytes to be written to {}",
            size,
            path.display()
        );
        Ok(PendingImport {
            path,
            size,
            inner: Some(ImportFile {
                claim,
                dir,
                file,
                name: tmp,
            }),
        })
    }

    /// Ends an import begun by [`Pool::import_begin`]: on success the data
    /// becomes the committed image (the previous one a revision), as an
    /// import does; otherwise it is dropped. The file must still be `size`
    /// bytes long. Gives the revision the previous image was kept as.
    pub fn import_end(&self, mut import: PendingImport, success: bool) -> Result<Option<u64>> {
        let (size, path) = (import.size, import.path.clone());
        let Some(ImportFile {
            claim,
            dir,
            file,
            name,
        }) = import.inner.take()
        else {
            unreachable!("an import ends once")
        };
        let vid = claim.volume.vid.clone();
        let v = vid.to_string();
        let drop_it = |why: &str| {
            log::warn!("{vid}: import into {} dropped: {why}", path.display());
            dir.remove_tmp(&v, &name);
        };
        if !success {
            drop_it("its writer failed");
            return Ok(None);
        }
        let st = sys::fstat(file.as_fd()).map_err(io_ctx(&dir, "examining", &name))?;
        // The commit renames by name: the name must still be this file.
        let ours = super::fsops::FileSig::from_stat(&st);
        let named = super::lifecycle::regular_entry(&dir, &vid, &name)
            .ok()
            .flatten();
        if !named.is_some_and(|n| n.same_inode(&ours)) {
            drop_it("it was replaced");
            return Err(Error::InvalidValue {
                property: "the import file".into(),
                reason: format!(
                    "{} was replaced instead of written in place, so nothing changed",
                    path.display()
                ),
            });
        }
        let len = st.st_size as u64;
        if len != size {
            drop_it("its size changed");
            return Err(Error::InvalidSize {
                input: len.to_string(),
                reason: format!(
                    "the import file was {size} bytes and is now {len}; it was not written in place, so nothing changed"
                ),
            });
        }
        self.replace_committed(&claim.volume, &dir, &file, &name, "import", None)
            .inspect_err(|_| drop_it("its commit failed"))
    }

    /// Opens what `export` reads: the committed image of an origin volume
    /// (of the resolved source for a snapshot), or one of its revisions.
    /// The file never changes while open, since images are only replaced by
    /// rename.
    pub fn open_export_source(
        &self,
        vid: &ValidVid,
        revision: Option<&str>,
    ) -> Result<(File, PathBuf)> {
        // No claim: an export reads a committed image or a revision, which
        // never change, so it waits for nothing and holds nothing up.
        let vol = self.volume(vid)?;
        let cfg = vol.config();
        match (cfg.kind(), revision) {
            (VolumeKind::Volatile, _) => {
                Err(refused(vid, "a volatile volume has no committed data"))
            }
            (VolumeKind::Snapshot, Some(_)) => {
                Err(refused(vid, "a snapshot volume has no revisions"))
            }
            (VolumeKind::Snapshot, None) => {
                let (origin, _, dir, file) = self.open_source_image(vid, &cfg)?;
                Ok((file, dir.shown(&Names::of(&origin).img())))
            }
            (VolumeKind::Origin, Some(w)) => {
                let dir = self.vm_dir(vid, false)?;
                let revs = self.list_revisions(vid, Some(&dir))?;
                let name = pick_revision(vid, &revs, Some(w))?.file_name.clone();
                let f = open_image(&dir, vid, &name, libc::O_RDONLY)?;
                Ok((f, dir.shown(&name)))
            }
            (VolumeKind::Origin, None) => {
                let life = vol.lock();
                if life.run().is_some() && life.config.revisions_to_keep == -1 {
                    return Err(busy(
                        vid,
                        "it runs with revisions_to_keep=-1, so it has no committed image now",
                    ));
                }
                drop(life);
                let (f, _) = self.open_committed(vid)?;
                let dir = self.vm_dir(vid, false)?;
                Ok((f, dir.shown(&Names::of(vid).img())))
            }
        }
    }

    /// Exports the committed image (or revision) to `dest`, sparse-aware:
    /// a regular file gets a reflink or a copy of the data regions, a pipe
    /// gets every byte. Returns the bytes exported.
    pub fn export(&self, vid: &ValidVid, dest: &File, revision: Option<&str>) -> Result<u64> {
        let (src, shown) = self.open_export_source(vid, revision)?;
        let len = sys::fstat(src.as_fd())
            .map_err(|e| Error::io(format!("examining {}", shown.display()), e))?
            .st_size as u64;
        // A new, empty regular file gets a reflink or a sparse copy; anything
        // else (a pipe, or a file that already holds data, as a redirected
        // stdout may) gets every byte written at its current position.
        let fresh_file = sys::fstat(dest.as_fd())
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size == 0)
            .unwrap_or(false)
            && sys::lseek(dest.as_fd(), 0, libc::SEEK_CUR).ok() == Some(0)
            && !sys::is_append(dest.as_fd()).unwrap_or(true);
        let res = if fresh_file {
            copy_into(&src, dest, CopyStrategy::Reflink)
                .map(|k| log::info!("{vid}: exported {} ({})", shown.display(), k.as_str()))
        } else {
            stream_out(&src, dest, len)
        };
        res.map_err(|e| Error::io(format!("{vid}: exporting {}", shown.display()), e))?;
        Ok(len)
    }

    /// Clones `src` (of this pool) into `dst` of `dst_pool` (this pool or
    /// another): a reflink when possible, else a sparse copy. A missing
    /// `dst` is created as an origin volume; an existing one gets the data
    /// as an import. Either way `dst` gets the source's size.
    pub fn clone_volume(&self, src: &ValidVid, dst_pool: &Pool, dst: &ValidVid) -> Result<()> {
        if std::ptr::eq(self, dst_pool) && src == dst {
            return Err(refused(dst, "a volume cannot be cloned onto itself"));
        }
        let (file, shown) = self.open_export_source(src, None)?;
        let src_rw = self.volume(src)?.config().rw;
        let exists = dst_pool.table.contains(dst);
        if !exists {
            let size = sys::fstat(file.as_fd())
                .map_err(|e| Error::io(format!("examining {}", shown.display()), e))?
                .st_size as u64;
            let mut opts = CreateOptions::origin(size);
            if !dst_pool.config().read_only {
                opts.rw = Some(src_rw);
            }
            dst_pool.create_with(dst, &opts, Some((&file, &shown)))?;
            log::info!("{dst}: cloned from {src}");
            return Ok(());
        }
        // A read-only pool's volumes are read-only for VMs; root fills
        // them (a kernel's images) by import or clone.
        let writes = !dst_pool.config().read_only;
        let (claim, _, dir) =
            dst_pool.claim_origin(dst, OpName::Clone, "cloning into it", writes)?;
        let v = dst.to_string();
        let tmp = Names::of(dst).import();
        dir.remove_if_exists(&v, &tmp)
            .map_err(io_ctx(&dir, "removing", &tmp))?;
        let (f, _) = dir
            .copy_from(&v, &file, &shown, &tmp, dst_pool.copy_strategy())
            .map_err(io_ctx(&dir, "copying to", &tmp))
            .inspect_err(|_| dir.remove_tmp(&v, &tmp))?;
        failpoint::hit!("clone.copied");
        dst_pool
            .replace_committed(&claim.volume, &dir, &f, &tmp, "clone", None)
            .inspect_err(|_| dir.remove_tmp(&v, &tmp))?;
        log::info!("{dst}: cloned from {src}");
        Ok(())
    }
}

/// An import begun by [`Pool::import_begin`]: the volume stays claimed
/// (`importing`) until [`Pool::import_end`]. Dropped without it (its
/// daemon shuts down), the import is abandoned: the file goes, and the
/// volume is as it was.
pub struct PendingImport {
    /// Where the data is to be written.
    pub path: PathBuf,
    size: u64,
    inner: Option<ImportFile>,
}

struct ImportFile {
    claim: Claim,
    dir: Dir,
    file: File,
    name: String,
}

impl PendingImport {
    pub fn vid(&self) -> Option<&ValidVid> {
        self.inner.as_ref().map(|i| &i.claim.volume.vid)
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for PendingImport {
    fn drop(&mut self) {
        if let Some(i) = self.inner.take() {
            let vid = i.claim.volume.vid.to_string();
            log::warn!(
                "{vid}: import into {} abandoned; the volume is unchanged",
                self.path.display()
            );
            let _ = i.dir.remove_if_exists(&vid, &i.name);
            let _ = i.dir.sync();
        }
    }
}
