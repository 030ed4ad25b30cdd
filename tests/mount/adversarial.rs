//! What a hostile or careless user did to a mount (issue 9), each kept as
//! a regression test on real mounts:
//!
//! - writes and fallocate past a volume's end, in both I/O modes: the size
//!   is the volume's contract, and nothing a client does through the mount
//!   wedges the volume or changes its size;
//! - writers that outlive their file: a loop device across a daemon crash,
//!   a loop device across `umount -f`, and a shared mapping that outlives
//!   its descriptor. `N.img` never changes after its commit: the dirty
//!   image is committed only once the writer has let go (the volume is
//!   "held" until then);
//! - planted symlinks in `.reflinkfs/`, which neither the daemon nor the
//!   CLI follows;
//! - a sibling volume whose name starts like a revision of another;
//! - recovery finishes the prune a crash interrupted;
//! - a start that fails reports EIO, not EROFS;
//! - `status` after `umount -l`; a loop device across `umount -l`, and an
//!   unmount with a held volume, which the daemon waits to commit.

use crate::common;

use common::cli::*;
use common::mount::*;
use common::*;
use reflinkfs::engine::Pool;
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const V: &str = "c/v/n";
const DIRTY: &str = "c/v/n-dirty.img";
const SIZE: u64 = MIB;

/// A pool with volume `c/v/n` of [`SIZE`] bytes holding `initial` at 0,
/// mounted with `opts`.
fn mounted(fs: &TestFs, test: &str, opts: &str, initial: &[u8]) -> Mounted {
    let path = prepared_pool(fs, test, 1, |pool| {
        let v = create_origin(pool, V, SIZE);
        if !initial.is_empty() {
            write_cycle(pool, &v, 0, initial);
        }
    });
    Mounted::beside(&path, opts)
}

fn image(pool: &Path) -> PathBuf {
    pool.join("c/v/n.img")
}

fn hash_of(path: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    std::fs::read(path).unwrap().hash(&mut h);
    h.finish()
}

fn volume_json(pool: &Path, vid: &str) -> serde_json::Value {
    rf_json(pool, ["volume", "info", vid])
}

#[track_caller]
fn check_clean(pool: &Path, ctx: &str) {
    succeeded(&rf(pool, "pool check"), &format!("{ctx}: pool check"));
}

// ---------------------------------------------------------------------------
// Writes past the end.

/// The three reproductions of the report, and a write that straddles the
/// end: the volume keeps its size, commits, and opens again.
fn past_the_end_case(fs: &TestFs, opts: &str) {
    let passthrough = opts.is_empty();
    let ctx = format!(
        "[{} {}]",
        fs.name,
        if passthrough {
            "passthrough"
        } else {
            "daemon mode"
        }
    );
    let m = mounted(fs, "past-end", opts, &pattern(1, 4096));
    let dirty = m.path(DIRTY);
    let cases: [(&str, String); 3] = [
        (
            "an unaligned write at the end",
            format!(
                "printf x | dd of={} bs=1 seek={SIZE} conv=notrunc status=none",
                dirty.display()
            ),
        ),
        (
            "an aligned write past the end",
            format!(
                "dd if=/dev/zero of={} bs=4096 seek={} count=16 conv=notrunc status=none",
                dirty.display(),
                SIZE / 4096 + 3
            ),
        ),
        (
            "fallocate past the end",
            format!("fallocate -o {SIZE} -l 4096 {}", dirty.display()),
        ),
    ];
    for (what, cmd) in cases {
        let out = run(Command::new("sh").args(["-c", &cmd]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let daemon_sees_it = !passthrough || what.starts_with("fallocate");
        if daemon_sees_it {
            assert!(!out.status.success(), "{ctx} {what} must fail");
            assert!(
                stderr.contains("File too large"),
                "{ctx} {what}: EFBIG expected: {stderr}"
            );
        } else {
            assert!(out.status.success(), "{ctx} {what}: {stderr}");
        }
        m.wait_stopped(DIRTY);
        let info = volume_json(&m.pool, V);
        assert_eq!(info["size"], SIZE, "{ctx} {what}: the volume's size");
        assert_eq!(
            std::fs::metadata(image(&m.pool)).unwrap().len(),
            SIZE,
            "{ctx} {what}: N.img's size"
        );
        assert_eq!(
            std::fs::metadata(&dirty).unwrap().len(),
            SIZE,
            "{ctx} {what}: the size the mount shows"
        );
        // It opens again, and a write inside still works.
        m.write_and_close(DIRTY, 4096, b"inside");
        assert_eq!(
            read_at(&File::open(image(&m.pool)).unwrap(), 4096, 6),
            b"inside"
        );
    }
    // A write that starts inside and ends outside: the daemon cuts it short
    // at the end (as a file size limit does); passthrough writes it all and
    // the stop cuts the image back.
    let f = open_rw(&dirty);
    let n = f.write_at(&pattern(7, 8192), SIZE - 4096).unwrap();
    assert_eq!(
        n,
        if passthrough { 8192 } else { 4096 },
        "{ctx}: straddling write"
    );
    drop(f);
    m.wait_stopped(DIRTY);
    let img = File::open(image(&m.pool)).unwrap();
    assert_eq!(img.metadata().unwrap().len(), SIZE, "{ctx}");
    assert_eq!(
        read_at(&img, SIZE - 4096, 4096),
        pattern(7, 8192)[..4096],
        "{ctx}"
    );
    if passthrough {
        let log = daemon_log(&m.pool);
        assert!(
            log.contains("bytes written past the end of the volume"),
            "{ctx}: the cut is logged: {log}"
        );
    }
    check_clean(&m.pool, &ctx);
    m.unmount();
}

#[test]
fn writes_past_the_end_never_wedge_or_grow_a_volume() {
    for fs in mount_filesystems(&["dd", "fallocate"]) {
        past_the_end_case(&fs, "");
        past_the_end_case(&fs, "passthrough=off");
    }
}

/// A passthrough write past the end, then a crash before the stop: the
/// next mount's recovery cuts the image back and commits it.
#[test]
fn recovery_cuts_back_a_dirty_image_grown_past_the_end() {
    for fs in mount_filesystems(&["losetup"]) {
        let ctx = format!("[{}]", fs.name);
        let m = mounted(&fs, "past-end-crash", "", &[]);
        let f = open_rw(&m.path(DIRTY));
        f.write_all_at(&pattern(3, 4096), 0).unwrap();
        f.write_all_at(b"x", SIZE + 100).unwrap();
        f.sync_all().unwrap();
        m.kill_daemon();
        drop(f);
        let (pool, mnt) = (m.pool.clone(), m.mnt.clone());
        drop(m.dead());
        assert_eq!(
            std::fs::metadata(pool.join("c/v/n-dirty.img"))
                .unwrap()
                .len(),
            SIZE + 101,
            "{ctx}: the backing file grew"
        );
        let m = Mounted::mount(&pool, &mnt, "");
        let img = File::open(image(&pool)).unwrap();
        assert_eq!(img.metadata().unwrap().len(), SIZE, "{ctx}");
        assert_eq!(read_at(&img, 0, 4096), pattern(3, 4096), "{ctx}");
        assert!(
            daemon_log(&pool).contains("bytes written past the end"),
            "{ctx}"
        );
        m.write_and_close(DIRTY, 0, b"again");
        check_clean(&pool, &ctx);
        m.unmount();
    }
}

// ---------------------------------------------------------------------------
// Writers that outlive their file.

/// A writer on a loop device, going on until told to stop; returns the
/// content it left in each block it wrote.
struct LoopWriter {
    stop: Arc<AtomicBool>,
    writes: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<BTreeMap<u64, Vec<u8>>>>,
}

/// A test that fails midway still stops the writer, so its loop device
/// can go.
impl Drop for LoopWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl LoopWriter {
    fn start(dev: &str) -> LoopWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let dev = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dev)
            .unwrap();
        let (st, wr) = (stop.clone(), writes.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = Aligned::new(4096);
            let mut model = BTreeMap::new();
            let mut i = 0u64;
            while !st.load(Ordering::SeqCst) {
                let block = (i * 7) % (SIZE / 4096);
                let data = pattern((i % 251) as u8 ^ 0x5a, 4096);
                buf.bytes().copy_from_slice(&data);
                dev.write_all_at(buf.bytes(), block * 4096).unwrap();
                model.insert(block, data);
                wr.fetch_add(1, Ordering::SeqCst);
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            model
        });
        LoopWriter {
            stop,
            writes,
            thread: Some(thread),
        }
    }

    fn count(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    fn finish(mut self) -> BTreeMap<u64, Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Watches `N.img` for `secs` while the writer keeps writing: its content
/// must not change, and the writer must have written meanwhile.
fn stays_fixed(img: &Path, secs: u64, writer_progress: impl Fn() -> u64, ctx: &str) {
    let h0 = hash_of(img);
    let ino0 = std::fs::metadata(img).unwrap().ino();
    let w0 = writer_progress();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            hash_of(img),
            h0,
            "{ctx}: N.img changed under a stale writer"
        );
        assert_eq!(std::fs::metadata(img).unwrap().ino(), ino0, "{ctx}");
    }
    assert!(
        writer_progress() > w0 + 10,
        "{ctx}: the stale writer did not write while N.img was watched"
    );
}

/// The committed image holds what the writer left in every block it wrote.
fn holds_model(img: &Path, model: &BTreeMap<u64, Vec<u8>>, ctx: &str) {
    let f = File::open(img).unwrap();
    assert_eq!(f.metadata().unwrap().len(), SIZE, "{ctx}");
    for (block, data) in model {
        assert_eq!(
            &read_at(&f, block * 4096, 4096),
            data,
            "{ctx}: block {block}"
        );
    }
}

/// A mount of `c/v/n` (committed once), a loop device on its dirty image,
/// and a writer on that, writing; dropped in the reverse order.
fn loop_writer_on(fs: &TestFs, test: &str) -> (Mounted, Loop, LoopWriter) {
    let m = mounted(fs, test, "", &pattern(9, 4096));
    let lo = Loop::attach(&m.path(DIRTY), false, None);
    let writer = LoopWriter::start(&lo.dev);
    wait_for("the writer", 10, || writer.count() > 5);
    (m, lo, writer)
}

fn state_on(path: &Path) -> Option<String> {
    xattr(path, "user.reflinkfs.state")
}

#[test]
fn a_loop_device_that_outlives_a_crashed_daemon_never_changes_a_committed_image() {
    for fs in mount_filesystems(&["losetup"]) {
        let ctx = format!("[{}] crash + remount", fs.name);
        let (m, lo, writer) = loop_writer_on(&fs, "stale-crash");
        m.kill_daemon();
        let (pool, mnt) = (m.pool.clone(), m.mnt.clone());
        drop(m.dead());

        let m = Mounted::mount(&pool, &mnt, "");
        assert!(
            daemon_log(&pool).contains("still open for writing"),
            "{ctx}: recovery says why it does not commit"
        );
        assert_eq!(state_on(&m.path(DIRTY)).as_deref(), Some("held"), "{ctx}");
        let e = open_rw_error(&m.path(DIRTY));
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EBUSY),
            "{ctx}: a held volume cannot start"
        );
        let status = rf_json(&pool, "status");
        assert_eq!(status["held"][0], V, "{ctx}: {status}");
        stays_fixed(&image(&pool), 5, || writer.count(), &ctx);

        // The writer lets go: the daemon commits what it left.
        let model = writer.finish();
        lo.detach();
        m.wait_stopped(DIRTY);
        holds_model(&image(&pool), &model, &ctx);
        assert!(!pool.join("c/v/n-dirty.img").exists(), "{ctx}");
        check_clean(&pool, &ctx);
        m.unmount();
    }
}

#[test]
fn a_loop_device_that_outlives_umount_f_never_changes_a_committed_image() {
    for fs in mount_filesystems(&["losetup"]) {
        let ctx = format!("[{}] umount -f", fs.name);
        let (m, lo, writer) = loop_writer_on(&fs, "stale-umount-f");
        let pid = m.daemon_pid() as u32;
        // The mount is busy (the loop device), so umount -f fails, but it
        // aborts the connection: the session ends, and the daemon waits
        // for the loop device to let go of the volume.
        let _ = run(Command::new("umount").arg("-f").arg(&m.mnt));
        let (pool, mnt) = (m.pool.clone(), m.mnt.clone());
        let dead = m.dead();
        wait_for("the daemon to wait for the held volume", 30, || {
            rf_json(&pool, "status")["waiting_for"] == serde_json::json!([V])
        });
        assert!(
            daemon_log(&pool).contains("still open for writing"),
            "{ctx}: the shutdown says why it does not commit: {}",
            daemon_log(&pool)
        );
        assert!(pool.join("c/v/n-dirty.img").exists(), "{ctx}");
        assert_eq!(volume_json(&pool, V)["state"], "held", "{ctx}");
        stays_fixed(&image(&pool), 5, || writer.count(), &ctx);

        // The loop device lets go: the daemon commits what it wrote, and
        // only then exits.
        let model = writer.finish();
        lo.detach();
        wait_for("the daemon to exit", 60, || {
            !reflinkfs::sys::process_running(pid)
        });
        holds_model(&image(&pool), &model, &ctx);
        assert!(!pool.join("c/v/n-dirty.img").exists(), "{ctx}");
        drop(dead);
        let m = Mounted::mount(&pool, &mnt, "");
        assert_eq!(
            state_on(&m.path(DIRTY)).as_deref(),
            Some("stopped"),
            "{ctx}"
        );
        check_clean(&pool, &ctx);
        m.unmount();
    }
}

/// A shared writable mapping of a passthrough file: the kernel points it
/// at the backing file, so it writes on after its descriptor is closed and
/// the daemon has seen the last release.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; the test writes it from one
// thread at a time.
unsafe impl Send for Mapping {}

impl Mapping {
    fn of(path: &Path, len: usize) -> Mapping {
        let f = open_rw(path);
        // SAFETY: a new shared mapping of an open file; the result is
        // checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        drop(f);
        Mapping {
            ptr: ptr.cast(),
            len,
        }
    }

    fn write(&mut self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: in bounds of a live read-write mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }

    fn unmap(self) {
        // SAFETY: the mapping made in `of`, synced then unmapped once.
        unsafe {
            libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC);
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[test]
fn a_mapping_that_outlives_its_file_never_changes_a_committed_image() {
    for fs in filesystems() {
        let ctx = format!("[{}] mmap", fs.name);
        let m = mounted(&fs, "stale-mmap", "", &pattern(9, 4096));
        let mut map = Mapping::of(&m.path(DIRTY), SIZE as usize);
        // The descriptor is closed: the daemon sees the last release while
        // the mapping still writes the dirty image.
        wait_for("the volume to be held", 30, || {
            state_on(&m.path(DIRTY)).as_deref() == Some("held")
        });
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (st, c) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !st.load(Ordering::SeqCst) {
                map.write(((i % 64) * 4096) as usize, &pattern(i as u8, 4096));
                c.fetch_add(1, Ordering::SeqCst);
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            map.write(0, &pattern(0xEE, 4096));
            map
        });
        let e = open_rw_error(&m.path(DIRTY));
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{ctx}");
        stays_fixed(&image(&m.pool), 5, || count.load(Ordering::SeqCst), &ctx);
        stop.store(true, Ordering::SeqCst);
        thread.join().unwrap().unmap();
        m.wait_stopped(DIRTY);
        let img = File::open(image(&m.pool)).unwrap();
        assert_eq!(
            read_at(&img, 0, 4096),
            pattern(0xEE, 4096),
            "{ctx}: the last write is kept"
        );
        check_clean(&m.pool, &ctx);
        m.unmount();
    }
}

// ---------------------------------------------------------------------------
// Planted symlinks in .reflinkfs/.

/// A file outside the pool that a planted symlink points at: it must never
/// change.
struct Target {
    path: PathBuf,
    content: Vec<u8>,
}

impl Target {
    fn new(dir: &Path) -> Target {
        let path = dir.join("root-only-target");
        let content = b"root's file; nothing may append to it\n".to_vec();
        std::fs::write(&path, &content).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        Target { path, content }
    }

    fn untouched(&self, ctx: &str) {
        let meta = std::fs::metadata(&self.path).unwrap();
        assert_eq!(
            std::fs::read(&self.path).unwrap(),
            self.content,
            "{ctx}: content"
        );
        assert_eq!(meta.mode() & 0o7777, 0o644, "{ctx}: mode");
    }
}

#[test]
fn planted_symlinks_in_the_metadata_directory_are_never_followed() {
    need!(require(&["ln"]));
    let fs = filesystems().into_iter().next().unwrap();
    let path = prepared_pool(&fs, "symlinks", 1, |pool| {
        create_origin(pool, V, SIZE);
    });
    let meta = path.join(".reflinkfs");
    let target = Target::new(path.parent().unwrap());
    let mnt = path.parent().unwrap().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let plant = |name: &str| {
        let _ = std::fs::remove_file(meta.join(name));
        std::os::unix::fs::symlink(&target.path, meta.join(name)).unwrap();
    };
    let is_symlink = |name: &str| {
        std::fs::symlink_metadata(meta.join(name)).is_ok_and(|m| m.file_type().is_symlink())
    };

    // The daemon's log: the mount refuses to write through it.
    plant("daemon.log");
    let mount = || run(Command::new(bin()).arg("mount").arg(&path).arg(&mnt));
    let out = mount();
    if out.status.success() {
        Mounted::adopt(&path, &mnt).unmount();
        panic!("a mount with a planted daemon.log must be refused");
    }
    target.untouched("daemon.log");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("daemon.log"),
        "the error names the file: {err}"
    );
    std::fs::remove_file(meta.join("daemon.log")).unwrap();

    // The rotated log and the socket: replaced, never followed.
    plant("daemon.log.1");
    plant("control.sock");
    // The CLI refuses a socket that is a symlink instead of following it.
    let out = rf(&path, "volume list");
    assert!(!out.status.success(), "a symlinked control.sock is refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("control.sock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.untouched("control.sock (CLI)");
    std::fs::create_dir_all(&mnt).unwrap();
    let m = Mounted::mount_with(&path, &mnt, "", &[("REFLINKFS_LOG_MAX", "4K")]);
    assert!(
        !is_symlink("control.sock"),
        "the daemon replaced the symlink"
    );
    let mode = std::fs::symlink_metadata(meta.join("control.sock"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is 0600 from the start");
    // Enough to rotate the 4 KiB log a few times.
    for _ in 0..6 {
        m.write_and_close(DIRTY, 0, b"rotate the log");
    }
    assert!(!is_symlink("daemon.log.1"), "rotation replaced the symlink");
    assert!(daemon_log(&path).contains("the earlier lines are in"));
    for name in ["daemon.log", "daemon.log.1"] {
        let meta = std::fs::symlink_metadata(meta.join(name)).unwrap();
        assert!(meta.is_file(), "{name}");
        assert_eq!(meta.mode() & 0o777, 0o600, "{name} is 0600");
        assert!(
            meta.len() < 8192,
            "{name} stays near its cap: {}",
            meta.len()
        );
    }
    rf_ok(&path, "status");
    m.unmount();
    target.untouched("control.sock and daemon.log.1");

    // The lock and the pool's config: opening the pool refuses them.
    for name in ["lock", "pool.json"] {
        let saved = meta.join(format!("{name}.saved"));
        std::fs::rename(meta.join(name), &saved).unwrap();
        plant(name);
        let out = rf(&path, "volume list");
        assert!(!out.status.success(), "{name}: refused");
        let out = mount();
        if out.status.success() {
            drop(Mounted::adopt(&path, &mnt));
            panic!("{name}: the mount must be refused");
        }
        target.untouched(name);
        std::fs::remove_file(meta.join(name)).unwrap();
        std::fs::rename(&saved, meta.join(name)).unwrap();
    }
    // Temporary names of atomic writes are replaced, not followed.
    plant("volumes/c/v/n.json~tmp");
    rf_ok(&path, ["volume", "set", V, "revisions_to_keep", "2"]);
    target.untouched("n.json~tmp");
    assert!(!is_symlink("volumes/c/v/n.json~tmp"));
}

// ---------------------------------------------------------------------------
// A sibling whose name starts like a revision, on a mount.

#[test]
fn removing_a_volume_online_leaves_a_running_sibling_alone() {
    let fs = filesystems().into_iter().next().unwrap();
    let path = prepared_pool(&fs, "sibling-online", 1, |pool| {
        let p = create_origin(pool, "n/v/p", SIZE);
        write_cycle(pool, &p, 0, b"p's data");
    });
    // `p.img.7` is no longer a valid new name; older pools may have it.
    let sib = vid("n/v/p.img.7");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path.join(".reflinkfs/volumes/n/v/p.json")).unwrap())
            .unwrap();
    cfg["vid"] = sib.to_string().into();
    cfg["next_revision"] = 1.into();
    plant_config(&path, &sib, cfg);
    std::fs::write(path.join("n/v/p.img.7.img"), pattern(4, SIZE as usize)).unwrap();
    let pool = Pool::open(&path).unwrap();
    write_cycle(&pool, &sib, 0, &pattern(5, 4096));
    drop(pool);

    let m = Mounted::beside(&path, "");
    let f = open_rw(&m.path("n/v/p.img.7-dirty.img"));
    f.write_all_at(&pattern(6, 4096), 0).unwrap();
    rf_ok(&path, "volume remove n/v/p");
    let log = daemon_log(&path);
    assert!(
        !log.lines()
            .any(|l| l.contains("removed") && l.contains("p.img.7")),
        "nothing of p.img.7 was removed: {log}"
    );
    drop(f);
    m.wait_stopped("n/v/p.img.7-dirty.img");
    let img = File::open(path.join("n/v/p.img.7.img")).unwrap();
    assert_eq!(read_at(&img, 0, 4096), pattern(6, 4096));
    let names = files_of(&path, &sib);
    assert!(
        names
            .iter()
            .any(|f| f.starts_with("p.img.7.img.") && f.contains('@')),
        "{names:?}"
    );
    assert!(!names.iter().any(|f| f == "p.img"), "{names:?}");
    check_clean(&path, "sibling");
    m.unmount();
}

// ---------------------------------------------------------------------------
// Recovery, errors and status.

#[test]
fn recovery_finishes_a_prune_that_a_crash_interrupted() {
    need!(require_failpoints());
    let fs = filesystems().into_iter().next().unwrap();
    let path = prepared_pool(&fs, "recovery-prune", 1, |pool| {
        create_origin(pool, V, SIZE);
    });
    let mnt = path.parent().unwrap().join("mnt");
    for round in 0..3u8 {
        let failpoint = (reflinkfs::engine::failpoint::ENV, "commit.renamed");
        let m = Mounted::mount_with(&path, &mnt, "", &[failpoint]);
        let pid = m.daemon_pid() as u32;
        let f = open_rw(&m.path(DIRTY));
        f.write_all_at(&[round + 1; 512], 0).unwrap();
        drop(f);
        // The daemon aborts in the middle of the commit.
        wait_for("the daemon to abort", 30, || {
            !reflinkfs::sys::process_running(pid)
        });
        drop(m.dead());
        check_clean(&path, &format!("after crash {round}"));
    }
    let info = volume_json(&path, V);
    assert_eq!(info["revisions"].as_array().unwrap().len(), 1, "{info}");
}

#[test]
fn an_open_of_a_volume_that_cannot_start_gives_eio() {
    let fs = filesystems().into_iter().next().unwrap();
    let path = prepared_pool(&fs, "start-eio", 1, |pool| {
        create_origin(pool, V, SIZE);
    });
    // A snapshot whose source is a volatile volume cannot start; the
    // engine refuses that at create, so it is written by hand.
    let vol = serde_json::json!({
        "format": 1, "vid": "c/v/vol", "snap_on_start": false, "save_on_stop": false,
        "size": SIZE, "rw": true, "revisions_to_keep": 0, "next_revision": 1, "generation": 0,
    });
    let snap = serde_json::json!({
        "format": 1, "vid": "c/v/snap", "snap_on_start": true, "save_on_stop": false,
        "size": SIZE, "rw": true, "revisions_to_keep": 0, "source": "c/v/vol",
        "next_revision": 1, "generation": 0,
    });
    plant_config(&path, &vid("c/v/vol"), vol);
    plant_config(&path, &vid("c/v/snap"), snap);
    let m = Mounted::beside(&path, "");
    let e = open_rw_error(&m.path("c/v/snap-dirty.img"));
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        daemon_log(&path).contains("c/v/snap: cannot start"),
        "the reason is logged"
    );
    m.unmount();
}

/// [`pattern`] with each 4 KiB block's number in its first 8 bytes, so a
/// block in the wrong place shows.
fn numbered(tag: u8, len: usize) -> Vec<u8> {
    let mut v = pattern(tag, len);
    for (i, block) in v.chunks_mut(4096).enumerate() {
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    v
}

/// Issue 19, as an administrator did it: a loop device on
/// `appvms/u2/private-dirty.img` of a mount, 8 MiB written through it,
/// `umount -l`, 8 MiB more written and fsynced through the device, which
/// the lazily unmounted daemon still serves, then `losetup -d`. The daemon
/// commits all 16 MiB, leaves no dirty image, and exits.
#[test]
fn a_loop_device_across_umount_l_is_committed_when_it_lets_go() {
    const U2: &str = "appvms/u2/private";
    const U2_DIRTY: &str = "appvms/u2/private-dirty.img";
    for fs in mount_filesystems(&["losetup", "umount"])
        .into_iter()
        .filter(|f| f.reflink)
    {
        let ctx = format!("[{}] umount -l", fs.name);
        let path = prepared_pool(&fs, "lazy-loop", 1, |pool| {
            create_origin(pool, U2, 32 * MIB);
        });
        let m = Mounted::beside(&path, "");
        let pid = m.daemon_pid() as u32;
        let lo = Loop::attach(&m.path(U2_DIRTY), false, None);
        let dev = open_rw(Path::new(&lo.dev));
        let (first, second) = (numbered(0x19, 8 << 20), numbered(0x91, 8 << 20));
        dev.write_all_at(&first, 0).unwrap();
        dev.sync_all().unwrap();
        run_ok(Command::new("umount").arg("-l").arg(&m.mnt));
        dev.write_all_at(&second, 8 * MIB).unwrap();
        dev.sync_all().unwrap();
        drop(dev);
        lo.detach();
        wait_for("the daemon to exit", 60, || {
            !reflinkfs::sys::process_running(pid)
        });
        m.forget();

        let img = File::open(path.join("appvms/u2/private.img")).unwrap();
        assert!(read_at(&img, 0, 8 << 20) == first, "{ctx}: the first 8 MiB");
        assert!(
            read_at(&img, 8 * MIB, 8 << 20) == second,
            "{ctx}: the 8 MiB written after umount -l"
        );
        assert!(
            !path.join(U2_DIRTY).exists(),
            "{ctx}: a dirty image is left: {}",
            daemon_log(&path)
        );
        check_clean(&path, &ctx);
    }
}

/// A volume held by a loop device on its dirty image in the pool (outside
/// reflinkfs) when the mount goes, by SIGTERM or `reflinkfs unmount`: the
/// daemon stays, says in `status` that it waits for the volume (the control
/// socket answers meanwhile), never changes `N.img`, and once the device
/// lets go commits what it wrote and exits.
#[test]
fn an_unmount_with_a_held_volume_waits_to_commit_it() {
    for fs in mount_filesystems(&["losetup"])
        .into_iter()
        .filter(|f| f.reflink)
    {
        for how in ["SIGTERM", "reflinkfs unmount"] {
            let ctx = format!("[{}] {how}", fs.name);
            let m = mounted(&fs, "held-unmount", "", &pattern(9, 4096));
            let pid = m.daemon_pid() as u32;
            let f = open_rw(&m.path(DIRTY));
            let lo = Loop::attach(&m.pool.join(DIRTY), false, None);
            let writer = LoopWriter::start(&lo.dev);
            wait_for("the writer", 10, || writer.count() > 5);
            drop(f);
            wait_for("the volume to be held", 30, || {
                state_on(&m.path(DIRTY)).as_deref() == Some("held")
            });

            if how == "SIGTERM" {
                // SAFETY: sending a signal has no memory effects.
                assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
            } else {
                let out = run_ok(Command::new(bin()).arg("unmount").arg(&m.mnt));
                assert!(
                    out.contains(&format!("exits once it has committed {V}")),
                    "{ctx}: {out}"
                );
            }
            wait_for("the daemon to wait for the held volume", 30, || {
                rf_json(&m.pool, "status")["waiting_for"] == serde_json::json!([V])
            });
            let status = rf_json(&m.pool, "status");
            assert!(status["mountpoint"].is_null(), "{ctx}: {status}");
            assert_eq!(status["held"], serde_json::json!([V]), "{ctx}: {status}");
            let text = rf_ok(&m.pool, "status");
            assert!(
                text.contains(&format!("exits once it has committed {V}")),
                "{ctx}: {text}"
            );
            assert_eq!(volume_json(&m.pool, V)["state"], "held", "{ctx}");
            stays_fixed(&image(&m.pool), 2, || writer.count(), &ctx);
            assert!(reflinkfs::sys::process_running(pid), "{ctx}");

            let model = writer.finish();
            lo.detach();
            wait_for("the daemon to exit", 60, || {
                !reflinkfs::sys::process_running(pid)
            });
            let pool = m.pool.clone();
            m.forget();
            holds_model(&image(&pool), &model, &ctx);
            assert!(!pool.join(DIRTY).exists(), "{ctx}");
            assert!(
                daemon_log(&pool).contains("every held volume is committed"),
                "{ctx}"
            );
            check_clean(&pool, &ctx);
        }
    }
}

#[test]
fn status_after_a_lazy_unmount_names_no_mountpoint() {
    let fs = filesystems().into_iter().next().unwrap();
    let m = mounted(&fs, "status-lazy", "", &[]);
    let f = open_rw(&m.path(DIRTY));
    let pid = m.daemon_pid() as u32;
    run_ok(Command::new("umount").arg("-l").arg(&m.mnt));
    let v = rf_json(&m.pool, "status");
    assert!(v["mountpoint"].is_null(), "{v}");
    assert_eq!(v["detached_from"], s(&m.mnt), "{v}");
    let text = rf_ok(&m.pool, "status");
    assert!(text.contains("lazily unmounted"), "{text}");
    drop(f);
    wait_for("the daemon to exit", 30, || {
        !reflinkfs::sys::process_running(pid)
    });
    m.forget();
}
