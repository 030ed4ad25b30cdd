//! `volume attach` and `volume detach` (issue 13): a loop device straight on
//! a volume's running image, online and offline; its refusal while in use,
//! a crash with an attached volume, a resize, two at once; and the linger
//! that absorbs qemu's probe opens.

use crate::common;

use common::cli::*;
use common::mount::*;
use common::*;
use reflinkfs::engine::Property;
use reflinkfs::ErrorClass;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device of `volume attach`; detached by `losetup -d` on drop if
/// the test did not detach it, so a failing test leaves none behind.
struct Attached {
    dev: String,
    /// The dirty image it was given, as the kernel names it in sysfs.
    backing: String,
    done: bool,
}

impl Attached {
    fn new(pool: &Path, vid: &str, extra: &str) -> Attached {
        let out = rf_json(pool, format!("volume attach {vid} {extra}").as_str());
        let dev = out["device"].as_str().unwrap().to_owned();
        assert!(dev.starts_with("/dev/loop"), "{out}");
        assert_eq!(
            out["vid"]
                .as_str()
                .map(|v| v.ends_with(vid.split(':').next_back().unwrap())),
            Some(true)
        );
        assert!(
            out["backing"].as_str().unwrap().ends_with("-dirty.img"),
            "{out}"
        );
        assert!(
            out["major"].as_u64().is_some() && out["minor"].as_u64().is_some(),
            "{out}"
        );
        Attached::from_json(&out)
    }

    fn from_json(out: &serde_json::Value) -> Attached {
        Attached {
            dev: out["device"].as_str().unwrap().to_owned(),
            backing: out["backing"].as_str().unwrap().to_owned(),
            done: false,
        }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(&self.dev)
    }

    /// `volume detach`, which must succeed; gives what it says of the stop.
    fn detach(mut self, pool: &Path, vid: &str) -> String {
        let out = rf_json(pool, format!("volume detach {vid}").as_str());
        self.done = true;
        assert!(
            !is_bound_to(&self.dev, &self.backing),
            "{} still bound to {} after detach",
            self.dev,
            self.backing
        );
        out["stop"].as_str().unwrap_or("").to_owned()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if !self.done {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        }
    }
}

/// Whether `dev` is bound to `backing`. Only that: once detached, its
/// number may at once go to a device another test attaches.
fn is_bound_to(dev: &str, backing: &str) -> bool {
    let n = dev.trim_start_matches("/dev/loop");
    std::fs::read_to_string(format!("/sys/block/loop{n}/loop/backing_file"))
        .is_ok_and(|b| b.trim_end_matches('\n') == backing)
}

fn write_dev(dev: &Path, off: u64, data: &[u8]) {
    let f = File::options().write(true).open(dev).unwrap();
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

fn read_dev(dev: &Path, off: u64, len: usize) -> Vec<u8> {
    read_at(&File::open(dev).unwrap(), off, len)
}

fn revisions_of(pool: &Path, vid: &str) -> usize {
    rf_json(pool, format!("volume revisions {vid}").as_str())
        .as_array()
        .unwrap()
        .len()
}

fn pool_with(test: &str, vids: &[&str]) -> PathBuf {
    let (pool, path) = new_pool(&xfs(), test);
    for v in vids {
        create_origin(&pool, v, 16 * MIB);
    }
    path
}

#[test]
fn attach_and_detach_offline_start_and_commit_the_volume() {
    need!(require(&["losetup"]));
    let pool = pool_with("attach-offline", &["appvms/a/private"]);
    let lo = Attached::new(&pool, "a:private", "");
    // The process that attached it has exited: the record keeps the run.
    let st = rf_json(&pool, "status");
    assert_eq!(st["attached"][0]["device"], lo.dev.as_str(), "{st}");
    assert_eq!(rf_json(&pool, "volume info a:private")["state"], "running");
    write_dev(&lo.path(), 4096, &pattern(1, 8192));
    // An offline change that needs it stopped is refused: the loop device
    // writes it.
    let err = rf_fails(&pool, "volume set a:private rw false", ErrorClass::Busy);
    assert!(err.contains("running") || err.contains("attached"), "{err}");
    let stop = lo.detach(&pool, "a:private");
    assert!(stop.starts_with("committed"), "{stop}");
    assert_eq!(revisions_of(&pool, "a:private"), 1);
    assert_eq!(
        read_committed(&pool, &vid("appvms/a/private"), 4096, 8192),
        pattern(1, 8192)
    );
    let info = rf_json(&pool, "volume info a:private");
    assert_eq!(info["state"], "stopped");
    assert!(rf_json(&pool, "status")["attached"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(rf_json(&pool, "pool check").as_array().unwrap().is_empty());
}

#[test]
fn an_attached_volume_shares_its_run_with_the_mount_and_is_refused_while_in_use() {
    need!(require(&["losetup", "mkfs.ext4"]));
    let pool = pool_with("attach-online", &["appvms/a/private"]);
    let m = Mounted::mount(&pool, &pool.parent().unwrap().join("mnt"), "");
    let lo = Attached::new(&pool, "a:private", "");
    let st = rf_json(&pool, "status");
    assert_eq!(st["attached"][0]["device"], lo.dev.as_str(), "{st}");
    assert_eq!(
        xattr(
            &m.path("appvms/a/private-dirty.img"),
            "user.reflinkfs.state"
        )
        .as_deref(),
        Some("running")
    );
    // The mount's file is the same run: what the device wrote, it reads.
    write_dev(&lo.path(), 0, &pattern(2, 4096));
    let f = File::open(m.path("appvms/a/private-dirty.img")).unwrap();
    assert_eq!(read_at(&f, 0, 4096), pattern(2, 4096));
    drop(f);
    // In use (mounted): refused, naming the user; nothing changes.
    run_ok(Command::new("mkfs.ext4").args(["-q"]).arg(&lo.dev));
    let guest = pool.parent().unwrap().join("guest");
    std::fs::create_dir_all(&guest).unwrap();
    let _mounted = BlockMount::mount(&lo.dev, &guest);
    let err = rf_fails(&pool, "volume detach a:private", ErrorClass::Busy);
    assert!(err.contains(&lo.dev) && err.contains("--force"), "{err}");
    assert!(is_bound_to(&lo.dev, &lo.backing));
    _mounted.unmount();
    // The mount does not keep an attached volume: it stays after unmount,
    // and the next mount finds it running.
    m.unmount();
    assert_eq!(rf_json(&pool, "volume info a:private")["state"], "running");
    let m = Mounted::mount(&pool, &pool.parent().unwrap().join("mnt"), "");
    let stop = lo.detach(&pool, "a:private");
    assert!(stop.starts_with("committed"), "{stop}");
    assert_eq!(
        xattr(
            &m.path("appvms/a/private-dirty.img"),
            "user.reflinkfs.state"
        )
        .as_deref(),
        Some("stopped")
    );
    m.unmount();
}

#[test]
fn a_crash_with_an_attached_volume_keeps_it_running_and_loses_nothing() {
    need!(require(&["losetup"]));
    let pool = pool_with("attach-crash", &["appvms/a/private"]);
    let mnt = pool.parent().unwrap().join("mnt");
    let m = Mounted::mount(&pool, &mnt, "");
    let lo = Attached::new(&pool, "a:private", "");
    write_dev(&lo.path(), 0, &pattern(3, 4096));
    m.kill_daemon();
    let _dead = m.dead();
    // The device writes on while no daemon runs.
    write_dev(&lo.path(), 8192, &pattern(4, 4096));
    // Recovery (an offline open) finds it attached: not committed under the
    // device, not held.
    let info = rf_json(&pool, "volume info a:private");
    assert_eq!(info["state"], "running", "{info}");
    assert!(rf_json(&pool, "pool check").as_array().unwrap().is_empty());
    assert_eq!(revisions_of(&pool, "a:private"), 0);
    drop(_dead);
    let m = Mounted::mount(&pool, &mnt, "");
    write_dev(&lo.path(), 16384, &pattern(5, 4096));
    let stop = lo.detach(&pool, "a:private");
    assert!(stop.starts_with("committed"), "{stop}");
    let v = vid("appvms/a/private");
    for (off, tag) in [(0, 3), (8192, 4), (16384, 5)] {
        assert_eq!(
            read_committed(&pool, &v, off, 4096),
            pattern(tag, 4096),
            "at {off}"
        );
    }
    m.unmount();
}

#[test]
fn a_resize_of_an_attached_volume_reaches_its_device() {
    need!(require(&["losetup", "blockdev"]));
    let pool = pool_with("attach-resize", &["appvms/a/private"]);
    let lo = Attached::new(&pool, "a:private", "");
    rf_ok(&pool, "volume resize a:private 32M");
    let size = run_ok(Command::new("blockdev").arg("--getsize64").arg(&lo.dev));
    assert_eq!(size.trim().parse::<u64>().unwrap(), 32 * MIB);
    write_dev(&lo.path(), 32 * MIB - 4096, &pattern(6, 4096));
    lo.detach(&pool, "a:private");
    assert_eq!(rf_json(&pool, "volume info a:private")["size"], 32 * MIB);
    assert_eq!(
        read_committed(&pool, &vid("appvms/a/private"), 32 * MIB - 4096, 4096),
        pattern(6, 4096)
    );
}

#[test]
fn two_volumes_attached_at_once_commit_each_its_own() {
    need!(require(&["losetup"]));
    let pool = pool_with("attach-two", &["appvms/a/private", "appvms/b/private"]);
    let (a, b) = (
        Attached::new(&pool, "a:private", ""),
        Attached::new(&pool, "b:private", "--direct-io=off"),
    );
    assert_ne!(a.dev, b.dev);
    assert_eq!(
        rf_json(&pool, "status")["attached"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    write_dev(&a.path(), 0, &pattern(7, 4096));
    write_dev(&b.path(), 0, &pattern(8, 4096));
    assert_eq!(read_dev(&a.path(), 0, 4096), pattern(7, 4096));
    b.detach(&pool, "b:private");
    a.detach(&pool, "a:private");
    assert_eq!(
        read_committed(&pool, &vid("appvms/a/private"), 0, 4096),
        pattern(7, 4096)
    );
    assert_eq!(
        read_committed(&pool, &vid("appvms/b/private"), 0, 4096),
        pattern(8, 4096)
    );
}

#[test]
fn attach_refusals_change_nothing() {
    need!(require(&["losetup"]));
    let (p, pool) = new_pool(&xfs(), "attach-refused");
    create_origin(&p, "appvms/a/private", 16 * MIB);
    let ro = create_origin(&p, "appvms/a/kernel", 16 * MIB);
    p.set(&ro, reflinkfs::engine::Property::Rw(false)).unwrap();
    drop(p);
    rf_fails(&pool, "volume detach a:private", ErrorClass::Refused);
    let lo = Attached::new(&pool, "a:private", "");
    let err = rf_fails(&pool, "volume attach a:private", ErrorClass::Busy);
    assert!(err.contains(&lo.dev), "names the device it has: {err}");
    rf_fails(&pool, "volume attach a:kernel", ErrorClass::Refused);
    let kernel = Attached::new(&pool, "a:kernel", "--read-only");
    let n = kernel.dev.trim_start_matches("/dev/loop");
    let ro = std::fs::read_to_string(format!("/sys/block/loop{n}/ro")).unwrap();
    assert_eq!(ro.trim(), "1", "a read-only device");
    kernel.detach(&pool, "a:kernel");
    lo.detach(&pool, "a:private");
    assert_eq!(
        revisions_of(&pool, "a:private"),
        0,
        "nothing written, nothing committed"
    );
}

#[test]
fn qemus_probe_opens_make_one_start_per_launch() {
    need!(require(&["qemu-io"]));
    let (p, pool) = new_pool(&xfs(), "linger");
    let tpl = create_origin(&p, "vm-templates/t/root", 16 * MIB);
    create_kind(
        &p,
        "appvms/disp/root",
        16 * MIB,
        reflinkfs::engine::NewKind::SnapshotOf(tpl),
    );
    create_origin(&p, "appvms/a/private", 16 * MIB);
    drop(p);
    let m = Mounted::mount(&pool, &pool.parent().unwrap().join("mnt"), "");
    let starts = || m.root_counter("starts");
    for (rel, cmd) in [
        ("appvms/disp/root-dirty.img", "read 0 64k"),
        ("appvms/a/private-dirty.img", "write -P 9 0 64k"),
    ] {
        let before = starts();
        // qemu opens the image several times as it starts, the first time
        // to probe it (O_RDONLY|O_NONBLOCK).
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "raw", "-c", cmd])
                .arg(m.path(rel)),
        );
        assert_eq!(starts() - before, 1, "{rel}: one start for one launch");
        m.wait_stopped(rel);
    }
    assert_eq!(
        revisions_of(&pool, "a:private"),
        1,
        "the write committed once"
    );
    // A plain read-only open and close, then a write open within the
    // linger: one run.
    let before = starts();
    drop(File::open(m.path("appvms/a/private-dirty.img")).unwrap());
    m.write_and_close("appvms/a/private-dirty.img", 0, &pattern(1, 4096));
    assert_eq!(starts() - before, 1);
    // An explicit stop does not wait for the linger.
    drop(File::open(m.path("appvms/a/private-dirty.img")).unwrap());
    rf_ok(&pool, "volume revert a:private");
    m.unmount();
}

#[test]
fn the_device_keeps_512_byte_blocks_unless_asked_for_4096() {
    need!(require(&["losetup", "mkfs.ext4", "e2fsck"]));
    let pool = pool_with("attach-blocks", &["appvms/a/private"]);
    // The default: the 512-byte sectors the image is laid out for, even
    // where direct I/O would need 4096 (XFS): a file system with 1 KiB
    // blocks made on it checks clean through it.
    let lo = Attached::new(&pool, "a:private", "");
    let st = rf_json(&pool, "status");
    assert_eq!(st["attached"][0]["block_size"], 512, "{st}");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "1024"])
            .arg(&lo.dev),
    );
    lo.detach(&pool, "a:private");
    // Asked for 4096: direct I/O on XFS. The 1 KiB-block file system
    // cannot be used on such a device; back on 512 it is intact.
    let out = rf_json(&pool, "volume attach a:private --block-size 4096");
    let lo = Attached::from_json(&out);
    assert_eq!(out["block_size"], 4096, "{out}");
    assert_eq!(
        out["direct_io"], true,
        "XFS does direct I/O with 4096-byte blocks: {out}"
    );
    // Its last block would be partial: refused, nothing changes.
    let odd = 16 * MIB + 512;
    let err = rf_fails(
        &pool,
        format!("volume resize a:private {odd}").as_str(),
        ErrorClass::Refused,
    );
    assert!(err.contains(&lo.dev) && err.contains("4096"), "{err}");
    assert_eq!(rf_json(&pool, "volume info a:private")["size"], 16 * MIB);
    lo.detach(&pool, "a:private");
    let lo = Attached::new(&pool, "a:private", "--direct-io=off");
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&lo.dev)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    lo.detach(&pool, "a:private");
    // A size with a partial 4096-byte block cannot be attached so.
    rf_ok(&pool, format!("volume resize a:private {odd}").as_str());
    let err = rf_fails(
        &pool,
        "volume attach a:private --block-size 4096",
        ErrorClass::Refused,
    );
    assert!(err.contains("not a multiple of 4096"), "{err}");
    assert_eq!(rf_json(&pool, "volume info a:private")["state"], "stopped");
    assert!(rf_json(&pool, "status")["attached"]
        .as_array()
        .unwrap()
        .is_empty());
    // A size the loop driver does not take is refused, and changes nothing.
    let out = rf(
        &pool,
        ["volume", "attach", "a:private", "--block-size", "1024"],
    );
    assert_eq!(out.status.code(), Some(2), "a usage error: {}", show(&out));
    assert_eq!(rf_json(&pool, "volume info a:private")["state"], "stopped");
}

#[test]
fn a_detach_never_touches_a_device_that_is_no_longer_the_volumes() {
    need!(require(&["losetup"]));
    let pool = pool_with("attach-reused", &["appvms/a/private"]);
    // Mounted: the daemon keeps the attachment (offline, the next
    // command's recovery would find the device gone and clear it).
    let _m = Mounted::mount(&pool, &pool.parent().unwrap().join("mnt"), "");
    let mut lo = Attached::new(&pool, "a:private", "");
    write_dev(&lo.path(), 0, &pattern(3, 4096));
    // An administrator detaches it by hand, and the number goes to
    // another disk at once.
    run_ok(Command::new("losetup").arg("-d").arg(&lo.dev));
    lo.done = true;
    let n = lo.dev.trim_start_matches("/dev/loop").to_owned();
    let sysfs = format!("/sys/block/loop{n}/loop/backing_file");
    wait_for("the hand-made detach", 30, || !Path::new(&sysfs).exists());
    let other = pool.parent().unwrap().join("other.img");
    std::fs::write(&other, vec![0u8; MIB as usize]).unwrap();
    // Tests run in parallel: another may take the number first; then wait
    // for it to be free again.
    wait_for("the device to take the other disk", 30, || {
        Command::new("losetup")
            .arg(&lo.dev)
            .arg(&other)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    });
    let theirs = Theirs {
        dev: lo.dev.clone(),
    };
    let out = rf_json(&pool, "volume detach a:private");
    assert!(
        out["stop"].as_str().unwrap_or("").starts_with("committed"),
        "{out}"
    );
    let backing = std::fs::read_to_string(&sysfs).expect("the other disk is still attached");
    assert_eq!(backing.trim_end(), other.to_str().unwrap());
    drop(theirs);
    assert_eq!(
        read_committed(&pool, &vid("appvms/a/private"), 0, 4096),
        pattern(3, 4096)
    );
}

/// A loop device the test made itself; `losetup -d` on drop.
struct Theirs {
    dev: String,
}

impl Drop for Theirs {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Issue 18: every change of a volume's config re-reads it under the
/// volume's config writer. Before, `volume set` and `volume resize` wrote
/// back a copy read at their start, and an attach or detach in between
/// (which wrote the config without a claim) was lost on disk: a detached
/// volume stayed recorded as attached, or an attached one not. Eight
/// threads on one volume, 2,000 rounds in all: two attach and detach it
/// (real loop devices, 100 rounds each), three resize it and three set its
/// `revisions_to_keep` (300 rounds each); each checks on disk, after each
/// of its rounds, the field that only its kind of thread changes, and at
/// the end every field holds the last value written to it.
#[test]
fn concurrent_attach_resize_and_set_lose_no_config_write() {
    need!(require(&["losetup"]));
    use std::sync::Mutex;
    let (pool, path) = new_pool(&xfs(), "config-writes");
    let v = create_origin(&pool, "appvms/a/private", MIB);
    let pool = std::sync::Arc::new(pool);
    // One lock per field: the threads of one kind take turns, so each
    // knows what the disk must say; the kinds run against each other. The
    // size and keep locks hold the last value written, checked at the end.
    let (attach, size, keep) = (Mutex::new(()), Mutex::new(MIB), Mutex::new(0u64));
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (pool, v, path) = (&pool, &v, &path);
            let (attach, size, keep) = (&attach, &size, &keep);
            s.spawn(move || match t {
                0..=1 => {
                    for _ in 0..100 {
                        let _one = attach.lock().unwrap_or_else(|e| e.into_inner());
                        let a = pool.attach(v, false, false, 512).unwrap();
                        // A failed check must not leave the device.
                        let lo = Attached {
                            dev: a.device().display().to_string(),
                            backing: String::new(),
                            done: false,
                        };
                        let on_disk = config_on_disk(path, v);
                        assert_eq!(
                            on_disk["attached"]["number"],
                            serde_json::json!(a.number),
                            "attached as {:?}, but the disk says {on_disk}",
                            a.device()
                        );
                        pool.detach(v, false, std::time::Duration::from_secs(10))
                            .unwrap();
                        let mut lo = lo;
                        lo.done = true;
                        let on_disk = config_on_disk(path, v);
                        assert!(
                            on_disk["attached"].is_null(),
                            "detached, but the disk says {on_disk}"
                        );
                    }
                }
                2..=4 => {
                    for round in 0..300u64 {
                        let mut last = size.lock().unwrap_or_else(|e| e.into_inner());
                        let want = MIB + 4096 * ((round + t) % 4);
                        pool.resize(v, want, true).unwrap();
                        *last = want;
                        let on_disk = config_on_disk(path, v);
                        let got = on_disk["dirty_size"]
                            .as_u64()
                            .or(on_disk["size"].as_u64())
                            .unwrap();
                        assert_eq!(got, want, "resized to {want}, the disk says {on_disk}");
                    }
                }
                _ => {
                    for round in 0..300u64 {
                        let mut last = keep.lock().unwrap_or_else(|e| e.into_inner());
                        let want = 1 + (round + t) % 3;
                        pool.set(v, Property::RevisionsToKeep(want as i64)).unwrap();
                        *last = want;
                        let on_disk = config_on_disk(path, v);
                        assert_eq!(
                            on_disk["revisions_to_keep"],
                            serde_json::json!(want),
                            "set to {want}, the disk says {on_disk}"
                        );
                    }
                }
            });
        }
    });
    // Every field holds the last value its kind wrote: none was lost to
    // another kind's write.
    let on_disk = config_on_disk(&path, &v);
    assert!(on_disk["attached"].is_null(), "{on_disk}");
    assert!(on_disk["dirty_size"].is_null(), "{on_disk}");
    let last_size = *size.lock().unwrap();
    let last_keep = *keep.lock().unwrap();
    assert_eq!(on_disk["size"], serde_json::json!(last_size), "{on_disk}");
    assert_eq!(
        on_disk["revisions_to_keep"],
        serde_json::json!(last_keep),
        "{on_disk}"
    );
}
