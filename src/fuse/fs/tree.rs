//! The tree the mount shows: names, attributes, listings and xattrs,
//! read from the pool's volumes.

use super::*;

pub(super) fn time_of((sec, nsec): (i64, i64)) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH
    }
}

/// The attributes of an image file, from its backing file.
pub(super) fn sig_attr(ino: u64, sig: &FileSig, perm: u16) -> Attr {
    Attr {
        ino,
        kind: Kind::File,
        size: sig.size,
        blocks: sig.blocks,
        perm,
        mtime: time_of(sig.mtime),
        ctime: time_of(sig.ctime),
        cacheable: true,
    }
}

impl<B: Send + Sync + 'static> ReflinkFs<B> {
    pub(super) fn dir_attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            blocks: 0,
            perm: 0o755,
            mtime: self.started,
            ctime: self.started,
            cacheable: true,
        }
    }

    pub(super) fn file_perm(&self, writable: bool) -> u16 {
        if writable {
            0o600
        } else {
            0o400
        }
    }

    /// The attributes of a node. With `fh` (an fstat), those of the open
    /// file itself, so a reader keeps its own image's attributes; without,
    /// fresh from the backing files.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        let node = self.node(ino)?;
        if let Some(fh) = fh {
            let file = self.handles.lock().get(&fh).map(|h| h.file.clone());
            if let Some(file) = file {
                let sig = FileSig::from_stat(
                    &sys::fstat(file.as_fd()).map_err(|e| io_errno("getattr", e))?,
                );
                let perm = match &node {
                    Node::Dirty(vid, _) => self.file_perm(
                        self.pool
                            .snapshot(vid)
                            .map_err(|e| errno_of("getattr", &e))?
                            .config
                            .rw,
                    ),
                    _ => 0o400,
                };
                let mut a = sig_attr(ino, &sig, perm);
                a.cacheable = !matches!(node, Node::Dirty(..));
                return Ok(a);
            }
        }
        self.attr_of(ino, &node)
    }

    pub(super) fn attr_of(&self, ino: u64, node: &Node) -> FsResult<Attr> {
        crate::engine::failpoint::panic_if("fuse.getattr", &format!("{node:?}"));
        match node {
            Node::Root | Node::Class(_) | Node::Vm(..) => Ok(self.dir_attr(ino)),
            Node::Dirty(vid, _) => {
                // A running volume: one fstat of its dirty image, nothing
                // else (a VM's disk is stat'ed while others load the disk).
                if let Ok(Some((sig, rw))) = self.pool.running_dirty(vid) {
                    return Ok(Attr {
                        cacheable: false,
                        ..sig_attr(ino, &sig, self.file_perm(rw))
                    });
                }
                let view = self.view(vid)?;
                let perm = self.file_perm(view.config.rw);
                match (view.running, view.dirty) {
                    (true, Some(sig)) => Ok(Attr {
                        cacheable: false,
                        ..sig_attr(ino, &sig, perm)
                    }),
                    _ => {
                        let (mtime, ctime, blocks) = view
                            .img
                            .map(|s| (time_of(s.mtime), time_of(s.ctime), s.blocks))
                            .unwrap_or((self.started, self.started, 0));
                        Ok(Attr {
                            ino,
                            kind: Kind::File,
                            size: view.nominal_size,
                            blocks,
                            perm,
                            mtime,
                            ctime,
                            cacheable: true,
                        })
                    }
                }
            }
            Node::Img(vid, _, generation) => {
                // An older generation's image never changes: it keeps the
                // attributes it had, whatever replaced the name since.
                let remembered = self.inodes.lock().sig(ino);
                let view = self.view(vid)?;
                if view.generation != *generation {
                    return remembered
                        .map(|s| sig_attr(ino, &s, 0o400))
                        .ok_or(libc::ENOENT);
                }
                let sig = view.img.ok_or(libc::ENOENT)?;
                self.inodes.lock().remember(ino, sig);
                Ok(sig_attr(ino, &sig, 0o400))
            }
            Node::Revision(vid, _, name) => {
                let f = self
                    .pool
                    .open_revision(vid, name)
                    .map_err(|e| errno_of("getattr", &e))?;
                let st = sys::fstat(f.as_fd()).map_err(|e| io_errno("getattr", e))?;
                let sig = FileSig::from_stat(&st);
                Ok(sig_attr(ino, &sig, 0o400))
            }
        }
    }

    /// Which node `name` in directory `parent` is, if it exists. One range
    /// query of the pool's sorted volumes: as cheap with 10,000 volumes as
    /// with 10.
    pub(super) fn child(&self, parent: &Node, name: &str) -> FsResult<Node> {
        match parent {
            Node::Root => self
                .pool
                .class_shown(name)
                .then(|| Node::Class(name.to_owned()))
                .ok_or(libc::ENOENT),
            Node::Class(c) => (!self.pool.shown_in_vm(c, name).is_empty())
                .then(|| Node::Vm(c.clone(), name.to_owned()))
                .ok_or(libc::ENOENT),
            Node::Vm(c, vm) => {
                for v in self.pool.shown_in_vm(c, vm) {
                    let n = crate::engine::Names::of(&v);
                    if !name.starts_with(v.name()) {
                        continue;
                    }
                    if name == n.dirty() {
                        let view = self.view(&v)?;
                        return Ok(Node::Dirty(v.clone(), view.config.incarnation));
                    }
                    if name == n.img() || name.starts_with(&format!("{}.img", v.name())) {
                        let view = self.view(&v)?;
                        let inc = view.config.incarnation;
                        if name == n.img() {
                            return match view.img {
                                Some(_) => Ok(Node::Img(v.clone(), inc, view.generation)),
                                None => Err(libc::ENOENT),
                            };
                        }
                        if self.revisions(&v)?.iter().any(|r| r.file_name == name) {
                            return Ok(Node::Revision(v.clone(), inc, name.to_owned()));
                        }
                    }
                }
                Err(libc::ENOENT)
            }
            _ => Err(libc::ENOTDIR),
        }
    }

    pub fn lookup(&self, parent: u64, name: &str) -> FsResult<Attr> {
        let parent = self.node(parent)?;
        let node = self.child(&parent, name)?;
        // The number and its count are taken together: a FORGET of earlier
        // lookups that runs meanwhile on another worker cannot drop the
        // entry this reply names. FORGET balances the count.
        let ino = self.inodes.lock().looked_up(&node);
        self.attr_of(ino, &node)
            .inspect_err(|_| self.forget(ino, 1))
    }

    /// FORGET of `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.lock().forget(ino, n);
    }

    /// Drops the inode numbers handed out by readdir for files that have
    /// gone since (replaced images, removed volumes) and that the kernel
    /// does not hold. The daemon calls it now and then.
    pub fn sweep_inodes(&self) {
        let live = |n: &Node| match n {
            Node::Root | Node::Class(_) | Node::Vm(..) => true,
            Node::Dirty(v, inc) | Node::Revision(v, inc, _) => self
                .pool
                .snapshot(v)
                .is_ok_and(|s| s.config.incarnation == *inc),
            Node::Img(v, inc, generation) => self
                .pool
                .snapshot(v)
                .is_ok_and(|s| s.config.incarnation == *inc && s.config.generation == *generation),
        };
        // The liveness test reads the pool, so the table is not held during
        // it: nodes are judged first, then dropped if still unheld.
        let candidates: Vec<Node> = {
            let t = self.inodes.lock();
            t.unheld()
        };
        let dead: std::collections::HashSet<Node> =
            candidates.into_iter().filter(|n| !live(n)).collect();
        if !dead.is_empty() {
            let n = self.inodes.lock().sweep(|node| !dead.contains(node));
            log::debug!("dropped {n} inode number(s) of files that are gone");
        }
    }

    /// The entries of a directory, without `.` and `..`.
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(u64, Kind, String)>> {
        let node = self.node(ino)?;
        let mut out = Vec::new();
        match &node {
            Node::Root => {
                for c in self.pool.shown_classes() {
                    let n = Node::Class(c.clone());
                    out.push((self.ino_of(&n), Kind::Dir, c));
                }
            }
            Node::Class(c) => {
                for vm in self.pool.shown_vms(c) {
                    let n = Node::Vm(c.clone(), vm.clone());
                    out.push((self.ino_of(&n), Kind::Dir, vm));
                }
            }
            Node::Vm(c, vm) => {
                for v in self.pool.shown_in_vm(c, vm) {
                    let names = crate::engine::Names::of(&v);
                    let Ok(view) = self.pool.volume_view(&v) else {
                        continue;
                    };
                    let inc = view.config.incarnation;
                    out.push((
                        self.ino_of(&Node::Dirty(v.clone(), inc)),
                        Kind::File,
                        names.dirty(),
                    ));
                    if view.img.is_some() {
                        out.push((
                            self.ino_of(&Node::Img(v.clone(), inc, view.generation)),
                            Kind::File,
                            names.img(),
                        ));
                    }
                    for r in self.revisions(&v).unwrap_or_default() {
                        let n = Node::Revision(v.clone(), inc, r.file_name.clone());
                        out.push((self.ino_of(&n), Kind::File, r.file_name));
                    }
                }
            }
            _ => return Err(libc::ENOTDIR),
        }
        Ok(out)
    }

    /// readdirplus: the entries with their attributes. Each one the
    /// adapter sends counts as a lookup (see [`ReflinkFs::looked_up`]).
    pub fn readdir_plus(&self, ino: u64) -> FsResult<Vec<(Kind, String, Attr)>> {
        let mut out = Vec::new();
        for (eino, kind, name) in self.readdir(ino)? {
            let Some(node) = self.inodes.lock().node(eino) else {
                continue;
            };
            // An entry gone since the listing is left out.
            if let Ok(a) = self.attr_of(eino, &node) {
                out.push((kind, name, a));
            }
        }
        Ok(out)
    }

    /// An entry of a readdirplus reply went out: the kernel holds a lookup.
    pub fn looked_up(&self, ino: u64) {
        let mut inodes = self.inodes.lock();
        if let Some(n) = inodes.node(ino) {
            inodes.looked_up(&n);
        }
    }

    pub fn statfs(&self) -> FsResult<(u64, u64, u64)> {
        let s = self.pool.fs_stats().map_err(|e| errno_of("statfs", &e))?;
        let scale = |n: u64| n.saturating_mul(s.block_size) / 4096;
        Ok((scale(s.blocks), scale(s.blocks_free), scale(s.blocks_avail)))
    }

    /// The `user.reflinkfs.*` xattrs of a node, in a stable order.
    pub fn xattrs(&self, ino: u64) -> FsResult<Vec<(String, String)>> {
        let node = self.node(ino)?;
        let mut out = Vec::new();
        let mut put = |k: &str, v: String| out.push((format!("user.reflinkfs.{k}"), v));
        match &node {
            Node::Root => {
                let n = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
                put("pool", self.pool.path().display().to_string());
                put("io_mode", self.io_mode().to_string());
                put("read_requests", n(&self.stats.reads));
                put("write_requests", n(&self.stats.writes));
                put("read_bytes", n(&self.stats.read_bytes));
                put("write_bytes", n(&self.stats.write_bytes));
                put("getxattr_requests", n(&self.stats.getxattrs));
                put("panics", n(&self.stats.panics));
                put("open_volumes", self.open_volumes().to_string());
                put("starts", self.pool.starts().to_string());
                put("inodes", self.inode_count().to_string());
            }
            Node::Class(_) | Node::Vm(..) => {}
            Node::Dirty(vid, _) | Node::Img(vid, _, _) | Node::Revision(vid, _, _) => {
                let view = self.view(vid)?;
                let c = &view.config;
                put("vid", vid.to_string());
                put("type", c.kind().as_str().to_owned());
                put("state", view.state.to_string());
                put("size", view.nominal_size.to_string());
                put("rw", c.rw.to_string());
                put("revisions_to_keep", c.revisions_to_keep.to_string());
                put("snap_on_start", c.snap_on_start.to_string());
                put("save_on_stop", c.save_on_stop.to_string());
                if let Some(s) = &c.source {
                    put("source", s.to_string());
                }
                if let Node::Revision(_, _, file) = &node {
                    if let Some(r) = self
                        .revisions(vid)?
                        .into_iter()
                        .find(|r| &r.file_name == file)
                    {
                        put("revision", r.id.to_string());
                        put("committed", r.timestamp.clone());
                    }
                }
                if let Ok(Some(o)) = self.pool.is_outdated(vid) {
                    put("is_outdated", o.to_string());
                }
            }
        }
        Ok(out)
    }
}
