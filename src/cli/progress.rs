//! A progress bar for copies that take more than a second, on a terminal
//! only: never with `--json`, and never when output is piped.
//!
//! The bar watches the file being written (its allocated bytes), so it
//! works the same whether the copy runs here or in the daemon of a mounted
//! pool. Reflinks finish before the bar would appear.

use indicatif::{ProgressBar, ProgressStyle};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where the copied bytes land.
pub enum Watch {
    /// A file this process holds open (an export's destination).
    Fd(std::fs::File),
    /// A file the engine writes (an import's `N-import.img`).
    Path(PathBuf),
}

impl Watch {
    fn allocated(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        match self {
            Watch::Fd(f) => crate::sys::fstat(f.as_fd())
                .ok()
                .map(|st| st.st_blocks as u64 * 512),
            Watch::Path(p) => std::fs::metadata(p).ok().map(|m| m.blocks() * 512),
        }
    }
}

/// A running progress display; `finish` stops it.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Whether a bar may be shown: stdout and stderr are terminals, and the
/// output is not JSON.
pub fn wanted(json: bool) -> bool {
    !json
        && crate::sys::is_tty(std::io::stdout().as_fd())
        && crate::sys::is_tty(std::io::stderr().as_fd())
}

impl Progress {
    /// Starts watching; the bar appears only after a second.
    pub fn start(label: String, total: Option<u64>, watch: Watch) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let begun = Instant::now();
                while begun.elapsed() < Duration::from_secs(1) {
                    if flag.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let bar = match total {
                    Some(t) if t > 0 => ProgressBar::new(t).with_style(
                        ProgressStyle::with_template(
                            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    ),
                    _ => ProgressBar::new_spinner().with_style(
                        ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                            .expect("valid template"),
                    ),
                };
                bar.set_message(label);
                while !flag.load(Ordering::SeqCst) {
                    if let Some(n) = watch.allocated() {
                        bar.set_position(total.map_or(n, |t| n.min(t)));
                    }
                    bar.tick();
                    std::thread::sleep(Duration::from_millis(100));
                }
                bar.finish_and_clear();
            })
            .ok();
        Progress { stop, thread }
    }

    pub fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `f` while `bar` (if any) shows its progress, and stops the bar.
pub fn during<T>(bar: Option<Progress>, f: impl FnOnce() -> T) -> T {
    let r = f();
    if let Some(b) = bar {
        b.finish();
    }
    r
}
