//! A pool (SPEC §1): init with the reflink check, open with the lock and
//! recovery, and the in-memory table of volumes.

use super::config::{parse_json, store_json, PoolConfig, VolumeConfig, FORMAT_VERSION};
use super::fsops::{read_small_file, CopyStrategy, Dir, Entry};
use super::revision::{now_utc, parse_revision_name, Parsed, Revision};
use super::table::VolumeTable;
use super::vid::ValidVid;
use super::volume::{ChangeHook, Hooks, Volume};
use crate::error::{Error, Result};
use crate::sys;
use parking_lot::{Mutex, RwLock};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use super::names::Names;
pub(crate) use super::setup_check::reflink_check;

pub const META_DIR: &str = ".reflinkfs";
pub const POOL_JSON: &str = "pool.json";
pub const VOLUMES_DIR: &str = "volumes";
pub const LOCK_FILE: &str = "lock";
pub const CONTROL_SOCKET: &str = "control.sock";
/// The class directories `pool init` makes (those of Qubes' pools).
pub const CLASS_DIRS: [&str; 2] = ["appvms", "vm-templates"];

/// Options of `pool init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Clone a test file with FICLONE and refuse a filesystem without
    /// reflinks. `false` records the pool as copy mode.
    pub setup_check: bool,
    pub revisions_to_keep: i64,
    pub read_only: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            setup_check: true,
            revisions_to_keep: 1,
            read_only: false,
        }
    }
}

/// An open pool. Holds the pool's lock for as long as it lives.
pub struct Pool {
    pub(crate) root: Dir,
    pub(crate) meta: Dir,
    pub(crate) volmeta: Dir,
    _lock: File,
    /// The pool's config (`pool.json`); `pool set` changes it.
    pub(crate) config: RwLock<PoolConfig>,
    /// Held by `pool set` while it stores the config (never by readers).
    pub(crate) setting: Mutex<()>,
    /// How many runs were started since the pool was opened.
    pub(crate) starts: std::sync::atomic::AtomicU64,
    /// Every volume by id, and the ids being created or held.
    pub(crate) table: VolumeTable,
    /// Told of every change to a volume's files or properties.
    pub(crate) hooks: Arc<Hooks>,
    /// Open VM directories, for the mount's lookups (`dirs.rs`).
    pub(crate) vm_dirs: super::dirs::VmDirs,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("root", &self.root.path())
            .finish()
    }
}

fn io_at(path: &Path, what: &str) -> impl FnOnce(io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |e| Error::io(context, e)
}

/// A pool this user may not open: who may, from the owner of `pool`.
pub fn no_access(what: &str, path: &Path, pool: &Path) -> Error {
    use std::os::unix::fs::MetadataExt;
    let who = match std::fs::metadata(pool) {
        Ok(m) => format!(
            "only root and the pool's owner (uid {}) may administer it{}",
            m.uid(),
            if sys::getuid() == 0 {
                ""
            } else {
                "; run the command as one of them (e.g. with sudo)"
            }
        ),
        Err(_) => "only root and the pool's owner may administer it".to_owned(),
    };
    Error::NoAccess {
        what: what.to_owned(),
        path: path.to_owned(),
        who,
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

impl Pool {
    /// Creates a new pool in `path` (created if missing) and opens it.
    pub fn init(path: &Path, opts: &InitOptions) -> Result<Pool> {
        if opts.revisions_to_keep < -1 {
            return Err(Error::InvalidValue {
                property: "revisions_to_keep".into(),
                reason: format!("{} is below the minimum of -1", opts.revisions_to_keep),
            });
        }
        let path = absolute(path);
        let created = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::NotRegular {
                    what: "pool directory".into(),
                    path,
                })
            }
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&path).map_err(io_at(&path, "creating pool directory"))?;
                true
            }
            Err(e) => return Err(Error::io(format!("examining {}", path.display()), e)),
        };
        let result = Pool::init_in(&path, opts);
        if result.is_err() && created {
            // A failed init leaves nothing behind, not even the directory.
            let _ = std::fs::remove_dir_all(&path);
        }
        result
    }

    fn init_in(path: &Path, opts: &InitOptions) -> Result<Pool> {
        let path = path.to_owned();
        let root = Dir::open_path(&path).map_err(io_at(&path, "opening pool directory"))?;
        if root.entry(META_DIR).map_err(io_at(&path, "examining"))? != Entry::Missing {
            return Err(Error::PoolExists { path });
        }
        let copy_mode = if opts.setup_check {
            reflink_check(&root, &path, true)?;
            false
        } else {
            log::warn!(
                "pool {}: setup check skipped; copy mode: every snapshot is a full sparse copy",
                path.display()
            );
            true
        };
        let config = PoolConfig {
            format: FORMAT_VERSION,
            copy_mode,
            revisions_to_keep: if opts.read_only {
                0
            } else {
                opts.revisions_to_keep
            },
            read_only: opts.read_only,
            created: now_utc(),
        };
        let meta = root
            .subdir(META_DIR, true)
            .map_err(io_at(&path, "creating metadata directory in"))?;
        meta.subdir(VOLUMES_DIR, true)
            .map_err(io_at(meta.path(), "creating"))?;
        store_json(meta.fd(), POOL_JSON, &config, &meta.shown(POOL_JSON))?;
        // The layout of SPEC §1.1, as Qubes' file-reflink makes it: the
        // directories of ordinary VMs and of templates.
        for class in CLASS_DIRS {
            root.subdir(class, true)
                .map_err(io_at(&root.shown(class), "creating"))?;
        }
        log::info!(
            "initialised pool {} ({}, revisions_to_keep={}{})",
            path.display(),
            if copy_mode { "copy mode" } else { "reflink" },
            config.revisions_to_keep,
            if config.read_only { ", read-only" } else { "" }
        );
        Pool::open(&path)
    }

    /// Opens a pool: takes its lock, loads every volume and runs recovery
    /// (SPEC §1.4, §4.4).
    pub fn open(path: &Path) -> Result<Pool> {
        let path = absolute(path);
        let root = match Dir::open_path(&path) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(Error::NoSuchPool { path })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(Error::NotAPool { path })
            }
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                return Err(no_access("pool directory", &path, &path))
            }
            Err(e) => return Err(Error::io(format!("opening pool {}", path.display()), e)),
        };
        let meta = match root.subdir(META_DIR, false) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(Error::NotAPool { path })
            }
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                return Err(no_access("pool", &path, &path))
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(Error::NotRegular {
                    what: "metadata directory".into(),
                    path: root.shown(META_DIR),
                })
            }
            Err(e) => {
                return Err(Error::io(
                    format!("opening {}", root.shown(META_DIR).display()),
                    e,
                ))
            }
        };
        let lock = take_lock(&path, &meta)?;
        let bytes = match read_small_file(&meta, POOL_JSON) {
            Ok(b) => b,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(Error::NotAPool { path })
            }
            Err(e) => {
                return Err(Error::io(
                    format!("reading {}", meta.shown(POOL_JSON).display()),
                    e,
                ))
            }
        };
        let config: PoolConfig = parse_json(&bytes, &meta.shown(POOL_JSON))?;
        let volmeta = meta
            .subdir(VOLUMES_DIR, true)
            .map_err(io_at(&meta.shown(VOLUMES_DIR), "opening"))?;
        let pool = Pool {
            root,
            meta,
            volmeta,
            _lock: lock,
            config: RwLock::new(config),
            setting: Mutex::new(()),
            starts: Default::default(),
            table: VolumeTable::default(),
            hooks: Arc::new(Hooks::default()),
            vm_dirs: Default::default(),
        };
        let loaded = super::table::load(&pool.volmeta, &pool.config.read(), &pool.hooks)?;
        pool.table.fill(loaded);
        pool.recover_all()?;
        log::debug!("opened pool {}", path.display());
        Ok(pool)
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// Calls `hook` whenever a volume's files or properties change: a
    /// start, a stop, every operation, a create. The mount uses it to drop
    /// what the kernel caches. See [`ChangeHook`] for when it is called.
    pub fn on_change(&self, hook: ChangeHook) {
        self.hooks.add(hook);
    }

    /// Where a mounted pool's daemon listens for administration requests.
    pub fn control_socket_path(&self) -> PathBuf {
        self.meta.shown(CONTROL_SOCKET)
    }

    /// The same socket, reached through the open metadata directory, for
    /// bind(): a `.reflinkfs` swapped for a symlink is not followed.
    pub fn control_socket_fd_path(&self) -> PathBuf {
        sys::path_in_dir_fd(self.meta.fd(), CONTROL_SOCKET)
    }

    /// Removes a file of the metadata directory (the link itself, never
    /// what a symlink points to); `false` when it did not exist.
    pub fn remove_meta_file(&self, name: &str) -> io::Result<bool> {
        match sys::unlinkat(self.meta.fd(), name) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives a file of the metadata directory (the control socket) to the
    /// pool's owner, without following a symlink.
    pub fn give_meta_file_to_owner(&self, name: &str) -> io::Result<()> {
        let (uid, gid) = self.owner()?;
        sys::chown_entry(self.meta.fd(), name, uid, gid)
    }

    /// Opens a file of the metadata directory for appending (the daemon's
    /// log), never through a symlink (ELOOP) and never a FIFO or device
    /// (EINVAL). It is created with mode 0600, and an older file's mode is
    /// narrowed to 0600.
    pub fn open_meta_append(&self, name: &str) -> io::Result<File> {
        let fd = sys::openat(
            self.meta.fd(),
            name,
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_NONBLOCK,
            super::fsops::FILE_MODE,
        )?;
        let st = sys::fstat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        sys::clear_nonblock(fd.as_fd())?;
        if st.st_mode & 0o077 != 0 {
            sys::fchmod(fd.as_fd(), super::fsops::FILE_MODE)?;
        }
        Ok(File::from(fd))
    }

    /// Renames a file of the metadata directory over another (log
    /// rotation); neither name is resolved through a symlink.
    pub fn rename_meta_file(&self, from: &str, to: &str) -> io::Result<()> {
        sys::renameat(self.meta.fd(), from, to)
    }

    /// The owner of the pool directory (who may administer it beside root).
    pub fn owner_uid(&self) -> io::Result<u32> {
        Ok(self.owner()?.0)
    }

    /// The user and group that own the pool directory: the mount shows
    /// every file and directory as theirs.
    pub fn owner(&self) -> io::Result<(u32, u32)> {
        let st = sys::fstat(self.root.fd())?;
        Ok((st.st_uid, st.st_gid))
    }

    /// The path of a file of the metadata directory, for messages.
    pub fn meta_path(&self, name: &str) -> PathBuf {
        self.meta.shown(name)
    }

    pub fn config(&self) -> PoolConfig {
        self.config.read().clone()
    }

    /// How many runs were started (snapshots made) since the pool was
    /// opened.
    pub fn starts(&self) -> u64 {
        self.starts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the pool is read-only (the kernel-pool mode).
    pub fn read_only(&self) -> bool {
        self.config.read().read_only
    }

    /// Stores `pool.json` (atomically, as all metadata).
    pub(crate) fn store_pool_config(&self, cfg: &PoolConfig) -> Result<()> {
        store_json(self.meta.fd(), POOL_JSON, cfg, &self.meta.shown(POOL_JSON))
    }

    pub(crate) fn copy_strategy(&self) -> CopyStrategy {
        if self.config.read().copy_mode {
            CopyStrategy::Sparse
        } else {
            CopyStrategy::Reflink
        }
    }

    /// A volume, or the error that says why there is none.
    pub(crate) fn volume(&self, vid: &ValidVid) -> Result<Arc<Volume>> {
        self.table.get(vid)
    }

    /// Opens the image directory of a VM (`POOL/CLASS/VM`), never through a
    /// symlink. With `create`, makes missing directories.
    pub(crate) fn vm_dir(&self, vid: &ValidVid, create: bool) -> Result<Dir> {
        let class = open_subdir_checked(&self.root, vid.class(), "VM directory", create)?;
        open_subdir_checked(&class, vid.vm(), "VM directory", create)
    }

    /// Like `vm_dir`, but `None` when the directory does not exist.
    pub(crate) fn vm_dir_if_exists(&self, vid: &ValidVid) -> Result<Option<Dir>> {
        match self.vm_dir(vid, false) {
            Ok(d) => Ok(Some(d)),
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The metadata directory of a VM, `.reflinkfs/volumes/CLASS/VM`.
    pub(crate) fn vm_meta_dir(&self, vid: &ValidVid, create: bool) -> Result<Dir> {
        let class = self
            .volmeta
            .subdir(vid.class(), create)
            .map_err(io_at(&self.volmeta.shown(vid.class()), "opening"))?;
        class
            .subdir(vid.vm(), create)
            .map_err(io_at(&class.shown(vid.vm()), "opening"))
    }

    /// The one way a volume's config changes: under the volume's config
    /// writer, `change` gets the config as it is now (never a copy read
    /// before another change), and what it makes is stored (validated,
    /// atomically) and then shown to readers. Nothing is written when
    /// `change` leaves the config as it was, or fails.
    pub(crate) fn update_config<T>(
        &self,
        vol: &Volume,
        change: impl FnOnce(&mut VolumeConfig) -> Result<T>,
    ) -> Result<T> {
        let writer = vol.write_config();
        let old = writer.current();
        let mut cfg = (*old).clone();
        let out = change(&mut cfg)?;
        if cfg != *old {
            self.store_volume(&cfg)?;
            writer.publish(&mut vol.lock(), cfg);
        }
        Ok(out)
    }

    /// The VM directory of `vid`, for reading, kept open (see `dirs.rs`);
    /// `None` when it does not exist.
    pub(crate) fn kept_vm_dir(&self, vid: &ValidVid) -> Result<Option<Arc<Dir>>> {
        self.vm_dirs
            .get(vid, &|v| self.vm_dir_if_exists(v), &|limit| {
                self.first_of_each_vm(limit)
            })
    }

    /// Opens the VM directories the mount reads and keeps them open (see
    /// `dirs.rs`): the daemon calls it before it mounts, so that no request
    /// waits for it. Gives how many are kept.
    pub fn keep_vm_dirs(&self) -> usize {
        self.vm_dirs.seed(&|v| self.vm_dir_if_exists(v), &|limit| {
            self.first_of_each_vm(limit)
        });
        self.vm_dirs.len()
    }

    /// One volume of each VM, in order, `limit` at most.
    fn first_of_each_vm(&self, limit: usize) -> Vec<ValidVid> {
        let mut vms: Vec<ValidVid> = Vec::new();
        for vid in self.table.volumes.read().keys() {
            if vms.len() >= limit {
                break;
            }
            if vms
                .last()
                .is_none_or(|l| l.class() != vid.class() || l.vm() != vid.vm())
            {
                vms.push(vid.clone());
            }
        }
        vms
    }

    /// Writes a volume's config atomically, after validating it.
    pub(crate) fn store_volume(&self, config: &VolumeConfig) -> Result<()> {
        config
            .validate(&self.config.read())
            .map_err(|reason| Error::Refused {
                vid: config.vid.to_string(),
                reason,
            })?;
        let dir = self.vm_meta_dir(&config.vid, true)?;
        let file = format!("{}.json", config.vid.name());
        store_json(dir.fd(), &file, config, &dir.shown(&file))
    }

    /// Stores `config` back after `op` failed before its image was
    /// replaced: the config on disk goes with the image that stayed. A
    /// failure to do so is logged; the next pool open's recovery puts the
    /// size right from the image.
    pub(crate) fn store_back(&self, op: &str, config: &VolumeConfig) {
        if let Err(e) = self.store_volume(config) {
            log::error!(
                "{}: the {op} failed, and storing its config back failed too ({e}): the next pool open puts it right from the files",
                config.vid
            );
        }
    }

    /// The revisions of a volume found on disk, oldest first. Names that
    /// look like ours but do not parse are logged and ignored.
    pub(crate) fn list_revisions(
        &self,
        vid: &ValidVid,
        dir: Option<&Dir>,
    ) -> Result<Vec<Revision>> {
        let Some(dir) = dir else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for file in dir
            .names()
            .map_err(|e| Error::io(format!("listing {}", dir.path().display()), e))?
        {
            match parse_revision_name(vid.name(), &file) {
                Parsed::Revision(r) => out.push(r),
                Parsed::Malformed if !self.owned_by_sibling(vid, &file) => log::warn!(
                    "{vid}: ignoring {}: it looks like a revision but its name does not parse",
                    dir.shown(&file).display()
                ),
                Parsed::Malformed | Parsed::NotOurs => {}
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

/// Opens a subdirectory without following a symlink; a symlink or a file
/// where the directory should be is [`Error::NotRegular`].
pub(crate) fn open_subdir_checked(
    parent: &Dir,
    name: &str,
    what: &str,
    create: bool,
) -> Result<Dir> {
    parent.subdir(name, create).map_err(|e| {
        if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) {
            Error::NotRegular {
                what: what.to_owned(),
                path: parent.shown(name),
            }
        } else {
            Error::io(format!("opening {}", parent.shown(name).display()), e)
        }
    })
}

/// Flocks the lock file of `dir` (made with mode 0600 when missing) and,
/// when it got the lock, writes our PID in it for whoever finds the lock
/// taken. The flag says whether it got it; the lock lasts while the file
/// is open.
pub(crate) fn lock_with_pid(dir: &Dir) -> Result<(File, bool)> {
    let shown = dir.shown(LOCK_FILE);
    let fd = sys::openat(
        dir.fd(),
        LOCK_FILE,
        libc::O_RDWR | libc::O_CREAT,
        super::fsops::FILE_MODE,
    )
    .map_err(io_at(&shown, "opening lock file"))?;
    let file = File::from(fd);
    if !sys::try_lock_exclusive(file.as_fd()).map_err(io_at(&shown, "locking"))? {
        return Ok((file, false));
    }
    let pid = format!("{}\n", std::process::id());
    sys::ftruncate(file.as_fd(), 0).map_err(io_at(&shown, "writing"))?;
    super::fsops::write_all_at(&file, pid.as_bytes(), 0).map_err(io_at(&shown, "writing"))?;
    Ok((file, true))
}

/// Takes the pool's lock (see [`lock_with_pid`]). A second owner gets an
/// error naming the holder's PID.
fn take_lock(pool: &Path, meta: &Dir) -> Result<File> {
    let (file, locked) = lock_with_pid(meta)?;
    if !locked {
        let mut buf = [0u8; 64];
        let n = sys::pread(file.as_fd(), &mut buf, 0).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
        let holder = if text.is_empty() {
            "unknown".to_owned()
        } else {
            format!("process {text}")
        };
        return Err(Error::PoolLocked {
            pool: pool.to_owned(),
            holder,
            lock: meta.shown(LOCK_FILE),
        });
    }
    Ok(file)
}
