//! The names of a volume's files in its VM directory (SPEC §3), and which
//! files a volume owns.

use super::revision::{parse_revision_name, Parsed};
use super::vid::ValidVid;

/// File names of one volume's backing files (SPEC §3).
#[derive(Debug, Clone)]
pub struct Names<'a> {
    pub name: &'a str,
}

impl<'a> Names<'a> {
    pub fn of(vid: &'a ValidVid) -> Names<'a> {
        Names { name: vid.name() }
    }
    pub fn img(&self) -> String {
        format!("{}.img", self.name)
    }
    pub fn dirty(&self) -> String {
        format!("{}-dirty.img", self.name)
    }
    pub fn import(&self) -> String {
        format!("{}-import.img", self.name)
    }
    /// `N-precache.img`: a reflink of `N.img` the next start renames to
    /// `N-dirty.img` (see `precache.rs`).
    pub fn precache(&self) -> String {
        format!("{}-precache.img", self.name)
    }
    /// `N-dirty.img~tmp`: a start's copy before it is renamed into place.
    pub fn dirty_tmp(&self) -> String {
        format!("{}-dirty.img~tmp", self.name)
    }
    /// `N.img~OP`: the new committed image of a resize or revert.
    pub fn img_tmp(&self, op: &str) -> String {
        format!("{}.img~{op}", self.name)
    }
    /// Whether `file` is one of this volume's temporary files. The stem must
    /// match exactly, so `priv` never claims `private.img~tmp`.
    pub fn is_temp(&self, file: &str) -> bool {
        let dirty_stem = format!("{}-dirty.img~", self.name);
        let img_stem = format!("{}.img~", self.name);
        file.starts_with(&dirty_stem) || file.starts_with(&img_stem)
    }
    /// Whether `file` is one of the names this volume generates: its
    /// image, dirty, import and precache images, its temporary files, and revisions
    /// whose names parse. Nothing else: a name that merely starts like one
    /// of ours (`p.img.7.img`, the image of volume `p.img.7`) is not `p`'s.
    /// Given the id rules (no `@` or `~`, no reserved suffix), no file is
    /// owned by two volumes of one VM; `tests/engine/names.rs` checks it.
    pub fn owns(&self, file: &str) -> bool {
        file == self.img()
            || file == self.dirty()
            || file == self.import()
            || file == self.precache()
            || self.is_temp(file)
            || matches!(parse_revision_name(self.name, file), Parsed::Revision(_))
    }
}
