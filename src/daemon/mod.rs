//! The daemon of a mount: it opens the pool, mounts it, detaches once the
//! mount is ready, starts the control socket, the housekeeping and signal
//! threads, and closes the pool once the mount is gone and no volume is
//! held by a writer outside reflinkfs.

mod logfile;
pub mod mounts;
pub mod options;
mod signals;
mod state;

use self::logfile::{init_daemon_logging, log_cap, LogSink};
pub use self::logfile::{log_path, DEFAULT_LOG_MAX, LOG_FILE, LOG_MAX_ENV, OLD_LOG_FILE};
use self::mounts::mount_id;
pub use self::options::MountOpts;
use self::state::DaemonState;
use crate::engine::{InitOptions, Pool};
use crate::error::{Error, Result};
use crate::fuse::fs::{FsOptions, ReflinkFs};
use crate::fuse::{Adapter, Connection};
use crate::sys;
use fuser::{Config, MountOption, SessionACL};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

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
    if sys::getuid() != 0 {
        // FUSE passthrough (the native-speed data path) and the loop
        // devices of `volume attach` need CAP_SYS_ADMIN; a user's mount
        // would be a slower, different filesystem. Root mounts a user's
        // pool with allow_other, and the files show as the user's.
        return Err(Error::NoAccess {
            what: "mounting".into(),
            path: pool.to_owned(),
            who: "reflinkfs mounts need root (kernel FUSE passthrough needs CAP_SYS_ADMIN); as root, `reflinkfs mount POOL MOUNTPOINT -o allow_other` shows the pool's files as owned by the pool directory's owner, who can then use them".into(),
        });
    }
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
        sink.set_foreground();
        return serve(pool, &mnt, &opts, None, sink);
    }
    // Fork before any thread exists; the parent waits for the child's word
    // that the mount is ready.
    let (rd, wr) = sys::pipe().map_err(|e| Error::io("creating a pipe", e))?;
    // SAFETY: no thread has been started yet: logging is not set up, the
    // pool is not open, and fuser and the control socket start theirs in
    // the child.
    match unsafe { sys::fork() }.map_err(|e| Error::io("fork", e))? {
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
            let code = match serve(pool, &mnt, &opts, Some(File::from(wr)), sink.clone()) {
                Ok(_) => 0,
                Err(e) => {
                    // Before it detached, the error went to the waiting
                    // parent, which prints it: logging it here too would
                    // print it twice.
                    if sink.detached() {
                        log::error!("{e}");
                    }
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

    let pool = open_pool(pool_path, opts).map_err(|e| fail(&mut pipe, e))?;
    let pool = Arc::new(pool);
    // Before the mount: no request waits while they are opened.
    let t = std::time::Instant::now();
    let kept = pool.keep_vm_dirs();
    log::debug!(
        "kept {kept} VM directories open for lookups ({:.0} ms)",
        t.elapsed().as_secs_f64() * 1e3
    );
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
            committers: 2,
        },
    ));
    let config = fuse_config(opts, &pool);

    let session = start_session(&pool, &fs, mnt, opts, &config).map_err(|e| fail(&mut pipe, e))?;
    log::info!(
        "mounted pool {} on {} (I/O mode: {}, {} threads{}{})",
        pool.path().display(),
        mnt.display(),
        fs.io_mode(),
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
        imports: Default::default(),
    });
    crate::control::server::spawn(pool.clone(), daemon.clone()).map_err(|e| {
        fail(
            &mut pipe,
            Error::io(
                format!("starting the control socket of {}", pool.path().display()),
                e,
            ),
        )
    })?;
    spawn_threads(&fs, &daemon, mnt, signals).map_err(|e| fail(&mut pipe, e))?;

    if let Some(p) = pipe.take() {
        detach(p, log_file, &sink, &pool);
    }
    let result = session.run();
    fs.shutdown();
    // The mount is gone; the daemon, its control socket and housekeeping
    // stay until every held volume is committed.
    fs.wait_held();
    crate::control::server::remove(&pool);
    match result {
        Ok(()) => {
            log::info!("unmounted {}; the pool is closed", mnt.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(Error::io(format!("serving {}", mnt.display()), e)),
    }
}

/// Opens the pool to mount; an empty directory becomes a new pool.
fn open_pool(pool_path: &Path, opts: &MountOpts) -> Result<Pool> {
    match Pool::open(pool_path) {
        Ok(p) => Ok(p),
        Err(Error::NotAPool { .. }) if is_empty_dir(pool_path) => {
            log::info!(
                "{} is an empty directory: initialising a pool there",
                pool_path.display()
            );
            let init = InitOptions {
                setup_check: opts.setup_check,
                ..InitOptions::default()
            };
            Pool::init(pool_path, &init)
        }
        Err(e) => {
            let e = mounts::explain_not_a_pool(e, |pool| {
                format!("the pool is {}, mounted there already", pool.display())
            });
            Err(e)
        }
    }
}

/// Mounts the pool on `mnt`: the FUSE session, the daemon's own
/// descriptor of its connection, and the kernel cache invalidator.
fn start_session(
    pool: &Arc<Pool>,
    fs: &Arc<ReflinkFs>,
    mnt: &Path,
    opts: &MountOpts,
    config: &Config,
) -> Result<fuser::Session<Adapter>> {
    let owner = pool
        .owner()
        .map_err(|e| Error::io(format!("examining {}", pool.path().display()), e))?;
    let conn = Arc::new(Connection::default());
    let session = fuser::Session::new(
        Adapter {
            fs: fs.clone(),
            conn: conn.clone(),
            read_only: opts.read_only,
            owner,
        },
        mnt,
        config,
    )
    .map_err(|e| {
        Error::io(
            format!("mounting {} on {}", pool.path().display(), mnt.display()),
            e,
        )
    })?;
    // The daemon's own descriptor of the connection, for passthrough
    // registrations that can be taken back whenever their last open goes,
    // even after the session (see `Connection`).
    let own = session
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("duplicating the FUSE connection's descriptor", e))?;
    conn.set(own);
    // Entries and attributes are cached by the kernel from now on, and
    // dropped at every change of a volume.
    fs.set_invalidator(Box::new(crate::fuse::Notify(session.notifier())));
    Ok(session)
}

/// The FUSE session's options.
fn fuse_config(opts: &MountOpts, pool: &Pool) -> Config {
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
    config
}

/// Starts the daemon's housekeeping and signal threads.
fn spawn_threads(
    fs: &Arc<ReflinkFs>,
    daemon: &Arc<DaemonState>,
    mnt: &Path,
    signals: [i32; 3],
) -> Result<()> {
    // Housekeeping: commits the runs held by a writer outside reflinkfs
    // once it lets go (every second), drops the imports whose writer's
    // process exited (every second), and drops inode numbers of files
    // that are gone (every ten).
    let fs_house = fs.clone();
    let daemon_house = daemon.clone();
    std::thread::Builder::new()
        .name("housekeeping".into())
        .spawn(move || {
            for tick in 1u64.. {
                std::thread::sleep(std::time::Duration::from_secs(1));
                // A panic ends this tick's work, never the thread.
                crate::engine::guard::catch("housekeeping", || {
                    crate::control::reap_stale_imports(&daemon_house.imports);
                    // Once the session ended, `wait_held` retries held
                    // volumes and no inode is looked up any more.
                    if fs_house.session_ended() {
                        return;
                    }
                    fs_house.retry_held();
                    if tick % 10 == 0 {
                        fs_house.sweep_inodes();
                    }
                });
            }
        })
        .map_err(|e| Error::io("starting the housekeeping thread", e))?;
    let mnt_owned = mnt.to_owned();
    let fs_sig = fs.clone();
    let id = daemon.mount_id;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::engine::guard::keep_running("the signal thread", || {
                signals::signal_loop(&signals, &mnt_owned, id, &fs_sig)
            })
        })
        .map_err(|e| Error::io("starting the signal thread", e))?;
    Ok(())
}

/// Detaches from the parent: logs go to the pool's log file, stdio to
/// /dev/null, and the parent hears that the mount is up.
fn detach(mut p: File, log_file: Option<File>, sink: &LogSink, pool: &Arc<Pool>) {
    if let Some(f) = log_file {
        sink.switch_to(pool.clone(), f, log_cap());
    }
    let _ = p.write_all(format!("ok {}\n", std::process::id()).as_bytes());
    drop(p);
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        let _ = sys::redirect_stdio(null.as_fd());
    }
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}
