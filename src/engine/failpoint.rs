//! Failpoints for crash tests.
//!
//! In a build with the cargo feature `failpoints` (the tests' build), when
//! the environment variable `REFLINKFS_FAILPOINT` names a point, the process
//! aborts (SIGABRT, no unwinding, no destructors) the moment it reaches that
//! point: a crash between two syscalls, where the kernel keeps what was done
//! and nothing after it runs. Other builds ignore the variable (and say so
//! once), so it can never abort a service in the middle of a commit.

use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// The environment variable that arms a failpoint.
pub const ENV: &str = "REFLINKFS_FAILPOINT";

/// Every failpoint, in the order the operations reach them.
pub const ALL: &[&str] = &[
    // create: image in place, config not yet written
    "create.image",
    // start (§4.1): copy made, then renamed to -dirty.img
    "start.copied",
    "start.renamed",
    // commit (§4.2): fsync, counter stored, revision linked, image renamed
    "commit.synced",
    "commit.config",
    "commit.linked",
    "commit.renamed",
    // precache (after a commit): made as a temporary, renamed into place
    "precache.made",
    "precache.renamed",
    // prune, after the first revision was removed
    "prune.removed",
    // revert: revision copied, then committed like a stop
    "revert.copied",
    "revert.synced",
    "revert.config",
    "revert.linked",
    "revert.renamed",
    // resize of a stopped origin volume
    "resize.copied",
    "resize.truncated",
    "resize.config",
    "resize.renamed",
    // import: data half written, whole, then committed like a stop
    "import.partial",
    "import.copied",
    "import.synced",
    "import.config",
    "import.linked",
    "import.renamed",
    // clone: copy made, then committed as an import of the destination
    "clone.copied",
    "clone.synced",
    "clone.config",
    "clone.linked",
    "clone.renamed",
    // set revisions_to_keep: config stored, before pruning
    "set.stored",
    // a queued discard: request stored (the run goes on); the run's dirty
    // image dropped at stop, the request not yet cleared
    "pending.stored",
    "pending.dropped",
];

/// Whether this build has failpoints (the cargo feature `failpoints`).
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Aborts at failpoint `$name` ([`abort_at`]). In a build without
/// failpoints it is a constant-false branch the compiler drops: its
/// argument (often a `format!`) is never evaluated.
macro_rules! hit {
    ($name:expr) => {
        if $crate::engine::failpoint::ENABLED {
            $crate::engine::failpoint::abort_at(&$name);
        }
    };
}

/// Panics at panic point `$name` for `$subject` ([`panic_at`]); nothing,
/// and no argument evaluated, without failpoints.
macro_rules! panic_if {
    ($name:expr, $subject:expr) => {
        if $crate::engine::failpoint::ENABLED {
            $crate::engine::failpoint::panic_at($name, &$subject);
        }
    };
}

/// Pauses at pause point `$name` for `$subject` ([`pause_at`]); nothing,
/// and no argument evaluated, without failpoints.
macro_rules! pause {
    ($name:expr, $subject:expr) => {
        if $crate::engine::failpoint::ENABLED {
            $crate::engine::failpoint::pause_at($name, &$subject);
        }
    };
}

pub(crate) use {hit, panic_if, pause};

/// Says once, in a build without failpoints, that `REFLINKFS_FAILPOINT` is
/// ignored (the process's start calls it: no failpoint is ever reached to
/// say so).
pub fn warn_if_ignored() {
    if !ENABLED {
        let _ = armed();
    }
}

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var(ENV).ok().filter(|v| !v.is_empty());
            if v.is_some() && !ENABLED {
                log::warn!("{ENV} is set, but this build has no failpoints (cargo feature `failpoints`); ignoring it");
                return None;
            }
            v
        })
        .as_deref()
}

/// Aborts the process if `name` is the armed failpoint (only in a build
/// with failpoints). Called through `hit!`.
pub fn abort_at(name: &str) {
    debug_assert!(ALL.contains(&name), "failpoint {name} is not listed in ALL");
    if armed() == Some(name) {
        log::error!("failpoint {name} reached: aborting");
        eprintln!("reflinkfs: failpoint {name} reached: aborting");
        std::process::abort();
    }
}

/// Panics when `name` is an armed failpoint and `subject` (what the
/// request is about) mentions "panic": a test arms it and touches a volume
/// named so, and every other request goes on as usual. Only in a build with
/// failpoints.
///
/// `REFLINKFS_FAILPOINT` may name several panic points, separated by
/// commas. The points of [`PANICS_ONCE`] panic once per subject (the
/// second time, the work goes on: a test then checks the volume is
/// usable), or N times with `NAME=N`; [`panic_once`] arms one for one
/// subject in-process.
pub fn panic_at(name: &str, subject: &str) {
    debug_assert!(PANICS.contains(&name), "panic point {name} is not listed");
    if !ENABLED {
        return;
    }
    let key = (name.to_owned(), subject.to_owned());
    if panics_armed().lock().remove(&key) {
        panic!("failpoint {name} reached for {subject}");
    }
    // `NAME`, or `NAME=N` for a point of PANICS_ONCE to panic N times.
    let times = armed().and_then(|a| {
        a.split(',').find_map(|p| match p.split_once('=') {
            None if p == name => Some(1),
            Some((n, t)) if n == name => t.parse::<u32>().ok(),
            _ => None,
        })
    });
    if let (Some(times), true) = (times, subject.contains("panic")) {
        if PANICS_ONCE.contains(&name) {
            let mut fired = panics_fired().lock();
            let n = fired.entry(key).or_insert(0);
            if *n >= times {
                return;
            }
            *n += 1;
        }
        panic!("failpoint {name} reached for {subject}");
    }
}

/// Arms panic point `name` for `subject`, in-process: the next time it is
/// reached for that subject, it panics (once).
pub fn panic_once(name: &str, subject: &str) {
    debug_assert!(PANICS.contains(&name), "panic point {name} is not listed");
    panics_armed()
        .lock()
        .insert((name.to_owned(), subject.to_owned()));
}

fn panics_armed() -> &'static Mutex<std::collections::HashSet<(String, String)>> {
    static P: OnceLock<Mutex<std::collections::HashSet<(String, String)>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

fn panics_fired() -> &'static Mutex<HashMap<(String, String), u32>> {
    static P: OnceLock<Mutex<HashMap<(String, String), u32>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

/// The panic points: the work panics there (see `panic_if!` and [`panic_at`]). A FUSE
/// request's getattr; a start's I/O after its copy is in place; a stop's
/// I/O before its commit; a committer thread before it runs a stop; a
/// control request before it is executed.
pub const PANICS: &[&str] = &[
    "fuse.getattr",
    "start.io",
    "stop.io",
    "committer",
    "control",
];

/// The panic points that panic only once per subject.
pub const PANICS_ONCE: &[&str] = &["start.io", "stop.io", "committer", "control"];

/// The pause points: the work of one volume stops there until released, so
/// that a test can hold a start, a commit or a removal in progress and
/// look at everything else meanwhile.
pub const PAUSES: &[&str] = &["pause.start", "pause.commit", "pause.remove"];

/// The environment variable naming a file whose existence releases an
/// armed pause point (`REFLINKFS_FAILPOINT=pause.commit`).
pub const GATE_ENV: &str = "REFLINKFS_FAILPOINT_GATE";

type Gate = Arc<(Mutex<bool>, Condvar)>;

fn pauses() -> &'static Mutex<HashMap<(String, String), Gate>> {
    static P: OnceLock<Mutex<HashMap<(String, String), Gate>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

/// Pauses at `name` for `subject` (a volume id) when armed (only in a
/// build with failpoints):
/// - in the environment, `REFLINKFS_FAILPOINT=NAME` pauses every subject
///   that mentions "pause" until the file named by
///   `REFLINKFS_FAILPOINT_GATE` exists (a daemon under test);
/// - in-process, [`pause_for`] pauses one subject until [`resume`].
pub fn pause_at(name: &str, subject: &str) {
    debug_assert!(PAUSES.contains(&name), "pause point {name} is not listed");
    if !ENABLED {
        return;
    }
    if armed() == Some(name) && subject.contains("pause") {
        let gate = std::env::var_os(GATE_ENV).map(std::path::PathBuf::from);
        log::warn!("failpoint {name} reached for {subject}: paused until {gate:?} exists");
        while gate.as_ref().is_some_and(|g| !g.exists()) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        log::warn!("failpoint {name} for {subject}: going on");
        return;
    }
    let gate = pauses()
        .lock()
        .get(&(name.to_owned(), subject.to_owned()))
        .cloned();
    if let Some(g) = gate {
        let (lock, cv) = &*g;
        let mut open = lock.lock();
        *open = false;
        cv.notify_all();
        // `false` tells `wait_paused` someone is here; wait for `resume`.
        while !*open {
            cv.wait(&mut open);
        }
    }
}

/// Arms a pause point for one subject, in-process. Returns the gate that
/// [`wait_paused`] and [`resume`] take.
pub fn pause_for(name: &str, subject: &str) -> Gate {
    let g: Gate = Arc::new((Mutex::new(true), Condvar::new()));
    pauses()
        .lock()
        .insert((name.to_owned(), subject.to_owned()), g.clone());
    g
}

/// Waits until a thread is held at the gate's pause point.
pub fn wait_paused(g: &Gate) {
    let (lock, cv) = &**g;
    let mut open = lock.lock();
    while *open {
        cv.wait(&mut open);
    }
}

/// Lets the thread held at a pause point go, and disarms it.
pub fn resume(name: &str, subject: &str, g: &Gate) {
    pauses()
        .lock()
        .remove(&(name.to_owned(), subject.to_owned()));
    let (lock, cv) = &**g;
    *lock.lock() = true;
    cv.notify_all();
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_unique() {
        let mut v = super::ALL.to_vec();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), super::ALL.len());
    }
}
