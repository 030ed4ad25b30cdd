//! What a volume's config records of its files: a file's identity at one
//! moment, and what its precache was made from (see `precache.rs`). A leaf
//! module, so that the config can name these without depending on the
//! precache's logic.

use super::fsops::FileSig;
use serde::{Deserialize, Serialize};

/// What identifies one state of a file: replaced, it has another inode
/// (or ctime); written, another mtime and ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdent {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl FileIdent {
    pub fn of(sig: &FileSig) -> FileIdent {
        FileIdent {
            dev: sig.dev,
            ino: sig.ino,
            size: sig.size,
            mtime: sig.mtime,
            ctime: sig.ctime,
        }
    }
}

/// What a volume's precache was made from (stored in its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrecacheRecord {
    /// The volume's generation when the precache was made.
    pub generation: u64,
    /// `N.img` then.
    pub image: FileIdent,
    /// The precache then.
    pub copy: FileIdent,
}

impl PrecacheRecord {
    /// Whether `copy` is still a copy of `image`, the committed image of
    /// generation `generation`.
    pub fn matches(&self, generation: u64, image: &FileSig, copy: &FileSig) -> bool {
        self.generation == generation
            && self.image == FileIdent::of(image)
            && self.copy == FileIdent::of(copy)
    }

    /// Whether `image` is still the committed image this record was made
    /// from (the precache itself aside).
    pub(crate) fn same_image(&self, generation: u64, image: &FileSig) -> bool {
        self.generation == generation && self.image == FileIdent::of(image)
    }
}
