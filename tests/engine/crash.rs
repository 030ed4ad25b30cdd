//! Crash tests: for every failpoint, a child process aborts there (SIGABRT,
//! no destructors run), the pool is reopened, and recovery must leave the
//! latest committed data whole (old or new), no temporary files, no
//! duplicate revisions, and a volume that starts and stops.

use crate::common;

use common::*;
use reflinkfs::engine::failpoint;
use reflinkfs::engine::{CreateOptions, Pool, Property, StopOutcome, ValidVid};
use reflinkfs::error::Cause;
use std::any::Any;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::Duration;

const ENV_POOL: &str = "REFLINKFS_CRASH_POOL";
const ENV_SIDE: &str = "REFLINKFS_CRASH_SIDE";
const V: &str = "appvms/vm/private";
const W: &str = "appvms/other/private";
const NEW_VOL: &str = "appvms/new/private";

/// Content the child tries to commit, and the source the import reads.
fn new_content() -> Vec<u8> {
    pattern(0xB0, MIB as usize)
}

fn old_content() -> Vec<u8> {
    pattern(0xA0, MIB as usize)
}

fn clone_content() -> Vec<u8> {
    pattern(0xC0, MIB as usize)
}

/// The operation a failpoint belongs to.
fn op_of(fp: &str) -> &str {
    fp.split('.').next().unwrap()
}

/// Runs in the child: does the operation of the armed failpoint, which
/// must abort before it returns.
fn child_main(pool_path: &Path, fp: &str, side: &Path) {
    let pool = Pool::open(pool_path).expect("child: open pool");
    let v = vid(V);
    match op_of(fp) {
        "create" => pool
            .create(&vid(NEW_VOL), &CreateOptions::origin(MIB))
            .unwrap(),
        "start" => {
            pool.start(&v).unwrap();
        }
        "commit" | "prune" | "precache" => {
            let f = pool.start(&v).unwrap();
            write_at(&f, 0, &new_content());
            drop(f);
            pool.stop(&v).unwrap();
        }
        "revert" => {
            pool.revert(&v, Some("1")).unwrap();
        }
        "resize" => {
            pool.resize(&v, 2 * MIB, false).unwrap();
        }
        "import" => {
            let src = File::open(side).unwrap();
            pool.import(&v, &src, None).unwrap();
        }
        "clone" => pool.clone_volume(&vid(W), &pool, &v).unwrap(),
        "set" => pool.set(&v, Property::RevisionsToKeep(1)).unwrap(),
        "pending" => {
            // Changes the stop must drop: never to be seen after recovery.
            let f = pool.start(&v).unwrap();
            write_at(&f, 0, &new_content());
            f.sync_all().unwrap();
            drop(f);
            pool.discard_changes(&v).unwrap();
            pool.stop(&v).unwrap();
        }
        other => panic!("no crash scenario for operation {other}"),
    }
    eprintln!("child: {fp} was not reached");
    std::process::exit(0);
}

/// The entry point of the child processes (not a test by itself).
#[test]
#[ignore = "entry point of the crash tests' child processes"]
fn crash_child() {
    let pool = std::env::var(ENV_POOL).expect("run by crash tests only");
    let fp = std::env::var(failpoint::ENV).expect("a failpoint is armed");
    let side = std::env::var(ENV_SIDE).unwrap_or_default();
    child_main(Path::new(&pool), &fp, Path::new(&side));
}

/// A pool where V has committed `old_content` with revision 1 (the empty
/// image) kept, and W holds `clone_content`.
fn setup(fs: &TestFs, fp: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (pool, path) = new_pool_with(fs, &format!("crash-{fp}"), 3);
    let v = create_origin(&pool, V, MIB);
    write_cycle(&pool, &v, 0, &old_content());
    let w = create_origin(&pool, W, MIB);
    write_cycle(&pool, &w, 0, &clone_content());
    if op_of(fp) == "prune" {
        // The child's commit must prune one revision, and never the pinned
        // revision 1.
        write_cycle(&pool, &v, 0, &old_content());
        pool.pin_revision(&v, "1", Some("kept".into())).unwrap();
        pool.set(&v, Property::RevisionsToKeep(1)).unwrap();
    }
    let side = path.parent().unwrap().join("import-source.img");
    std::fs::write(&side, new_content()).unwrap();
    (path, side)
}

/// The committed content V may have after a crash at `fp`: the old, or the
/// new that the operation was making.
fn acceptable(fp: &str) -> Vec<Vec<u8>> {
    let old = old_content();
    let mut grown = old.clone();
    grown.resize(2 * MIB as usize, 0);
    let new = match op_of(fp) {
        "commit" | "prune" | "precache" | "import" => new_content(),
        "revert" => vec![0u8; MIB as usize],
        // A queued discard: the run's writes never survive.
        "pending" => old.clone(),
        "resize" => grown,
        "clone" => clone_content(),
        _ => old.clone(),
    };
    vec![old, new]
}

fn check_after_crash(fs: &TestFs, fp: &str, path: &Path) {
    let ctx = format!("[{}] failpoint {fp}", fs.name);
    let pool = Pool::open(path).unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
    let v = vid(V);

    // Latest committed data intact: whole old or whole new.
    let img =
        std::fs::read(image_path(path, &v)).unwrap_or_else(|e| panic!("{ctx}: no image: {e}"));
    let ok = acceptable(fp);
    assert!(
        ok.contains(&img),
        "{ctx}: the committed image is neither the old nor the new content (len {})",
        img.len()
    );
    assert_eq!(
        pool.info(&v).unwrap().size,
        img.len() as u64,
        "{ctx}: config size follows the image"
    );

    // No temporary files, no leftovers, no duplicate revisions.
    for vol in [&v, &vid(W), &vid(NEW_VOL)] {
        for f in files_of(path, vol) {
            assert!(
                !f.contains('~') && !f.ends_with("-import.img") && !f.ends_with("-dirty.img"),
                "{ctx}: leftover {f}"
            );
        }
    }
    let img_ino = std::fs::metadata(image_path(path, &v)).unwrap().ino();
    let revs = pool.revisions(&v).unwrap();
    let mut inos = Vec::new();
    for r in &revs {
        let ino = std::fs::metadata(vm_dir(path, &v).join(&r.file_name))
            .unwrap()
            .ino();
        // A revert links the revision it goes back to: that one may be the
        // committed image's file; no other may.
        if !(op_of(fp) == "revert" && r.file_name.starts_with("private.img.1@")) {
            assert_ne!(
                ino, img_ino,
                "{ctx}: revision {} is the committed image",
                r.id
            );
        }
        inos.push(ino);
    }
    inos.sort();
    inos.dedup();
    assert_eq!(inos.len(), revs.len(), "{ctx}: two revisions share a file");
    // Recovery finishes the prune an interrupted operation skipped; only a
    // revert keeps one more, the revision it went back to.
    let info = pool.info(&v).unwrap();
    let keep = info.revisions_to_keep;
    let extra = i64::from(op_of(fp) == "revert");
    let unpinned = revs.iter().filter(|r| r.pin.is_none()).count();
    assert!(
        unpinned as i64 <= keep + extra,
        "{ctx}: {unpinned} unpinned revisions with revisions_to_keep={keep}"
    );
    if op_of(fp) == "prune" {
        let first = revs.first().expect("the pinned revision");
        assert_eq!(
            (first.id.to_string(), first.pin.is_some()),
            ("1".into(), true),
            "{ctx}: the pinned revision survives the prune"
        );
    }
    assert_eq!(info.pending, None, "{ctx}: a queued change is done");
    let problems = pool.check(None).unwrap();
    let real: Vec<_> = problems
        .iter()
        .filter(|p| !(op_of(fp) == "create" && p.problem.contains("no volume owns")))
        .collect();
    assert!(real.is_empty(), "{ctx}: check found {real:?}");

    // A reflink pool has a precache of the committed image again, and
    // the next start runs it; copy mode keeps none.
    let pc = vm_dir(path, &v).join("private-precache.img");
    let pc_ino = std::fs::metadata(&pc).ok().map(|m| m.ino());
    assert_eq!(
        pc_ino.is_some(),
        fs.reflink,
        "{ctx}: precache after recovery"
    );

    // The next start and stop work and commit.
    let f = pool
        .start(&v)
        .unwrap_or_else(|e| panic!("{ctx}: start after crash: {e}"));
    if let Some(i) = pc_ino {
        assert_eq!(f.metadata().unwrap().ino(), i, "{ctx}: started from it");
    }
    assert_eq!(
        read_at(&f, 0, img.len()),
        img,
        "{ctx}: the committed data runs"
    );
    write_at(&f, 4096, &pattern(0xD0, 4096));
    drop(f);
    assert!(
        matches!(pool.stop(&v).unwrap(), StopOutcome::Committed { .. }),
        "{ctx}"
    );
    assert_eq!(
        read_committed(path, &v, 4096, 4096),
        pattern(0xD0, 4096),
        "{ctx}"
    );
    // A volume whose creation crashed can be created (stale files go).
    if op_of(fp) == "create" && pool.info(&vid(NEW_VOL)).is_err() {
        pool.create(&vid(NEW_VOL), &CreateOptions::origin(MIB))
            .unwrap();
    }
    let n = vid(NEW_VOL);
    if pool.info(&n).is_ok() {
        write_cycle(&pool, &n, 0, b"works");
    }
}

#[test]
fn every_failpoint_recovers() {
    need!(require_failpoints());
    let exe = std::env::current_exe().unwrap();
    let mut exercised = 0usize;
    let mut names = std::collections::BTreeSet::new();
    for fs in filesystems() {
        for fp in failpoint::ALL {
            if op_of(fp) == "precache" && !fs.reflink {
                // Copy mode keeps no precache: the point is never reached.
                continue;
            }
            let (path, side) = setup(&fs, fp);
            let out = Command::new(&exe)
                .args([
                    "--exact",
                    "crash::crash_child",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ENV_POOL, &path)
                .env(ENV_SIDE, &side)
                .env(failpoint::ENV, fp)
                .env("RUST_LOG", "warn")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGABRT),
                "[{}] the child did not abort at {fp}: {:?}\nstdout: {}\nstderr: {stderr}",
                fs.name,
                out.status,
                String::from_utf8_lossy(&out.stdout)
            );
            assert!(
                stderr.contains(&format!("failpoint {fp} reached")),
                "[{}] {fp}: {stderr}",
                fs.name
            );
            check_after_crash(&fs, fp, &path);
            exercised += 1;
            names.insert(*fp);
        }
    }
    println!(
        "crash tests: exercised {} failpoints ({} distinct) on {} filesystem(s)",
        exercised,
        names.len(),
        filesystems().len()
    );
    assert_eq!(names.len(), failpoint::ALL.len());
}

/// Issue 18: recovery walks `/sys/block` (every loop device's backing
/// file) once, however many volumes have a leftover dirty image. Before,
/// it walked it once per such volume: 24 volumes took 24 walks.
#[test]
fn recovery_scans_loop_devices_once_for_all_leftover_dirty_images() {
    let (pool, path) = new_pool(&xfs(), "recovery-scans");
    let vids: Vec<_> = (0..24)
        .map(|i| create_origin(&pool, &format!("appvms/vm{i}/private"), 1 << 20))
        .collect();
    drop(pool);
    // What a crash of a daemon with every volume running leaves.
    for v in &vids {
        let dirty = vm_dir(&path, v).join(format!("{}-dirty.img", v.name()));
        std::fs::copy(image_path(&path, v), &dirty).unwrap();
        write_at(
            &File::options().write(true).open(&dirty).unwrap(),
            0,
            &new_content(),
        );
    }
    let before = reflinkfs::sys::loop_backing_scans();
    let pool = Pool::open(&path).unwrap();
    let scans = reflinkfs::sys::loop_backing_scans() - before;
    assert_eq!(
        scans, 1,
        "recovery of 24 leftover dirty images walked /sys/block {scans} times"
    );
    for v in &vids {
        assert!(!vm_dir(&path, v)
            .join(format!("{}-dirty.img", v.name()))
            .exists());
        assert_eq!(
            read_committed(&path, v, 0, new_content().len()),
            new_content()
        );
    }
    drop(pool);
}

/// Runs `f` with the pool and the volume on a thread of its own and gives
/// its result, or fails after 60 s: a volume left starting or committing
/// makes the next call wait for ever. The thread is detached, so that a
/// stuck call fails the test instead of hanging it.
fn with_deadline<T: Send + 'static>(
    what: &str,
    pool: &Arc<Pool>,
    v: &ValidVid,
    f: impl FnOnce(&Pool, ValidVid) -> T + Send + 'static,
) -> T {
    let (pool, v) = (Arc::clone(pool), v.clone());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(|| f(&pool, v))));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(out)) => out,
        Ok(Err(panic)) => panic!("{what} panicked: {}", panic_text(&*panic)),
        Err(_) => panic!("{what} waits for ever: the volume is stuck"),
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("?")
}

type PanicHook = Box<dyn Fn(&std::panic::PanicHookInfo) + Sync + Send>;

/// Silences the panics the test provokes at failpoints until dropped, and
/// then puts back the panic hook before, also when the test fails. Other
/// panics (a failed assertion, another test's) go to the hook before.
struct QuietFailpoints(Option<Arc<PanicHook>>);

impl QuietFailpoints {
    fn new() -> QuietFailpoints {
        let before: Arc<PanicHook> = Arc::new(std::panic::take_hook());
        let others = Arc::clone(&before);
        std::panic::set_hook(Box::new(move |info| {
            if !panic_text(info.payload()).starts_with("failpoint ") {
                others(info)
            }
        }));
        QuietFailpoints(Some(before))
    }
}

impl Drop for QuietFailpoints {
    fn drop(&mut self) {
        let before = self.0.take().unwrap();
        // set_hook refuses a panicking thread (a failed assertion
        // unwinding through here): another thread puts it back.
        let _ = std::thread::spawn(move || {
            std::panic::set_hook(Box::new(move |info| before(info)));
        })
        .join();
    }
}

/// Issue 18: a panic in a start's or a stop's I/O puts the volume back
/// instead of leaving it starting or committing until the process
/// restarts: a start to stopped, a stop to its run, held, until a retry
/// commits it (after 3 in a row, to stopped). Nothing is lost, and it
/// starts, takes writes and commits again. Before, every later start or
/// stop waited for ever; then a panicked stop said "stopped" although
/// its run was not committed.
#[test]
fn a_panic_in_a_start_or_a_stop_leaves_the_volume_usable() {
    need!(require_failpoints());
    let (pool, path) = new_pool(&xfs(), "panic-phases");
    let pool = Arc::new(pool);
    let v = create_origin(&pool, "appvms/panic/private", 1 << 20);
    let dirty = vm_dir(&path, &v).join(format!("{}-dirty.img", v.name()));
    let quiet = QuietFailpoints::new();

    failpoint::panic_once("start.io", &v.to_string());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.start(&v)));
    assert!(r.is_err(), "the start did not panic");
    assert!(!dirty.exists(), "the half-made dirty image stayed");
    with_deadline("a start after a panicked start", &pool, &v, |pool, v| {
        let f = pool.start(&v).unwrap();
        write_at(&f, 0, &pattern(1, 4096));
        f.sync_all().unwrap();
    });

    failpoint::panic_once("stop.io", &v.to_string());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.stop(&v)));
    assert!(r.is_err(), "the stop did not panic");
    assert!(dirty.exists(), "the dirty image of a panicked stop is gone");
    // Not committed, so not stopped: the run is held, and it cannot start
    // meanwhile. Whatever waits for the stop (qubesd's stop()) waits for
    // the daemon's held retry, a stop, which commits the run.
    let snap = pool.snapshot(&v).unwrap();
    assert!(snap.held.is_some(), "a panicked stop is not held");
    let e = pool.start(&v).unwrap_err();
    assert_eq!(e.cause(), Some(Cause::Held), "{e}");
    let (p, w) = (Arc::clone(&pool), v.clone());
    let waiter = std::thread::spawn(move || p.wait_stopped(&w, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!waiter.is_finished(), "a wait for the stop did not wait");
    let retried = with_deadline("the retry of a panicked stop", &pool, &v, |pool, v| {
        matches!(pool.stop(&v).unwrap(), StopOutcome::Committed { .. })
    });
    assert!(retried);
    with_deadline("the wait for the stop", &pool, &v, move |_, _| {
        waiter.join().unwrap().unwrap()
    });
    assert!(pool.held_vids().is_empty(), "still in the held set");
    assert!(
        read_committed(&path, &v, 0, 4096) == pattern(1, 4096),
        "the first run's write is lost"
    );
    // A stop that panics every time: after 3 in a row the volume is put
    // back to stopped (the daemon can exit), its dirty image kept; the
    // next start commits it, and its own run commits as usual.
    let f = pool.start(&v).unwrap();
    write_at(&f, 8192, &pattern(2, 4096));
    drop(f);
    for round in 1..=3 {
        failpoint::panic_once("stop.io", &v.to_string());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.stop(&v)));
        assert!(r.is_err(), "stop {round} did not panic");
        let held = pool.snapshot(&v).unwrap().held.is_some();
        assert_eq!(held, round < 3, "after panicked stop {round}");
    }
    assert!(dirty.exists(), "the dirty image of a panicked stop is gone");
    assert!(pool.held_vids().is_empty(), "still in the held set");
    drop(quiet);
    let committed = with_deadline("a start after panicked stops", &pool, &v, |pool, v| {
        let f = pool.start(&v).unwrap();
        assert!(read_at(&f, 8192, 4096) == pattern(2, 4096));
        write_at(&f, 16384, &pattern(3, 4096));
        drop(f);
        matches!(pool.stop(&v).unwrap(), StopOutcome::Committed { .. })
    });
    assert!(committed);
    for (at, tag) in [(0, 1), (8192, 2), (16384, 3)] {
        assert!(
            read_committed(&path, &v, at, 4096) == pattern(tag, 4096),
            "the write at {at} is lost"
        );
    }
}
