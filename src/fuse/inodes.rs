//! The inode table of the mount: every node the kernel has been told about,
//! the inode number it got, and how many lookups the kernel holds on it.
//!
//! Inode numbers are never reused, and a node names what it shows exactly
//! enough that a new backing file always gets a new number:
//! - a volume's files carry its incarnation (drawn when the volume is
//!   made), so a volume removed and made again under the same id is new;
//! - `N.img` carries the generation of the committed image, so a commit,
//!   revert, resize or import gives the path a new number, and a reader of
//!   the old one keeps the old attributes (remembered here: the old image
//!   never changes). The kernel allows one passthrough backing file per
//!   inode, so a new open must never be handed an old inode;
//! - `N-dirty.img` keeps one number per incarnation: its backing file only
//!   changes between the last release and the next first open, when the
//!   inode has no opens.
//!
//! FORGET is honoured: a node the kernel has forgotten (and that no
//! readdir refers to any more) leaves the table, so it does not grow with
//! every commit.

use crate::engine::fsops::FileSig;
use crate::engine::ValidVid;
use std::collections::HashMap;

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    Root,
    Class(String),
    Vm(String, String),
    /// `N-dirty.img` of one incarnation of a volume.
    Dirty(ValidVid, u64),
    /// `N.img` of one incarnation, at one generation of the committed image.
    Img(ValidVid, u64, u64),
    /// A revision, by file name (K never repeats, so names are unique).
    Revision(ValidVid, u64, String),
}

pub const ROOT_INO: u64 = 1;

#[derive(Debug)]
struct Entry {
    node: Node,
    /// Lookups the kernel holds (LOOKUP replies minus FORGET counts).
    lookups: u64,
    /// For immutable files (`N.img`, revisions): the attributes they had
    /// when first seen, served when the name has moved on.
    sig: Option<FileSig>,
}

impl Node {
    /// The volume a file node belongs to.
    pub fn vid(&self) -> Option<&ValidVid> {
        match self {
            Node::Dirty(v, _) | Node::Img(v, _, _) | Node::Revision(v, _, _) => Some(v),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct Inodes {
    by_node: HashMap<Node, u64>,
    by_ino: HashMap<u64, Entry>,
    /// The inode numbers of each volume's files, to invalidate them.
    by_vid: HashMap<ValidVid, Vec<u64>>,
    next: u64,
}

impl Default for Inodes {
    fn default() -> Self {
        let mut t = Inodes {
            by_node: HashMap::new(),
            by_ino: HashMap::new(),
            by_vid: HashMap::new(),
            next: ROOT_INO + 1,
        };
        t.by_node.insert(Node::Root, ROOT_INO);
        t.by_ino.insert(
            ROOT_INO,
            Entry {
                node: Node::Root,
                lookups: 1,
                sig: None,
            },
        );
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
        if let Some(v) = node.vid() {
            self.by_vid.entry(v.clone()).or_default().push(ino);
        }
        self.by_node.insert(node.clone(), ino);
        self.by_ino.insert(
            ino,
            Entry {
                node: node.clone(),
                lookups: 0,
                sig: None,
            },
        );
        ino
    }

    /// A LOOKUP reply about to be sent for `node`: its number, counted.
    pub fn looked_up(&mut self, node: &Node) -> u64 {
        let ino = self.ino_of(node);
        if let Some(e) = self.by_ino.get_mut(&ino) {
            e.lookups += 1;
        }
        ino
    }

    /// FORGET: the kernel drops `n` lookups of `ino`. At zero the node
    /// leaves the table (the root never does).
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let gone = match self.by_ino.get_mut(&ino) {
            Some(e) => {
                e.lookups = e.lookups.saturating_sub(n);
                e.lookups == 0
            }
            None => false,
        };
        if gone {
            self.remove(ino);
        }
    }

    fn remove(&mut self, ino: u64) {
        if let Some(e) = self.by_ino.remove(&ino) {
            self.by_node.remove(&e.node);
            if let Some(v) = e.node.vid() {
                if let Some(list) = self.by_vid.get_mut(v) {
                    list.retain(|i| *i != ino);
                    if list.is_empty() {
                        self.by_vid.remove(v);
                    }
                }
            }
        }
    }

    /// The inode numbers the kernel may cache of a volume's files, with
    /// their names and the number of their directory (when known), and the
    /// numbers of its VM directory and class directory.
    pub fn of_volume(&self, vid: &ValidVid) -> Vec<(u64, Option<u64>, String, Node)> {
        let vm = self
            .by_node
            .get(&Node::Vm(vid.class().to_owned(), vid.vm().to_owned()))
            .copied();
        let names = crate::engine::Names::of(vid);
        self.by_vid
            .get(vid)
            .map(|inos| {
                inos.iter()
                    .filter_map(|ino| {
                        let e = self.by_ino.get(ino)?;
                        let name = match &e.node {
                            Node::Dirty(..) => names.dirty(),
                            Node::Img(..) => names.img(),
                            Node::Revision(_, _, f) => f.clone(),
                            _ => return None,
                        };
                        Some((*ino, vm, name, e.node.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The number of a directory node, if the kernel was told of it.
    pub fn peek(&self, node: &Node) -> Option<u64> {
        self.by_node.get(node).copied()
    }

    /// Drops the entries nobody holds (no lookups) whose node `live` says
    /// is gone: numbers readdir handed out for files since replaced.
    pub fn sweep(&mut self, live: impl Fn(&Node) -> bool) -> usize {
        let dead: Vec<u64> = self
            .by_ino
            .iter()
            .filter(|(ino, e)| **ino != ROOT_INO && e.lookups == 0 && !live(&e.node))
            .map(|(ino, _)| *ino)
            .collect();
        for ino in &dead {
            self.remove(*ino);
        }
        dead.len()
    }

    /// The nodes the kernel holds no lookup of (candidates for `sweep`).
    pub fn unheld(&self) -> Vec<Node> {
        self.by_ino
            .iter()
            .filter(|(ino, e)| **ino != ROOT_INO && e.lookups == 0)
            .map(|(_, e)| e.node.clone())
            .collect()
    }

    pub fn node(&self, ino: u64) -> Option<Node> {
        self.by_ino.get(&ino).map(|e| e.node.clone())
    }

    /// The attributes remembered for an immutable file's inode.
    pub fn sig(&self, ino: u64) -> Option<FileSig> {
        self.by_ino.get(&ino).and_then(|e| e.sig)
    }

    /// Remembers an immutable file's attributes the first time it is seen.
    pub fn remember(&mut self, ino: u64, sig: FileSig) {
        if let Some(e) = self.by_ino.get_mut(&ino) {
            e.sig.get_or_insert(sig);
        }
    }

    pub fn len(&self) -> usize {
        self.by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ino.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_generation_or_incarnation_gets_a_new_number() {
        let mut t = Inodes::default();
        let v: ValidVid = "appvms/vm/private".parse().unwrap();
        let a = t.ino_of(&Node::Img(v.clone(), 7, 1));
        assert_eq!(t.ino_of(&Node::Img(v.clone(), 7, 1)), a);
        let b = t.ino_of(&Node::Img(v.clone(), 7, 2));
        let c = t.ino_of(&Node::Img(v.clone(), 8, 1));
        assert!(a != b && b != c && a != c);
        assert_eq!(t.node(a), Some(Node::Img(v, 7, 1)));
        assert_eq!(t.ino_of(&Node::Root), ROOT_INO);
    }

    #[test]
    fn forget_and_sweep_bound_the_table() {
        let mut t = Inodes::default();
        let v: ValidVid = "appvms/vm/private".parse().unwrap();
        for generation in 0..1000 {
            let n = Node::Img(v.clone(), 1, generation);
            let ino = t.looked_up(&n);
            t.looked_up(&n);
            t.forget(ino, 2);
        }
        assert_eq!(t.len(), 1, "only the root is left");
        for generation in 0..100 {
            t.ino_of(&Node::Img(v.clone(), 1, generation));
        }
        assert_eq!(t.sweep(|n| matches!(n, Node::Img(_, _, 99))), 99);
        assert_eq!(t.len(), 2);
        t.forget(ROOT_INO, 100);
        assert_eq!(t.node(ROOT_INO), Some(Node::Root), "the root stays");
    }
}
