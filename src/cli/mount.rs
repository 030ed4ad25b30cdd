//! `reflinkfs mount` and `reflinkfs unmount`: option parsing, detaching
//! once the mount is ready, signals, and a clean end.

use crate::engine::{InitOptions, Pool};
use crate::error::{Error, Result};
use crate::fuse::fs::{FsOptions, ReflinkFs};
use crate::fuse::Adapter;
use crate::sys;
use fuser::{Config, MountOption, SessionACL};
use parking_lot::Mutex;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Options of `reflinkfs mount -o`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOpts {
    pub passthrough: bool,
    pub threads: usize,
    pub allow_other: bool,
    pub read_only: bool,
    pub setup_check: bool,
    pub noexec: bool,
    pub noatime: bool,
}

impl Default for MountOpts {
    fn default() -> Self {
        MountOpts {
            passthrough: true,
            threads: 4,
            allow_other: false,
            read_only: false,
            setup_check: true,
            noexec: false,
            noatime: false,
        }
    }
}

fn bad_option(opt: &str, reason: &str) -> Error {
    Error::InvalidValue {
        property: format!("mount option {opt:?}"),
        reason: reason.to_owned(),
    }
}

impl MountOpts {
    /// Parses comma-separated `-o` lists. Unknown options are refused.
    pub fn parse<S: AsRef<str>>(lists: &[S]) -> Result<MountOpts> {
        let mut o = MountOpts::default();
        for list in lists {
            for opt in list
                .as_ref()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                let (key, value) = match opt.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (opt, None),
                };
                match (key, value) {
                    ("passthrough", Some("on")) => o.passthrough = true,
                    ("passthrough", Some("off")) => o.passthrough = false,
                    ("passthrough", _) => return Err(bad_option(opt, "use passthrough=on or passthrough=off")),
                    ("threads", Some(n)) => {
                        o.threads = n
                            .parse()
                            .ok()
                            .filter(|n| (1..=64).contains(n))
                            .ok_or_else(|| bad_option(opt, "threads must be a number from 1 to 64"))?
                    }
                    ("setup_check", Some("no")) => o.setup_check = false,
                    ("setup_check", Some("yes")) => o.setup_check = true,
                    ("setup_check", _) => return Err(bad_option(opt, "use setup_check=no or setup_check=yes")),
                    ("allow_other", None) => o.allow_other = true,
                    ("ro", None) => o.read_only = true,
                    ("rw", None) => o.read_only = false,
                    ("noexec", None) => o.noexec = true,
                    ("exec", None) => o.noexec = false,
                    ("noatime", None) => o.noatime = true,
                    ("atime" | "relatime" | "nosuid" | "nodev" | "defaults" | "async", None) => {}
                    ("suid" | "dev", None) => {
                        return Err(bad_option(opt, "reflinkfs always mounts nosuid,nodev"))
                    }
                    _ => {
                        return Err(bad_option(
                            opt,
                            "unknown option; known: passthrough=on|off, threads=N, allow_other, ro, rw, setup_check=no, and the flags noexec, noatime, nosuid, nodev",
                        ))
                    }
                }
            }
        }
        Ok(o)
    }
}

/// The daemon's log file in the pool's metadata directory.
pub const LOG_FILE: &str = "daemon.log";
/// Where the log goes when it reaches its cap: one older file is kept.
pub const OLD_LOG_FILE: &str = "daemon.log.1";
/// The environment variable that sets the log's cap in bytes (default
/// [`DEFAULT_LOG_MAX`]); the log lives on the filesystem of the VM images,
/// so it must not grow without bound.
pub const LOG_MAX_ENV: &str = "REFLINKFS_LOG_MAX";
pub const DEFAULT_LOG_MAX: u64 = 16 << 20;

/// Log output that starts on stderr and moves to a file once the daemon
/// detaches. What was logged before (recovery at pool open) is copied into
/// the file too, so the file tells the whole story. The file is rotated to
/// `daemon.log.1` when it reaches its cap.
#[derive(Clone, Default)]
struct LogSink(Arc<Mutex<LogState>>);

#[derive(Default)]
struct LogState {
    file: Option<File>,
    /// The pool, to reopen the log file through its metadata directory.
    pool: Option<Arc<Pool>>,
    written: u64,
    cap: u64,
    early: Vec<u8>,
    foreground: bool,
}

impl LogSink {
    fn switch_to(&self, pool: Arc<Pool>, mut f: File, cap: u64) {
        let mut st = self.0.lock();
        let _ = f.write_all(&st.early);
        st.written = sys::fstat(f.as_fd()).map_or(0, |s| s.st_size as u64);
        st.early = Vec::new();
        st.file = Some(f);
        st.pool = Some(pool);
        st.cap = cap;
    }
}

impl LogState {
    /// Moves the full log to `daemon.log.1` (replacing the older one) and
    /// starts a new file, which says so in its first line. Nothing here
    /// may log: the sink's lock is held.
    fn rotate(&mut self) {
        let Some(pool) = &self.pool else { return };
        let note = match pool
            .rename_meta_file(LOG_FILE, OLD_LOG_FILE)
            .and_then(|()| pool.open_meta_append(LOG_FILE))
        {
            Ok(f) => {
                self.file = Some(f);
                format!(
                    "[{}] reflinkfs: the log reached {} bytes; the earlier lines are in {}\n",
                    crate::engine::revision::now_utc(),
                    self.cap,
                    pool.meta_path(OLD_LOG_FILE).display()
                )
            }
            Err(e) => format!(
                "[{}] reflinkfs: rotating the log at {} bytes failed ({e}); going on in this file\n",
                crate::engine::revision::now_utc(),
                self.cap
            ),
        };
        self.written = 0;
        if let Some(f) = &mut self.file {
            if f.write_all(note.as_bytes()).is_ok() {
                self.written = note.len() as u64;
            }
        }
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut st = self.0.lock();
        if st.file.is_some() && st.cap > 0 && st.written + buf.len() as u64 > st.cap {
            st.rotate();
        }
        let st = &mut *st;
        match &mut st.file {
            Some(f) => {
                let n = f.write(buf)?;
                st.written += n as u64;
                Ok(n)
            }
            None => {
                if st.early.len() < (1 << 20) {
                    st.early.extend_from_slice(buf);
                }
                // Before it detaches, the daemon shows a person only what
                // needs attention (recovery, errors); the file gets it all.
                let line = String::from_utf8_lossy(buf);
                if st.foreground || line.contains(" WARN ") || line.contains(" ERROR ") {
                    std::io::stderr().write_all(buf)?;
                }
                Ok(buf.len())
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.0.lock().file {
            Some(f) => f.flush(),
            None => std::io::stderr().flush(),
        }
    }
}

fn init_daemon_logging(verbose: u8) -> LogSink {
    let sink = LogSink::default();
    let level = if verbose > 1 { "debug" } else { "info" };
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .target(env_logger::Target::Pipe(Box::new(sink.clone())))
        .try_init();
    sink
}

/// The daemon's log file, beside the pool's metadata.
pub fn log_path(pool: &Path) -> PathBuf {
    pool.join(crate::engine::pool::META_DIR).join(LOG_FILE)
}

/// The log's cap from the environment, or the default.
fn log_cap() -> u64 {
    match std::env::var(LOG_MAX_ENV) {
        Ok(v) => match crate::engine::parse_size(&v) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("{LOG_MAX_ENV}={v:?}: {e}; using {DEFAULT_LOG_MAX} bytes");
                DEFAULT_LOG_MAX
            }
        },
        Err(_) => DEFAULT_LOG_MAX,
    }
}

/// What the detached child tells the waiting parent.
fn report(pipe: &mut Option<File>, msg: &str) {
    if let Some(p) = pipe.as_mut() {
        let _ = p.write_all(msg.as_bytes());
    }
}

/// `reflinkfs mount POOL MOUNTPOINT [-o OPTIONS] [-f]`.
pub fn mount(
    pool: &Path,
    mountpoint: &Path,
    options: &[String],
    foreground: bool,
    verbose: u8,
) -> Result<ExitCode> {
    let opts = MountOpts::parse(options)?;
    let mnt = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_owned());
    match std::fs::metadata(&mnt) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::InvalidValue {
                property: "mountpoint".into(),
                reason: format!("{} is not a directory", mnt.display()),
            })
        }
        Err(e) => return Err(Error::io(format!("mountpoint {}", mnt.display()), e)),
    }
    if foreground {
        let sink = init_daemon_logging(verbose);
        sink.0.lock().foreground = true;
        return serve(pool, &mnt, &opts, None, sink);
    }
    // Fork before any thread exists; the parent waits for the child's word
    // that the mount is ready.
    let (rd, wr) = sys::pipe().map_err(|e| Error::io("creating a pipe", e))?;
    match sys::fork().map_err(|e| Error::io("fork", e))? {
        sys::Forked::Parent { child } => {
            drop(wr);
            let mut msg = String::new();
            let _ = File::from(rd).read_to_string(&mut msg);
            if let Some(rest) = msg.strip_prefix("ok ") {
                log::debug!("daemon {child} ready: {rest}");
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(rest) = msg.strip_prefix("err ") {
                let (code, text) = rest.split_once(' ').unwrap_or(("1", rest));
                eprintln!("reflinkfs: error: {}", text.trim_end());
                return Ok(ExitCode::from(code.parse::<u8>().unwrap_or(1)));
            }
            eprintln!(
                "reflinkfs: error: the daemon (PID {child}) exited before the mount was ready; see {}",
                log_path(pool).display()
            );
            Ok(ExitCode::from(1))
        }
        sys::Forked::Child => {
            drop(rd);
            let _ = sys::setsid();
            let sink = init_daemon_logging(verbose);
            let code = match serve(pool, &mnt, &opts, Some(File::from(wr)), sink) {
                Ok(_) => 0,
                Err(e) => {
                    log::error!("{e}");
                    e.class().exit_code() as i32
                }
            };
            std::process::exit(code);
        }
    }
}

/// Opens the pool, mounts, reports readiness, and serves until unmounted.
fn serve(
    pool_path: &Path,
    mnt: &Path,
    opts: &MountOpts,
    pipe: Option<File>,
    sink: LogSink,
) -> Result<ExitCode> {
    let mut pipe = pipe;
    let fail = |pipe: &mut Option<File>, e: Error| -> Error {
        report(pipe, &format!("err {} {e}\n", e.class().exit_code()));
        e
    };
    // Signals are taken by one thread; every thread started later inherits
    // the blocked mask.
    let signals = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    sys::block_signals(&signals).map_err(|e| fail(&mut pipe, Error::io("blocking signals", e)))?;

    let pool = match Pool::open(pool_path) {
        Ok(p) => p,
        Err(Error::NotAPool { .. }) if is_empty_dir(pool_path) => {
            log::info!(
                "{} is an empty directory: initialising a pool there",
                pool_path.display()
            );
            let init = InitOptions {
                setup_check: opts.setup_check,
                ..InitOptions::default()
            };
            Pool::init(pool_path, &init).map_err(|e| fail(&mut pipe, e))?
        }
        Err(e) => return Err(fail(&mut pipe, e)),
    };
    let pool = Arc::new(pool);
    // The detached daemon's log, opened through the metadata directory's fd,
    // never through a symlink a pool owner planted there: a mount that
    // could not log is refused before anything is mounted.
    let log_file = match pipe.is_some() {
        true => Some(pool.open_meta_append(LOG_FILE).map_err(|e| {
            let path = pool.meta_path(LOG_FILE);
            let err = if e.raw_os_error() == Some(libc::ELOOP)
                || e.raw_os_error() == Some(libc::EINVAL)
            {
                Error::NotRegular {
                    what: "the daemon's log".into(),
                    path,
                }
            } else {
                Error::io(format!("opening {}", path.display()), e)
            };
            fail(&mut pipe, err)
        })?),
        false => None,
    };
    let fs = Arc::new(ReflinkFs::new(
        pool.clone(),
        FsOptions {
            passthrough: opts.passthrough,
            read_only: opts.read_only,
            committers: 2,
        },
    ));
    let mut mount_options = vec![
        MountOption::FSName(pool.path().display().to_string()),
        MountOption::Subtype("reflinkfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    if opts.read_only {
        mount_options.push(MountOption::RO);
    }
    if opts.noexec {
        mount_options.push(MountOption::NoExec);
    }
    if opts.noatime {
        mount_options.push(MountOption::NoAtime);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads);
    config.clone_fd = true;

    let session = fuser::Session::new(Adapter { fs: fs.clone() }, mnt, &config).map_err(|e| {
        fail(
            &mut pipe,
            Error::io(
                format!("mounting {} on {}", pool.path().display(), mnt.display()),
                e,
            ),
        )
    })?;
    // Entries and attributes are cached by the kernel from now on, and
    // dropped at every change of a volume.
    fs.set_invalidator(Box::new(crate::fuse::Notify(session.notifier())));
    log::info!(
        "mounted pool {} on {} (I/O mode: {}, {} threads{}{})",
        pool.path().display(),
        mnt.display(),
        if fs.passthrough() {
            "passthrough"
        } else {
            "daemon (pread/pwrite)"
        },
        opts.threads,
        if opts.read_only { ", read-only" } else { "" },
        if opts.allow_other {
            ", allow_other"
        } else {
            ""
        },
    );

    let daemon = Arc::new(DaemonState {
        fs: fs.clone(),
        mountpoint: mnt.to_owned(),
        mount_id: mount_id(mnt, pool.path()),
        started: std::time::Instant::now(),
    });
    crate::control::server::spawn(pool.clone(), daemon).map_err(|e| {
        fail(
            &mut pipe,
            Error::io(
                format!("starting the control socket of {}", pool.path().display()),
                e,
            ),
        )
    })?;
    // Housekeeping: commits the runs held by a writer outside reflinkfs
    // once it lets go (every second), and drops inode numbers of files
    // that are gone (every ten).
    let fs_house = fs.clone();
    std::thread::Builder::new()
        .name("housekeeping".into())
        .spawn(move || {
            for tick in 1u64.. {
                std::thread::sleep(std::time::Duration::from_secs(1));
                fs_house.retry_held();
                if tick % 10 == 0 {
                    fs_house.sweep_inodes();
                }
            }
        })
        .map_err(|e| fail(&mut pipe, Error::io("starting the housekeeping thread", e)))?;
    let mnt_owned = mnt.to_owned();
    let fs_sig = fs.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || signal_loop(&signals, &mnt_owned, &fs_sig))
        .map_err(|e| fail(&mut pipe, Error::io("starting the signal thread", e)))?;

    if let Some(mut p) = pipe.take() {
        // Detach: logs go to the pool's log file, stdio to /dev/null.
        if let Some(f) = log_file {
            sink.switch_to(pool.clone(), f, log_cap());
        }
        let _ = p.write_all(format!("ok {}\n", std::process::id()).as_bytes());
        drop(p);
        if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
            for fd in 0..3 {
                let _ = sys::dup2(null.as_fd(), fd);
            }
        }
    }
    let result = session.run();
    fs.shutdown();
    crate::control::server::remove(&pool);
    match result {
        Ok(()) => {
            log::info!("unmounted {}; the pool is closed", mnt.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(Error::io(format!("serving {}", mnt.display()), e)),
    }
}

/// What `reflinkfs status` and online resizes need from the daemon.
struct DaemonState {
    fs: Arc<ReflinkFs>,
    mountpoint: PathBuf,
    /// The mount's id in /proc/self/mountinfo: once it is gone there (a
    /// lazy unmount), the daemon only serves the files still open.
    mount_id: Option<u64>,
    started: std::time::Instant,
}

impl DaemonState {
    /// Whether the mount is still attached at its mountpoint.
    fn attached(&self) -> bool {
        match self.mount_id {
            Some(id) => fuse_mounts().iter().any(|m| m.id == id),
            None => true,
        }
    }
}

impl crate::control::Daemon for DaemonState {
    fn status(&self) -> serde_json::Value {
        let running: Vec<serde_json::Value> = self
            .fs
            .open_handles()
            .into_iter()
            .map(|(vid, n)| serde_json::json!({ "vid": vid.to_string(), "open_handles": n }))
            .collect();
        let busy = self.fs.busy_volumes();
        let commits: Vec<String> = busy
            .iter()
            .filter(|(_, st)| *st == "committing")
            .map(|(v, _)| v.to_string())
            .collect();
        let busy: Vec<serde_json::Value> = busy
            .iter()
            .map(|(v, st)| serde_json::json!({ "vid": v.to_string(), "state": st }))
            .collect();
        let held: Vec<String> = self
            .fs
            .pool()
            .held_vids()
            .iter()
            .map(|v| v.to_string())
            .collect();
        let attached = self.attached();
        serde_json::json!({
            "held": held,
            "pool": self.fs.pool().path().display().to_string(),
            "mounted": true,
            "mountpoint": attached.then(|| self.mountpoint.display().to_string()),
            "detached_from": (!attached).then(|| self.mountpoint.display().to_string()),
            "io_mode": self.fs.io_mode(),
            "pid": std::process::id(),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "running": running,
            "commits_in_flight": commits,
            "busy": busy,
        })
    }

    fn settled(&self) {
        self.fs.sync_invalidations();
    }

    fn resized(&self, vid: &crate::engine::ValidVid) {
        let path = self
            .mountpoint
            .join(vid.class())
            .join(vid.vm())
            .join(crate::engine::Names::of(vid).dirty());
        // A stat through the mount makes the kernel fetch the new size
        // (attributes are not cached), which the loop driver then reads.
        if let Err(e) = std::fs::metadata(&path) {
            log::warn!("{vid}: stat of {} after resize: {e}", path.display());
        }
        for dev in loop_devices_backed_by(&path) {
            match File::open(&dev).and_then(|f| sys::loop_set_capacity(f.as_fd())) {
                Ok(()) => log::info!("{vid}: told {} the new capacity", dev.display()),
                Err(e) => log::error!("{vid}: LOOP_SET_CAPACITY on {}: {e}", dev.display()),
            }
        }
    }
}

/// Loop devices whose backing file is `path` (from sysfs).
fn loop_devices_backed_by(path: &Path) -> Vec<PathBuf> {
    let want = path.display().to_string();
    sys::loop_backing_files()
        .into_iter()
        .filter(|(_, backing)| *backing == want)
        .map(|(dev, _)| dev)
        .collect()
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

/// SIGTERM, SIGINT and SIGHUP unmount when nothing is open; otherwise the
/// daemon keeps serving rather than pull a disk from under a VM.
fn signal_loop(signals: &[libc::c_int], mnt: &Path, fs: &ReflinkFs) {
    loop {
        let sig = match sys::wait_signal(signals) {
            Ok(s) => s,
            Err(e) => {
                log::error!("waiting for signals failed: {e}");
                return;
            }
        };
        let open = fs.open_volumes();
        if open > 0 {
            log::warn!(
                "signal {sig}: not unmounting {}: {open} volume(s) open",
                mnt.display()
            );
            continue;
        }
        match sys::umount2(mnt, 0) {
            Ok(()) => {
                log::info!("signal {sig}: unmounted {}", mnt.display());
                return;
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                log::warn!(
                    "signal {sig}: not unmounting {}: it is busy (files are open on it)",
                    mnt.display()
                )
            }
            Err(e) => log::error!("signal {sig}: unmounting {} failed: {e}", mnt.display()),
        }
    }
}

/// One FUSE mount of /proc/self/mountinfo: its id, mountpoint and source.
struct FuseMount {
    id: u64,
    mountpoint: String,
    source: String,
}

/// The FUSE mounts of this mount namespace.
fn fuse_mounts() -> Vec<FuseMount> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let fstype = fields.get(sep + 1).copied().unwrap_or("");
        if fstype != "fuse" && fstype != "fuse.reflinkfs" {
            continue;
        }
        let (Some(id), Some(mp), Some(src)) = (
            fields.first().and_then(|f| f.parse().ok()),
            fields.get(4),
            fields.get(sep + 2),
        ) else {
            continue;
        };
        out.push(FuseMount {
            id,
            mountpoint: unescape_mount(mp),
            source: unescape_mount(src),
        });
    }
    out
}

/// The id of the FUSE mount of `pool` on `mnt` (read once it is mounted),
/// to tell later whether it is still attached.
fn mount_id(mnt: &Path, pool: &Path) -> Option<u64> {
    let (mnt, pool) = (mnt.to_str()?, pool.to_str()?);
    fuse_mounts()
        .into_iter()
        .filter(|m| m.mountpoint == mnt && m.source == pool)
        .map(|m| m.id)
        .max()
}

/// The pool (FUSE source) of a reflinkfs mount, from /proc/self/mountinfo.
fn pool_of_mount(mnt: &Path) -> Option<PathBuf> {
    let want = mnt.to_str()?;
    fuse_mounts()
        .into_iter()
        .filter(|m| m.mountpoint == want)
        .map(|m| PathBuf::from(m.source))
        // Ours when the source is a pool (fuser mounts as plain "fuse").
        .find(|source| {
            source
                .join(crate::engine::pool::META_DIR)
                .join(crate::engine::pool::POOL_JSON)
                .exists()
        })
}

/// Undoes the octal escapes (`\040` for a space) of /proc/self/mountinfo.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `reflinkfs unmount MOUNTPOINT`: refused while volumes are open; waits
/// for the daemon to commit and release the pool.
pub fn unmount(mountpoint: &Path) -> Result<ExitCode> {
    let mnt = std::fs::canonicalize(mountpoint)
        .map_err(|e| Error::io(format!("mountpoint {}", mountpoint.display()), e))?;
    let Some(pool) = pool_of_mount(&mnt) else {
        return Err(Error::NotAMount { path: mnt });
    };
    let daemon = daemon_pid(&pool);
    match sys::umount2(&mnt, 0) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(Error::Busy {
                vid: mnt.display().to_string(),
                reason: "files on the mount are open (a running volume, a loop device, or a reader); stop them first".into(),
            })
        }
        Err(e) => return Err(Error::io(format!("unmounting {}", mnt.display()), e)),
    }
    // The daemon gives the pool's lock up before it has closed its last
    // files (its log, the pool directory): wait until it has exited, so
    // that the filesystem under the pool can be unmounted as soon as this
    // returns. Without its PID, the lock is all there is to wait for.
    match daemon {
        Some(pid) => wait_for_exit(pid),
        None => wait_for_pool_release(&pool),
    }
    println!("unmounted {} (pool {})", mnt.display(), pool.display());
    Ok(ExitCode::SUCCESS)
}

fn lock_path(pool: &Path) -> PathBuf {
    pool.join(crate::engine::pool::META_DIR)
        .join(crate::engine::pool::LOCK_FILE)
}

/// The PID the mount's daemon wrote into the pool's lock file.
fn daemon_pid(pool: &Path) -> Option<u32> {
    std::fs::read_to_string(lock_path(pool))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits (up to a minute) until process `pid` has exited.
fn wait_for_exit(pid: u32) {
    for _ in 0..3000 {
        if !sys::process_running(pid) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    log::warn!("the daemon (process {pid}) is still running a minute after the unmount");
}

/// Waits (up to a minute) until no process holds the pool's lock.
fn wait_for_pool_release(pool: &Path) {
    let lock = lock_path(pool);
    for _ in 0..600 {
        match File::open(&lock) {
            Ok(f) => {
                if sys::try_lock_exclusive(f.as_fd()).unwrap_or(false) {
                    return;
                }
            }
            Err(_) => return,
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    log::warn!(
        "the daemon of {} still holds the pool after a minute",
        pool.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_options() {
        let o = MountOpts::parse(&["passthrough=off,threads=8", "allow_other,ro"]).unwrap();
        assert!(!o.passthrough && o.threads == 8 && o.allow_other && o.read_only);
        assert!(!MountOpts::parse(&["setup_check=no"]).unwrap().setup_check);
        for bad in [
            "passthrough=maybe",
            "threads=0",
            "threads=x",
            "bogus",
            "suid",
            "allow_other=1",
        ] {
            assert!(MountOpts::parse(&[bad]).is_err(), "{bad}");
        }
        assert_eq!(MountOpts::parse::<&str>(&[]).unwrap(), MountOpts::default());
    }

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }
}
