//! `pool adopt`: brings an existing Qubes `file-reflink` or `file` pool
//! directory under management in place. (Being written.)

use crate::error::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Options of `pool adopt`.
#[derive(Debug, Clone, Default)]
pub struct AdoptOptions {
    pub qubes_xml: Option<PathBuf>,
    pub dry_run: bool,
    pub setup_check: bool,
}

/// What adopt did, or would do with `--dry-run`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AdoptReport {
    pub dry_run: bool,
}

impl AdoptReport {
    pub fn to_text(&self) -> String {
        String::new()
    }
}

pub fn adopt(path: &Path, _opts: &AdoptOptions) -> Result<AdoptReport> {
    Err(Error::NotAPool {
        path: path.to_owned(),
    })
}
