//! Keeps a panic in one piece of work from taking down the thread that
//! serves the others: a committer, a control connection, the daemon's
//! housekeeping. The panic is logged (with what was being done) and
//! counted, and the thread goes on with its next piece of work. A volume
//! the work had in a transient state is put back by that state's own guard
//! (`lifecycle.rs`), as the panic unwinds.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};

static PANICS: AtomicU64 = AtomicU64::new(0);

/// How many panics the guards of this process caught.
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Runs `work`; a panic in it is logged as `what`'s, counted, and gives
/// `None`.
pub fn catch<T>(what: &str, work: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(v) => Some(v),
        Err(p) => {
            PANICS.fetch_add(1, Ordering::Relaxed);
            log::error!("{what} panicked: {}; carrying on", message(p.as_ref()));
            None
        }
    }
}

/// Runs `work` until it returns, starting it again after a panic (a
/// thread's main loop, which must not end on one).
pub fn keep_running(what: &str, mut work: impl FnMut()) {
    while catch(what, &mut work).is_none() {
        // Not a busy loop when it panics again at once.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// What a panic said.
pub fn message(p: &(dyn Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}
