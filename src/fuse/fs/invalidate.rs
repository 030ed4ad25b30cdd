//! What the kernel caches of the mount, and how a change of a volume
//! drops it: entries, attributes and listings are cached until a start,
//! commit or operation invalidates them.

use super::*;

/// Drops what the kernel caches (the daemon gives fuser's notifier).
pub trait Invalidate: Send + Sync {
    /// The entry `name` in directory `parent`.
    fn entry(&self, parent: u64, name: &str);
    /// The attributes of `ino`.
    fn inode(&self, ino: u64);
    /// The cached listing of directory `ino` (FOPEN_CACHE_DIR).
    fn listing(&self, ino: u64);
}

thread_local! {
    /// Set while this thread runs a FUSE request: an invalidation from it
    /// is queued, never sent, since the kernel may wait for this very
    /// request to finish before it takes the notification.
    pub(super) static IN_REQUEST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as (part of) a FUSE request's handler.
pub fn in_request<R>(f: impl FnOnce() -> R) -> R {
    let was = IN_REQUEST.with(|c| c.replace(true));
    let r = f();
    IN_REQUEST.with(|c| c.set(was));
    r
}

pub(super) enum Notice {
    /// Everything the kernel caches of a volume's files.
    Volume(ValidVid),
    /// Only their entries (see [`ReflinkFs::invalidate`]).
    Entries(ValidVid),
    Barrier(std::sync::mpsc::Sender<()>),
}

/// What an invalidation drops.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    All,
    /// Attributes and listings: the kernel takes these without a lock a
    /// request may hold.
    NoEntries,
    /// Entries: the kernel takes the directory's lock for each, which an
    /// unlink or rename in it holds while the daemon serves it.
    Entries,
}

impl<B: Send + Sync + 'static> ReflinkFs<B> {
    /// Starts caching: from now on every change of a volume (a start, a
    /// commit, an operation) drops what the kernel caches of its files,
    /// through `inv`. Without it (tests), nothing is cached that could go
    /// stale: see [`ReflinkFs::caching`].
    pub fn set_invalidator(self: &Arc<Self>, inv: Box<dyn Invalidate>) {
        if self.invalidator.set(inv).is_err() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel::<Notice>();
        *self.notices.lock() = Some(tx);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || {
                for n in rx {
                    let Some(fs) = weak.upgrade() else { return };
                    match n {
                        Notice::Volume(v) => fs.invalidate_now(&v, Part::All),
                        Notice::Entries(v) => fs.invalidate_now(&v, Part::Entries),
                        Notice::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the invalidation thread: {e}");
        }
        let weak = Arc::downgrade(self);
        self.pool.on_change(Box::new(move |vid| {
            if let Some(fs) = weak.upgrade() {
                fs.invalidate(vid);
            }
        }));
    }

    /// Whether the kernel may cache entries and attributes (an invalidator
    /// is set).
    pub fn caching(&self) -> bool {
        self.invalidator.get().is_some()
    }

    /// A volume changed: drop what the kernel caches of its files, and of
    /// the snapshots that show its size. From inside a request it is
    /// queued for the notifier thread. Elsewhere (a commit, an operation
    /// of the control socket) the attributes and listings are dropped at
    /// once, before the change shows as done, and the entries are queued:
    /// the kernel drops an entry under its directory's lock, which an
    /// unlink or rename there holds while it waits in the daemon for this
    /// very change to end (its claim waits for the commit or operation).
    pub(super) fn invalidate(&self, vid: &ValidVid) {
        if self.invalidator.get().is_none() {
            return;
        }
        let queued = match IN_REQUEST.with(|c| c.get()) {
            true => Notice::Volume(vid.clone()),
            false => {
                self.invalidate_now(vid, Part::NoEntries);
                Notice::Entries(vid.clone())
            }
        };
        if let Some(tx) = &*self.notices.lock() {
            let _ = tx.send(queued);
        }
    }

    pub(super) fn invalidate_now(&self, vid: &ValidVid, what: Part) {
        let (attrs, entries) = (what != Part::Entries, what != Part::NoEntries);
        let Some(inv) = self.invalidator.get() else {
            return;
        };
        let mut vids = vec![vid.clone()];
        vids.extend(self.pool.snapshots_of(vid));
        for v in &vids {
            let (files, vm, class) = {
                let t = self.inodes.lock();
                (
                    t.of_volume(v),
                    t.peek(&Node::Vm(v.class().to_owned(), v.vm().to_owned())),
                    t.peek(&Node::Class(v.class().to_owned())),
                )
            };
            let incarnation = self
                .pool
                .snapshot(v)
                .ok()
                .filter(|s| s.state != crate::engine::LifeState::Removed)
                .map(|s| s.config.incarnation);
            for (ino, parent, name, node) in files {
                if attrs {
                    inv.inode(ino);
                }
                // `N-dirty.img` names one inode for its volume's whole life:
                // its entry stays (dropping it would make the file of a
                // loop device on it look deleted), until the volume is gone.
                let same = matches!(node, Node::Dirty(_, inc) if Some(inc) == incarnation);
                if let (Some(p), false, true) = (parent, same, entries) {
                    inv.entry(p, &name);
                }
            }
            // The listings that may show it: its VM's (revisions come and
            // go with commits), its class's and the root's (a create or a
            // remove). A removed volume may also have taken its VM's or
            // class's last file, and their entries, with it. New names need
            // no entry invalidation: the mount never answers with a
            // negative entry the kernel could cache.
            if let (Some(vm), true) = (vm, attrs) {
                inv.listing(vm);
            }
            if let Some(c) = class {
                if attrs {
                    inv.listing(c);
                }
                if incarnation.is_none() && entries {
                    inv.entry(c, v.vm());
                }
            }
            let root = crate::fuse::inodes::ROOT_INO;
            if attrs {
                inv.listing(root);
            }
            if incarnation.is_none() && entries {
                inv.entry(root, v.class());
            }
        }
    }

    /// Waits until the invalidations queued so far are sent, for `limit`
    /// at most: the control socket calls it before it answers, so a client
    /// that changed a volume sees the change on the mount at once. Only
    /// entries are queued from outside a request (attributes and listings
    /// are dropped at once), and an entry may wait for its directory's
    /// lock, which an unlink or rename there holds while it waits for a
    /// volume's commit or import: then the reply goes after `limit`, and
    /// the name shows anew once that lock is free. Gives whether all were
    /// sent.
    pub fn sync_invalidations(&self, limit: std::time::Duration) -> bool {
        let tx = self.notices.lock().clone();
        let Some(tx) = tx else { return true };
        let (done, wait) = std::sync::mpsc::channel();
        if tx.send(Notice::Barrier(done)).is_err() {
            return true;
        }
        match wait.recv_timeout(limit) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
        }
    }
}
