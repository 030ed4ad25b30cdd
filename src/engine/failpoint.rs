//! Failpoints for crash tests.
//!
//! In a build with the cargo feature `failpoints` (the tests' build), when
//! the environment variable `REFLINKFS_FAILPOINT` names a point, the process
//! aborts (SIGABRT, no unwinding, no destructors) the moment it reaches that
//! point: a crash between two syscalls, where the kernel keeps what was done
//! and nothing after it runs. Other builds ignore the variable (and say so
//! once), so it can never abort a service in the middle of a commit.

use std::sync::OnceLock;

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
];

/// Whether this build has failpoints (the cargo feature `failpoints`).
pub const ENABLED: bool = cfg!(feature = "failpoints");

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
/// with failpoints).
pub fn hit(name: &str) {
    debug_assert!(ALL.contains(&name), "failpoint {name} is not listed in ALL");
    if armed() == Some(name) {
        log::error!("failpoint {name} reached: aborting");
        eprintln!("reflinkfs: failpoint {name} reached: aborting");
        std::process::abort();
    }
}

/// Panics when `name` is the armed failpoint and `subject` (what the
/// request is about) mentions "panic": a test arms it and touches a volume
/// named so, and every other request goes on as usual. Only in a build with
/// failpoints.
pub fn panic_if(name: &str, subject: &str) {
    debug_assert!(PANICS.contains(&name), "panic point {name} is not listed");
    if armed() == Some(name) && subject.contains("panic") {
        panic!("failpoint {name} reached for {subject}");
    }
}

/// The panic points: a handler panics there (see [`panic_if`]).
pub const PANICS: &[&str] = &["fuse.getattr"];

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
