//! The volume table: every volume of an open pool by id, the ids whose
//! config could not be read, the ids being created and the volumes whose
//! run is held. One service with one job: look volumes up, and reserve
//! and publish ids. Nothing here does I/O under a lock except
//! [`load`], which runs before the pool is shared.
//!
//! Each lock is held only to look up, insert or remove (see the lock order
//! in `volume.rs`): the table is level 1 of that order, and its sets of ids
//! (`held`, `creating`) are leaves.

use super::config::{parse_json, PoolConfig, VolumeConfig};
use super::fsops::{read_small_file, Dir};
use super::vid::{check_component, ValidVid};
use super::volume::{Hooks, Life, Phase, Volume};
use crate::error::{Error, Result};
use crate::sys;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

/// Why a volume's config could not be read: the file and the reason.
pub(crate) type Corrupt = (PathBuf, String);

#[derive(Default)]
pub(crate) struct VolumeTable {
    /// Every volume, by id: sorted by class, VM and name, so a VM's volumes
    /// are one range.
    pub volumes: RwLock<BTreeMap<ValidVid, Arc<Volume>>>,
    /// Volumes whose config file could not be read: path and reason. They
    /// are listed, and every operation on them fails with the reason.
    pub corrupt: RwLock<BTreeMap<ValidVid, Corrupt>>,
    /// Volumes whose run is held (see `volume::Run`), for the daemon to
    /// retry their commit.
    pub held: Mutex<BTreeSet<ValidVid>>,
    /// Ids of volumes being created (a clone's copy can take long): taken
    /// while the volume is not yet in `volumes`, so no second create of
    /// the same id can start.
    pub creating: Mutex<BTreeSet<ValidVid>>,
}

impl VolumeTable {
    /// A volume, or the error that says why there is none.
    pub fn get(&self, vid: &ValidVid) -> Result<Arc<Volume>> {
        if let Some(v) = self.volumes.read().get(vid) {
            return Ok(v.clone());
        }
        if let Some((path, reason)) = self.corrupt.read().get(vid) {
            return Err(Error::CorruptMetadata {
                path: path.clone(),
                reason: reason.clone(),
            });
        }
        Err(Error::NoSuchVolume(vid.to_string()))
    }

    /// Every volume, at one instant (the lock is released on return).
    pub fn all(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().values().cloned().collect()
    }

    /// Whether `vid` names a volume, readable or not.
    pub fn contains(&self, vid: &ValidVid) -> bool {
        self.volumes.read().contains_key(vid) || self.corrupt.read().contains_key(vid)
    }

    /// Why `vid`'s config could not be read, if it could not.
    pub fn corrupt(&self, vid: &ValidVid) -> Option<Corrupt> {
        self.corrupt.read().get(vid).cloned()
    }

    /// Sets a volume's phase (its lock held), and the held set with it:
    /// the daemon's held retry goes over the volumes whose run is held.
    pub fn set_phase(&self, vid: &ValidVid, life: &mut Life, phase: Phase) {
        self.set_held(
            vid,
            matches!(&phase, Phase::Running(r) if r.held().is_some()),
        );
        life.phase = phase;
    }

    /// Notes whether `vid`'s run is held (the daemon retries its commit).
    fn set_held(&self, vid: &ValidVid, held: bool) {
        let mut set = self.held.lock();
        if held {
            set.insert(vid.clone());
        } else {
            set.remove(vid);
        }
    }

    /// The volumes whose run is held.
    pub fn held(&self) -> Vec<ValidVid> {
        self.held.lock().iter().cloned().collect()
    }

    /// Replaces the table's content with what [`load`] read.
    pub fn fill(&self, loaded: Loaded) {
        *self.volumes.write() = loaded.volumes;
        *self.corrupt.write() = loaded.corrupt;
    }
}

/// What [`load`] found: the readable volumes and the unreadable ones.
#[derive(Default)]
pub(crate) struct Loaded {
    pub volumes: BTreeMap<ValidVid, Arc<Volume>>,
    pub corrupt: BTreeMap<ValidVid, Corrupt>,
}

fn reading(dir: &Dir) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("reading {}", dir.path().display()), e)
}

/// A subdirectory of `parent` named by a valid component, or `None` (logged)
/// for a name that cannot be a class or VM.
fn valid_subdir(parent: &Dir, name: &str, what: &str) -> Result<Option<Dir>> {
    if check_component(name, what, name).is_err() {
        log::warn!(
            "ignoring {}: not a valid {what}",
            parent.shown(name).display()
        );
        return Ok(None);
    }
    let shown = parent.shown(name);
    parent
        .subdir(name, false)
        .map(Some)
        .map_err(|e| Error::io(format!("reading {}", shown.display()), e))
}

/// Reads every `.reflinkfs/volumes/CLASS/VM/NAME.json` below `volmeta`.
/// A config that cannot be read or does not validate makes its volume
/// corrupt (listed, unavailable), never fails the load; an unfinished
/// metadata write (`NAME.json~tmp`) is removed.
pub(crate) fn load(volmeta: &Dir, pool: &PoolConfig, hooks: &Arc<Hooks>) -> Result<Loaded> {
    let mut out = Loaded::default();
    for class in volmeta.names().map_err(reading(volmeta))? {
        let Some(cdir) = valid_subdir(volmeta, &class, "class name")? else {
            continue;
        };
        for vm in cdir.names().map_err(reading(&cdir))? {
            let Some(vdir) = valid_subdir(&cdir, &vm, "VM name")? else {
                continue;
            };
            for file in vdir.names().map_err(reading(&vdir))? {
                load_file(&vdir, &class, &vm, &file, pool, hooks, &mut out)?;
            }
        }
    }
    Ok(out)
}

/// One file of a VM's metadata directory (see [`load`]).
fn load_file(
    vdir: &Dir,
    class: &str,
    vm: &str,
    file: &str,
    pool: &PoolConfig,
    hooks: &Arc<Hooks>,
    out: &mut Loaded,
) -> Result<()> {
    let shown = vdir.shown(file);
    if file.ends_with(".json~tmp") {
        log::warn!(
            "recovery: removing unfinished metadata write {}",
            shown.display()
        );
        return sys::unlinkat(vdir.fd(), file)
            .map_err(|e| Error::io(format!("removing {}", shown.display()), e));
    }
    let Some(name) = file.strip_suffix(".json") else {
        log::warn!("ignoring unexpected file {}", shown.display());
        return Ok(());
    };
    let Ok(vid) = ValidVid::new(class, vm, name) else {
        log::warn!("ignoring {}: not a valid volume name", shown.display());
        return Ok(());
    };
    match read_config(vdir, file, &vid, pool) {
        Ok(config) => {
            out.volumes.insert(vid, Volume::new(config, hooks.clone()));
        }
        Err(e) => {
            log::error!("{vid}: {e}; the volume is unavailable until the file is fixed");
            let reason = match e {
                Error::CorruptMetadata { reason, .. } => reason,
                other => other.to_string(),
            };
            out.corrupt.insert(vid, (shown, reason));
        }
    }
    Ok(())
}

/// Reads and checks the config of `vid` from `file`: it must parse, name
/// the volume whose place it lies at, and validate against the pool.
fn read_config(vdir: &Dir, file: &str, vid: &ValidVid, pool: &PoolConfig) -> Result<VolumeConfig> {
    let shown = vdir.shown(file);
    let corrupt = |reason: String| Error::CorruptMetadata {
        path: shown.clone(),
        reason,
    };
    let bytes = read_small_file(vdir, file).map_err(|e| corrupt(format!("cannot be read: {e}")))?;
    let c: VolumeConfig = parse_json(&bytes, &shown)?;
    if c.vid != *vid {
        return Err(corrupt(format!(
            "it names volume {} but lies at the place of {vid}",
            c.vid
        )));
    }
    c.validate(pool).map_err(corrupt)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CreateOptions, InitOptions, Pool};

    #[test]
    fn load_sorts_good_bad_and_unfinished_configs() {
        let d = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            setup_check: false,
            ..Default::default()
        };
        let pool = Pool::init(d.path(), &opts).unwrap();
        let private: ValidVid = "appvms/work/private".parse().unwrap();
        pool.create(&private, &CreateOptions::origin(1 << 20))
            .unwrap();
        let pool_cfg = pool.config();
        drop(pool);
        let meta = d.path().join(".reflinkfs/volumes");
        let vm = meta.join("appvms/work");
        std::fs::create_dir_all(meta.join("bad class!")).unwrap();
        // The right file at the wrong place, a file that is not JSON, and
        // an unfinished write.
        std::fs::copy(vm.join("private.json"), vm.join("root.json")).unwrap();
        std::fs::write(vm.join("volatile.json"), b"{").unwrap();
        std::fs::write(vm.join("x.json~tmp"), b"{").unwrap();
        let dir = Dir::open_path(&meta).unwrap();
        let loaded = load(&dir, &pool_cfg, &Arc::default()).unwrap();
        let ids = |m: Vec<&ValidVid>| m.iter().map(|v| v.to_string()).collect::<Vec<_>>();
        assert_eq!(
            ids(loaded.volumes.keys().collect()),
            ["appvms/work/private"]
        );
        assert_eq!(
            ids(loaded.corrupt.keys().collect()),
            ["appvms/work/root", "appvms/work/volatile"]
        );
        assert!(loaded.corrupt[&"appvms/work/root".parse().unwrap()]
            .1
            .contains("lies at the place of"));
        assert!(!vm.join("x.json~tmp").exists(), "an unfinished write goes");

        let table = VolumeTable::default();
        table.fill(loaded);
        let root: ValidVid = "appvms/work/root".parse().unwrap();
        let none: ValidVid = "appvms/work/none".parse().unwrap();
        assert!(table.get(&private).is_ok());
        assert!(matches!(
            table.get(&root),
            Err(Error::CorruptMetadata { .. })
        ));
        assert!(matches!(table.get(&none), Err(Error::NoSuchVolume(_))));
        assert!(table.contains(&root) && !table.contains(&none));
        assert_eq!(table.all().len(), 1);
        table.set_held(&private, true);
        assert_eq!(table.held(), vec![private.clone()]);
        table.set_held(&private, false);
        assert!(table.held().is_empty());
    }
}
