//! The differences from Qubes' `file-reflink` that a port of its storage
//! tests found (issue 12, part 1), each fixed or documented, and the filling
//! of a read-only (kernel) pool.

use crate::common;

use common::cli::*;
use common::mount::*;
use common::tree::*;
use common::*;
use reflinkfs::engine::{NewKind, Pool, PoolProperty, Property};
use reflinkfs::{Error, ErrorClass};
use std::fs::File;
use std::process::Command;

#[test]
fn pool_init_makes_the_class_directories() {
    let fs = xfs();
    let dir = scratch_dir(&fs, "init-layout").join("pool");
    rf_ok(&dir, "pool init --setup-check=no");
    for class in ["appvms", "vm-templates"] {
        assert!(dir.join(class).is_dir(), "{class}/ is made by init");
    }
    assert!(rf_json(&dir, "volume list").as_array().unwrap().is_empty());
    assert!(rf_json(&dir, "pool check").as_array().unwrap().is_empty());
    // The last volume of a VM takes its VM directory, never the class's.
    rf_ok(&dir, "volume create appvms/work/private --size 1M");
    rf_ok(&dir, "volume remove appvms/work/private");
    assert!(!dir.join("appvms/work").exists());
    assert!(dir.join("appvms").is_dir());
}

#[test]
fn a_cross_pool_clone_that_fails_leaves_nothing_behind() {
    let small = small_filesystems();
    let Some(ext4) = small.iter().find(|f| f.name == "ext4") else {
        assert!(
            !in_ci(),
            "CI=true but REFLINKFS_TEST_SMALL_FS names no ext4 (ext4=/path)"
        );
        eprintln!("SKIPPING: REFLINKFS_TEST_SMALL_FS names no ext4");
        return;
    };
    // 40 MiB of data that does not compress into holes, from a pool on
    // XFS into a copy-mode pool on a 64 MiB ext4: the export fits, the
    // copy into the new volume does not.
    let (src, src_path) = new_pool(&xfs(), "clone-fail-src");
    let v = create_origin(&src, "appvms/a/data", 40 * MIB);
    write_cycle(&src, &v, 0, &pattern(9, 40 * MIB as usize));
    drop(src);
    let dst = scratch_dir(ext4, "clone-fail-dst").join("pool");
    rf_ok(&dst, "pool init --setup-check=no");
    let before = tree_nodes(&dst);
    let out = rf(
        &src_path,
        argv(
            "volume clone appvms/a/data appvms/b/data --to-pool DST",
            &[("DST", &s(&dst))],
        ),
    );
    assert_eq!(
        out.status.code(),
        Some(code(ErrorClass::NoSpace)),
        "{}",
        show(&out)
    );
    assert_same_tree(&before, &tree_nodes(&dst), "a failed clone");
    assert!(rf_json(&dst, "volume list").as_array().unwrap().is_empty());
}

#[test]
fn a_read_only_pool_is_filled_by_import_and_clone_and_sizes_follow_images() {
    let fs = xfs();
    let base = scratch_dir(&fs, "kernels");
    let pool = base.join("pool");
    rf_ok(&pool, "pool init --read-only");
    rf_ok(&pool, "volume create kernels/6.1/modules --size 1M");
    // Root fills it: an import takes the data's size, whatever the volume's.
    let data = base.join("modules.img");
    std::fs::write(&data, pattern(3, 3 * MIB as usize)).unwrap();
    rf_ok(
        &pool,
        argv(
            "volume import kernels/6.1/modules DATA",
            &[("DATA", &s(&data))],
        ),
    );
    let info = rf_json(&pool, "volume info kernels/6.1/modules");
    assert_eq!(info["size"], 3 * MIB);
    assert_eq!(info["rw"], false, "still read-only for VMs");
    assert!(info["revisions"].as_array().unwrap().is_empty());
    // A pipe has no length: --size says it.
    let sh = format!(
        "cat {} | {} volume import kernels/6.1/modules - --pool {}",
        data.display(),
        bin().display(),
        pool.display()
    );
    let out = run(Command::new("sh").args(["-c", &sh]));
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(text(&out.stderr).contains("--size"));
    // A clone from another pool creates the volume with its data.
    let (other, other_path) = new_pool(&fs, "kernels-src");
    let v = create_origin(&other, "vm-templates/t/root", 2 * MIB);
    write_cycle(&other, &v, 0, &pattern(4, 4096));
    drop(other);
    rf_ok(
        &other_path,
        argv(
            "volume clone vm-templates/t/root kernels/6.1/initramfs --to-pool DST",
            &[("DST", &s(&pool))],
        ),
    );
    let info = rf_json(&pool, "volume info kernels/6.1/initramfs");
    assert_eq!(
        (info["size"].as_u64(), info["rw"].as_bool()),
        (Some(2 * MIB), Some(false))
    );
    // A hand-copied image of another size is the volume's new size, and no
    // problem.
    std::fs::write(
        pool.join("kernels/6.1/modules.img"),
        pattern(5, 5 * MIB as usize),
    )
    .unwrap();
    assert_eq!(
        rf_json(&pool, "volume info kernels/6.1/modules")["size"],
        5 * MIB
    );
    assert!(rf_json(&pool, "pool check").as_array().unwrap().is_empty());
    // VMs still cannot write it.
    let m = Mounted::mount(&pool, &base.join("mnt"), "");
    let e = open_rw_error(&m.path("kernels/6.1/modules-dirty.img"));
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let f = File::open(m.path("kernels/6.1/modules-dirty.img")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 5 * MIB);
    assert_eq!(read_at(&f, 0, 4096), pattern(5, 4096));
    drop(f);
    m.wait_stopped("kernels/6.1/modules-dirty.img");
    m.unmount();
}

#[test]
fn pool_set_changes_the_default_of_new_volumes_offline_and_mounted() {
    let fs = xfs();
    let (p, pool) = new_pool(&fs, "pool-set");
    drop(p);
    rf_ok(&pool, "volume create appvms/a/old --size 1M");
    rf_ok(&pool, "pool set revisions_to_keep 3");
    assert_eq!(rf_json(&pool, "pool info")["revisions_to_keep"], 3);
    rf_ok(&pool, "volume create appvms/a/new --size 1M");
    assert_eq!(rf_json(&pool, "volume info a:new")["revisions_to_keep"], 3);
    assert_eq!(
        rf_json(&pool, "volume info a:old")["revisions_to_keep"],
        1,
        "existing volumes keep their own"
    );
    let m = Mounted::mount(&pool, &pool.parent().unwrap().join("mnt"), "");
    let out = rf_json(&pool, "pool set revisions_to_keep 0");
    assert_eq!(
        (out["property"].as_str(), out["value"].as_str()),
        (Some("revisions_to_keep"), Some("0"))
    );
    assert_eq!(rf_json(&pool, "pool info")["revisions_to_keep"], 0);
    rf_fails(
        &pool,
        "pool set revisions_to_keep -2",
        ErrorClass::InvalidInput,
    );
    rf_fails(&pool, "pool set colour blue", ErrorClass::InvalidInput);
    m.unmount();
    // Stored: a new open sees it.
    assert_eq!(Pool::open(&pool).unwrap().config().revisions_to_keep, 0);
    // A read-only pool keeps no revisions.
    let ro = scratch_dir(&fs, "pool-set-ro").join("pool");
    rf_ok(&ro, "pool init --read-only");
    let err = rf_fails(&ro, "pool set revisions_to_keep 2", ErrorClass::Refused);
    assert!(err.contains("read-only"), "{err}");
    rf_ok(&ro, "pool set revisions_to_keep 0");
    let p = Pool::open(&ro).unwrap();
    assert!(p.set_pool(PoolProperty::RevisionsToKeep(1)).is_err());
}

#[test]
fn snapshots_disabled_cannot_change_while_a_snapshot_of_the_volume_runs() {
    let (pool, _) = new_pool(&xfs(), "keep-minus-one");
    let tpl = create_origin(&pool, "vm-templates/t/root", MIB);
    let snap = create_kind(
        &pool,
        "appvms/a/root",
        MIB,
        NewKind::SnapshotOf(tpl.clone()),
    );
    let run = pool.start(&snap).unwrap();
    for n in [-1, 1] {
        let err = pool.set(&tpl, Property::RevisionsToKeep(n));
        match (n, err) {
            (-1, Err(e @ Error::Busy { .. })) => {
                assert!(
                    e.to_string().contains("appvms/a/root"),
                    "names the snapshot: {e}"
                )
            }
            (-1, other) => panic!("to -1 while a snapshot runs: {other:?}"),
            (_, r) => r.unwrap(),
        }
    }
    drop(run);
    pool.stop(&snap).unwrap();
    pool.set(&tpl, Property::RevisionsToKeep(-1)).unwrap();
    pool.set(&tpl, Property::RevisionsToKeep(1)).unwrap();
}

#[test]
fn export_of_a_snapshot_volume_gives_its_sources_committed_image() {
    let (pool, path) = new_pool(&xfs(), "export-snap");
    let tpl = create_origin(&pool, "vm-templates/t/root", MIB);
    write_cycle(&pool, &tpl, 0, &pattern(6, 4096));
    create_kind(&pool, "appvms/a/root", MIB, NewKind::SnapshotOf(tpl));
    drop(pool);
    let out = path.parent().unwrap().join("root-export.img");
    rf_ok(
        &path,
        argv("volume export a:root OUT", &[("OUT", &s(&out))]),
    );
    let f = File::open(&out).unwrap();
    assert_eq!(read_at(&f, 0, 4096), pattern(6, 4096));
}

#[test]
fn a_snapshot_whose_source_image_is_missing_is_reported_unusable() {
    let (pool, path) = new_pool(&xfs(), "snap-missing-src");
    let tpl = create_origin(&pool, "vm-templates/t/root", MIB);
    let snap = create_kind(&pool, "appvms/a/root", MIB, NewKind::SnapshotOf(tpl));
    drop(pool);
    let src_img = path.join("vm-templates/t/root.img");
    std::fs::remove_file(&src_img).unwrap();
    let out = rf(
        &path,
        argv("pool check --volume VID", &[("VID", &snap.to_string())]),
    );
    assert_eq!(
        out.status.code(),
        Some(code(ErrorClass::Corrupt)),
        "{}",
        show(&out)
    );
    let text = text(&out.stdout);
    assert!(
        text.contains("appvms/a/root")
            && text.contains("vm-templates/t/root")
            && text.contains(src_img.to_str().unwrap()),
        "names the snapshot, its source and the missing file: {text}"
    );
    let list = rf_json(&path, "volume list");
    let s = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vid"] == "appvms/a/root")
        .unwrap();
    assert_eq!(s["state"], "missing", "{s}");
    assert!(s["problem"].as_str().unwrap().contains("source"), "{s}");
}
