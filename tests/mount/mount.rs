//! The mounted filesystem (SPEC §6), for real: the daemon is started with
//! `reflinkfs mount` on scratch XFS (and btrfs and ext4 where marked), and
//! files are opened, written and closed by this process, as a hypervisor
//! would.

use crate::common;

use common::mount::*;
use common::*;
use reflinkfs::engine::{NewKind, Pool, Property};
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const PRIV: &str = "appvms/vm/private-dirty.img";

/// A pool with `appvms/vm/private` (origin) and what `setup` makes,
/// mounted with `opts`.
fn mounted(fs: &TestFs, test: &str, opts: &str, setup: impl FnOnce(&Pool)) -> Mounted {
    let path = prepared_pool(fs, test, 1, |pool| {
        create_origin(pool, "appvms/vm/private", 4 * MIB);
        setup(pool);
    });
    Mounted::beside(&path, opts)
}

/// [`mounted`] on the scratch XFS, where the test can run (as root, with
/// `tools`).
fn mounted_on_xfs(tools: &[&str], test: &str, setup: impl FnOnce(&Pool)) -> Option<Mounted> {
    require(tools).then(|| mounted(&xfs(), test, "", setup))
}

/// Runs `check` on a new [`mounted`] pool on every filesystem, in both I/O
/// modes, and unmounts.
fn in_both_io_modes(test: &str, check: impl Fn(&Mounted, &str)) {
    for fs in mount_filesystems(&[]) {
        for opts in ["", "passthrough=off"] {
            let m = mounted(&fs, test, opts, |_| {});
            check(&m, &format!("[{}] {opts:?}", fs.name));
            m.unmount();
        }
    }
}

fn committed(pool: &Path, vm: &str, name: &str) -> PathBuf {
    pool.join("appvms").join(vm).join(format!("{name}.img"))
}

fn revisions(pool: &Path) -> Vec<String> {
    revision_files(pool, "appvms/vm/private")
}

#[test]
fn a_write_then_close_commits_and_n_img_shows_it() {
    in_both_io_modes("commit", |m, ctx| {
        m.write_and_close(PRIV, 4096, &pattern(1, 8192));
        let through = File::open(m.path("appvms/vm/private.img")).unwrap();
        assert_eq!(read_at(&through, 4096, 8192), pattern(1, 8192), "{ctx}");
        let backing = File::open(committed(&m.pool, "vm", "private")).unwrap();
        assert_eq!(read_at(&backing, 4096, 8192), pattern(1, 8192), "{ctx}");
        assert_eq!(revisions(&m.pool).len(), 1, "{ctx}");
        assert!(!m.pool.join(PRIV).exists(), "{ctx}");
    });
}

#[test]
fn an_open_and_close_without_writes_adds_no_revision() {
    let Some(m) = mounted_on_xfs(&[], "noop", |_| {}) else {
        return;
    };
    m.write_and_close(PRIV, 0, b"first");
    let before = revisions(&m.pool);
    for _ in 0..3 {
        let f = File::open(m.path(PRIV)).unwrap();
        let _ = read_at(&f, 0, 512);
        drop(f);
        m.wait_stopped(PRIV);
        let f = open_rw(&m.path(PRIV));
        drop(f);
        m.wait_stopped(PRIV);
    }
    assert_eq!(revisions(&m.pool), before);
}

#[test]
fn a_snapshot_volume_shows_its_templates_last_commit() {
    need!(require(&[]));
    let path = prepared_pool(&xfs(), "snap", 1, |pool| {
        let tpl = create_origin(pool, "vm-templates/tpl/root", 4 * MIB);
        create_snapshot(pool, "appvms/app/root", 4 * MIB, &tpl);
    });
    let m = Mounted::beside(&path, "");
    for round in 1..=2u8 {
        m.write_and_close("vm-templates/tpl/root-dirty.img", 0, &pattern(round, 4096));
        let f = open_rw(&m.path("appvms/app/root-dirty.img"));
        assert_eq!(read_at(&f, 0, 4096), pattern(round, 4096), "round {round}");
        f.write_all_at(&pattern(99, 4096), 0).unwrap();
        drop(f);
        m.wait_stopped("appvms/app/root-dirty.img");
    }
    // The snapshot's own writes never reach the template.
    let t = File::open(m.path("vm-templates/tpl/root.img")).unwrap();
    assert_eq!(read_at(&t, 0, 4096), pattern(2, 4096));
    assert!(
        !m.path("appvms/app/root.img").exists(),
        "a snapshot volume has no N.img"
    );
}

#[test]
fn volatile_is_zeroed_on_every_start() {
    for fs in mount_filesystems(&[]) {
        let m = mounted(&fs, "volatile", "", |p| {
            create_kind(p, "appvms/vm/volatile", 2 * MIB, NewKind::Volatile);
        });
        let rel = "appvms/vm/volatile-dirty.img";
        for round in 1..=3u8 {
            let f = open_rw(&m.path(rel));
            assert!(
                read_at(&f, 0, 2 * MIB as usize).iter().all(|&b| b == 0),
                "[{}] round {round}",
                fs.name
            );
            f.write_all_at(&pattern(round, 65536), 0).unwrap();
            drop(f);
            m.wait_stopped(rel);
        }
    }
}

#[test]
fn rw_false_gives_erofs_and_o_trunc_gives_eperm() {
    let Some(m) = mounted_on_xfs(&[], "erofs", |p| {
        let ro = create_origin(p, "appvms/vm/kernel", MIB);
        p.set(&ro, Property::Rw(false)).unwrap();
    }) else {
        return;
    };
    let e = OpenOptions::new()
        .write(true)
        .open(m.path("appvms/vm/kernel-dirty.img"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    // Reading a read-only volume works, and shows mode 0400.
    let f = File::open(m.path("appvms/vm/kernel-dirty.img")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o400);
    drop(f);
    m.wait_stopped("appvms/vm/kernel-dirty.img");
    // O_TRUNC never starts a volume.
    let e = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path(PRIV))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    assert!(!m.pool.join("appvms/vm/private-dirty.img").exists());
    // N.img and revisions are read-only.
    let e = OpenOptions::new()
        .write(true)
        .open(m.path("appvms/vm/private.img"))
        .unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "{e}"
    );
    // Creating, removing and renaming files is refused.
    let e = File::create(m.path("appvms/vm/new.img")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let e = std::fs::create_dir(m.path("appvms/other")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let e = std::fs::remove_file(m.path("appvms/vm/private.img")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let log = daemon_log(&m.pool);
    assert!(
        log.contains("reflinkfs volume remove"),
        "the log names the CLI command to use"
    );
}

#[test]
fn a_read_only_mount_serves_reads_and_changes_nothing() {
    let keep_two = |p: &Pool| {
        p.set(&vid("appvms/vm/private"), Property::RevisionsToKeep(2))
            .unwrap()
    };
    let Some(m) = mounted_on_xfs(&[], "ro-mount", keep_two) else {
        return;
    };
    m.write_and_close(PRIV, 0, &pattern(1, 4096));
    m.write_and_close(PRIV, 0, &pattern(2, 4096));
    let (pool, mnt) = (m.pool.clone(), m.mnt.clone());
    m.unmount();
    let before = revisions(&pool);
    assert_eq!(before.len(), 2, "{before:?}");
    let m = Mounted::mount(&pool, &mnt, "ro");
    use std::os::unix::fs::PermissionsExt;
    for name in [PRIV, "appvms/vm/private.img"] {
        let mode = std::fs::metadata(m.path(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400, "{name} shows 0400 on a ro mount");
    }
    // Reads work; every change is refused with EROFS.
    let f = File::open(m.path(PRIV)).unwrap();
    assert_eq!(read_at(&f, 0, 4096), pattern(2, 4096));
    drop(f);
    m.wait_stopped(PRIV);
    let e = OpenOptions::new()
        .write(true)
        .open(m.path(PRIV))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let rev = before
        .iter()
        .find(|r| r.starts_with("private.img.1@"))
        .unwrap();
    let e = std::fs::remove_file(m.path(&format!("appvms/vm/{rev}"))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = std::fs::rename(
        m.path(&format!("appvms/vm/{rev}")),
        m.path("appvms/vm/private.img"),
    )
    .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    m.unmount();
    assert_eq!(
        revisions(&pool),
        before,
        "a read of a ro mount adds no revision and removes none"
    );
    let img = File::open(pool.join("appvms/vm/private.img")).unwrap();
    assert_eq!(read_at(&img, 0, 4096), pattern(2, 4096));
}

#[test]
fn unlinking_a_revision_deletes_it_and_renaming_one_onto_n_img_reverts() {
    for fs in mount_filesystems(&[]) {
        let m = mounted(&fs, "revs", "", |p| {
            p.set(&vid("appvms/vm/private"), Property::RevisionsToKeep(3))
                .unwrap();
        });
        for i in 1..=3u8 {
            m.write_and_close(PRIV, 0, &pattern(i, 4096));
        }
        let revs = revisions(&m.pool);
        assert_eq!(revs.len(), 3, "[{}] {revs:?}", fs.name);
        // Revision 2 holds pattern 1; rename it onto N.img to revert.
        let r2 = revs
            .iter()
            .find(|r| r.starts_with("private.img.2@"))
            .unwrap()
            .clone();
        std::fs::rename(
            m.path(&format!("appvms/vm/{r2}")),
            m.path("appvms/vm/private.img"),
        )
        .unwrap();
        let img = File::open(m.path("appvms/vm/private.img")).unwrap();
        assert_eq!(
            read_at(&img, 0, 4096),
            pattern(1, 4096),
            "[{}] revert through rename",
            fs.name
        );
        drop(img);
        assert!(
            m.pool.join("appvms/vm").join(&r2).exists(),
            "revision 2 stays"
        );
        // Unlink the oldest revision.
        let r1 = revs
            .iter()
            .find(|r| r.starts_with("private.img.1@"))
            .unwrap()
            .clone();
        std::fs::remove_file(m.path(&format!("appvms/vm/{r1}"))).unwrap();
        assert!(
            !m.pool.join("appvms/vm").join(&r1).exists(),
            "[{}]",
            fs.name
        );
        let listed: Vec<String> = std::fs::read_dir(m.path("appvms/vm"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!listed.contains(&r1) && listed.contains(&r2), "{listed:?}");
        // Renaming anything else is refused.
        let e = std::fs::rename(m.path(PRIV), m.path("appvms/vm/x")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }
}

#[test]
fn a_reader_of_n_img_keeps_the_old_bytes_through_a_commit() {
    in_both_io_modes("reader", |m, ctx| {
        m.write_and_close(PRIV, 0, &pattern(1, 4 * MIB as usize));
        let reader = File::open(m.path("appvms/vm/private.img")).unwrap();
        let first = read_at(&reader, 0, 2 * MIB as usize);
        m.write_and_close(PRIV, 0, &pattern(2, 4 * MIB as usize));
        let second = read_at(&reader, 2 * MIB, 2 * MIB as usize);
        let mut all = first;
        all.extend(second);
        assert_eq!(
            all,
            pattern(1, 4 * MIB as usize),
            "{ctx}: the reader saw the commit"
        );
        let fresh = File::open(m.path("appvms/vm/private.img")).unwrap();
        assert_eq!(
            read_at(&fresh, 0, 4096),
            pattern(2, 4096),
            "{ctx}: a new open sees the new commit"
        );
    });
}

#[test]
fn two_openers_of_dirty_share_one_run() {
    let Some(m) = mounted_on_xfs(&[], "share", |_| {}) else {
        return;
    };
    let a = open_rw(&m.path(PRIV));
    let b = File::open(m.path(PRIV)).unwrap();
    a.write_all_at(b"shared", 0).unwrap();
    assert_eq!(
        read_at(&b, 0, 6),
        b"shared",
        "both openers see one dirty image"
    );
    drop(a);
    // Still open through b: not committed yet.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        xattr(&m.path(PRIV), "user.reflinkfs.state").as_deref(),
        Some("running")
    );
    drop(b);
    m.wait_stopped(PRIV);
    let img = File::open(committed(&m.pool, "vm", "private")).unwrap();
    assert_eq!(read_at(&img, 0, 6), b"shared");
}

#[test]
fn four_volumes_in_parallel_fifty_cycles_each() {
    let Some(m) = mounted_on_xfs(&[], "parallel", |p| {
        for i in 0..4 {
            create_origin(p, &format!("appvms/vm{i}/private"), 2 * MIB);
        }
    }) else {
        return;
    };
    std::thread::scope(|s| {
        for i in 0..4u8 {
            let m = &m;
            s.spawn(move || {
                let rel = format!("appvms/vm{i}/private-dirty.img");
                for cycle in 0..50u8 {
                    let data = pattern(i.wrapping_mul(64).wrapping_add(cycle), 8192);
                    m.write_and_close(&rel, u64::from(cycle) * 8192, &data);
                    let img = File::open(committed(&m.pool, &format!("vm{i}"), "private")).unwrap();
                    assert_eq!(
                        read_at(&img, u64::from(cycle) * 8192, 8192),
                        data,
                        "vm{i} cycle {cycle}"
                    );
                }
            });
        }
    });
    for i in 0..4u8 {
        let img = File::open(committed(&m.pool, &format!("vm{i}"), "private")).unwrap();
        for cycle in 0..50u8 {
            let data = pattern(i.wrapping_mul(64).wrapping_add(cycle), 8192);
            assert_eq!(
                read_at(&img, u64::from(cycle) * 8192, 8192),
                data,
                "vm{i} cycle {cycle} at the end"
            );
        }
    }
}

#[test]
fn passthrough_reads_and_writes_never_reach_the_daemon() {
    need!(require(&[]));
    let fs = xfs();
    for (opts, expect_daemon) in [("", false), ("passthrough=off", true)] {
        let m = mounted(&fs, "counter", opts, |p| {
            create_origin(p, "appvms/vm/big", 256 * MIB);
        });
        let mode = xattr(&m.mnt, "user.reflinkfs.io_mode").unwrap();
        assert_eq!(
            mode,
            if expect_daemon {
                "daemon"
            } else {
                "passthrough"
            }
        );
        let rel = "appvms/vm/big-dirty.img";
        let f = File::open(m.path(rel)).unwrap();
        let before = m.root_counter("read_requests");
        let mut buf = vec![0u8; MIB as usize];
        let mut total = 0u64;
        for i in 0..256 {
            f.read_exact_at(&mut buf, i * MIB).unwrap();
            total += MIB;
        }
        let after = m.root_counter("read_requests");
        println!("{opts:?}: read {total} bytes; daemon read requests {before} -> {after}");
        if expect_daemon {
            assert!(
                after - before >= 256,
                "daemon mode serves reads: {before} -> {after}"
            );
        } else {
            assert_eq!(after, before, "passthrough reads reached the daemon");
        }
        drop(f);
        // Writes: 256 MiB with O_DIRECT, and nothing reaches the daemon
        // either (not even the kernel's security.capability check).
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(m.path(rel))
            .unwrap();
        let (w0, x0) = (
            m.root_counter("write_requests"),
            m.root_counter("getxattr_requests"),
        );
        let mut aligned = Aligned::new(MIB as usize);
        for i in 0..256 {
            f.write_all_at(aligned.bytes(), i * MIB).unwrap();
        }
        drop(aligned);
        let (w1, x1) = (
            m.root_counter("write_requests"),
            m.root_counter("getxattr_requests"),
        );
        println!("{opts:?}: daemon write requests {w0} -> {w1}, getxattr requests {x0} -> {x1}");
        if expect_daemon {
            assert!(w1 - w0 >= 256, "daemon mode serves writes: {w0} -> {w1}");
        } else {
            assert_eq!(w1, w0, "passthrough writes reached the daemon");
            // The getxattr of the counter itself counts; allow a few.
            assert!(
                x1 - x0 < 8,
                "writes cost getxattr round trips: {x0} -> {x1}"
            );
        }
        drop(f);
        m.wait_stopped(rel);
    }
}

#[test]
fn kill_9_with_fsynced_data_recovers_on_the_next_mount() {
    for fs in mount_filesystems(&["losetup"]) {
        let m = mounted(&fs, "kill9", "", |_| {});
        let lo = Loop::attach(&m.path(PRIV), false, None);
        let data = pattern(0x5c, MIB as usize);
        {
            // fsync of the loop device makes the loop driver fsync the file,
            // which reaches the backing image.
            let dev = OpenOptions::new().write(true).open(&lo.dev).unwrap();
            dev.write_all_at(&data, MIB).unwrap();
            dev.sync_all().unwrap();
        }
        m.kill_daemon();
        lo.detach();
        run_ok(Command::new("umount").arg("-l").arg(&m.mnt));
        let (pool, mnt) = (m.pool.clone(), m.mnt.clone());
        m.forget();
        // The dirty image is still there; the next mount recovers it.
        assert!(pool.join("appvms/vm/private-dirty.img").exists());
        let m = Mounted::mount(&pool, &mnt, "");
        let img = File::open(committed(&pool, "vm", "private")).unwrap();
        assert_eq!(
            read_at(&img, MIB, MIB as usize),
            data,
            "[{}] fsynced data lost",
            fs.name
        );
        assert!(!pool.join("appvms/vm/private-dirty.img").exists());
        let log = daemon_log(&pool);
        assert!(log.contains("recovery"), "recovery is logged: {log}");
        m.unmount();
    }
}

#[test]
fn mount_and_umount_through_the_helper_and_fstab() {
    need!(require(&["mount", "umount"]));
    assert!(
        Path::new("/usr/sbin/mount.reflinkfs").exists()
            || Path::new("/sbin/mount.reflinkfs").exists(),
        "mount.reflinkfs is not installed (scripts/test installs it with mount-helper/install)"
    );
    let path = prepared_pool(&xfs(), "helper", 1, |pool| {
        create_origin(pool, "appvms/vm/private", MIB);
    });
    let mnt = path.parent().unwrap().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "reflinkfs"])
            .arg(&path)
            .arg(&mnt)
            .args(["-o", "passthrough=off,defaults,noatime"]),
    );
    let m = Mounted::adopt(&path, &mnt);
    assert_eq!(
        xattr(&mnt, "user.reflinkfs.io_mode").as_deref(),
        Some("daemon")
    );
    assert!(m.path(PRIV).exists());
    run_ok(Command::new("umount").arg(&mnt));
    wait_for("the daemon to release the pool", 30, || {
        Pool::open(&path).is_ok()
    });
    m.forget();
    // An unknown option is refused, and nothing is mounted.
    let out = run(Command::new("mount")
        .args(["-t", "reflinkfs"])
        .arg(&path)
        .arg(&mnt)
        .args(["-o", "bogus"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    assert!(!std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(mnt.to_str().unwrap()));
    // An fstab line.
    let fstab = path.parent().unwrap().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "{} {} reflinkfs threads=2,nofail 0 0\n",
            path.display(),
            mnt.display()
        ),
    )
    .unwrap();
    run_ok(Command::new("mount").arg("--fstab").arg(&fstab).arg(&mnt));
    let m = Mounted::adopt(&path, &mnt);
    assert_eq!(
        xattr(&mnt, "user.reflinkfs.io_mode").as_deref(),
        Some("passthrough")
    );
    run_ok(Command::new("umount").arg(&mnt));
    m.forget();
}

#[test]
fn umount_while_a_volume_is_open_is_refused_and_the_mount_stays_usable() {
    let Some(m) = mounted_on_xfs(&["umount"], "busy", |_| {}) else {
        return;
    };
    let f = open_rw(&m.path(PRIV));
    f.write_all_at(b"busy", 0).unwrap();
    let out = run(Command::new("umount").arg(&m.mnt));
    assert!(!out.status.success(), "umount of a busy mount succeeded");
    let out = run(Command::new(bin()).arg("unmount").arg(&m.mnt));
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SIGTERM does not unmount either.
    // SAFETY: sending a signal has no memory effects.
    unsafe { libc::kill(m.daemon_pid(), libc::SIGTERM) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(read_at(&f, 0, 4), b"busy", "the mount stays usable");
    assert!(m.path("appvms/vm/private.img").exists());
    drop(f);
    m.wait_stopped(PRIV);
    // Now SIGTERM unmounts cleanly.
    let pid = m.daemon_pid();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for("SIGTERM to unmount", 30, || {
        std::fs::metadata(format!("/proc/{pid}")).is_err()
    });
    assert!(!std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(m.mnt.to_str().unwrap()));
    let img = File::open(committed(&m.pool, "vm", "private")).unwrap();
    assert_eq!(read_at(&img, 0, 4), b"busy");
    m.forget();
}

#[test]
fn a_second_mount_of_the_same_pool_is_refused_naming_the_holder() {
    let Some(m) = mounted_on_xfs(&[], "second", |_| {}) else {
        return;
    };
    let mnt2 = m.mnt.with_file_name("mnt2");
    std::fs::create_dir_all(&mnt2).unwrap();
    let out = run(Command::new(bin()).arg("mount").arg(&m.pool).arg(&mnt2));
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("process {}", m.daemon_pid())),
        "{err}"
    );
    assert!(!std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(mnt2.to_str().unwrap()));
    // Administration goes through the daemon while it is mounted.
    let out = run(Command::new(bin())
        .args(["volume", "list", "--pool"])
        .arg(&m.pool));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("appvms/vm/private"));
}

#[test]
fn a_non_root_user_cannot_read_an_image_without_allow_other() {
    need!(require(&["runuser"]));
    let fs = xfs();
    // The mountpoint must be reachable by other users for the test to
    // mean anything: /tmp, not the scratch directory (mode 0700).
    let base = tempfile::Builder::new()
        .prefix("reflinkfs-perm")
        .tempdir_in("/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for (opts, can_list) in [("", false), ("allow_other", true)] {
        let path = prepared_pool(&fs, "perm", 1, |pool| {
            create_origin(pool, "appvms/vm/private", MIB);
        });
        let mnt = base.path().join(format!("mnt{}", can_list as u8));
        let m = Mounted::mount(&path, &mnt, opts);
        let as_nobody =
            |cmd: &str| run(Command::new("runuser").args(["-u", "nobody", "--", "sh", "-c", cmd]));
        let cat = as_nobody(&format!(
            "cat {} > /dev/null",
            m.path("appvms/vm/private.img").display()
        ));
        assert!(!cat.status.success(), "{opts:?}: nobody read an image");
        let ls = as_nobody(&format!("ls {}", m.mnt.display()));
        assert_eq!(
            ls.status.success(),
            can_list,
            "{opts:?}: listing the mount as nobody"
        );
        m.unmount();
    }
}

#[test]
fn statfs_reports_4096_and_xattrs_show_properties() {
    let Some(m) = mounted_on_xfs(&[], "statfs", |_| {}) else {
        return;
    };
    let out = run_ok(Command::new("stat").args(["-f", "-c", "%s %S"]).arg(&m.mnt));
    assert_eq!(out.trim(), "4096 4096");
    let p = m.path(PRIV);
    assert_eq!(
        xattr(&p, "user.reflinkfs.vid").as_deref(),
        Some("appvms/vm/private")
    );
    assert_eq!(xattr(&p, "user.reflinkfs.type").as_deref(), Some("origin"));
    assert_eq!(xattr(&p, "user.reflinkfs.rw").as_deref(), Some("true"));
    let e = run(Command::new("setfattr")
        .args(["-n", "user.reflinkfs.rw", "-v", "false"])
        .arg(&p));
    assert!(!e.status.success(), "xattrs are read-only");
    // fallocate, SEEK_DATA/SEEK_HOLE and fsync reach the backing file.
    let f = open_rw(&p);
    f.write_all_at(&[1u8; 8192], MIB).unwrap();
    f.sync_all().unwrap();
    let backing = m.pool.join("appvms/vm/private-dirty.img");
    let before = allocated(&backing);
    run_ok(
        Command::new("fallocate")
            .args([
                "--punch-hole",
                "--offset",
                &MIB.to_string(),
                "--length",
                "8192",
            ])
            .arg(&p),
    );
    assert!(
        allocated(&backing) < before,
        "punch hole reached the backing file"
    );
    let data = reflinkfs::sys::seek_data(std::os::fd::AsFd::as_fd(&f), 0).unwrap();
    assert_eq!(data, None, "SEEK_DATA through the mount sees the hole");
    drop(f);
    m.wait_stopped(PRIV);
    let e = run(Command::new("fallocate")
        .args(["--length", "4096"])
        .arg(m.path("appvms/vm/private.img")));
    assert!(!e.status.success(), "fallocate of N.img is refused");
}

#[test]
fn truncate_grows_a_volume_and_refuses_to_shrink() {
    let Some(m) = mounted_on_xfs(&[], "truncate", |_| {}) else {
        return;
    };
    let f = open_rw(&m.path(PRIV));
    f.set_len(8 * MIB).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 8 * MIB);
    let e = f.set_len(MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    drop(f);
    m.wait_stopped(PRIV);
    assert_eq!(
        std::fs::metadata(committed(&m.pool, "vm", "private"))
            .unwrap()
            .len(),
        8 * MIB,
        "the new size is committed"
    );
}
