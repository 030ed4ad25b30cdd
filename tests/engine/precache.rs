//! The precache (issue 16): `NAME-precache.img`, a reflink of an origin
//! volume's committed image, made after every replacement of it, which a
//! start renames to `NAME-dirty.img` instead of copying. On XFS and btrfs;
//! copy-mode pools (ext4) keep none. A stale precache is never run.

use crate::common;

use common::mount::*;
use common::*;
use reflinkfs::engine::{Pool, Property, StopOutcome, ValidVid};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const V: &str = "appvms/vm/private";

fn precache_path(pool: &Path, v: &ValidVid) -> PathBuf {
    vm_dir(pool, v).join(format!("{}-precache.img", v.name()))
}

fn ino(p: &Path) -> Option<u64> {
    std::fs::symlink_metadata(p).ok().map(|m| m.ino())
}

/// `pool check` finds a problem whose text contains `problem`.
#[track_caller]
fn check_finds(pool: &Pool, problem: &str, ctx: &str) {
    let problems = pool.check(None).unwrap();
    assert!(
        problems.iter().any(|p| p.problem.contains(problem)),
        "{ctx}: {problems:?}"
    );
}

/// Starts `v` and gives the dirty image's inode and its first `len` bytes.
fn start_ino(pool: &Pool, v: &ValidVid, len: usize) -> (u64, Vec<u8>) {
    let f = pool.start(v).unwrap();
    let data = read_at(&f, 0, len);
    (f.metadata().unwrap().ino(), data)
}

/// A new pool on each reflink filesystem, with one origin volume of 1 MiB:
/// the context for messages, the pool, its path, the volume and the path
/// of its precache.
fn on_reflink(
    name: &str,
    keep: i64,
) -> impl Iterator<Item = (String, Pool, PathBuf, ValidVid, PathBuf)> + '_ {
    filesystems()
        .into_iter()
        .filter(|f| f.reflink)
        .map(move |fs| {
            let (pool, path) = new_pool_with(&fs, name, keep);
            let v = create_origin(&pool, V, MIB);
            let pc = precache_path(&path, &v);
            (format!("[{}]", fs.name), pool, path, v, pc)
        })
}

/// Starts `v`: its running image must be the precache inode `made`, with
/// `data` at its start; then stops it and checks the pool.
fn runs_precache(pool: &Pool, v: &ValidVid, made: u64, data: &[u8], ctx: &str) {
    let (running, got) = start_ino(pool, v, data.len());
    assert_eq!((running, got.as_slice()), (made, data), "{ctx}");
    pool.stop(v).unwrap();
    assert_eq!(pool.check(None).unwrap(), vec![], "{ctx}");
}

#[test]
fn a_start_after_a_commit_renames_the_precache() {
    for fs in filesystems() {
        let ctx = format!("[{}]", fs.name);
        let (pool, path) = new_pool(&fs, "precache-start");
        let v = create_origin(&pool, V, MIB);
        let pc = precache_path(&path, &v);
        // Made at create, recorded in the config; none in copy mode.
        assert_eq!(pc.exists(), fs.reflink, "{ctx}: after create");
        assert_eq!(
            config_on_disk(&path, &v).get("precache").is_some(),
            fs.reflink
        );
        write_cycle(&pool, &v, 0, &pattern(0x11, 8192));
        if !fs.reflink {
            assert!(!pc.exists(), "{ctx}: copy mode keeps no precache");
            let (_, data) = start_ino(&pool, &v, 8192);
            assert_eq!(data, pattern(0x11, 8192), "{ctx}");
            pool.stop(&v).unwrap();
            continue;
        }
        let made = ino(&pc).expect("a precache after the commit");
        assert_ne!(Some(made), ino(&image_path(&path, &v)), "{ctx}: a copy");
        assert_eq!(
            std::fs::read(&pc).unwrap(),
            std::fs::read(image_path(&path, &v)).unwrap()
        );
        // The start renames it: the running image is that inode.
        let (running, data) = start_ino(&pool, &v, 8192);
        assert_eq!(running, made, "{ctx}: the dirty image is the precache");
        assert_eq!(data, pattern(0x11, 8192), "{ctx}");
        assert!(!pc.exists(), "{ctx}: renamed, not copied");
        // An unmodified run gives it back as the precache.
        assert_eq!(pool.stop(&v).unwrap(), StopOutcome::Unchanged, "{ctx}");
        assert_eq!(ino(&pc), Some(made), "{ctx}: recycled");
        assert_eq!(start_ino(&pool, &v, 1).0, made, "{ctx}: and used again");
        pool.stop(&v).unwrap();
        // A snapshot volume started from the image does not make it stale.
        let s = create_snapshot(&pool, "appvms/disp/root", MIB, &v);
        assert!(
            !precache_path(&path, &s).exists(),
            "{ctx}: snapshots keep none"
        );
        write_cycle(&pool, &s, 0, b"discarded");
        assert_eq!(
            start_ino(&pool, &v, 1).0,
            made,
            "{ctx}: after a snapshot ran"
        );
        pool.stop(&v).unwrap();
        // A real commit makes a new one, of the new content.
        write_cycle(&pool, &v, 0, &pattern(0x22, 4096));
        let again = ino(&pc).expect("a new precache");
        runs_precache(&pool, &v, again, &pattern(0x22, 4096), &ctx);
    }
}

#[test]
fn a_stale_precache_is_never_run() {
    for (ctx, pool, path, v, pc) in on_reflink("precache-stale", 2) {
        let img = image_path(&path, &v);
        write_cycle(&pool, &v, 0, &pattern(0xA1, 4096));
        write_cycle(&pool, &v, 0, &pattern(0xB2, 4096));

        // Revert and import replace N.img: the precache follows.
        pool.revert(&v, None).unwrap();
        assert_eq!(
            start_ino(&pool, &v, 4096).1,
            pattern(0xA1, 4096),
            "{ctx}: revert"
        );
        pool.stop(&v).unwrap();
        let src = path.parent().unwrap().join("import.img");
        let mut content = pattern(0xC3, 4096);
        content.resize(MIB as usize, 0);
        std::fs::write(&src, &content).unwrap();
        pool.import(&v, &std::fs::File::open(&src).unwrap(), None)
            .unwrap();
        let made = ino(&pc).unwrap();
        let (running, data) = start_ino(&pool, &v, 4096);
        assert_eq!(
            (running, data),
            (made, pattern(0xC3, 4096)),
            "{ctx}: import"
        );
        pool.stop(&v).unwrap();

        // N.img replaced by hand, with the pool open: same size and mtime
        // (what file-reflink compares), other content.
        let old_mtime = std::fs::metadata(&img).unwrap().modified().unwrap();
        let hand = vm_dir(&path, &v).join("by-hand");
        let mut d = pattern(0xD4, 4096);
        d.resize(MIB as usize, 0);
        std::fs::write(&hand, &d).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&hand)
            .unwrap()
            .set_modified(old_mtime)
            .unwrap();
        std::fs::rename(&hand, &img).unwrap();
        assert!(pc.exists());
        check_finds(&pool, "stale precache", &ctx);
        let (running, data) = start_ino(&pool, &v, 4096);
        assert_ne!(Some(running), Some(made), "{ctx}: not the stale precache");
        assert_eq!(data, pattern(0xD4, 4096), "{ctx}: the hand-made image");
        assert!(!pc.exists(), "{ctx}: the stale one was removed");
        pool.stop(&v).unwrap();

        // The precache written in place (its mtime put back): not used.
        write_cycle(&pool, &v, 0, &pattern(0xE5, 4096));
        let m = std::fs::metadata(&pc).unwrap().modified().unwrap();
        let f = std::fs::File::options().write(true).open(&pc).unwrap();
        write_at(&f, 0, &pattern(0x66, 4096));
        f.set_modified(m).unwrap();
        drop(f);
        assert_eq!(
            start_ino(&pool, &v, 4096).1,
            pattern(0xE5, 4096),
            "{ctx}: written"
        );
        pool.stop(&v).unwrap();

        // Replaced by hand while the pool is closed: recovery removes the
        // stale one and makes a new one.
        write_cycle(&pool, &v, 0, &pattern(0xE6, 4096));
        assert!(pc.exists(), "{ctx}");
        drop(pool);
        let mut e = pattern(0xF6, 4096);
        e.resize(MIB as usize, 0);
        std::fs::write(&hand, &e).unwrap();
        std::fs::set_permissions(&hand, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::fs::rename(&hand, &img).unwrap();
        let pool = Pool::open(&path).unwrap();
        let fresh = ino(&pc).expect("recovery made a new precache");
        assert_eq!(std::fs::read(&pc).unwrap(), e, "{ctx}");
        runs_precache(&pool, &v, fresh, &pattern(0xF6, 4096), &ctx);
    }
}

#[test]
fn revisions_to_keep_minus_one_keeps_no_precache() {
    for (ctx, pool, path, v, pc) in on_reflink("precache-minus-one", 1) {
        assert!(pc.exists(), "{ctx}");
        pool.set(&v, Property::RevisionsToKeep(-1)).unwrap();
        assert!(!pc.exists(), "{ctx}: removed at the set");
        assert!(config_on_disk(&path, &v).get("precache").is_none(), "{ctx}");
        write_cycle(&pool, &v, 0, b"no snapshots");
        assert!(!pc.exists(), "{ctx}: none made at the stop");
        pool.set(&v, Property::RevisionsToKeep(1)).unwrap();
        assert!(pc.exists(), "{ctx}: made again");
        assert_eq!(start_ino(&pool, &v, 12).1, b"no snapshots", "{ctx}");
        pool.stop(&v).unwrap();
        pool.remove(&v).unwrap();
        assert!(
            !pc.exists() && files_of(&path, &v).is_empty(),
            "{ctx}: removed"
        );
    }
}

#[test]
fn a_precache_that_cannot_be_made_costs_only_the_copy() {
    for (ctx, pool, path, v, pc) in on_reflink("precache-fail", 1) {
        // A directory in its place: neither removable nor replaceable.
        std::fs::remove_file(&pc).unwrap();
        std::fs::create_dir(&pc).unwrap();
        std::fs::write(pc.join("x"), b"x").unwrap();
        assert!(matches!(
            write_cycle(&pool, &v, 0, &pattern(0x31, 4096)),
            StopOutcome::Committed { .. }
        ));
        assert!(config_on_disk(&path, &v).get("precache").is_none(), "{ctx}");
        assert_eq!(start_ino(&pool, &v, 4096).1, pattern(0x31, 4096), "{ctx}");
        pool.stop(&v).unwrap();
        check_finds(&pool, "not a regular file", &ctx);
        std::fs::remove_dir_all(&pc).unwrap();
    }
}

#[test]
fn usage_counts_the_precache() {
    for fs in filesystems().into_iter().filter(|f| f.reflink) {
        let ctx = format!("[{}]", fs.name);
        let (pool, path) = new_pool_with(&fs, "precache-usage", 0);
        let v = create_origin(&pool, V, 4 * MIB);
        write_cycle(&pool, &v, 0, &pattern(0x41, 2 * MIB as usize));
        let info = pool.info(&v).unwrap();
        let usage = info.usage.unwrap();
        let pc = usage
            .files
            .iter()
            .find(|f| f.file.ends_with("private-precache.img"))
            .unwrap_or_else(|| panic!("{ctx}: {:?}", usage.files));
        assert!(pc.usage.allocated >= 2 * MIB, "{ctx}: {pc:?}");
        assert_eq!(
            pc.usage.shared, pc.usage.allocated,
            "{ctx}: all shared with N.img"
        );
        assert_eq!(pc.usage.exclusive, 0, "{ctx}");
        let with = pool.pool_info().unwrap().pool_allocated;
        std::fs::remove_file(precache_path(&path, &v)).unwrap();
        let without = pool.pool_info().unwrap().pool_allocated;
        assert_eq!(with - without, pc.usage.allocated, "{ctx}: pool allocation");
        // Not a revision.
        assert!(pool.revisions(&v).unwrap().is_empty(), "{ctx}");
    }
}

/// No name in the mount's listing of the VM is a precache.
fn assert_no_precache_listed(m: &Mounted, ctx: &str) {
    let names: Vec<String> = std::fs::read_dir(m.path("appvms/vm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("precache")),
        "{ctx}: {names:?}"
    );
}

#[test]
fn the_mount_never_shows_the_precache() {
    for fs in mount_filesystems(&[]) {
        let ctx = format!("[{}]", fs.name);
        let path = prepared_pool(&fs, "precache-mount", 1, |pool| {
            let v = create_origin(pool, V, MIB);
            write_cycle(pool, &v, 0, &pattern(0x51, 4096));
        });
        let v = vid(V);
        let pc = precache_path(&path, &v);
        let made = ino(&pc);
        assert_eq!(made.is_some(), fs.reflink, "{ctx}");
        let m = Mounted::beside(&path, "");
        assert_no_precache_listed(&m, &ctx);
        let err = std::fs::metadata(m.path("appvms/vm/private-precache.img")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{ctx}");
        // The first open through the mount runs the precache.
        let f = open_rw(&m.path("appvms/vm/private-dirty.img"));
        assert_eq!(read_at(&f, 0, 4096), pattern(0x51, 4096), "{ctx}");
        if let Some(made) = made {
            let dirty = vm_dir(&path, &v).join("private-dirty.img");
            assert_eq!(ino(&dirty), Some(made), "{ctx}: started from the precache");
        }
        write_at(&f, 0, &pattern(0x52, 4096));
        drop(f);
        m.wait_stopped("appvms/vm/private-dirty.img");
        assert_eq!(ino(&pc).is_some(), fs.reflink, "{ctx}: made at the commit");
        assert_no_precache_listed(&m, &ctx);
        m.unmount();
    }
}
