//! The daemon's log: stderr until it detaches, then a capped, rotated file
//! in the pool's metadata directory.

use crate::engine::Pool;
use crate::sys;
use parking_lot::Mutex;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
pub(super) struct LogSink(Arc<Mutex<LogState>>);

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
    pub(super) fn switch_to(&self, pool: Arc<Pool>, mut f: File, cap: u64) {
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

pub(super) fn init_daemon_logging(verbose: u8) -> LogSink {
    let sink = LogSink::default();
    let level = if verbose > 1 { "debug" } else { "info" };
    let logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .target(env_logger::Target::Pipe(Box::new(sink.clone())))
        .build();
    let max = logger.filter();
    if log::set_boxed_logger(Box::new(Demote(logger))).is_ok() {
        log::set_max_level(max);
    }
    crate::engine::failpoint::warn_if_ignored();
    sink
}

/// fuser's own log lines about what is normal for this daemon, at the
/// level they deserve, with what they mean; `None` for every other line.
fn demoted(record: &log::Record<'_>) -> Option<(log::Level, &'static str)> {
    let target = record.target();
    if !target.starts_with("fuser") || record.level() > log::Level::Warn {
        return None;
    }
    let text = record.args().to_string();
    if text.starts_with("Failed to send FUSE reply: No such file or directory") {
        // The kernel forgets a request that was interrupted (a signal to
        // its caller) or whose connection was aborted, and refuses its
        // late reply with ENOENT.
        return Some((
            log::Level::Debug,
            " (the request was interrupted; the kernel no longer waited for it)",
        ));
    }
    if text.starts_with("Failed to umount filesystem") {
        // An unmount (`reflinkfs unmount`, umount, a signal) has already
        // taken the mount away when the session ends.
        return Some((log::Level::Debug, " (it was already unmounted)"));
    }
    if text.starts_with("[Not Implemented]") {
        return Some((log::Level::Debug, ""));
    }
    None
}

/// The daemon's logger: env_logger, with fuser's routine lines demoted.
struct Demote(env_logger::Logger);

impl log::Log for Demote {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        self.0.enabled(m)
    }

    fn log(&self, record: &log::Record<'_>) {
        let Some((level, note)) = demoted(record) else {
            return self.0.log(record);
        };
        let meta = log::Metadata::builder()
            .level(level)
            .target(record.target())
            .build();
        if self.0.enabled(&meta) {
            self.0.log(
                &log::Record::builder()
                    .metadata(meta)
                    .args(format_args!("{}{note}", record.args()))
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            );
        }
    }

    fn flush(&self) {
        self.0.flush()
    }
}

/// The daemon's log file, beside the pool's metadata.
pub fn log_path(pool: &Path) -> PathBuf {
    pool.join(crate::engine::pool::META_DIR).join(LOG_FILE)
}

/// The log's cap from the environment, or the default.
pub(super) fn log_cap() -> u64 {
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

impl LogSink {
    /// Everything goes to stderr too (`mount -f`).
    pub(super) fn set_foreground(&self) {
        self.0.lock().foreground = true;
    }
}

impl LogSink {
    /// Whether the log has moved to its file (the daemon has detached).
    pub(super) fn detached(&self) -> bool {
        self.0.lock().file.is_some()
    }
}
