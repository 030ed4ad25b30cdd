//! The administration operations of SPEC §5: create, remove, resize,
//! revert, set, import, export and clone.

use super::config::{check_pool_constraints, VolumeConfig, VolumeKind};
use super::failpoint;
use super::fsops::Dir;
use super::lifecycle::{io_ctx, regular_entry};
use super::pool::{Names, Pool};
use super::props::check_revisions_to_keep;
use super::revision::{pick_revision, Revision};
use super::size::check_size;
use super::vid::ValidVid;
use super::volume::{Claim, Life, OpName, Run, Volume};
use crate::error::{Cause, Error, Result};
use crate::sys;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

/// The type of a new volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewKind {
    Origin,
    SnapshotOf(ValidVid),
    Volatile,
}

/// Options of `volume create`.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub kind: NewKind,
    /// `None`: true, or false in a read-only pool.
    pub rw: Option<bool>,
    /// `None`: the pool's default for origin volumes, 0 for the others.
    pub revisions_to_keep: Option<i64>,
    pub optional: bool,
}

impl CreateOptions {
    pub fn origin(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            kind: NewKind::Origin,
            rw: None,
            revisions_to_keep: None,
            optional: false,
        }
    }
}

/// What a resize did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeOutcome {
    Unchanged,
    /// The dirty image of a running volume was resized.
    Running,
    /// The committed image of a stopped origin volume was replaced.
    Committed,
    /// Only the nominal size of a stopped snapshot or volatile volume.
    Nominal,
}

pub(super) use crate::error::{busy, refused};

impl Pool {
    /// Claims a volume for `op` once it is settled, refusing while it runs
    /// (or is held).
    pub(super) fn claim_stopped(&self, vid: &ValidVid, op: OpName, what: &str) -> Result<Claim> {
        self.end_linger(vid)?;
        self.volume(vid)?
            .claim(op, |life| not_running(vid, life, what))
    }

    /// Claims a stopped, clean origin volume for an operation that replaces
    /// its committed image (`doing` says which, for messages); `writes`:
    /// the volume must be writable too. Gives the claim, its config and
    /// the VM's directory.
    pub(super) fn claim_origin(
        &self,
        vid: &ValidVid,
        op: OpName,
        doing: &str,
        writes: bool,
    ) -> Result<(Claim, Arc<VolumeConfig>, Dir)> {
        let claim = self.claim_stopped(vid, op, doing)?;
        let cfg = claim.config();
        let dir = self.vm_dir(vid, true)?;
        self.check_clean(vid, Some(&dir), doing)?;
        cfg.kind().need_origin(vid, doing)?;
        if writes && !cfg.rw {
            return Err(refused(
                vid,
                format!("it is read-only (rw=false); {doing} is refused"),
            ));
        }
        Ok((claim, cfg, dir))
    }

    /// Claims a volume for `op` once it is settled, running or not.
    pub(super) fn claim_any(&self, vid: &ValidVid, op: OpName) -> Result<Claim> {
        self.volume(vid)?
            .claim(op, |life| match life.run().and_then(Run::held) {
                Some(h) => Err(Error::because(
                    vid,
                    Cause::Held,
                    super::stopping::held_reason(h),
                )),
                None => Ok(()),
            })
    }

    /// Refuses when the volume has a dirty image waiting to be committed
    /// (a stop that failed).
    pub(super) fn check_clean(&self, vid: &ValidVid, dir: Option<&Dir>, what: &str) -> Result<()> {
        if let Some(dir) = dir {
            if regular_entry(dir, vid, &Names::of(vid).dirty())?.is_some() {
                return Err(busy(
                    vid,
                    format!("it has a dirty image waiting to be committed; start and stop it (or reopen the pool) before {what}"),
                ));
            }
        }
        Ok(())
    }

    /// Creates a volume (SPEC §5). An origin volume gets a sparse image, or
    /// a copy of `initial` (used by clone).
    pub fn create(&self, vid: &ValidVid, opts: &CreateOptions) -> Result<()> {
        self.create_with(vid, opts, None)
    }

    pub(crate) fn create_with(
        &self,
        vid: &ValidVid,
        opts: &CreateOptions,
        initial: Option<(&File, &std::path::Path)>,
    ) -> Result<()> {
        vid.check_new()?;
        let config = self.new_config(vid, opts)?;
        let (size, kind, source) = (config.size, config.kind(), config.source.clone());

        if let Some(src) = &source {
            if !self.table.volumes.read().contains_key(src) {
                return Err(Error::NoSuchVolume(format!("{src} (the source of {vid})")));
            }
            // The chain must end at an origin volume.
            self.resolve_source(&config)?;
        }
        // The id is reserved while the files are made (a clone's copy takes
        // as long as it takes), without holding the map of volumes.
        let _reserved = self.reserve_new(vid)?;
        // A create that fails (no space for a clone's copy) leaves nothing,
        // not even the VM directory it made.
        let made = (|| -> Result<()> {
            let dir = self.vm_dir(vid, true)?;
            let n = Names::of(vid);
            let v = vid.to_string();
            for f in dir.names().map_err(io_ctx(&dir, "listing", ""))? {
                if n.owns(&f) {
                    log::warn!(
                        "{vid}: removing stale {} of an earlier volume",
                        dir.shown(&f).display()
                    );
                    dir.remove(&v, &f).map_err(io_ctx(&dir, "removing", &f))?;
                }
            }
            if kind == VolumeKind::Origin {
                let tmp = n.img_tmp("create");
                let made = match initial {
                    Some((src, shown)) => dir
                        .copy_from(&v, src, shown, &tmp, self.copy_strategy())
                        .map(|(f, _)| f),
                    None => dir.create_sparse(&v, &tmp, size),
                };
                // A copy that fails (no space, a short source) leaves nothing.
                let f = made
                    .map_err(io_ctx(&dir, "creating", &tmp))
                    .inspect_err(|_| dir.remove_tmp(&v, &tmp))?;
                let actual = sys::fstat(f.as_fd())
                    .map_err(io_ctx(&dir, "examining", &tmp))?
                    .st_size as u64;
                // Data of any length may come (a file passed with the
                // request): its length must be a valid size.
                let config_size = check_size(actual, &actual.to_string())
                    .inspect_err(|_| dir.remove_tmp(&v, &tmp))?;
                sys::fsync(f.as_fd()).map_err(io_ctx(&dir, "syncing", &tmp))?;
                dir.rename(&v, &tmp, &n.img())
                    .map_err(io_ctx(&dir, "renaming", &tmp))?;
                dir.sync().map_err(io_ctx(&dir, "syncing", ""))?;
                failpoint::hit!("create.image");
                let mut config = config;
                config.size = config_size;
                self.store_volume(&config)?;
                let vol = Volume::new(config, self.hooks.clone());
                // Not in the map yet: nothing else can use it.
                self.refresh_precache(&vol, &dir);
                self.table.volumes.write().insert(vid.clone(), vol);
            } else {
                dir.sync().map_err(io_ctx(&dir, "syncing", ""))?;
                self.store_volume(&config)?;
                self.table
                    .volumes
                    .write()
                    .insert(vid.clone(), Volume::new(config, self.hooks.clone()));
            }
            Ok(())
        })();
        if made.is_err() {
            self.remove_dir_if_empty(vid.class(), vid.vm(), false);
        }
        made?;
        self.hooks.changed(vid);
        log::info!("{vid}: created ({}, {size} bytes)", kind.as_str());
        Ok(())
    }

    /// The config of a new volume as `opts` asks, checked against the
    /// pool's constraints.
    fn new_config(&self, vid: &ValidVid, opts: &CreateOptions) -> Result<VolumeConfig> {
        let size = check_size(opts.size, &opts.size.to_string())?;
        let pool_cfg = self.config();
        let (kind, source) = match &opts.kind {
            NewKind::Origin => (VolumeKind::Origin, None),
            NewKind::SnapshotOf(s) => (VolumeKind::Snapshot, Some(s.clone())),
            NewKind::Volatile => (VolumeKind::Volatile, None),
        };
        let revisions_to_keep = match (kind, opts.revisions_to_keep) {
            (VolumeKind::Origin, Some(n)) => check_revisions_to_keep(n)?,
            (VolumeKind::Origin, None) => pool_cfg.revisions_to_keep,
            (_, None | Some(0)) => 0,
            (_, Some(n)) => {
                return Err(Error::InvalidValue {
                    property: "revisions_to_keep".into(),
                    reason: format!(
                        "a {} volume keeps no revisions; {n} is not allowed",
                        kind.as_str()
                    ),
                })
            }
        };
        let rw = opts.rw.unwrap_or(!pool_cfg.read_only);
        check_pool_constraints(&pool_cfg, rw, revisions_to_keep).map_err(|r| refused(vid, r))?;
        let config = VolumeConfig {
            rw,
            revisions_to_keep,
            source: source.clone(),
            optional: opts.optional,
            ..VolumeConfig::new(vid.clone(), kind, size)
        };
        config.validate(&pool_cfg).map_err(|r| refused(vid, r))?;
        Ok(config)
    }

    /// Removes a volume: images, revisions, config, and the VM directories
    /// once empty. Refused while it runs.
    pub fn remove(&self, vid: &ValidVid) -> Result<()> {
        self.remove_forced(vid, false)
    }

    /// [`Pool::remove`]; a volume with pinned revisions needs `force`, and
    /// the log names the pins dropped.
    pub fn remove_forced(&self, vid: &ValidVid, force: bool) -> Result<()> {
        // Dependants are looked up before this volume is locked: a snapshot
        // is always locked before its source, never after.
        let others: Vec<_> = self.table.all();
        let dependants: Vec<String> = others
            .iter()
            .filter_map(|v| {
                let c = v.config();
                (c.source.as_ref() == Some(vid)).then(|| c.vid.to_string())
            })
            .collect();
        if !dependants.is_empty() {
            return Err(refused(
                vid,
                format!(
                    "it is the source of {}; remove those first",
                    dependants.join(", ")
                ),
            ));
        }
        let claim = self.claim_stopped(vid, OpName::Remove, "removing it")?;
        let pins: Vec<String> = claim.config().pins.keys().cloned().collect();
        if !pins.is_empty() {
            let which = pins.join(", ");
            if !force {
                return Err(Error::because(
                    vid,
                    Cause::Pinned,
                    format!(
                        "it has pinned revisions ({which}); give --force to remove them with it"
                    ),
                ));
            }
            log::warn!("{vid}: removing it with its pinned revisions {which} (--force)");
        }
        failpoint::pause!("pause.remove", vid.to_string());
        let v = vid.to_string();
        let n = Names::of(vid);
        if let Some(dir) = self.vm_dir_if_exists(vid)? {
            for f in dir.names().map_err(io_ctx(&dir, "listing", ""))? {
                if n.owns(&f) {
                    dir.remove(&v, &f).map_err(io_ctx(&dir, "removing", &f))?;
                }
            }
            dir.sync().map_err(io_ctx(&dir, "syncing", ""))?;
            self.remove_dir_if_empty(vid.class(), vid.vm(), false);
        }
        let mdir = self.vm_meta_dir(vid, false)?;
        let file = format!("{}.json", vid.name());
        mdir.remove(&v, &file)
            .map_err(io_ctx(&mdir, "removing", &file))?;
        mdir.sync().map_err(io_ctx(&mdir, "syncing", ""))?;
        self.remove_dir_if_empty(vid.class(), vid.vm(), true);
        self.delta_forget(vid);
        // Marked removed before it leaves the map: an open or operation
        // waiting on it fails cleanly, and nothing it made is orphaned.
        claim.finish_removed();
        self.table.volumes.write().remove(vid);
        log::info!("{vid}: removed");
        Ok(())
    }

    fn remove_dir_if_empty(&self, class: &str, vm: &str, meta: bool) {
        let base = if meta { &self.volmeta } else { &self.root };
        if let Ok(cdir) = base.subdir(class, false) {
            match sys::rmdirat(cdir.fd(), vm) {
                Ok(()) => {
                    log::info!("removed empty directory {}", cdir.shown(vm).display());
                    let _ = cdir.sync();
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOTEMPTY | libc::EEXIST | libc::ENOENT)
                    ) => {}
                Err(e) => log::warn!("could not remove {}: {e}", cdir.shown(vm).display()),
            }
        }
    }

    /// The size a stopped volume shows: an origin's committed size; for a
    /// snapshot the larger of its nominal size and its source's.
    pub(crate) fn nominal_size(&self, cfg: &VolumeConfig) -> u64 {
        match cfg.kind() {
            VolumeKind::Snapshot => {
                let src = self
                    .resolve_source(cfg)
                    .ok()
                    .and_then(|s| self.volume(&s).ok())
                    .map(|v| v.config().size)
                    .unwrap_or(0);
                src.max(cfg.size)
            }
            // A read-only pool's images are put there by root (a kernel's
            // modules.img copied in place): the image's size is the size.
            VolumeKind::Origin if self.read_only() => self
                .vm_dir_if_exists(&cfg.vid)
                .ok()
                .flatten()
                .and_then(|d| regular_entry(&d, &cfg.vid, &Names::of(&cfg.vid).img()).ok())
                .flatten()
                .map_or(cfg.size, |sig| sig.size),
            _ => cfg.size,
        }
    }

    /// Reverts an origin volume to revision `which` (default: the newest).
    /// The current image is saved as a new revision first, and revision
    /// `which` stays in the list. Returns the K the current image was
    /// saved as.
    pub fn revert(&self, vid: &ValidVid, which: Option<&str>) -> Result<Option<u64>> {
        self.revert_to(vid, which).map(|(_, saved)| saved)
    }

    /// [`Pool::revert`], also naming the revision gone back to.
    pub(crate) fn revert_to(
        &self,
        vid: &ValidVid,
        which: Option<&str>,
    ) -> Result<(String, Option<u64>)> {
        let (claim, cfg, dir) = self.claim_origin(vid, OpName::Revert, "reverting it", false)?;
        if cfg.revisions_to_keep == -1 {
            return Err(refused(
                vid,
                "snapshots are disabled (revisions_to_keep=-1), so there is nothing to revert to",
            ));
        }
        let revs = self.list_revisions(vid, Some(&dir))?;
        let rev = pick_revision(vid, &revs, which)?;
        let saved = self.revert_in_place(&claim.volume, &dir, &rev.file_name)?;
        log::info!("{vid}: reverted to revision {}", rev.id);
        Ok((rev.id.to_string(), saved))
    }

    /// The revisions of a volume, oldest first.
    pub fn revisions(&self, vid: &ValidVid) -> Result<Vec<Revision>> {
        let cfg = self.volume(vid)?.config();
        let dir = self.vm_dir_if_exists(vid)?;
        let revs = self.list_revisions(vid, dir.as_ref())?;
        Ok(self.annotate_revisions(&cfg, dir.as_ref(), revs, true))
    }

    /// Deletes one revision (the FUSE layer's unlink of a revision).
    pub fn remove_revision(&self, vid: &ValidVid, which: &str) -> Result<()> {
        let _claim = self.claim_any(vid, OpName::RemoveRevision)?;
        let dir = self.vm_dir(vid, false)?;
        let revs = self.list_revisions(vid, Some(&dir))?;
        let rev = pick_revision(vid, &revs, Some(which))?;
        let cfg = self.volume(vid)?.config();
        if super::revision::is_protected(&cfg, rev) {
            return Err(Error::because(
                vid,
                Cause::Pinned,
                format!(
                    "revision {} is pinned (or a queued revert's target); `reflinkfs volume revisions unpin` it first",
                    rev.id
                ),
            ));
        }
        dir.remove(&vid.to_string(), &rev.file_name)
            .map_err(io_ctx(&dir, "removing", &rev.file_name))?;
        dir.sync().map_err(io_ctx(&dir, "syncing", ""))?;
        Ok(())
    }
}

impl Pool {
    /// Reserves the id of a volume being created, refusing one that exists
    /// or is being created; the reservation ends when the guard drops.
    fn reserve_new<'a>(&'a self, vid: &ValidVid) -> Result<Reserved<'a>> {
        let mut creating = self.table.creating.lock();
        if self.table.contains(vid) || creating.contains(vid) {
            return Err(Error::VolumeExists(vid.to_string()));
        }
        creating.insert(vid.clone());
        Ok(Reserved {
            pool: self,
            vid: vid.clone(),
        })
    }
}

/// An id reserved by [`Pool::reserve_new`].
struct Reserved<'a> {
    pool: &'a Pool,
    vid: ValidVid,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.pool.table.creating.lock().remove(&self.vid);
    }
}

/// Refuses an operation on a running (or held) volume.
fn not_running(vid: &ValidVid, life: &Life, what: &str) -> Result<()> {
    match life.run() {
        Some(run) => Err(match run.held() {
            Some(h) => Error::because(vid, Cause::Held, super::stopping::held_reason(h)),
            None => Error::because(
                vid,
                Cause::Running,
                format!("it is running; stop it before {what}"),
            ),
        }),
        None => Ok(()),
    }
}

/// A copy-mode pool in `path` with an origin volume of `size` bytes for
/// each id of `volumes`, for unit tests.
#[cfg(test)]
pub(crate) fn scratch_pool(path: &std::path::Path, volumes: &[&str], size: u64) -> Pool {
    let opts = super::InitOptions {
        setup_check: false,
        ..Default::default()
    };
    let pool = Pool::init(path, &opts).expect("a scratch pool");
    for v in volumes {
        let vid = v.parse().expect("a valid volume id");
        pool.create(&vid, &CreateOptions::origin(size))
            .expect("a volume of the scratch pool");
    }
    pool
}
