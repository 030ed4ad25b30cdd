//! Incremental export and import (doc/DELTA.md): revision ids, change maps
//! recorded at commit, `volume diff`, and Ceph `rbd diff v1` streams.
//!
//! The commit calls two hooks: [`Pool::delta_stamp`] gives the new image
//! its id before its fsync, and [`Pool::delta_record`], once it is durable
//! and before it replaces the committed image, records which ranges differ
//! from that image.

mod changes;
pub mod ids;
mod io;
mod ops;
mod ranges;
pub mod stream;

pub use ids::RevId;
pub use ops::{DiffReport, ExportReport, ImportReport};

use super::fsops::Dir;
use super::lifecycle::open_image;
use super::pool::{Names, Pool};
use super::vid::ValidVid;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;

/// The answer to a delta request (protocol 1.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeltaResponse {
    Diff(DiffReport),
    Exported(ExportReport),
    Imported(ImportReport),
}

impl Pool {
    /// Gives the image about to be committed by `op` its id, before the
    /// commit's fsync makes it durable. A commit's dirty image always gets a
    /// new one (under `revisions_to_keep=-1` it is the previous image,
    /// renamed and written since); an import's keeps the id a delta gave
    /// it. Where the filesystem keeps no extended attributes the image has
    /// none, and any stale id is removed.
    pub(crate) fn delta_stamp(
        &self,
        dir: &Dir,
        vid: &ValidVid,
        new: &File,
        op: &str,
    ) -> Result<Option<RevId>> {
        if op != "commit" {
            if let Ok(Some(id)) = ids::read_id(new) {
                return Ok(Some(id));
            }
        }
        let id = RevId::random();
        match ids::stamp(new, id) {
            Ok(()) => Ok(Some(id)),
            Err(e) => {
                log::warn!("{vid}: the new image gets no revision id: {e}");
                ids::clear(new).map_err(|e| {
                    Error::io(
                        format!(
                            "{vid}: removing a stale revision id in {}",
                            dir.path().display()
                        ),
                        e,
                    )
                })?;
                Ok(None)
            }
        }
    }

    /// Records the change map from the committed image to `new`, once `new`
    /// is durable and before it replaces it: both are quiescent, so their
    /// extent maps tell the truth. Never fails the commit: without a map, a
    /// later diff compares data.
    pub(crate) fn delta_record(
        &self,
        dir: &Dir,
        vid: &ValidVid,
        new: &File,
        new_id: Option<RevId>,
    ) {
        if let Err(e) = self.record_changes(dir, vid, new, new_id) {
            log::warn!("{vid}: no change map recorded for this commit: {e}");
        }
    }

    fn record_changes(
        &self,
        dir: &Dir,
        vid: &ValidVid,
        new: &File,
        new_id: Option<RevId>,
    ) -> std::io::Result<()> {
        // A copy-mode pool shares no extents: such a map would call
        // everything changed, and comparing data later does better.
        let Some(new_id) = new_id.filter(|_| !self.config().copy_mode) else {
            return Ok(());
        };
        let Ok(old) = open_image(dir, vid, &Names::of(vid).img(), libc::O_RDONLY) else {
            return Ok(());
        };
        let Some(old_id) = ids::id_or_assign(&old)? else {
            return Ok(());
        };
        let cdir = changes::changes_dir(&self.meta, vid, true)?.expect("created");
        let mut live = vec![old_id, new_id];
        live.extend(self.revision_ids(vid, dir));
        changes::collect_garbage(&cdir, &live)?;
        if old_id == new_id {
            return Ok(());
        }
        let sizes = (
            crate::sys::fstat(std::os::fd::AsFd::as_fd(&old))?.st_size as u64,
            crate::sys::fstat(std::os::fd::AsFd::as_fd(new))?.st_size as u64,
        );
        let changed = changes::extent_changes(&old, sizes.0, new, sizes.1)?;
        changes::store(&cdir, old_id, new_id, sizes, &changed)
    }

    /// The ids of a volume's revisions (those that have one).
    pub(crate) fn revision_ids(&self, vid: &ValidVid, dir: &Dir) -> Vec<RevId> {
        self.list_revisions(vid, Some(dir))
            .unwrap_or_default()
            .iter()
            .filter_map(|r| open_image(dir, vid, &r.file_name, libc::O_RDONLY).ok())
            .filter_map(|f| ids::read_id(&f).ok().flatten())
            .collect()
    }

    /// Removes a volume's change maps (it is being removed).
    pub(crate) fn delta_forget(&self, vid: &ValidVid) {
        if let Err(e) = changes::remove_all(&self.meta, vid) {
            log::warn!("{vid}: could not remove its change maps: {e}");
        }
    }
}
