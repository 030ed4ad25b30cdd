//! The inode table of the mount: every node the kernel has been told about,
//! and the inode number it got.
//!
//! A committed image's node includes the generation of the volume's
//! committed image, so when a commit, revert, resize or import replaces the
//! backing file the path gets a new inode number. The kernel allows one
//! passthrough backing file per inode, so a new open must never be handed
//! an inode that still has opens of the old file. Numbers are never
//! reused, and FORGET is not acted on: the table holds a few entries per
//! volume and commit, far less than the kernel's own inode cache.
//! `N-dirty.img` keeps one
//! number per volume: its backing file only changes between the last
//! release and the next first open, when the inode has no opens.

use crate::engine::ValidVid;
use std::collections::HashMap;

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    Root,
    Class(String),
    Vm(String, String),
    /// `N-dirty.img`.
    Dirty(ValidVid),
    /// `N.img` at one generation of the committed image.
    Img(ValidVid, u64),
    /// A revision, by file name (K never repeats, so names are unique).
    Revision(ValidVid, String),
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self, Node::Root | Node::Class(_) | Node::Vm(..))
    }

    pub fn vid(&self) -> Option<&ValidVid> {
        match self {
            Node::Dirty(v) | Node::Img(v, _) | Node::Revision(v, _) => Some(v),
            _ => None,
        }
    }
}

pub const ROOT_INO: u64 = 1;

#[derive(Debug)]
pub struct Inodes {
    by_node: HashMap<Node, u64>,
    by_ino: HashMap<u64, Node>,
    next: u64,
}

impl Default for Inodes {
    fn default() -> Self {
        let mut t = Inodes {
            by_node: HashMap::new(),
            by_ino: HashMap::new(),
            next: ROOT_INO + 1,
        };
        t.by_node.insert(Node::Root, ROOT_INO);
        t.by_ino.insert(ROOT_INO, Node::Root);
        t
    }
}

impl Inodes {
    /// The inode number of `node`, assigning a new one the first time.
    /// Numbers are never reused.
    pub fn ino_of(&mut self, node: &Node) -> u64 {
        if let Some(&ino) = self.by_node.get(node) {
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_node.insert(node.clone(), ino);
        self.by_ino.insert(ino, node.clone());
        ino
    }

    pub fn node(&self, ino: u64) -> Option<Node> {
        self.by_ino.get(&ino).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_generation_gets_a_new_number() {
        let mut t = Inodes::default();
        let v: ValidVid = "appvms/vm/private".parse().unwrap();
        let a = t.ino_of(&Node::Img(v.clone(), 1));
        assert_eq!(t.ino_of(&Node::Img(v.clone(), 1)), a);
        let b = t.ino_of(&Node::Img(v.clone(), 2));
        assert_ne!(a, b);
        assert_eq!(t.node(a), Some(Node::Img(v, 1)));
        assert_eq!(t.ino_of(&Node::Root), ROOT_INO);
    }
}
