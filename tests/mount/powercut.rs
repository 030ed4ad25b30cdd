//! A power cut under a mounted pool (issue 9). The crash tests abort a
//! process, which keeps the page cache, so a missing fsync can never fail
//! them; here the filesystem under the pool stops without flushing its log
//! (`xfs_io -x -c shutdown`, without `-f`, as xfstests' godown tests do),
//! is unmounted and mounted again (log recovery), and the pool reopened.
//! It must show every acknowledged commit and admin operation intact, the
//! data fsynced before the cut, and a clean `pool check`.
//!
//! Each test makes its own small filesystem on a loop device (the shutdown
//! kills it), on XFS (reflink=1) and on ext4 (copy mode).

use crate::common;

use common::cli::*;
use common::mount::*;
use common::*;
use reflinkfs::engine::{InitOptions, Pool};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;

const A: &str = "c/v/a";
const B: &str = "c/v/b";
const C: &str = "c/v/c";

/// Where the test's filesystem image goes: the scratch directory of
/// scripts/test, or a temporary one.
fn scratch() -> (PathBuf, Option<tempfile::TempDir>) {
    match std::env::var("REFLINKFS_TEST_SCRATCH") {
        Ok(d) if !d.is_empty() => (PathBuf::from(d), None),
        _ => {
            let t = tempfile::tempdir_in("/var/tmp").unwrap();
            (t.path().to_owned(), Some(t))
        }
    }
}

fn power_cut_case(kind: &str) {
    let ctx = format!("[{kind}]");
    let (base, _keep) = scratch();
    let dir = base.join(format!("powercut-{kind}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("fs.img");
    File::create(&img).unwrap().set_len(512 * MIB).unwrap();
    match kind {
        "xfs" => run_ok(
            Command::new("mkfs.xfs")
                .args(["-q", "-f", "-m", "reflink=1"])
                .arg(&img),
        ),
        _ => run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "nodiscard"])
                .arg(&img),
        ),
    };
    let lo = Loop::attach(&img, false, None);
    let fsdir = dir.join("fs");
    let fs = BlockMount::mount(&lo.dev, &fsdir);
    let pool_path = fsdir.join("pool");
    let pool = Pool::init(
        &pool_path,
        &InitOptions {
            setup_check: kind == "xfs",
            revisions_to_keep: 2,
            read_only: false,
        },
    )
    .unwrap();
    create_origin(&pool, A, 4 * MIB);
    create_origin(&pool, B, 4 * MIB);
    let c = create_origin(&pool, C, MIB);
    write_cycle(&pool, &c, 0, &pattern(0xC1, 4096));
    drop(pool);

    let mnt = dir.join("mnt");
    let m = Mounted::mount(&pool_path, &mnt, "");
    // Acknowledged commits: each returns to "stopped" before the next.
    let rel_a = "c/v/a-dirty.img";
    for round in 0..3u8 {
        let f = OpenOptions::new().write(true).open(m.path(rel_a)).unwrap();
        f.write_all_at(&pattern(0x10 + round, 64 * 1024), u64::from(round) * 65536)
            .unwrap();
        drop(f);
        m.wait_stopped(rel_a);
    }
    // Acknowledged admin operations, through the daemon.
    rf_ok(&pool_path, "volume create c/v/new --size 1M");
    rf_ok(&pool_path, ["volume", "resize", A, "8M"]);
    rf_ok(&pool_path, ["volume", "set", A, "revisions_to_keep", "3"]);
    // Data fsynced on a running volume, then more that is not.
    let fb = OpenOptions::new()
        .write(true)
        .open(m.path("c/v/b-dirty.img"))
        .unwrap();
    fb.write_all_at(&pattern(0xB1, 128 * 1024), 0).unwrap();
    fb.sync_all().unwrap();
    fb.write_all_at(&pattern(0xB2, 4096), MIB).unwrap();
    // A queued discard, acknowledged, with the run's writes fsynced: they
    // must never come back. And a pin, acknowledged.
    let fc = OpenOptions::new()
        .write(true)
        .open(m.path("c/v/c-dirty.img"))
        .unwrap();
    fc.write_all_at(&pattern(0xC2, 4096), 0).unwrap();
    fc.sync_all().unwrap();
    rf_ok(&pool_path, ["volume", "discard-changes", C]);
    let pinned = rf_json(&pool_path, ["volume", "revisions", A])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    rf_ok(&pool_path, ["volume", "revisions", "pin", A, &pinned]);
    // A prune with a pinned revision, acknowledged just before the cut:
    // the unpinned ones go down to one, the pinned one stays.
    rf_ok(&pool_path, ["volume", "set", A, "revisions_to_keep", "1"]);
    let a_before: Vec<u8> = std::fs::read(pool_path.join("c/v/a.img")).unwrap();
    let a_revisions = files_of(&pool_path, &vid(A))
        .into_iter()
        .filter(|f| f.starts_with("a.img."))
        .count();
    assert_eq!(a_revisions, 2, "{ctx}: the pinned revision and one more");

    // The cut: the filesystem stops where its log is, nothing flushed.
    let pid = m.daemon_pid();
    run_ok(
        Command::new("xfs_io")
            .args(["-x", "-c", "shutdown"])
            .arg(&fsdir),
    );
    // SAFETY: sending a signal has no memory effects.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("the daemon to die", 30, || {
        !reflinkfs::sys::process_running(pid as u32)
    });
    drop(fb);
    drop(fc);
    run_ok(Command::new("umount").arg("-l").arg(&mnt));
    m.forget();
    // The dead FUSE connection lets go of its backing files a moment after
    // the lazy unmount.
    wait_for("the filesystem to be unmountable", 30, || {
        run(Command::new("umount").arg(&fsdir)).status.success()
    });
    fs.forget();
    let fs = BlockMount::mount(&lo.dev, &fsdir);

    let pool = Pool::open(&pool_path).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
    let a = vid(A);
    let got = std::fs::read(pool_path.join("c/v/a.img")).unwrap();
    assert_eq!(got.len(), a_before.len(), "{ctx}: the resize survived");
    assert_eq!(
        got, a_before,
        "{ctx}: every acknowledged commit of a is intact"
    );
    let info = pool.info(&a).unwrap();
    assert_eq!(info.size, 8 * MIB, "{ctx}");
    assert_eq!(info.revisions_to_keep, 1, "{ctx}: the sets survived");
    assert_eq!(info.revisions.len(), a_revisions, "{ctx}: revisions");
    assert!(
        pool.info(&vid("c/v/new")).is_ok(),
        "{ctx}: the create survived"
    );
    // b's dirty image was committed by recovery, with the fsynced data.
    let b_img = File::open(pool_path.join("c/v/b.img")).unwrap();
    assert_eq!(
        read_at(&b_img, 0, 128 * 1024),
        pattern(0xB1, 128 * 1024),
        "{ctx}: data fsynced before the cut"
    );
    drop(b_img);
    // c: as at its run's start, never the dropped writes; the request done.
    let c_img = File::open(pool_path.join("c/v/c.img")).unwrap();
    assert_eq!(
        read_at(&c_img, 0, 4096),
        pattern(0xC1, 4096),
        "{ctx}: discarded"
    );
    drop(c_img);
    assert_eq!(pool.info(&vid(C)).unwrap().pending, None, "{ctx}");
    let pins: Vec<String> = info
        .revisions
        .iter()
        .filter(|r| r.pin.is_some())
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(pins, [pinned], "{ctx}: the pin survived");
    assert_eq!(pool.check(None).unwrap(), vec![], "{ctx}: pool check");
    // And the pool works on.
    write_cycle(&pool, &a, 0, b"after the cut");
    drop(pool);
    fs.unmount();
    lo.detach();
    let _ = std::fs::remove_dir_all(&dir);
}

fn tools() -> bool {
    require(&["xfs_io", "mkfs.xfs", "mkfs.ext4", "losetup"])
}

#[test]
fn a_power_cut_on_xfs_keeps_every_acknowledged_commit() {
    if tools() {
        power_cut_case("xfs");
    }
}

#[test]
fn a_power_cut_on_ext4_keeps_every_acknowledged_commit() {
    if tools() {
        power_cut_case("ext4");
    }
}
