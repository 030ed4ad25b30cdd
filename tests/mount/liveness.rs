//! One volume never stalls another (issue 10), on real mounts.
//!
//! Deterministic, with no time asserted: the slow thing is held by the
//! test (an import's input pipe it does not feed, a commit paused at a
//! failpoint), every probe must return while it is held, and only then is
//! it let go. A probe that hangs fails the test after a generous watchdog,
//! which first aborts the FUSE connection so nothing stays in D state.
//!
//! Also here: the races of issue 10 that need a kernel (a reader of an old
//! `N.img` keeps its attributes across a resize and across remove and
//! create; an import from a file on the same mount), a request that panics,
//! and FORGET keeping the inode table bounded.

use crate::common;

use common::cli::*;
use common::mount::*;
use common::*;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const IMPORT_SIZE: u64 = MIB;

/// A pool of a few VMs, mounted with `opts` and `env`.
fn pool_with(fs: &TestFs, test: &str, vols: &[&str], opts: &str, env: &[(&str, &str)]) -> Mounted {
    pool_keeping(fs, test, 1, vols, opts, env)
}

/// [`pool_with`], keeping `keep` revisions.
fn pool_keeping(
    fs: &TestFs,
    test: &str,
    keep: i64,
    vols: &[&str],
    opts: &str,
    env: &[(&str, &str)],
) -> Mounted {
    let path = prepared_pool(fs, test, keep, |pool| {
        for v in vols {
            create_origin(pool, v, MIB);
        }
    });
    Mounted::mount_with(&path, &path.parent().unwrap().join("mnt"), opts, env)
}

/// A pool of `vols` on XFS, keeping `keep` revisions, mounted with
/// `threads` FUSE workers and the pause failpoint `point` (`pause.commit`:
/// every commit of a volume named `pause` waits while the gate file is
/// absent; `pause.start`: every start). The gate starts open (the file
/// made) if `open`. Gives the mount and the gate file.
fn held_at_a_gate(
    point: &str,
    test: &str,
    vols: &[&str],
    keep: i64,
    threads: usize,
    open: bool,
) -> (Mounted, PathBuf) {
    let fs = xfs();
    let gate = scratch_dir(&fs, &format!("{test}-gate")).join("open");
    if open {
        File::create(&gate).unwrap();
    }
    let m = pool_keeping(
        &fs,
        test,
        keep,
        vols,
        &format!("threads={threads}"),
        &[
            ("REFLINKFS_FAILPOINT", point),
            ("REFLINKFS_FAILPOINT_GATE", &s(&gate)),
        ],
    );
    (m, gate)
}

/// An import whose input the test holds: it waits on its pipe until fed.
struct StalledImport {
    child: Child,
}

impl StalledImport {
    fn start(pool: &Path, vid: &str) -> StalledImport {
        let child = Command::new(bin())
            .args(["volume", "import", "--pool", &s(pool), vid, "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        StalledImport { child }
    }

    /// Feeds the input and checks the import succeeded.
    fn feed(mut self) {
        let mut stdin = self.child.stdin.take().unwrap();
        stdin
            .write_all(&pattern(0x1f, IMPORT_SIZE as usize))
            .unwrap();
        drop(stdin);
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(status.success(), "the import: {err}");
    }
}

impl Drop for StalledImport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `probe` on a thread; it must return within the watchdog, or the
/// mount's connection is aborted and the test fails naming it.
fn must_return<T: Send + 'static>(
    what: &str,
    dev: u64,
    probe: impl FnOnce() -> T + Send + 'static,
) -> T {
    let t = std::thread::spawn(probe);
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while !t.is_finished() {
        if std::time::Instant::now() > end {
            Mounted::abort_connection(dev);
            panic!("{what} did not return while the slow operation was held");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    t.join().unwrap()
}

fn state_of(pool: &Path, vid: &str) -> String {
    rf_json(pool, ["volume", "info", vid])["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The probes: each on its own thread, each must return.
fn probes(m: &Mounted, other_open: &File) {
    let dev = m.dev();
    let (mnt, pool) = (m.mnt.clone(), m.pool.clone());
    must_return("ls -lR of the mount", dev, move || {
        run_ok(Command::new("ls").arg("-lR").arg(&mnt));
    });
    let mnt = m.mnt.clone();
    must_return("a start and commit of another volume", dev, move || {
        write_until(&mnt.join("appvms/busy/free-dirty.img"), b"free", "stopped");
    });
    let f = other_open.try_clone().unwrap();
    must_return("fsync of an open volume", dev, move || {
        f.write_all_at(b"sync", 0).unwrap();
        f.sync_all().unwrap();
    });
    for args in ["status", "volume list", "volume info appvms/busy/open"] {
        let pool = pool.clone();
        must_return(&format!("reflinkfs {args}"), dev, move || {
            rf_ok(&pool, args);
        });
    }
}

const VOLS: &[&str] = &[
    "appvms/busy/open",
    "appvms/busy/free",
    "appvms/imp/private",
    "appvms/held/pause",
];

#[test]
fn nothing_waits_for_an_import_that_waits_for_its_input() {
    need!(require(&["ls"]));
    let fs = xfs();
    let m = pool_with(&fs, "live-import", VOLS, "", &[]);
    let open = open_rw(&m.path("appvms/busy/open-dirty.img"));
    let import = StalledImport::start(&m.pool, "appvms/imp/private");
    wait_for("the import to wait for its input", 30, || {
        state_of(&m.pool, "appvms/imp/private") == "importing"
    });
    let status = rf(&m.pool, "status");
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("importing"),
        "status shows the operation"
    );
    probes(&m, &open);
    // An open of the importing volume is refused at once, not held.
    let e = OpenOptions::new()
        .write(true)
        .open(m.path("appvms/imp/private-dirty.img"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    import.feed();
    assert_eq!(
        read_committed(&m.pool, &vid("appvms/imp/private"), 0, 4096),
        pattern(0x1f, 4096)
    );
    drop(open);
    m.wait_stopped("appvms/busy/open-dirty.img");
    m.unmount();
}

#[test]
fn one_worker_serves_every_volume_while_a_commit_is_held() {
    need!(require(&["ls"]) && require_failpoints());
    let (m, gate) = held_at_a_gate("pause.commit", "live-held", VOLS, 1, 1, false);
    let dev = m.dev();
    let open = open_rw(&m.path("appvms/busy/open-dirty.img"));
    // The held volume's commit stops at the failpoint.
    let held = m.path("appvms/held/pause-dirty.img");
    write_until(&held, b"held", "committing");
    let import = StalledImport::start(&m.pool, "appvms/imp/private");
    wait_for("the import to wait for its input", 30, || {
        state_of(&m.pool, "appvms/imp/private") == "importing"
    });
    probes(&m, &open);
    // An open of the committing volume waits for the commit (on its own
    // thread in the daemon): release the commit, and it completes.
    let reopen = {
        let held = held.clone();
        std::thread::spawn(move || OpenOptions::new().write(true).open(&held))
    };
    std::thread::sleep(Duration::from_millis(100));
    let mnt = m.mnt.clone();
    must_return(
        "a stat while an open waits for the commit",
        dev,
        move || {
            std::fs::metadata(mnt.join("appvms/busy/free-dirty.img")).unwrap();
        },
    );
    File::create(&gate).unwrap();
    let f = must_return("the open of the committed volume", dev, move || {
        reopen.join().unwrap()
    })
    .unwrap();
    drop(f);
    m.wait_stopped("appvms/held/pause-dirty.img");
    import.feed();
    drop(open);
    m.wait_stopped("appvms/busy/open-dirty.img");
    m.unmount();
}

#[test]
fn an_import_from_a_file_on_the_same_mount_completes() {
    let fs = xfs();
    let m = pool_with(&fs, "live-self-import", &["c/v/src", "c/v/dst"], "", &[]);
    let src = m.path("c/v/src-dirty.img");
    write_until(&src, &pattern(0x42, 65536), "stopped");
    let dev = m.dev();
    // From another volume's image, then into the very volume it reads from.
    for (what, from) in [
        ("an import from the mount", "c/v/src.img"),
        ("an import of a volume from itself", "c/v/dst.img"),
    ] {
        let (pool, from) = (m.pool.clone(), m.path(from));
        must_return(what, dev, move || {
            rf_ok(&pool, ["volume", "import", "c/v/dst", &s(&from)]);
        });
        assert_eq!(
            read_committed(&m.pool, &vid("c/v/dst"), 0, 65536),
            pattern(0x42, 65536),
            "{what}"
        );
    }
    m.unmount();
}

/// Writes `data` at the start of the volume behind `dirty` (opened for
/// writing only) and closes it; then waits until the volume is in `state`.
fn write_until(dirty: &Path, data: &[u8], state: &str) {
    let f = OpenOptions::new().write(true).open(dirty).unwrap();
    f.write_all_at(data, 0).unwrap();
    drop(f);
    wait_for(&format!("{} to be {state}", dirty.display()), 60, || {
        xattr(dirty, "user.reflinkfs.state").as_deref() == Some(state)
    });
}

/// What a reader of `N.img` sees through its open file.
fn fstat_of(f: &File) -> (u64, u64) {
    let m = f.metadata().unwrap();
    (m.ino(), m.len())
}

#[test]
fn a_reader_of_an_old_image_keeps_its_attributes_across_resize_and_recreate() {
    let fs = xfs();
    let m = pool_with(&fs, "live-old-reader", &["c/v/n"], "", &[]);
    let dirty = m.path("c/v/n-dirty.img");
    write_until(&dirty, &pattern(1, 4096), "stopped");
    let img = m.path("c/v/n.img");

    // A resize replaces N.img; a remove and a create make a new volume
    // under the same id. A reader of the old N.img keeps it either way.
    for (what, size) in [("a resize", 2 * MIB), ("a remove and a create", 3 * MIB)] {
        let reader = File::open(&img).unwrap();
        let before = fstat_of(&reader);
        if size == 2 * MIB {
            assert_eq!(before.1, MIB);
            rf_ok(&m.pool, "volume resize c/v/n 2M");
        } else {
            rf_ok(&m.pool, "volume remove c/v/n");
            rf_ok(&m.pool, "volume create c/v/n --size 3M");
            write_until(&dirty, &pattern(2, 4096), "stopped");
        }
        assert_eq!(
            fstat_of(&reader),
            before,
            "{what}: the reader keeps its inode and size (the old volume's image)"
        );
        assert_eq!(read_at(&reader, 0, 4096), pattern(1, 4096), "{what}");
        let now = std::fs::metadata(&img).unwrap();
        assert_eq!(now.len(), size, "{what}");
        assert_ne!(
            now.ino(),
            before.0,
            "{what}: the new image has a new inode number"
        );
    }
    assert_ne!(
        std::fs::metadata(&dirty).unwrap().ino(),
        0,
        "the new volume's dirty image is a file"
    );
    m.unmount();
}

#[test]
fn a_request_that_panics_fails_alone() {
    need!(require_failpoints());
    let fs = xfs();
    let m = pool_with(
        &fs,
        "live-panic",
        &["c/v/panic", "c/v/n"],
        "",
        &[("REFLINKFS_FAILPOINT", "fuse.getattr")],
    );
    let open = open_rw(&m.path("c/v/n-dirty.img"));
    let e = std::fs::metadata(m.path("c/v/panic-dirty.img")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Everything else serves on.
    std::fs::metadata(m.path("c/v/n-dirty.img")).unwrap();
    open.write_all_at(b"alive", 0).unwrap();
    open.sync_all().unwrap();
    rf_ok(&m.pool, "status");
    assert!(m.root_counter("panics") >= 1);
    let log = daemon_log(&m.pool);
    assert!(log.contains("the request panicked"), "{log}");
    drop(open);
    m.wait_stopped("c/v/n-dirty.img");
    m.unmount();
}

#[test]
fn forget_keeps_the_inode_table_bounded() {
    need!(require(&["sync"]));
    let fs = xfs();
    let m = pool_with(&fs, "live-forget", &["c/v/n"], "", &[]);
    let dirty = m.path("c/v/n-dirty.img");
    let img = m.path("c/v/n.img");
    for i in 0..100u8 {
        write_until(&dirty, &[i; 512], "stopped");
        // A lookup of each new N.img: a new inode every time.
        std::fs::metadata(&img).unwrap_or_else(|e| panic!("round {i}: {e}"));
    }
    // Without FORGET the table would hold one entry per commit; the kernel
    // forgets each old N.img once nothing caches it (drop_caches makes
    // sure), and the table stays small.
    run_ok(&mut Command::new("sync"));
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    wait_for("the kernel's FORGETs", 30, || m.root_counter("inodes") < 20);
    m.unmount();
}

/// Listings and attributes are cached by the kernel (and dropped at every
/// change): whatever changes, through the mount or the CLI, shows at once.
#[test]
fn the_mount_shows_every_change_at_once_despite_caching() {
    let fs = xfs();
    let m = pool_with(&fs, "live-cache", &["c/v/a"], "", &[]);
    let list = |rel: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(m.path(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let cli = |args: &str| rf_ok(&m.pool, args);
    assert_eq!(list("c/v"), ["a-dirty.img", "a.img"]);
    assert_eq!(list("c"), ["v"]);
    // A new volume, in this VM and in a new one.
    cli("volume create c/v/b --size 1M");
    cli("volume create c/w/x --size 1M");
    assert_eq!(
        list("c/v"),
        ["a-dirty.img", "a.img", "b-dirty.img", "b.img"]
    );
    assert_eq!(list("c"), ["v", "w"]);
    // A commit: a revision appears, N.img is a new file.
    let img_ino = std::fs::metadata(m.path("c/v/a.img")).unwrap().ino();
    write_until(&m.path("c/v/a-dirty.img"), b"x", "stopped");
    let names = list("c/v");
    assert!(names.iter().any(|n| n.starts_with("a.img.1@")), "{names:?}");
    assert_ne!(
        std::fs::metadata(m.path("c/v/a.img")).unwrap().ino(),
        img_ino
    );
    // A resize shows its size, stopped and committed.
    cli("volume resize c/v/b 3M");
    assert_eq!(
        std::fs::metadata(m.path("c/v/b.img")).unwrap().len(),
        3 * MIB
    );
    assert_eq!(
        std::fs::metadata(m.path("c/v/b-dirty.img")).unwrap().len(),
        3 * MIB
    );
    // rw=false shows in the mode.
    cli("volume set c/v/b rw false");
    let mode = std::fs::metadata(m.path("c/v/b-dirty.img")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o400);
    // Removals: the files go, and a VM whose last volume went goes.
    cli("volume remove c/v/b");
    cli("volume remove c/w/x");
    let names = list("c/v");
    assert!(!names.iter().any(|n| n.starts_with("b")), "{names:?}");
    assert_eq!(list("c"), ["v"]);
    assert!(std::fs::metadata(m.path("c/w")).is_err());
    m.unmount();
}

/// `truncate(2)` of a path, without opening it (an open would be one more
/// request that may wait, and this is about the setattr).
fn truncate_path(p: &Path, len: u64) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string; truncate(2) only reads it.
    match unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Issue 18: truncates (resizes), unlinks (a revision's removal), renames
/// (reverts) and opens of volumes whose commits are held all wait in the
/// daemon's pool of waiting threads, never on a FUSE worker: with more of
/// them than the mount has workers (two), another volume is still looked
/// up, stat'ed, opened (a start, which waits too, on its own thread of the
/// pool), written and read, and every waiting request completes once the
/// commits are let go.
#[test]
fn waiting_truncates_unlinks_renames_and_opens_take_no_fuse_worker() {
    need!(require(&["ls"]) && require_failpoints());
    // Open at first: the commits that make A's revisions go through.
    let (m, gate) = held_at_a_gate(
        "pause.commit",
        "live-wait",
        &["appvms/ra/pause", "appvms/rb/pause", "appvms/free/c"],
        10,
        2,
        true,
    );
    let dev = m.dev();
    let (a, b) = (
        m.path("appvms/ra/pause-dirty.img"),
        m.path("appvms/rb/pause-dirty.img"),
    );
    for tag in 1..=3 {
        write_until(&a, &pattern(tag, 4096), "stopped");
    }
    let first = |name: &str| {
        let f = File::open(m.path(&format!("appvms/ra/{name}"))).unwrap();
        read_at(&f, 0, 4096)
    };
    let revisions = revision_files(&m.pool, "appvms/ra/pause");
    let target = revisions
        .iter()
        .find(|r| first(r) == pattern(1, 4096))
        .expect("a revision with the first write")
        .clone();
    let victim = revisions.iter().find(|r| **r != target).unwrap().clone();
    // From now on both commits stay held.
    std::fs::remove_file(&gate).unwrap();
    write_until(&a, &pattern(4, 4096), "committing");
    write_until(&b, &pattern(5, 4096), "committing");

    let mut waiting: Vec<(String, std::thread::JoinHandle<std::io::Result<()>>)> = Vec::new();
    let mut wait = |what: &str, f: Box<dyn FnOnce() -> std::io::Result<()> + Send>| {
        waiting.push((what.to_owned(), std::thread::spawn(f)));
        // In this order into the daemon (one volume's requests run in turn).
        std::thread::sleep(Duration::from_millis(100));
    };
    let (a2, b2) = (a.clone(), b.clone());
    wait(
        "truncate of A",
        Box::new(move || truncate_path(&a2, 2 * MIB)),
    );
    let (from, to) = (
        m.path(&format!("appvms/ra/{target}")),
        m.path("appvms/ra/pause.img"),
    );
    wait(
        "rename (revert) of A",
        Box::new(move || std::fs::rename(&from, &to)),
    );
    let victim_path = m.path(&format!("appvms/ra/{victim}"));
    wait(
        "unlink of a revision of A",
        Box::new(move || std::fs::remove_file(&victim_path)),
    );
    wait(
        "truncate of B",
        Box::new(move || truncate_path(&b2, 2 * MIB)),
    );
    for i in 0..3 {
        let b = b.clone();
        wait(
            &format!("open {i} of B"),
            Box::new(move || {
                let f = File::open(&b)?;
                assert_eq!(read_at(&f, 0, 4096), pattern(5, 4096));
                Ok(())
            }),
        );
    }
    for (what, t) in &waiting {
        assert!(!t.is_finished(), "{what} waits for its volume's commit");
    }

    // Another volume answers: lookup, getattr, listing, an open that
    // starts it, a write, a read, and its commit.
    let mnt = m.mnt.clone();
    must_return("lookup and getattr of another volume", dev, move || {
        assert_eq!(
            std::fs::metadata(mnt.join("appvms/free/c-dirty.img"))
                .unwrap()
                .len(),
            MIB
        );
        assert_eq!(
            std::fs::metadata(mnt.join("appvms/free/c.img"))
                .unwrap()
                .len(),
            MIB
        );
    });
    let mnt = m.mnt.clone();
    must_return("ls -l of another VM", dev, move || {
        run_ok(Command::new("ls").arg("-l").arg(mnt.join("appvms/free")));
    });
    let c = m.path("appvms/free/c-dirty.img");
    must_return(
        "an open (a start), write and read of another volume",
        dev,
        move || {
            let f = open_rw(&c);
            f.write_all_at(&pattern(6, 4096), 0).unwrap();
            assert_eq!(read_at(&f, 0, 4096), pattern(6, 4096));
        },
    );
    let img = m.path("appvms/free/c.img");
    must_return("a read of another volume's N.img", dev, move || {
        read_at(&File::open(&img).unwrap(), 0, 4096);
    });
    for (what, t) in &waiting {
        assert!(!t.is_finished(), "{what} still waits");
    }

    // The commits go on, and every waiting request completes.
    File::create(&gate).unwrap();
    for (what, t) in waiting {
        must_return(&what.clone(), dev, move || t.join().unwrap())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    m.wait_stopped("appvms/ra/pause-dirty.img");
    m.wait_stopped("appvms/rb/pause-dirty.img");
    m.wait_stopped("appvms/free/c-dirty.img");
    // A: reverted to the target, the victim gone, and the 2 MiB image made
    // by the truncate is N.img or (reverted from) a revision.
    assert_eq!(first("pause.img"), pattern(1, 4096));
    let now = revision_files(&m.pool, "appvms/ra/pause");
    assert!(now.contains(&target) && !now.contains(&victim), "{now:?}");
    let sizes: Vec<u64> = now
        .iter()
        .chain([&"pause.img".to_owned()])
        .map(|n| {
            std::fs::metadata(m.path(&format!("appvms/ra/{n}")))
                .unwrap()
                .len()
        })
        .collect();
    assert!(sizes.contains(&(2 * MIB)), "{now:?}: {sizes:?}");
    assert_eq!(
        read_committed(&m.pool, &vid("appvms/rb/pause"), 0, 4096),
        pattern(5, 4096)
    );
    assert_eq!(
        std::fs::metadata(m.path("appvms/rb/pause.img"))
            .unwrap()
            .len(),
        2 * MIB
    );
    assert_eq!(
        read_committed(&m.pool, &vid("appvms/free/c"), 0, 4096),
        pattern(6, 4096)
    );
    m.unmount();
}

/// A read-only control request (`status`, `volume info`, `volume list`)
/// does not wait for the mount's pending invalidations. Here one is stuck:
/// an unlink of a revision of A waits in the daemon for A's commit (held
/// by a failpoint) while the kernel holds A's VM directory locked for it,
/// and the commit of B, A's sibling in that directory (its file opened
/// before, its committed image looked up), queues an entry invalidation
/// that waits for that lock.
/// Before, every control reply waited behind it (qubesd's polls too),
/// until A's commit ended. A request that changes a volume (`volume set`)
/// waits for them 2 s at most.
#[test]
fn control_requests_do_not_wait_for_a_stuck_invalidation() {
    need!(require_failpoints());
    let (m, gate) = held_at_a_gate(
        "pause.commit",
        "live-barrier",
        &["appvms/x/pause", "appvms/x/b"],
        10,
        4,
        true,
    );
    let dev = m.dev();
    let a = m.path("appvms/x/pause-dirty.img");
    for tag in 1..=2 {
        write_until(&a, &pattern(tag, 4096), "stopped");
    }
    let victim = m.path(&format!(
        "appvms/x/{}",
        revision_files(&m.pool, "appvms/x/pause")[0]
    ));
    // B runs; no lookup in the directory is made once the unlink waits
    // (it would wait for the directory's lock too).
    let b = open_rw(&m.path("appvms/x/b-dirty.img"));
    // The kernel knows B's committed image: B's commit drops its entry.
    std::fs::metadata(m.path("appvms/x/b.img")).unwrap();
    // A's commit stays held from now on; the unlink waits for it.
    std::fs::remove_file(&gate).unwrap();
    write_until(&a, &pattern(3, 4096), "committing");
    let unlink = std::thread::spawn(move || std::fs::remove_file(&victim));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!unlink.is_finished(), "the unlink waits for A's commit");
    // B commits; its entry invalidations wait for the directory's lock.
    b.write_all_at(&pattern(4, 4096), 0).unwrap();
    drop(b);

    let pool = m.pool.clone();
    let (status, list) = must_return("read-only control requests", dev, move || {
        wait_for("B to stop", 60, || {
            rf_json(&pool, ["volume", "info", "appvms/x/b"])["state"] == "stopped"
        });
        (
            rf_json(&pool, ["status"]),
            rf_json(&pool, ["volume", "list"]),
        )
    });
    assert_eq!(status["mounted"], true, "{status}");
    assert!(list.to_string().contains("appvms/x/b"), "{list}");
    // A request that changes something waits for them, but not without
    // bound: it answers, and the log says why the wait was cut short.
    let pool = m.pool.clone();
    let set = must_return("a changing control request", dev, move || {
        rf_json(&pool, "volume set appvms/x/b revisions_to_keep 3")
    });
    assert_eq!(set["value"], "3", "{set}");
    let log = daemon_log(&m.pool);
    assert!(
        log.contains("answering before the mount dropped every name"),
        "{log}"
    );

    File::create(&gate).unwrap();
    must_return("the unlink once A's commit ends", dev, move || {
        unlink.join().unwrap().unwrap();
    });
    m.wait_stopped("appvms/x/pause-dirty.img");
    m.unmount();
}

/// More volumes wait at once than the waiting pool keeps idle threads
/// (here 10, each with an open whose start waits, held by a failpoint):
/// another volume's open, which starts it, still gets a thread at once.
/// Before, the pool had 8 threads at most, and that open waited for a
/// turn until one of the held starts ended.
#[test]
fn an_open_never_waits_for_a_turn_behind_volumes_that_wait() {
    need!(require_failpoints());
    let held: Vec<String> = (0..10).map(|i| format!("appvms/v{i}/pause")).collect();
    let mut vols: Vec<&str> = held.iter().map(String::as_str).collect();
    vols.push("appvms/free/c");
    let (m, gate) = held_at_a_gate("pause.start", "live-turns", &vols, 1, 2, false);
    let dev = m.dev();
    let dirty = |v: &str| m.path(&format!("{v}-dirty.img"));
    let mut waiting = Vec::new();
    for v in &held {
        let p = dirty(v);
        waiting.push(std::thread::spawn(move || open_rw(&p).sync_all()));
        wait_for(&format!("{v} to be starting"), 60, || {
            xattr(&dirty(v), "user.reflinkfs.state").as_deref() == Some("starting")
        });
    }
    for t in &waiting {
        assert!(!t.is_finished(), "an open waits for its volume's start");
    }
    let c = dirty("appvms/free/c");
    must_return("an open (a start) of another volume", dev, move || {
        let f = open_rw(&c);
        f.write_all_at(&pattern(9, 4096), 0).unwrap();
        assert_eq!(read_at(&f, 0, 4096), pattern(9, 4096));
    });
    File::create(&gate).unwrap();
    must_return("the waiting opens once the starts end", dev, move || {
        for t in waiting {
            t.join().unwrap().unwrap();
        }
    });
    for v in held.iter().map(String::as_str).chain(["appvms/free/c"]) {
        m.wait_stopped(&format!("{v}-dirty.img"));
    }
    m.unmount();
}

/// The daemon opens the VM directories it keeps for lookups before it
/// mounts, so no request waits while thousands are opened: they are open
/// before the first lookup. Before, the first lookup opened them all while
/// every other request that needed one waited for it.
#[test]
fn the_kept_vm_directories_are_opened_before_the_first_lookup() {
    let vids: Vec<String> = (0..20).map(|i| format!("appvms/vm{i}/private")).collect();
    let vols: Vec<&str> = vids.iter().map(String::as_str).collect();
    let m = pool_keeping(&xfs(), "live-kept-dirs", 1, &vols, "", &[]);
    let pool = std::fs::canonicalize(&m.pool).unwrap();
    let fds = format!("/proc/{}/fd", m.daemon_pid());
    let kept: Vec<PathBuf> = std::fs::read_dir(&fds)
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|p| {
            p.starts_with(pool.join("appvms"))
                && p.components().count() == pool.components().count() + 2
        })
        .collect();
    assert_eq!(kept.len(), 20, "kept before any lookup: {kept:?}");
    std::fs::metadata(m.path("appvms/vm3/private.img")).unwrap();
    m.unmount();
}
