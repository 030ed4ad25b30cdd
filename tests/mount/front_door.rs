//! What a new user meets first, tried as a new user would: the messages of
//! common mistakes, sizes that read two ways, a volume larger than its
//! filesystem, users other than root, an unmount while busy, and a daemon
//! log that stays quiet during ordinary use.

use crate::common;

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
    need!(require(&["losetup", "sleep"]));
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
    need!(require(&["qemu-io", "qemu-img"]));
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

/// Lines a person can paste: the `+ ` lines of `out`, without the `+ `.
fn echoed_commands(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("+ "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_demos_commands_can_be_pasted_without_reflinkfs_pool() {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    let demo = std::fs::read_to_string(checkout.join("scripts/demo")).unwrap();
    assert!(
        demo.contains(". scripts/lib/demo.sh") && demo.contains("demo_pool \"$pool\""),
        "scripts/demo makes its pool with scripts/lib/demo.sh"
    );
    assert!(
        !demo
            .lines()
            .any(|l| l.trim_start().starts_with("export REFLINKFS_POOL")),
        "the demo's commands do not rely on a REFLINKFS_POOL of its own"
    );
    let base = scratch_dir(&xfs(), "demo-paste");
    let (shown, pasted) = (base.join("shown"), base.join("pasted"));
    // `reflinkfs` on PATH as the demo has it; no REFLINKFS_POOL, as in a
    // new user's shell.
    let path = format!(
        "{}:{}",
        bin().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let bash = |script: &str, args: &[&Path]| {
        run(Command::new("bash")
            .args(["-euo", "pipefail", "-c", script, "bash"])
            .args(args)
            .current_dir(checkout)
            .env("PATH", &path)
            .env_remove("REFLINKFS_POOL"))
    };
    // The demo's own block, as the demo runs it.
    let o = bash(". scripts/lib/demo.sh; demo_pool \"$1\"", &[&shown]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!("export REFLINKFS_POOL={}", shown.display())),
        "it says once how to leave --pool out: {out}"
    );
    let commands = echoed_commands(&out);
    assert!(commands.len() >= 6, "{out}");
    for c in &commands {
        assert!(
            c.starts_with("reflinkfs ") && c.contains(&format!("--pool {}", shown.display())),
            "each command names its pool: {c}"
        );
    }
    // Pasted one by one into a new shell, for another pool: the same pool.
    for c in &commands {
        let line = c.replace(&s(&shown), &s(&pasted));
        let o = bash(&line, &[]);
        assert!(o.status.success(), "pasted {line:?}: {}", stderr(&o));
    }
    let names = |pool: &Path| -> Vec<String> {
        let mut v: Vec<String> = rf_json(pool, "volume list")
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["vid"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&pasted), names(&shown));
    assert_eq!(names(&pasted).len(), 4);
}

#[test]
fn a_mountpoint_given_as_the_pool_is_named_with_the_pool_it_serves() {
    let m = mounted_private("mountpoint");
    let (pool, mnt) = (m.pool.clone(), m.mnt.clone());
    let pass = format!("pass --pool {}", pool.display());
    let inside = mnt.join("appvms");
    for (given, place) in [
        (
            &mnt,
            format!(
                "{} is a reflinkfs mount of the pool {}",
                mnt.display(),
                pool.display()
            ),
        ),
        (
            &inside,
            format!(
                "{} is in {}, a reflinkfs mount of the pool {}",
                inside.display(),
                mnt.display(),
                pool.display()
            ),
        ),
    ] {
        for args in ["volume list", "status", "volume info work:private"] {
            let o = rf(given, args);
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(4), "{args}: {e}");
            assert!(e.contains(&place) && e.contains(&pass), "{args}: {e}");
            assert!(!e.contains("pool.json"), "{args}: {e}");
        }
    }
    // From REFLINKFS_POOL, the same, and how to set it.
    let o = run(Command::new(bin())
        .args(["volume", "list"])
        .env("REFLINKFS_POOL", &mnt));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{e}");
    assert!(
        e.contains(&pass) && e.contains(&format!("export REFLINKFS_POOL={}", pool.display())),
        "{e}"
    );
    // The other pool of a clone.
    let o = rf(
        &pool,
        vec![
            "volume".into(),
            "clone".into(),
            "work:private".into(),
            "appvms/copy/private".into(),
            "--to-pool".into(),
            s(&mnt),
        ],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{e}");
    assert!(
        e.contains(&format!("pass --to-pool {}", pool.display())),
        "{e}"
    );
    // A pool is not made or adopted in a mount: refused, nothing changes.
    let before = std::fs::read_dir(pool.join("appvms")).unwrap().count();
    for args in ["pool init", "pool adopt --dry-run"] {
        for given in [&mnt, &inside] {
            let o = rf(given, args);
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(3), "{args}: {e}");
            assert!(
                e.contains(&format!("a reflinkfs mount of the pool {}", pool.display()))
                    && e.contains("outside any mount"),
                "{args}: {e}"
            );
        }
    }
    assert_eq!(
        std::fs::read_dir(pool.join("appvms")).unwrap().count(),
        before
    );
    assert!(!pool.join("appvms/.reflinkfs").exists());
    // Mounting the mountpoint names the pool too.
    let other = pool.parent().unwrap().join("mnt-of-mnt");
    std::fs::create_dir_all(&other).unwrap();
    let o = run(Command::new(bin()).arg("mount").arg(&mnt).arg(&other));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{e}");
    assert!(
        e.contains(&format!(
            "the pool is {}, mounted there already",
            pool.display()
        )),
        "{e}"
    );
    // A directory that is neither keeps the plain message.
    let plain = pool.parent().unwrap().join("not-a-pool");
    std::fs::create_dir_all(&plain).unwrap();
    let e = stderr(&rf(&plain, "volume list"));
    assert!(e.contains("is not a reflinkfs pool"), "{e}");
    m.unmount();
}

/// Runs `script` with scripts/lib/helper.sh sourced, DESTDIR=`root` and
/// `$1` the built binary.
fn with_helper_lib(root: &Path, script: &str) -> Output {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    let full = format!(". scripts/lib/helper.sh\ntrap helper_restore EXIT\n{script}");
    run(Command::new("bash")
        .args(["-euo", "pipefail", "-c", &full, "bash"])
        .arg(bin())
        .current_dir(checkout)
        .env("DESTDIR", root))
}

#[test]
fn a_test_run_puts_the_mount_helper_back_as_it_was() {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    let test = std::fs::read_to_string(checkout.join("scripts/test")).unwrap();
    assert!(
        test.contains("helper_install \"$PWD/target/debug/reflinkfs\"")
            && test.contains("    helper_restore\n")
            && test.contains("trap cleanup EXIT")
            && !test.contains("mount-helper/install"),
        "scripts/test installs the helper with scripts/lib/helper.sh and restores it at exit"
    );
    let root = tempfile::tempdir().unwrap();
    let sbin = root.path().join("usr/sbin");
    std::fs::create_dir_all(&sbin).unwrap();
    let helper = sbin.join("mount.reflinkfs");
    let installed = "[ -x \"$DESTDIR/usr/sbin/mount.reflinkfs\" ]\n\
                     grep -qF \"$1\" \"$DESTDIR/usr/sbin/mount.reflinkfs\"\n";

    // None before: removed at the end, even of a run that fails.
    let o = with_helper_lib(
        root.path(),
        &format!("helper_install \"$1\"\n{installed}exit 3"),
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(!helper.exists(), "{}", stdout(&o));
    assert!(stdout(&o).contains("removed"), "{}", stdout(&o));

    // One before (another checkout's): put back, byte for byte, mode too.
    let before = "#!/bin/sh\nREFLINKFS=${REFLINKFS:-/opt/other/reflinkfs}\n";
    std::fs::write(&helper, before).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = with_helper_lib(root.path(), &format!("helper_install \"$1\"\n{installed}"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&helper).unwrap(), before);
    let mode = std::fs::metadata(&helper).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    assert!(
        stdout(&o).contains("put back") && stdout(&o).contains("/opt/other/reflinkfs"),
        "{}",
        stdout(&o)
    );

    // Replaced during the run by another install: that one stays.
    let other = "#!/bin/sh\nREFLINKFS=${REFLINKFS:-/opt/newer/reflinkfs}\n";
    let o = with_helper_lib(
        root.path(),
        &format!(
            "helper_install \"$1\"\nprintf '%s' '{other}' > \"$DESTDIR/usr/sbin/mount.reflinkfs\""
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&helper).unwrap(), other);
    assert!(stdout(&o).contains("left"), "{}", stdout(&o));

    // No saved copies left behind in TMPDIR.
    let o = with_helper_lib(
        root.path(),
        "TMPDIR=$DESTDIR/tmp; mkdir -p \"$TMPDIR\"; helper_install \"$1\"; helper_restore; [ -z \"$(ls -A \"$TMPDIR\")\" ]",
    );
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}
