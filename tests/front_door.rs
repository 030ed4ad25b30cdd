//! What a new user meets first, tried as a new user would: the messages of
//! common mistakes, sizes that read two ways, a volume larger than its
//! filesystem, users other than root, an unmount while busy, and a daemon
//! log that stays quiet during ordinary use.

mod common;

use common::cli::*;
use common::mount::*;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn stderr(o: &Output) -> String {
    text(&o.stderr)
}

fn stdout(o: &Output) -> String {
    text(&o.stdout)
}

/// A pool with `appvms/work/private`, offline.
fn pool_with_private(test: &str) -> PathBuf {
    let (pool, path) = new_pool(&xfs(), test);
    create_origin(&pool, "appvms/work/private", 4 * MIB);
    path
}

/// [`pool_with_private`], mounted beside it.
fn mounted_private(test: &str) -> Mounted {
    let pool = pool_with_private(test);
    let mnt = pool.parent().unwrap().join("mnt");
    Mounted::mount(&pool, &mnt, "")
}

/// A directory under /tmp that every user can traverse (the scratch
/// filesystems live under a 0700 directory), removed on drop.
fn open_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("reflinkfs-door")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn as_nobody(args: &[&str]) -> Output {
    run(Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(bin())
        .args(args))
}

#[test]
fn a_pool_directory_that_does_not_exist_is_named_as_such() {
    let missing = std::env::temp_dir().join("reflinkfs-no-such-dir/pool");
    for args in ["status", "volume list", "pool info"] {
        let o = rf(&missing, args);
        assert_eq!(o.status.code(), Some(4), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("does not exist") && !stderr(&o).contains("pool.json"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    let mnt = open_dir();
    let o = run(Command::new(bin())
        .arg("mount")
        .arg(&missing)
        .arg(mnt.path()));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

#[test]
fn sizes_that_read_as_powers_of_1000_are_refused_and_change_nothing() {
    let pool = pool_with_private("sizes");
    for size in ["1Gb", "1GB", "512MB", "4kb"] {
        let o = rf(
            &pool,
            ["volume", "create", "appvms/work/data", "--size", size],
        );
        assert_eq!(o.status.code(), Some(3), "{size}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("1024") && stderr(&o).contains("iB"),
            "{size}: {}",
            stderr(&o)
        );
        let o = rf(&pool, ["volume", "resize", "work:private", size]);
        assert_eq!(o.status.code(), Some(3), "{size}: {}", stderr(&o));
    }
    assert!(!pool.join("appvms/work/data.img").exists());
    let o = rf(
        &pool,
        ["volume", "create", "appvms/work/data", "--size", "1GiB"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(rf_json(&pool, "volume info work:data")["size"], 1u64 << 30);
}

#[test]
fn a_volume_larger_than_the_free_space_is_allowed_with_a_warning() {
    let pool = pool_with_private("huge");
    let o = rf(
        &pool,
        ["volume", "create", "appvms/work/huge", "--size", "100T"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "created appvms/work/huge\n");
    let e = stderr(&o);
    assert!(
        e.contains("warning") && e.contains("100.0 TiB") && e.contains("free"),
        "the warning names the size and the free space: {e}"
    );
    // A size that fits says nothing.
    let o = rf(
        &pool,
        ["volume", "create", "appvms/work/small", "--size", "1M"],
    );
    assert!(
        o.status.success() && stderr(&o).is_empty(),
        "{}",
        stderr(&o)
    );
    // JSON carries it too, and a resize past the free space warns as well.
    let o = rf(&pool, ["volume", "resize", "work:small", "50T", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(
        v["warning"].as_str().is_some_and(|w| w.contains("free")),
        "{v}"
    );
    assert!(stderr(&o).contains("warning"), "{}", stderr(&o));
}

#[test]
fn mistakes_get_messages_that_say_what_to_do() {
    let pool = pool_with_private("mistakes");
    let o = rf(&pool, ["volume", "set", "work:private", "colour", "blue"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("revisions_to_keep") && stderr(&o).contains("rw"),
        "the valid properties are named: {}",
        stderr(&o)
    );
    // A revert without a revision says which one it went back to.
    let p = reflinkfs::engine::Pool::open(&pool).unwrap();
    let v = vid("appvms/work/private");
    p.set(&v, reflinkfs::engine::Property::RevisionsToKeep(2))
        .unwrap();
    write_cycle(&p, &v, 0, &pattern(1, 4096));
    write_cycle(&p, &v, 0, &pattern(2, 4096));
    drop(p);
    let o = rf(&pool, ["volume", "revert", "work:private"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("reverted to revision 2") && !out.contains("newest"),
        "{out}"
    );
}

/// For a test with another user: `base` (removed on drop), the pool's path
/// in it, and a mountpoint; `None` without runuser.
fn user_dirs() -> Option<(tempfile::TempDir, PathBuf, PathBuf)> {
    if !require(&["runuser"]) {
        return None;
    }
    let base = open_dir();
    let (pool, mnt) = (base.path().join("pool"), base.path().join("mnt"));
    std::fs::create_dir(&mnt).unwrap();
    Some((base, pool, mnt))
}

#[test]
fn other_users_are_told_who_may_administer_mount_and_unmount() {
    let Some((_base, pool, mnt)) = user_dirs() else {
        return;
    };
    run_ok(
        Command::new(bin())
            .args(["pool", "init", "--setup-check=no", "--pool"])
            .arg(&pool),
    );
    let p = pool.to_str().unwrap();
    // Offline: the CLI cannot open root's pool.
    let o = as_nobody(&["volume", "list", "--pool", p]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("only root and the pool's owner (uid 0)"),
        "{}",
        stderr(&o)
    );
    // Mounting needs root, and says how a user's pool is served.
    let o = as_nobody(&["mount", p, mnt.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("need root") && stderr(&o).contains("allow_other"),
        "{}",
        stderr(&o)
    );
    let m = Mounted::mount(&pool, &mnt, "");
    // Online: the socket is root's.
    let o = as_nobody(&["volume", "list", "--pool", p]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(stderr(&o).contains("only root"), "{}", stderr(&o));
    // Unmounting too, with the command that works.
    let o = as_nobody(&["unmount", mnt.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("only root may unmount") && stderr(&o).contains("sudo"),
        "{}",
        stderr(&o)
    );
    m.unmount();
}

#[test]
fn a_users_pool_mounted_by_root_shows_the_users_files() {
    let Some((_base, pool, mnt)) = user_dirs() else {
        return;
    };
    std::fs::create_dir(&pool).unwrap();
    // nobody makes a pool in a directory it owns.
    run_ok(Command::new("chown").arg("nobody").arg(&pool));
    let p = pool.to_str().unwrap();
    let o = as_nobody(&["pool", "init", "--setup-check=no", "--pool", p]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = as_nobody(&[
        "volume",
        "create",
        "appvms/mine/private",
        "--size",
        "1M",
        "--pool",
        p,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = Mounted::mount(&pool, &mnt, "allow_other");
    use std::os::unix::fs::MetadataExt;
    let dirty = m.path("appvms/mine/private-dirty.img");
    let md = std::fs::metadata(&dirty).unwrap();
    let nobody = run_ok(Command::new("id").args(["-u", "nobody"]));
    assert_eq!(md.uid().to_string(), nobody.trim(), "the owner's file");
    assert_eq!(md.mode() & 0o777, 0o600);
    // nobody writes its volume through the mount, and the commit keeps it.
    let sh = format!(
        "printf hello | dd of={} conv=notrunc status=none",
        dirty.display()
    );
    let o = run(Command::new("runuser").args(["-u", "nobody", "--", "sh", "-c", &sh]));
    assert!(o.status.success(), "{}", stderr(&o));
    m.wait_stopped("appvms/mine/private-dirty.img");
    let o = as_nobody(&["volume", "list", "--pool", p]);
    assert!(
        o.status.success(),
        "the owner administers it online: {}",
        stderr(&o)
    );
    m.unmount();
    let img = std::fs::read(pool.join("appvms/mine/private.img")).unwrap();
    assert_eq!(&img[..5], b"hello");
}

#[test]
fn an_unmount_while_busy_names_the_open_volumes_and_their_holders() {
    if !require(&["losetup", "sleep"]) {
        return;
    }
    let m = mounted_private("busy");
    let mnt = m.mnt.clone();
    let lo = Loop::attach(&m.path("appvms/work/private-dirty.img"), false, None);
    let mut sleeper = Command::new("sleep")
        .arg("60")
        .current_dir(m.path("appvms"))
        .spawn()
        .unwrap();
    let o = run(Command::new(bin()).arg("unmount").arg(&mnt));
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(5), "{e}");
    assert!(e.contains("cannot unmount"), "{e}");
    assert!(
        !e.contains("volume /"),
        "the mountpoint is not a volume: {e}"
    );
    assert!(e.contains("appvms/work/private"), "the open volume: {e}");
    assert!(e.contains(&lo.dev), "the loop device: {e}");
    assert!(
        e.contains(&format!("sleep (PID {})", sleeper.id())),
        "the process in the directory: {e}"
    );
    lo.detach();
    m.wait_stopped("appvms/work/private-dirty.img");
    m.unmount();
}

#[test]
fn a_failed_mount_prints_its_error_once() {
    let m = mounted_private("once");
    let pool = m.pool.clone();
    // A second mount of the same pool fails in the detached child, which
    // tells the waiting parent.
    let other = pool.parent().unwrap().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let o = run(Command::new(bin()).arg("mount").arg(&pool).arg(&other));
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let e = stderr(&o);
    let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {e}");
    assert!(lines[0].starts_with("reflinkfs: error: "), "{e}");
    m.unmount();
}

#[test]
fn ordinary_use_by_qemu_and_an_unmount_leave_no_warnings_in_the_log() {
    if !require(&["qemu-io", "qemu-img"]) {
        return;
    }
    let m = mounted_private("quiet");
    let pool = m.pool.clone();
    let dirty = m.path("appvms/work/private-dirty.img");
    // qemu probes the image (ioctls, poll), writes, flushes and reads.
    run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 7 0 64k",
                "-c",
                "flush",
                "-c",
                "read -P 7 0 64k",
            ])
            .arg(&dirty),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["info", "-f", "raw"])
            .arg(&dirty),
    );
    m.wait_stopped("appvms/work/private-dirty.img");
    m.unmount();
    let log = std::fs::read_to_string(pool.join(".reflinkfs/daemon.log")).unwrap();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("Not Implemented"))
        .collect();
    assert!(
        noisy.is_empty(),
        "warnings in ordinary use:\n{}",
        noisy.join("\n")
    );
    assert!(
        log.contains("committed") || log.contains("commit"),
        "the log tells the commit:\n{log}"
    );
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(pool.join(".reflinkfs/daemon.log"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the log is private");
}

#[test]
fn sighup_unmounts_an_idle_mount_as_sigterm_and_sigint_do() {
    for sig in [libc::SIGHUP, libc::SIGINT] {
        let m = mounted_private("sighup");
        let mnt = m.mnt.clone();
        let pid = m.daemon_pid();
        // SAFETY: sending a signal to a PID has no memory effects.
        unsafe { libc::kill(pid, sig) };
        wait_for("the signal to unmount", 30, || {
            !reflinkfs::sys::process_running(pid as u32)
        });
        m.forget();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(!mounts.contains(mnt.to_str().unwrap()), "signal {sig}");
    }
}

#[test]
fn demo_clean_removes_what_it_installed_only_when_it_points_into_the_checkout() {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    let helper = Path::new("/usr/sbin/mount.reflinkfs");
    let link = Path::new("/usr/local/bin/reflinkfs");
    // Other test binaries mount through the helper: it is put back after.
    let saved = std::fs::read(helper).ok();
    let restore = || match &saved {
        Some(b) => {
            std::fs::write(helper, b).unwrap();
            std::fs::set_permissions(helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        None => {
            let _ = std::fs::remove_file(helper);
        }
    };
    let had_link = std::fs::symlink_metadata(link).is_ok();
    if had_link {
        // Someone's demo is installed: leave it be (CI starts clean).
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{} exists on a CI machine",
            link.display()
        );
        eprintln!("{} exists and is not this test's: skipping", link.display());
        restore();
        return;
    }
    let release = checkout.join("target/release/reflinkfs");
    let demo = || {
        run(Command::new("bash")
            .arg(checkout.join("scripts/demo"))
            .arg("--clean"))
    };
    // Pointing into this checkout: both go.
    run_ok(
        Command::new("bash")
            .arg(checkout.join("mount-helper/install"))
            .arg(bin()),
    );
    std::os::unix::fs::symlink(&release, link).unwrap();
    let o = demo();
    let (helper_left, link_left) = (helper.exists(), std::fs::symlink_metadata(link).is_ok());
    // Pointing elsewhere: both stay.
    std::fs::write(helper, "#!/bin/sh\nREFLINKFS=/opt/other/reflinkfs\n").unwrap();
    std::os::unix::fs::symlink("/opt/other/reflinkfs", link).unwrap();
    let o2 = demo();
    let kept = (helper.exists(), std::fs::symlink_metadata(link).is_ok());
    let _ = std::fs::remove_file(link);
    restore();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!helper_left && !link_left, "removed: {}", stdout(&o));
    assert!(stdout(&o).contains("removed /usr/sbin/mount.reflinkfs"));
    assert!(o2.status.success(), "{}", stderr(&o2));
    assert_eq!(
        kept,
        (true, true),
        "a helper or link of another install stays"
    );
}
