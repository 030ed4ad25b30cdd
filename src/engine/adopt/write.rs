//! Phase 2: the metadata is built in [`ADOPT_DIR`], the files of the Qubes
//! drivers are acted on, and one rename makes the directory a pool.

use super::plan::Plan;
use super::ADOPT_DIR;
use crate::engine::config::store_json;
use crate::engine::fsops::{read_small_file, Dir, Entry, DIR_MODE, FILE_MODE};
use crate::engine::lifecycle::io_ctx;
use crate::engine::pool::{
    lock_with_pid, open_subdir_checked, reflink_check, LOCK_FILE, META_DIR, POOL_JSON, VOLUMES_DIR,
};
use crate::engine::vid::ValidVid;
use crate::error::{Error, Result};
use crate::sys;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

/// Removes a directory tree that adopt made, never following a symlink.
pub(super) fn remove_tree(parent: &Dir, name: &str) -> io::Result<()> {
    let dir = parent.subdir(name, false)?;
    for entry in dir.names()? {
        let st = sys::lstatat(dir.fd(), &entry)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            remove_tree(&dir, &entry)?;
        } else {
            sys::unlinkat(dir.fd(), &entry)?;
        }
    }
    drop(dir);
    sys::rmdirat(parent.fd(), name)?;
    parent.sync()
}

/// The error for a directory another adopt is working on, naming its PID
/// when its lock file has it.
fn adopt_running(path: &Path, root: &Dir) -> Error {
    let pid = root
        .subdir(ADOPT_DIR, false)
        .and_then(|d| read_small_file(&d, LOCK_FILE))
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    Error::PoolLocked {
        pool: path.to_owned(),
        holder: if pid.is_empty() {
            "another adopt".to_owned()
        } else {
            format!("another adopt (process {pid})")
        },
        lock: root.shown(ADOPT_DIR).join(LOCK_FILE),
    }
}

/// Whether an earlier adopt that did not finish left its metadata
/// directory, for phase 2 to remove; an error when another adopt is still
/// at work on it.
pub(super) fn stale_adopt(root: &Dir, path: &Path, dry_run: bool) -> Result<bool> {
    if root
        .entry(ADOPT_DIR)
        .map_err(io_ctx(root, "examining", ADOPT_DIR))?
        == Entry::Missing
    {
        return Ok(false);
    }
    // A symlink or file in its place is refused.
    let d = open_subdir_checked(root, ADOPT_DIR, "unfinished adopt directory", false)?;
    let running = match d.entry(LOCK_FILE) {
        Ok(Entry::Missing) | Err(_) => false,
        Ok(_) if !dry_run => !lock_with_pid(&d)?.1,
        Ok(_) => {
            // A dry run must not create or lock anything: open the
            // existing lock file read-only to test it.
            let f = d
                .open(LOCK_FILE, libc::O_RDONLY)
                .map_err(io_ctx(&d, "opening", LOCK_FILE))?;
            !sys::try_lock_exclusive(f.as_fd()).map_err(io_ctx(&d, "locking", LOCK_FILE))?
        }
    };
    if running {
        return Err(adopt_running(path, root));
    }
    Ok(true)
}

/// Phase 2: builds the metadata in [`ADOPT_DIR`], acts on the files, and
/// renames the metadata into place.
pub(super) fn write_pool(root: &Dir, path: &Path, plan: &Plan) -> Result<()> {
    let pool_cfg = plan.pool.as_ref().expect("planned");
    let shown_tmp = root.shown(ADOPT_DIR);
    match sys::mkdirat(root.fd(), ADOPT_DIR, DIR_MODE) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Err(adopt_running(path, root)),
        Err(e) => return Err(io_ctx(root, "creating", ADOPT_DIR)(e)),
    }
    let result = (|| -> Result<()> {
        let meta = open_subdir_checked(root, ADOPT_DIR, "metadata directory", false)?;
        let (lock, locked) = lock_with_pid(&meta)?;
        if !locked {
            return Err(adopt_running(path, root));
        }
        if plan.named_check {
            reflink_check(&meta, path, true)?;
        }
        store_json(meta.fd(), POOL_JSON, pool_cfg, &meta.shown(POOL_JSON))?;
        let vols =
            meta.subdir(VOLUMES_DIR, true)
                .map_err(io_ctx(&meta, "creating", VOLUMES_DIR))?;
        for (vid, cfg) in &plan.configs {
            let cdir =
                vols.subdir(vid.class(), true)
                    .map_err(io_ctx(&vols, "creating", vid.class()))?;
            let vdir = cdir
                .subdir(vid.vm(), true)
                .map_err(io_ctx(&cdir, "creating", vid.vm()))?;
            let file = format!("{}.json", vid.name());
            store_json(vdir.fd(), &file, cfg, &vdir.shown(&file))?;
        }
        meta.sync()
            .map_err(|e| Error::io(format!("syncing {}", meta.path().display()), e))?;

        // The files of the Qubes drivers.
        let mut dirs: BTreeMap<(String, String), Dir> = BTreeMap::new();
        let mut vm_dir = |vid: &ValidVid| -> Result<()> {
            let key = (vid.class().to_owned(), vid.vm().to_owned());
            if let std::collections::btree_map::Entry::Vacant(slot) = dirs.entry(key) {
                let c = open_subdir_checked(root, vid.class(), "class directory", false)?;
                slot.insert(open_subdir_checked(&c, vid.vm(), "VM directory", false)?);
            }
            Ok(())
        };
        for (vid, _, _) in &plan.removals {
            vm_dir(vid)?;
        }
        for (vid, _, _) in &plan.chmods {
            vm_dir(vid)?;
        }
        let key = |vid: &ValidVid| (vid.class().to_owned(), vid.vm().to_owned());
        for (vid, f, _) in &plan.removals {
            let d = &dirs[&key(vid)];
            d.remove_if_exists(&vid.to_string(), f)
                .map_err(io_ctx(d, "removing", f))?;
        }
        for (vid, f, old) in &plan.chmods {
            let d = &dirs[&key(vid)];
            let file = d
                .open(f, libc::O_RDONLY)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ELOOP) | Some(libc::EINVAL) => Error::NotRegular {
                        what: format!("file of {vid}"),
                        path: d.shown(f),
                    },
                    _ => io_ctx(d, "opening", f)(e),
                })?;
            sys::fchmod(file.as_fd(), FILE_MODE).map_err(io_ctx(d, "changing the mode of", f))?;
            log::info!(
                "{vid}: mode of {} changed from {old:04o} to 0600",
                d.shown(f).display()
            );
        }
        for d in dirs.values() {
            d.sync()
                .map_err(|e| Error::io(format!("syncing {}", d.path().display()), e))?;
        }

        // The commit: one rename makes the directory a pool.
        if root
            .entry(META_DIR)
            .map_err(io_ctx(root, "examining", META_DIR))?
            != Entry::Missing
        {
            return Err(Error::PoolExists {
                path: path.to_owned(),
            });
        }
        sys::renameat(root.fd(), ADOPT_DIR, META_DIR).map_err(|e| {
            Error::io(
                format!(
                    "renaming {} to {}",
                    shown_tmp.display(),
                    root.shown(META_DIR).display()
                ),
                e,
            )
        })?;
        root.sync()
            .map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;
        drop(lock);
        Ok(())
    })();
    if result.is_err() {
        match remove_tree(root, ADOPT_DIR) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => log::error!(
                "could not remove the unfinished {}: {e}; the next adopt removes it",
                shown_tmp.display()
            ),
        }
    }
    result
}
