//! The reflink check of `pool init` and `pool adopt` (SPEC §1.2).

use super::fsops::Dir;
use crate::error::{Error, Result};
use crate::sys;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

/// The reflink check (SPEC §1.2): clones a small non-empty file with
/// FICLONE and compares the content. The two files are unnamed
/// (`O_TMPFILE`) in `dir`, so the check leaves nothing behind, not even
/// after a crash, and a dry run can make it. Where the filesystem has no
/// `O_TMPFILE`, it uses two named files in `dir` (removed again) if `named`
/// allows, else it returns `Ok(false)`: not run. Errors name `path`.
pub(crate) fn reflink_check(dir: &Dir, path: &Path, named: bool) -> Result<bool> {
    let io_error = |e| Error::io(format!("reflink check in {}", path.display()), e);
    let result = match open_unnamed(dir) {
        Ok(src) => {
            let dst = open_unnamed(dir).map_err(io_error)?;
            clone_and_compare(&src, &dst)
        }
        Err(e)
            if !matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) =>
        {
            return Err(io_error(e))
        }
        Err(_) if !named => return Ok(false),
        Err(_) => {
            let (a, b) = (".reflinkfs-setup-check~src", ".reflinkfs-setup-check~dst");
            let _ = sys::unlinkat(dir.fd(), a);
            let _ = sys::unlinkat(dir.fd(), b);
            let result = (|| {
                let src = dir.create_new(a)?;
                let dst = dir.create_new(b)?;
                clone_and_compare(&src, &dst)
            })();
            let _ = sys::unlinkat(dir.fd(), a);
            let _ = sys::unlinkat(dir.fd(), b);
            result
        }
    };
    result.map_err(|e| reflink_error(path, e))?;
    Ok(true)
}

/// A new unnamed file (`O_TMPFILE`, mode 0600) in `dir`: in the directory
/// open as `dir` exactly, through /proc, or by its path without /proc.
fn open_unnamed(dir: &Dir) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(super::fsops::FILE_MODE)
            .custom_flags(libc::O_TMPFILE)
            .open(p)
    };
    let exact = PathBuf::from(format!("/proc/self/fd/{}", dir.fd().as_raw_fd()));
    match open(&exact) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => open(dir.path()),
        other => other,
    }
}

/// Writes a small non-empty pattern to `src`, clones it into `dst` with
/// FICLONE and compares the content.
fn clone_and_compare(src: &File, dst: &File) -> io::Result<()> {
    let content: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    super::fsops::write_all_at(src, &content, 0)?;
    sys::fsync(src.as_fd())?;
    sys::ficlone(dst.as_fd(), src.as_fd())?;
    let mut back = vec![0u8; content.len()];
    let n = sys::pread(dst.as_fd(), &mut back, 0)?;
    if n != content.len() || back != content {
        return Err(io::Error::other(
            "the clone's content differs from the source",
        ));
    }
    Ok(())
}

/// The error of a failed reflink check: "unsupported" (with the
/// setup_check=no hint) when the kernel or the content says so.
fn reflink_error(path: &Path, e: io::Error) -> Error {
    if sys::is_reflink_unsupported(&e) || e.kind() == io::ErrorKind::Other {
        Error::ReflinkUnsupported {
            path: path.to_owned(),
            source: e,
        }
    } else {
        Error::io(format!("reflink check in {}", path.display()), e)
    }
}
