//! The VM directories the mount reads, kept open.
//!
//! A lookup through the mount ends in an lstat of the volume's image in
//! its VM directory. Opened by path each time, that directory is a name in
//! its class directory, which holds one entry per VM: once the kernel has
//! dropped its dentries (memory pressure, `drop_caches`), finding it again
//! is a search of a directory of thousands of entries, and a cold lookup
//! costs more the more VMs the pool has. An open directory keeps its own
//! dentry and inode, so a cold lookup through a kept one costs the same
//! with 10 volumes as with 10,000 (doc/BENCHMARKS.md, "Metadata").
//!
//! Only the mount's read-only views use these handles (`view.rs`); every
//! change opens its directories by path, as before. A kept directory that
//! was removed since (its link count is 0) is opened again by path. The
//! daemon opens every VM directory the volume table names before it
//! mounts (else the first view does), up to a quarter of the open-file
//! limit, so the handles never crowd out the
//! opens of images; past that, directories are opened by path each time.

use super::fsops::Dir;
use super::vid::ValidVid;
use crate::error::Result;
use crate::sys;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::{Arc, Once};

/// The most VM directories kept open, whatever the open-file limit.
const MOST: usize = 16384;

pub(crate) struct VmDirs {
    /// By class, then VM.
    dirs: RwLock<HashMap<(String, String), Arc<Dir>>>,
    seeded: Once,
}

impl Default for VmDirs {
    fn default() -> Self {
        VmDirs {
            dirs: RwLock::default(),
            seeded: Once::new(),
        }
    }
}

impl VmDirs {
    fn limit() -> usize {
        sys::open_files_limit().map_or(0, |n| (n / 4).min(MOST as u64) as usize)
    }
}

/// Opens the VM directory of a volume (`None` when it does not exist).
pub(crate) type OpenVmDir<'a> = &'a dyn Fn(&ValidVid) -> Result<Option<Dir>>;

impl VmDirs {
    /// The VM directory of `vid`, for reading, kept open; `None` when it
    /// does not exist. The first call opens the directories of the VMs
    /// `vms(limit)` names (one volume of each), up to the limit.
    pub(crate) fn get(
        &self,
        vid: &ValidVid,
        open: OpenVmDir<'_>,
        vms: &dyn Fn(usize) -> Vec<ValidVid>,
    ) -> Result<Option<Arc<Dir>>> {
        self.seed(open, vms);
        let key = (vid.class().to_owned(), vid.vm().to_owned());
        let kept = self.dirs.read().get(&key).cloned();
        if let Some(d) = kept {
            if sys::fstat(d.fd()).is_ok_and(|st| st.st_nlink > 0) {
                return Ok(Some(d));
            }
            self.dirs.write().remove(&key);
        }
        let Some(d) = open(vid)? else {
            return Ok(None);
        };
        let d = Arc::new(d);
        let mut dirs = self.dirs.write();
        if dirs.len() < VmDirs::limit() {
            dirs.insert(key, d.clone());
        }
        Ok(Some(d))
    }

    /// Opens the directories of the VMs `vms(limit)` names, once: the
    /// daemon does it before it mounts, else the first view does.
    pub(crate) fn seed(&self, open: OpenVmDir<'_>, vms: &dyn Fn(usize) -> Vec<ValidVid>) {
        self.seeded
            .call_once(|| self.keep_every(open, vms(VmDirs::limit())));
    }

    /// How many directories are kept open.
    pub(crate) fn len(&self) -> usize {
        self.dirs.read().len()
    }

    /// Opens the VM directories of `vms`.
    fn keep_every(&self, open: OpenVmDir<'_>, vms: Vec<ValidVid>) {
        let mut kept = HashMap::with_capacity(vms.len());
        for vid in vms {
            if let Ok(Some(d)) = open(&vid) {
                kept.insert((vid.class().to_owned(), vid.vm().to_owned()), Arc::new(d));
            }
        }
        self.dirs.write().extend(kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CreateOptions, InitOptions, Pool};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_vm_directory_made_again_is_read_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        let opts = InitOptions {
            setup_check: false,
            revisions_to_keep: 1,
            read_only: false,
        };
        let pool = Pool::init(&path, &opts).unwrap();
        let a: ValidVid = "c/v/a".parse().unwrap();
        pool.create(&a, &CreateOptions::origin(1 << 20)).unwrap();
        let first = pool.volume_view(&a).unwrap().img.unwrap();
        assert!(pool
            .vm_dirs
            .dirs
            .read()
            .contains_key(&("c".into(), "v".into())));
        // The last volume of the VM goes, and its directory with it; a new
        // volume of the same name makes both again.
        pool.remove(&a).unwrap();
        assert!(
            !path.join("c/v").exists(),
            "the empty VM directory is removed"
        );
        pool.create(&a, &CreateOptions::origin(2 << 20)).unwrap();
        let again = pool.volume_view(&a).unwrap().img.unwrap();
        let on_disk = std::fs::metadata(path.join("c/v/a.img")).unwrap();
        assert_eq!((again.ino, again.size), (on_disk.ino(), 2 << 20));
        // (Not its inode number: the filesystem may reuse the old one.)
        assert_ne!(first.size, again.size);
        let kept = pool.kept_vm_dir(&a).unwrap().unwrap();
        let st = sys::fstat(kept.fd()).unwrap();
        assert_eq!(
            st.st_ino,
            std::fs::metadata(path.join("c/v")).unwrap().ino()
        );
    }
}
