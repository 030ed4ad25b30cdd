//! On-disk metadata (SPEC §1.1): `pool.json` and one JSON file per volume,
//! written atomically and carrying a format version.

use super::fsops::write_file_atomic;
use super::vid::ValidVid;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::path::Path;

/// The metadata format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub format: u32,
    /// True when the pool was created with `setup_check=no` on a filesystem
    /// without reflinks: every copy is a sparse copy.
    pub copy_mode: bool,
    /// Default `revisions_to_keep` of new volumes.
    pub revisions_to_keep: i64,
    /// Kernel-pool mode: every volume is `rw=false`, `revisions_to_keep=0`.
    pub read_only: bool,
    /// When the pool was created (UTC).
    pub created: String,
}

/// The three volume types of SPEC §2.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    Origin,
    Snapshot,
    Volatile,
}

impl VolumeKind {
    /// Refuses `doing` (an operation, as the user named it) on a volume
    /// that is not an origin volume.
    pub fn need_origin(self, vid: &ValidVid, doing: &str) -> Result<()> {
        match self {
            VolumeKind::Origin => Ok(()),
            kind => Err(crate::error::refused(
                vid,
                format!(
                    "{doing} needs an origin volume; this is a {} one",
                    kind.as_str()
                ),
            )),
        }
    }

    pub fn from_flags(snap_on_start: bool, save_on_stop: bool) -> Option<VolumeKind> {
        match (snap_on_start, save_on_stop) {
            (false, true) => Some(VolumeKind::Origin),
            (true, false) => Some(VolumeKind::Snapshot),
            (false, false) => Some(VolumeKind::Volatile),
            (true, true) => None,
        }
    }

    pub fn flags(self) -> (bool, bool) {
        match self {
            VolumeKind::Origin => (false, true),
            VolumeKind::Snapshot => (true, false),
            VolumeKind::Volatile => (false, false),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VolumeKind::Origin => "origin",
            VolumeKind::Snapshot => "snapshot",
            VolumeKind::Volatile => "volatile",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub format: u32,
    pub vid: ValidVid,
    pub snap_on_start: bool,
    pub save_on_stop: bool,
    /// Nominal size in bytes. For an origin volume it follows the committed
    /// image.
    pub size: u64,
    pub rw: bool,
    pub revisions_to_keep: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ValidVid>,
    #[serde(default)]
    pub optional: bool,
    /// K of the next revision. It only grows, so a revision number is never
    /// reused, even after every revision was pruned.
    pub next_revision: u64,
    /// Bumped every time the committed image is replaced. Snapshot volumes
    /// remember the generation they started from, which makes `is_outdated`
    /// exact where inode numbers could be reused.
    pub generation: u64,
    /// The revision (file name) the last revert went back to. Pruning
    /// keeps it beyond `revisions_to_keep`, so that the revert can be
    /// undone, until the next commit clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_by_revert: Option<String>,
    /// Set by a resize of a running origin volume: the size of its dirty
    /// image, which the commit makes the volume's. Recovery holds a leftover
    /// dirty image to it (writes past the end are cut off), so a crash
    /// between the resize and the commit never cuts off the grown part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_size: Option<u64>,
    /// A random number drawn when the volume was made: a volume removed
    /// and made again under the same id is a different volume (the mount
    /// gives its files new inode numbers). 0 in configs of older builds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnation: u64,
    /// Set while `volume attach` has a loop device on the dirty image: the
    /// run outlives the process that attached it (an offline CLI), and the
    /// next open of the pool finds it running instead of committing it
    /// under a live writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<AttachedLoop>,
    /// Pinned revisions, by revision id (`K`, or `@TIMESTAMP`): never
    /// pruned, not counted against `revisions_to_keep`, not deleted until
    /// unpinned (SEMANTICS, "Pinned revisions").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pins: BTreeMap<String, Pin>,
    /// What the end of the current run does instead of a commit
    /// (`volume discard-changes`, a revert of a running volume). Stored
    /// before the request is answered, so it survives a crash: recovery
    /// applies it instead of committing the leftover dirty image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// What `N-precache.img` was made from: a start renames it to the
    /// dirty image only while both files still match this record (see
    /// `precache.rs`). A record of an older generation is stale, and tells
    /// recovery that a replacement of the image did not get its precache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precache: Option<super::ident::PrecacheRecord>,
}

/// A pinned revision's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// When it was pinned (UTC).
    pub pinned_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A change queued for the end of a volume's current run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Pending {
    /// The run's writes are dropped: the volume comes back as it was at
    /// the run's start.
    Discard,
    /// The run's writes are dropped and the committed image becomes the
    /// revision `revision` (its file name), as `volume revert` does.
    Revert { revision: String },
}

impl Pending {
    /// How `status` and `info` show it.
    pub fn describe(&self) -> String {
        match self {
            Pending::Discard => "discard the running changes at stop".into(),
            Pending::Revert { revision } => format!("revert to {revision} at stop"),
        }
    }
}

/// A loop device reflinkfs put on a volume's dirty image (`volume attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedLoop {
    /// N of `/dev/loopN`.
    pub number: u32,
    pub read_only: bool,
    pub direct_io: bool,
    /// The dirty image as the start made it: a detach by a later process
    /// still tells an unmodified run (no new revision) from a modified one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<super::fsops::FileSig>,
}

impl AttachedLoop {
    pub fn device(&self) -> std::path::PathBuf {
        crate::sys::loop_path(self.number)
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl VolumeConfig {
    /// A new volume's config: of `kind`, `size` bytes, read-write, keeping
    /// no revisions, with nothing run, pinned or queued yet and a new
    /// incarnation. Callers set what differs.
    pub fn new(vid: ValidVid, kind: VolumeKind, size: u64) -> VolumeConfig {
        let (snap_on_start, save_on_stop) = kind.flags();
        VolumeConfig {
            format: FORMAT_VERSION,
            vid,
            snap_on_start,
            save_on_stop,
            size,
            rw: true,
            revisions_to_keep: 0,
            source: None,
            optional: false,
            next_revision: 1,
            generation: 0,
            kept_by_revert: None,
            dirty_size: None,
            incarnation: crate::sys::random_u64(),
            attached: None,
            pins: Default::default(),
            pending: None,
            precache: None,
        }
    }

    /// The size a leftover dirty image of this volume is held to.
    pub fn dirty_contract(&self) -> u64 {
        self.dirty_size.unwrap_or(self.size)
    }
}

impl VolumeConfig {
    pub fn kind(&self) -> VolumeKind {
        VolumeKind::from_flags(self.snap_on_start, self.save_on_stop)
            .expect("validated at load and in every setter")
    }

    /// Checks the invariants every volume config must hold; used on load
    /// and after every change, so a value is valid however it was set.
    pub fn validate(&self, pool: &PoolConfig) -> std::result::Result<(), String> {
        let Some(kind) = VolumeKind::from_flags(self.snap_on_start, self.save_on_stop) else {
            return Err(
                "snap_on_start and save_on_stop are both true, which no volume type allows".into(),
            );
        };
        super::size::check_size(self.size, &self.size.to_string()).map_err(|e| e.to_string())?;
        if self.revisions_to_keep < -1 {
            return Err(format!(
                "revisions_to_keep is {}, below the minimum of -1",
                self.revisions_to_keep
            ));
        }
        if kind != VolumeKind::Origin && self.revisions_to_keep != 0 {
            return Err(format!(
                "a {} volume keeps no revisions, but revisions_to_keep is {}",
                kind.as_str(),
                self.revisions_to_keep
            ));
        }
        match (kind, &self.source) {
            (VolumeKind::Snapshot, None) => {
                return Err("a snapshot volume needs a source".into());
            }
            (VolumeKind::Snapshot, Some(s)) if *s == self.vid => {
                return Err("a snapshot volume cannot be its own source".into());
            }
            (VolumeKind::Origin | VolumeKind::Volatile, Some(_)) => {
                return Err(format!("a {} volume has no source", kind.as_str()));
            }
            _ => {}
        }
        check_pool_constraints(pool, self.rw, self.revisions_to_keep)
    }
}

/// The read-only (kernel) pool mode, in one place (SPEC §1.3).
pub fn check_pool_constraints(
    pool: &PoolConfig,
    rw: bool,
    revisions_to_keep: i64,
) -> std::result::Result<(), String> {
    if pool.read_only {
        if rw {
            return Err(
                "the pool is read-only (a kernel pool), so its volumes must have rw=false".into(),
            );
        }
        if revisions_to_keep != 0 {
            return Err("the pool is read-only (a kernel pool), so its volumes must have revisions_to_keep=0".into());
        }
    }
    Ok(())
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::CorruptMetadata {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Parses a metadata file, checking its format version. `shown` is the path
/// used in errors.
pub fn parse_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], shown: &Path) -> Result<T> {
    #[derive(Deserialize)]
    struct Version {
        format: Option<u32>,
    }
    let v: Version = serde_json::from_slice(bytes)
        .map_err(|e| corrupt(shown, format!("not valid JSON: {e}")))?;
    match v.format {
        Some(FORMAT_VERSION) => {}
        Some(other) => {
            return Err(corrupt(
                shown,
                format!("format version {other}; this reflinkfs reads version {FORMAT_VERSION}"),
            ))
        }
        None => return Err(corrupt(shown, "no format version")),
    }
    serde_json::from_slice(bytes).map_err(|e| corrupt(shown, e.to_string()))
}

/// Writes a metadata file atomically (temp file, fsync, rename, fsync dir).
pub fn store_json<T: Serialize>(
    dir: BorrowedFd<'_>,
    name: &str,
    value: &T,
    shown: &Path,
) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("metadata always serialises");
    bytes.push(b'\n');
    write_file_atomic(dir, name, &bytes)
        .map_err(|e| Error::io(format!("writing {}", shown.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> PoolConfig {
        PoolConfig {
            format: FORMAT_VERSION,
            copy_mode: false,
            revisions_to_keep: 1,
            read_only: false,
            created: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn origin() -> VolumeConfig {
        VolumeConfig {
            revisions_to_keep: 1,
            incarnation: 0,
            ..VolumeConfig::new(
                "appvms/vm/private".parse().unwrap(),
                VolumeKind::Origin,
                1 << 20,
            )
        }
    }

    #[test]
    fn validate_rejects_bad_combinations() {
        let p = pool();
        assert!(origin().validate(&p).is_ok());
        let mut both = origin();
        both.snap_on_start = true;
        assert!(both.validate(&p).unwrap_err().contains("both"));
        let mut neg = origin();
        neg.revisions_to_keep = -2;
        assert!(neg.validate(&p).is_err());
        let mut snap = origin();
        snap.snap_on_start = true;
        snap.save_on_stop = false;
        snap.revisions_to_keep = 0;
        assert!(snap.validate(&p).unwrap_err().contains("source"));
        let mut ro = p.clone();
        ro.read_only = true;
        assert!(origin().validate(&ro).unwrap_err().contains("read-only"));
    }

    #[test]
    fn parse_checks_version_and_fields() {
        let shown = Path::new("x.json");
        let good = serde_json::to_vec(&origin()).unwrap();
        assert_eq!(parse_json::<VolumeConfig>(&good, shown).unwrap(), origin());
        assert!(parse_json::<VolumeConfig>(b"{", shown).is_err());
        assert!(parse_json::<VolumeConfig>(b"{\"format\": 99}", shown)
            .unwrap_err()
            .to_string()
            .contains("version 99"));
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        v["vid"] = "a/../b".into();
        let bad = serde_json::to_vec(&v).unwrap();
        assert!(parse_json::<VolumeConfig>(&bad, shown).is_err());
    }
}
