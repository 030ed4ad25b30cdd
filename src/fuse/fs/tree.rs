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
        // The subject is formatted only where a failpoint can be armed (the
        // macro): not on every getattr of a service build.
        crate::engine::failpoint::panic_if!("fuse.getattr", format!("{node:?}"));
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
                Ok(self.dirty_attr(ino, &self.view(vid)?))
            }
            Node::Img(vid, _, generation) => self.img_attr(ino, *generation, &self.view(vid)?),
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

    /// The attributes of `N-dirty.img` from a view of its volume: the
    /// dirty image's while it runs, else the committed image's times and
    /// blocks with the volume's size.
    fn dirty_attr(&self, ino: u64, view: &VolumeView) -> Attr {
        let perm = self.file_perm(view.snap.config.rw);
        match (view.snap.running, view.dirty) {
            (true, Some(sig)) => Attr {
                cacheable: false,
                ..sig_attr(ino, &sig, perm)
            },
            _ => {
                let (mtime, ctime, blocks) = view
                    .img
                    .map(|s| (time_of(s.mtime), time_of(s.ctime), s.blocks))
                    .unwrap_or((self.started, self.started, 0));
                Attr {
                    ino,
                    kind: Kind::File,
                    size: view.nominal_size,
                    blocks,
                    perm,
                    mtime,
                    ctime,
                    cacheable: true,
                }
            }
        }
    }

    /// The attributes of `N.img` of one generation. An older generation's
    /// image never changes: it keeps the attributes it had, whatever
    /// replaced the name since.
    fn img_attr(&self, ino: u64, generation: u64, view: &VolumeView) -> FsResult<Attr> {
        if view.generation() != generation {
            return self
                .inodes
                .lock()
                .sig(ino)
                .map(|s| sig_attr(ino, &s, 0o400))
                .ok_or(libc::ENOENT);
        }
        let sig = view.img.ok_or(libc::ENOENT)?;
        self.inodes.lock().remember(ino, sig);
        Ok(sig_attr(ino, &sig, 0o400))
    }

    /// Which node `name` in directory `parent` is, if it exists. One range
    /// query of the pool's sorted volumes: as cheap with 10,000 volumes as
    /// with 10. Only `N.img` (whether it exists) and a revision's name (the
    /// directory's listing) look at the disk; `N-dirty.img` is known from
    /// the volume table alone.
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
                    // NAME-dirty.img, NAME.img or NAME.img.K@TIME
                    let Some(rest) = name.strip_prefix(v.name()) else {
                        continue;
                    };
                    if rest == "-dirty.img" {
                        let snap = self.pool.snapshot(&v).map_err(|e| errno_of("lookup", &e))?;
                        return Ok(Node::Dirty(v, snap.config.incarnation));
                    }
                    if !rest.starts_with(".img") {
                        continue;
                    }
                    if rest == ".img" {
                        let view = self.view(&v)?;
                        return match view.img {
                            Some(_) => Ok(Node::Img(
                                v,
                                view.snap.config.incarnation,
                                view.generation(),
                            )),
                            None => Err(libc::ENOENT),
                        };
                    }
                    let known = self
                        .pool
                        .revision_files(&v)
                        .map_err(|e| errno_of("lookup", &e))?
                        .iter()
                        .any(|r| r.file_name == name);
                    if known {
                        let snap = self.pool.snapshot(&v).map_err(|e| errno_of("lookup", &e))?;
                        return Ok(Node::Revision(v, snap.config.incarnation, name.to_owned()));
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
        Ok(self
            .listing(ino, false)?
            .into_iter()
            .map(|(ino, kind, name, _)| (ino, kind, name))
            .collect())
    }

    /// readdirplus: the entries with their attributes. Each one the
    /// adapter sends counts as a lookup (see [`ReflinkFs::looked_up`]).
    pub fn readdir_plus(&self, ino: u64) -> FsResult<Vec<(Kind, String, Attr)>> {
        Ok(self
            .listing(ino, true)?
            .into_iter()
            .filter_map(|(_, kind, name, a)| Some((kind, name, a?)))
            .collect())
    }

    /// A directory's entries, with their attributes when `plus` asks for
    /// them (an entry gone since the listing has none, and is left out of
    /// a readdirplus). A VM directory is read once, by
    /// [`Pool::vm_listing`]: its files' attributes come from that listing,
    /// not from a view per file (which opened and looked up the VM
    /// directory again for each). The inode table is locked once.
    #[allow(clippy::type_complexity)]
    fn listing(&self, ino: u64, plus: bool) -> FsResult<Vec<(u64, Kind, String, Option<Attr>)>> {
        let node = self.node(ino)?;
        let dirs = |names: Vec<String>, node: &dyn Fn(String) -> Node| {
            let mut inodes = self.inodes.lock();
            names
                .into_iter()
                .map(|name| {
                    let ino = inodes.ino_of(&node(name.clone()));
                    let a = plus.then(|| self.dir_attr(ino));
                    (ino, Kind::Dir, name, a)
                })
                .collect()
        };
        match &node {
            Node::Root => Ok(dirs(self.pool.shown_classes(), &|c| Node::Class(c))),
            Node::Class(c) => Ok(dirs(self.pool.shown_vms(c), &|vm| Node::Vm(c.clone(), vm))),
            Node::Vm(c, vm) => {
                let listed = self
                    .pool
                    .vm_listing(c, vm)
                    .map_err(|e| errno_of("readdir", &e))?;
                let mut out = Vec::new();
                for l in listed {
                    self.list_volume(l, plus, &mut out);
                }
                Ok(out)
            }
            _ => Err(libc::ENOTDIR),
        }
    }

    /// One volume's files in a VM directory's listing.
    fn list_volume(
        &self,
        l: crate::engine::view::Listed,
        plus: bool,
        out: &mut Vec<(u64, Kind, String, Option<Attr>)>,
    ) {
        let names = crate::engine::Names::of(&l.vid);
        let view = &l.view;
        let inc = view.snap.config.incarnation;
        let (dirty_ino, img_ino, rev_inos) = {
            let mut inodes = self.inodes.lock();
            let dirty = inodes.ino_of(&Node::Dirty(l.vid.clone(), inc));
            let img = view
                .img
                .map(|_| inodes.ino_of(&Node::Img(l.vid.clone(), inc, view.generation())));
            let revs: Vec<u64> = l
                .revisions
                .iter()
                .map(|(r, _)| {
                    inodes.ino_of(&Node::Revision(l.vid.clone(), inc, r.file_name.clone()))
                })
                .collect();
            (dirty, img, revs)
        };
        // A running volume's dirty image: one fstat through the run's own
        // descriptor, as getattr does.
        let dirty_attr = plus.then(|| match self.pool.running_dirty(&l.vid) {
            Ok(Some((sig, rw))) => Attr {
                cacheable: false,
                ..sig_attr(dirty_ino, &sig, self.file_perm(rw))
            },
            _ => self.dirty_attr(dirty_ino, view),
        });
        out.push((dirty_ino, Kind::File, names.dirty(), dirty_attr));
        if let Some(img_ino) = img_ino {
            let a = plus
                .then(|| self.img_attr(img_ino, view.generation(), view).ok())
                .flatten();
            out.push((img_ino, Kind::File, names.img(), a));
        }
        for ((r, sig), ino) in l.revisions.into_iter().zip(rev_inos) {
            let a = sig.filter(|_| plus).map(|s| sig_attr(ino, &s, 0o400));
            out.push((ino, Kind::File, r.file_name, a));
        }
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
                // Requests that panicked, and other work the guards caught.
                let panics = self.stats.panics.load(std::sync::atomic::Ordering::Relaxed)
                    + crate::engine::guard::panics();
                put("panics", panics.to_string());
                put("open_volumes", self.open_volumes().to_string());
                put("starts", self.pool.starts().to_string());
                put("inodes", self.inode_count().to_string());
            }
            Node::Class(_) | Node::Vm(..) => {}
            Node::Dirty(vid, _) | Node::Img(vid, _, _) | Node::Revision(vid, _, _) => {
                let view = self.view(vid)?;
                let c = &view.snap.config;
                put("vid", vid.to_string());
                put("type", c.kind().as_str().to_owned());
                put("state", view.snap.state.to_string());
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

#[cfg(test)]
mod tests {
    //! The listings against the lookups: a readdirplus answers for each
    //! entry what a LOOKUP and a GETATTR of it would, although it reads
    //! the VM directory once for all of them.
    use super::*;
    use std::collections::BTreeMap;

    struct Fake;

    fn setup() -> (tempfile::TempDir, ReflinkFs<Fake>) {
        let dir = tempfile::tempdir().unwrap();
        let pool = crate::engine::admin::scratch_pool(
            &dir.path().join("pool"),
            &["c/v/a", "c/v/b", "c/v/priv", "c/w/x"],
            1 << 20,
        );
        let fs = ReflinkFs::<Fake>::new(
            Arc::new(pool),
            FsOptions {
                passthrough: false,
                committers: 1,
            },
        );
        (dir, fs)
    }

    fn lookup_path(fs: &ReflinkFs<Fake>, path: &str) -> u64 {
        path.split('/')
            .fold(ROOT, |ino, part| fs.lookup(ino, part).unwrap().ino)
    }

    const ROOT: u64 = crate::fuse::inodes::ROOT_INO;

    fn same(a: &Attr, b: &Attr) -> bool {
        (
            a.ino,
            a.kind,
            a.size,
            a.blocks,
            a.perm,
            a.mtime,
            a.ctime,
            a.cacheable,
        ) == (
            b.ino,
            b.kind,
            b.size,
            b.blocks,
            b.perm,
            b.mtime,
            b.ctime,
            b.cacheable,
        )
    }

    #[test]
    fn a_listing_answers_what_lookups_answer() {
        let (_dir, fs) = setup();
        let register = |_: &File| Ok(Fake);
        let open_rw = |path: &str| {
            fs.open(lookup_path(&fs, path), libc::O_RDWR, &register, true)
                .map_err(|_| "open")
                .unwrap()
                .fh
        };
        // c/v/a gets a revision: one run that writes, committed.
        let fh = open_rw("c/v/a-dirty.img");
        fs.write(fh, 0, b"data").unwrap();
        fs.release(fh);
        let a: ValidVid = "c/v/a".parse().unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        while fs.pool.snapshot(&a).unwrap().state != crate::engine::volume::LifeState::Stopped {
            assert!(Instant::now() < end, "c/v/a did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        // c/v/b runs while the directory is listed.
        let running = open_rw("c/v/b-dirty.img");
        fs.write(running, 4096, b"more").unwrap();

        let names = |ino| -> Vec<String> {
            fs.readdir(ino)
                .unwrap()
                .into_iter()
                .map(|(_, _, n)| n)
                .collect()
        };
        assert_eq!(names(ROOT), ["c"]);
        assert_eq!(names(lookup_path(&fs, "c")), ["v", "w"]);
        let vm = lookup_path(&fs, "c/v");
        let plain: BTreeMap<String, (u64, Kind)> = fs
            .readdir(vm)
            .unwrap()
            .into_iter()
            .map(|(ino, kind, name)| (name, (ino, kind)))
            .collect();
        let plus = fs.readdir_plus(vm).unwrap();
        let revision = plus
            .iter()
            .find(|(_, n, _)| n.starts_with("a.img."))
            .map(|(_, n, _)| n.clone());
        assert!(
            revision.is_some(),
            "the run of c/v/a left a revision: {plus:?}"
        );
        assert_eq!(
            plain.keys().cloned().collect::<Vec<_>>(),
            plus.iter().map(|(_, n, _)| n.clone()).collect::<Vec<_>>(),
            "readdir and readdirplus list the same names"
        );
        assert_eq!(
            plus.len(),
            7,
            "3 dirty, 3 committed images, 1 revision: {plus:?}"
        );
        for (kind, name, listed) in &plus {
            assert_eq!(plain[name], (listed.ino, *kind), "{name}: readdir's entry");
            let looked = fs.lookup(vm, name).unwrap();
            let got = fs.getattr(looked.ino, None).unwrap();
            assert!(
                same(&looked, listed),
                "{name}: lookup {looked:?}, listing {listed:?}"
            );
            assert!(
                same(&got, listed),
                "{name}: getattr {got:?}, listing {listed:?}"
            );
        }
        let b_dirty = plus.iter().find(|(_, n, _)| n == "b-dirty.img").unwrap();
        assert!(
            !b_dirty.2.cacheable,
            "a running image's attributes are not cached"
        );
        assert_eq!(
            fs.lookup(vm, "a.img.999@20200101T000000Z").unwrap_err(),
            libc::ENOENT
        );
        assert_eq!(fs.lookup(vm, "b.img.1").unwrap_err(), libc::ENOENT);
        assert_eq!(fs.lookup(vm, "nobody-dirty.img").unwrap_err(), libc::ENOENT);
        fs.release(running);
    }
}
