//! The volume scenarios of issue 2, each run on XFS, btrfs and ext4 (copy
//! mode) through the engine's library API.

use crate::common;

use common::*;
use reflinkfs::engine::{
    CreateOptions, InitOptions, NewKind, Pool, Property, ResizeOutcome, RevisionId, StopOutcome,
    ValidVid, VolumeStateName,
};
use reflinkfs::{Error, ErrorClass};
use std::fs::File;
use std::os::unix::fs::MetadataExt;

fn each_fs(test: &str, f: impl Fn(&TestFs, &Pool, &std::path::Path)) {
    for fs in filesystems() {
        let (pool, path) = new_pool(&fs, test);
        eprintln!("[{}] {test}", fs.name);
        f(&fs, &pool, &path);
    }
}

/// A template's root volume whose first commit wrote `pattern(tag, 4096)`.
fn template(pool: &Pool, tag: u8) -> ValidVid {
    let tpl = create_origin(pool, "vm-templates/tpl/root", MIB);
    write_cycle(pool, &tpl, 0, &pattern(tag, 4096));
    tpl
}

/// `appvms/vm/private`, committed once, and started: its dirty image.
fn running_origin(pool: &Pool) -> (ValidVid, File) {
    let v = create_origin(pool, "appvms/vm/private", MIB);
    write_cycle(pool, &v, 0, b"x");
    let f = pool.start(&v).unwrap();
    (v, f)
}

#[test]
fn volatile_is_empty_after_every_start() {
    each_fs("volatile", |fs, pool, path| {
        let v = create_kind(pool, "appvms/vm/volatile", MIB, NewKind::Volatile);
        for round in 0..3u8 {
            let f = pool.start(&v).unwrap();
            assert_eq!(f.metadata().unwrap().len(), MIB, "[{}]", fs.name);
            assert!(
                read_at(&f, 0, MIB as usize).iter().all(|&b| b == 0),
                "[{}] round {round}: not empty",
                fs.name
            );
            write_at(&f, 4096, &pattern(round + 1, 8192));
            drop(f);
            assert_eq!(pool.stop(&v).unwrap(), StopOutcome::Discarded);
            assert_eq!(
                files_of(path, &v),
                Vec::<String>::new(),
                "[{}] volatile leaves no files",
                fs.name
            );
        }
    });
}

#[test]
fn origin_keeps_data_across_start_and_stop() {
    each_fs("origin", |fs, pool, path| {
        let v = create_origin(pool, "appvms/vm/private", 4 * MIB);
        let data = pattern(7, 64 * 1024);
        assert!(matches!(
            write_cycle(pool, &v, MIB, &data),
            StopOutcome::Committed { .. }
        ));
        assert_eq!(
            read_committed(path, &v, MIB, data.len()),
            data,
            "[{}]",
            fs.name
        );
        // The next start sees the data, and a second write keeps both.
        let f = pool.start(&v).unwrap();
        assert_eq!(read_at(&f, MIB, data.len()), data);
        write_at(&f, 0, &pattern(9, 4096));
        drop(f);
        pool.stop(&v).unwrap();
        assert_eq!(read_committed(path, &v, MIB, data.len()), data);
        assert_eq!(read_committed(path, &v, 0, 4096), pattern(9, 4096));
    });
    for fs in filesystems() {
        let (pool, path) = new_pool(&fs, "origin-reopen");
        let v = create_origin(&pool, "appvms/vm/private", MIB);
        write_cycle(&pool, &v, 0, &pattern(3, 4096));
        drop(pool);
        let pool = Pool::open(&path).unwrap();
        let f = pool.start(&v).unwrap();
        assert_eq!(read_at(&f, 0, 4096), pattern(3, 4096), "[{}]", fs.name);
        drop(f);
        assert_eq!(pool.stop(&v).unwrap(), StopOutcome::Unchanged);
    }
}

#[test]
fn open_and_close_without_writes_adds_no_revision() {
    each_fs("unchanged", |fs, pool, _| {
        let v = create_origin(pool, "appvms/vm/private", MIB);
        write_cycle(pool, &v, 0, b"first");
        let before = revision_ids(pool, &v);
        let f = pool.start(&v).unwrap();
        let _ = read_at(&f, 0, 512);
        drop(f);
        assert_eq!(
            pool.stop(&v).unwrap(),
            StopOutcome::Unchanged,
            "[{}]",
            fs.name
        );
        assert_eq!(revision_ids(pool, &v), before);
    });
}

#[test]
fn snapshot_sees_source_changes_only_after_restart_and_loses_its_writes() {
    each_fs("snapshot", |fs, pool, path| {
        let tpl = template(pool, 1);
        let root = create_snapshot(pool, "appvms/vm/root", MIB, &tpl);

        let f = pool.start(&root).unwrap();
        assert_eq!(read_at(&f, 0, 4096), pattern(1, 4096), "[{}]", fs.name);
        assert_eq!(pool.info(&root).unwrap().is_outdated, Some(false));
        // The template commits new data while the snapshot runs.
        write_cycle(pool, &tpl, 0, &pattern(2, 4096));
        assert_eq!(
            pool.info(&root).unwrap().is_outdated,
            Some(true),
            "[{}]",
            fs.name
        );
        assert_eq!(
            read_at(&f, 0, 4096),
            pattern(1, 4096),
            "a running snapshot keeps its start's view"
        );
        // Its own writes are lost at stop.
        write_at(&f, 8192, &pattern(5, 4096));
        drop(f);
        assert_eq!(pool.stop(&root).unwrap(), StopOutcome::Discarded);
        assert_eq!(files_of(path, &root), Vec::<String>::new());
        assert_eq!(
            read_committed(path, &tpl, 8192, 4096),
            vec![0u8; 4096],
            "the source never sees the snapshot's writes"
        );

        let f = pool.start(&root).unwrap();
        assert_eq!(
            read_at(&f, 0, 4096),
            pattern(2, 4096),
            "[{}] restart sees the new commit",
            fs.name
        );
        assert_eq!(read_at(&f, 8192, 4096), vec![0u8; 4096]);
        drop(f);
        pool.stop(&root).unwrap();
    });
}

#[test]
fn disposable_root_resolves_to_the_template_through_the_appvm() {
    each_fs("dispvm", |fs, pool, _| {
        let tpl = template(pool, 4);
        let app = create_snapshot(pool, "appvms/app/root", MIB, &tpl);
        let disp = create_snapshot(pool, "appvms/disp1/root", MIB, &app);
        let info = pool.info(&disp).unwrap();
        assert_eq!(info.source.as_deref(), Some("appvms/app/root"));
        assert_eq!(
            info.resolved_source.as_deref(),
            Some("vm-templates/tpl/root"),
            "[{}]",
            fs.name
        );
        // Even while the AppVM runs with changes of its own, the disposable
        // VM starts from the template's committed image.
        let fa = pool.start(&app).unwrap();
        write_at(&fa, 0, &pattern(9, 4096));
        let fd = pool.start(&disp).unwrap();
        assert_eq!(read_at(&fd, 0, 4096), pattern(4, 4096), "[{}]", fs.name);
        drop((fa, fd));
        pool.stop(&disp).unwrap();
        pool.stop(&app).unwrap();
    });
}

#[test]
fn clone_gets_the_source_size() {
    for fs in filesystems() {
        let (pool, path) = new_pool(&fs, "clone");
        let src = create_origin(&pool, "appvms/a/private", 3 * MIB);
        write_cycle(&pool, &src, MIB, &pattern(6, 4096));
        // Into a new volume and into an existing, smaller one.
        let dst_new = vid("appvms/b/private");
        pool.clone_volume(&src, &pool, &dst_new).unwrap();
        let dst_old = create_origin(&pool, "appvms/c/private", MIB);
        pool.clone_volume(&src, &pool, &dst_old).unwrap();
        for d in [&dst_new, &dst_old] {
            assert_eq!(pool.info(d).unwrap().size, 3 * MIB, "[{}] {d}", fs.name);
            assert_eq!(
                std::fs::metadata(image_path(&path, d)).unwrap().len(),
                3 * MIB
            );
            assert_eq!(read_committed(&path, d, MIB, 4096), pattern(6, 4096));
        }
        // The existing volume kept its old image as a revision.
        assert_eq!(revision_ids(&pool, &dst_old), ["1"]);
        // Writes to the clone do not reach the source.
        write_cycle(&pool, &dst_new, MIB, &pattern(7, 4096));
        assert_eq!(read_committed(&path, &src, MIB, 4096), pattern(6, 4096));
    }
}

#[test]
fn clone_to_another_pool_on_another_filesystem() {
    let all = filesystems();
    for (i, fs) in all.iter().enumerate() {
        let other = &all[(i + 1) % all.len()];
        let (pool, _) = new_pool(fs, "clone-src");
        let (pool2, path2) = new_pool(other, "clone-dst");
        let src = create_origin(&pool, "appvms/a/private", 2 * MIB);
        write_cycle(&pool, &src, 4096, &pattern(8, 4096));
        let dst = vid("appvms/z/private");
        pool.clone_volume(&src, &pool2, &dst).unwrap();
        assert_eq!(
            pool2.info(&dst).unwrap().size,
            2 * MIB,
            "[{} -> {}]",
            fs.name,
            other.name
        );
        assert_eq!(read_committed(&path2, &dst, 4096, 4096), pattern(8, 4096));
    }
}

#[test]
fn revisions_to_keep_minus_one_zero_one_and_three() {
    for fs in filesystems() {
        for keep in [-1i64, 0, 1, 3] {
            let (pool, path) = new_pool_with(&fs, &format!("keep{keep}"), keep);
            let v = create_origin(&pool, "appvms/vm/private", MIB);
            for i in 1..=5u8 {
                write_cycle(&pool, &v, 0, &pattern(i, 4096));
                assert_eq!(read_committed(&path, &v, 0, 4096), pattern(i, 4096));
            }
            let ids = revision_ids(&pool, &v);
            let expected: Vec<String> = match keep {
                -1 | 0 => vec![],
                // Commits 2..=5 saved revisions 1..=4 (the first commit
                // replaced the empty image, which was revision 0 of nothing:
                // it is saved too, so there are 5 revisions in all).
                n => ((6 - n as u64)..=5).map(|k| k.to_string()).collect(),
            };
            assert_eq!(ids, expected, "[{}] revisions_to_keep={keep}", fs.name);
            // Each kept revision holds the content committed before it.
            for r in pool.revisions(&v).unwrap() {
                let RevisionId::Numbered(k) = r.id else {
                    panic!()
                };
                let f = File::open(vm_dir(&path, &v).join(&r.file_name)).unwrap();
                let want = if k == 1 {
                    vec![0u8; 4096]
                } else {
                    pattern(k as u8 - 1, 4096)
                };
                assert_eq!(
                    read_at(&f, 0, 4096),
                    want,
                    "[{}] keep={keep} revision {k}",
                    fs.name
                );
            }
            if keep == -1 {
                // No copies: start renames the image, stop renames it back.
                let ino = std::fs::metadata(image_path(&path, &v)).unwrap().ino();
                let f = pool.start(&v).unwrap();
                assert!(!image_path(&path, &v).exists());
                assert_eq!(
                    f.metadata().unwrap().ino(),
                    ino,
                    "[{}] -1 renames, never copies",
                    fs.name
                );
                drop(f);
                pool.stop(&v).unwrap();
                assert_eq!(std::fs::metadata(image_path(&path, &v)).unwrap().ino(), ino);
                assert_eq!(revision_ids(&pool, &v), Vec::<String>::new());
            }
        }
    }
}

#[test]
fn revision_numbers_never_repeat_after_a_prune() {
    each_fs("counter", |fs, pool, _| {
        let v = create_origin(pool, "appvms/vm/private", MIB);
        for i in 1..=3u8 {
            write_cycle(pool, &v, 0, &pattern(i, 512));
        }
        assert_eq!(revision_ids(pool, &v), ["3"]);
        pool.set(&v, Property::RevisionsToKeep(0)).unwrap();
        assert_eq!(
            revision_ids(pool, &v),
            Vec::<String>::new(),
            "lowering prunes at once"
        );
        pool.set(&v, Property::RevisionsToKeep(2)).unwrap();
        write_cycle(pool, &v, 0, &pattern(9, 512));
        assert_eq!(
            revision_ids(pool, &v),
            ["4"],
            "[{}] K continues after the prune",
            fs.name
        );
    });
}

#[test]
fn revert_to_newest_and_to_older_each_revertible() {
    each_fs("revert", |fs, pool, path| {
        let v = create_origin(pool, "appvms/vm/private", MIB);
        pool.set(&v, Property::RevisionsToKeep(3)).unwrap();
        for i in 1..=3u8 {
            write_cycle(pool, &v, 0, &pattern(i, 4096));
        }
        // Revisions: 1 = empty, 2 = pattern 1, 3 = pattern 2; current = 3.
        assert_eq!(revision_ids(pool, &v), ["1", "2", "3"]);
        let saved = pool.revert(&v, None).unwrap();
        assert_eq!(
            saved,
            Some(4),
            "[{}] the current image is saved first",
            fs.name
        );
        assert_eq!(read_committed(path, &v, 0, 4096), pattern(2, 4096));
        assert!(
            revision_ids(pool, &v).contains(&"3".to_owned()),
            "revision 3 stays"
        );
        // Undo the revert with the revision it saved.
        pool.revert(&v, Some("4")).unwrap();
        assert_eq!(
            read_committed(path, &v, 0, 4096),
            pattern(3, 4096),
            "[{}]",
            fs.name
        );
        // Now an older one.
        pool.revert(&v, Some("2")).unwrap();
        assert_eq!(read_committed(path, &v, 0, 4096), pattern(1, 4096));
        let newest = pool.revisions(&v).unwrap().last().unwrap().id.to_string();
        pool.revert(&v, Some(&newest)).unwrap();
        assert_eq!(
            read_committed(path, &v, 0, 4096),
            pattern(3, 4096),
            "[{}] the older revert is itself revertible",
            fs.name
        );
        // The next commit prunes back to revisions_to_keep.
        write_cycle(pool, &v, 0, &pattern(4, 4096));
        assert_eq!(revision_ids(pool, &v).len(), 3);
    });
}

#[test]
fn revert_refused_while_running() {
    each_fs("revert-busy", |_, pool, _| {
        let (v, _f) = running_origin(pool);
        let e = pool.revert(&v, None).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Busy, "{e}");
        pool.stop(&v).unwrap();
    });
}

#[test]
fn unknown_revision_gives_a_clear_error() {
    each_fs("unknown-rev", |_, pool, _| {
        let v = create_origin(pool, "appvms/vm/private", MIB);
        write_cycle(pool, &v, 0, b"a");
        write_cycle(pool, &v, 0, b"b");
        let e = pool.revert(&v, Some("42")).unwrap_err();
        assert_eq!(e.class(), ErrorClass::NotFound);
        let msg = e.to_string();
        assert!(
            msg.contains("42") && msg.contains("valid revisions: 2"),
            "{msg}"
        );
        let e = pool
            .export(&v, &tempfile::tempfile().unwrap(), Some("7"))
            .unwrap_err();
        assert!(matches!(e, Error::UnknownRevision { .. }), "{e}");
    });
}

#[test]
fn resize_grows_a_stopped_origin_while_an_old_reader_reads_old_bytes() {
    each_fs("resize-reader", |fs, pool, path| {
        let v = create_origin(pool, "appvms/vm/private", MIB);
        write_cycle(pool, &v, MIB - 4096, &pattern(3, 4096));
        let reader = File::open(image_path(path, &v)).unwrap();
        assert_eq!(
            pool.resize(&v, 2 * MIB, false).unwrap(),
            ResizeOutcome::Committed
        );
        assert_eq!(
            reader.metadata().unwrap().len(),
            MIB,
            "[{}] the old reader's file is unchanged",
            fs.name
        );
        assert_eq!(read_at(&reader, MIB - 4096, 4096), pattern(3, 4096));
        let new = File::open(image_path(path, &v)).unwrap();
        assert_eq!(new.metadata().unwrap().len(), 2 * MIB);
        assert_eq!(read_at(&new, MIB - 4096, 4096), pattern(3, 4096));
        assert_eq!(read_at(&new, MIB, 4096), vec![0u8; 4096]);
        assert_eq!(pool.info(&v).unwrap().size, 2 * MIB);
    });
}

fn chattr(path: &std::path::Path, flags: &str) {
    let out = std::process::Command::new("chattr")
        .arg(flags)
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "chattr {flags}: {out:?}");
}

/// Runs `f` while `path` is immutable: a rename over it or a link of it
/// fails (EPERM), a real error at the last step of a replacement. The flag
/// goes again whatever `f` does, so the scratch filesystem can be emptied.
fn while_immutable<T>(path: &std::path::Path, f: impl FnOnce() -> T) -> T {
    struct Mutable<'a>(&'a std::path::Path);
    impl Drop for Mutable<'_> {
        fn drop(&mut self) {
            chattr(self.0, "-i");
        }
    }
    chattr(path, "+i");
    let _back = Mutable(path);
    f()
}

/// A resize of a stopped origin whose last step fails (the rename of the
/// resized copy over `N.img`, here immutable) leaves the volume as it was,
/// its config on disk included, and no temporary file. Before, the config
/// stored before the rename kept the new size until its next write.
#[test]
fn a_resize_whose_rename_fails_leaves_the_volume_and_its_config_as_they_were() {
    each_fs("resize-fails", |fs, pool, path| {
        let v = create_origin(pool, "appvms/vm/private", MIB);
        write_cycle(pool, &v, 0, &pattern(5, 4096));
        let img = image_path(path, &v);
        let before = config_on_disk(path, &v);
        let failed = while_immutable(&img, || pool.resize(&v, 2 * MIB, false));
        assert!(failed.is_err(), "[{}] {failed:?}", fs.name);
        assert_eq!(config_on_disk(path, &v), before, "[{}] config", fs.name);
        assert_eq!(pool.info(&v).unwrap().size, MIB, "[{}]", fs.name);
        assert_eq!(std::fs::metadata(&img).unwrap().len(), MIB);
        let names: Vec<String> = std::fs::read_dir(img.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains('~')),
            "[{}] no temporary file: {names:?}",
            fs.name
        );
        assert_eq!(
            pool.resize(&v, 2 * MIB, false).unwrap(),
            ResizeOutcome::Committed
        );
        assert_eq!(config_on_disk(path, &v)["size"], 2 * MIB);
        assert_eq!(read_committed(path, &v, 0, 4096), pattern(5, 4096));
    });
}

/// A stop whose commit fails at its last step (the rename over `N.img`,
/// here immutable) keeps the config that goes with the image it leaves:
/// its size, and the grown size of its run still waiting in the dirty
/// image, which the next start commits. Before, the config said the new
/// size, with no run waiting for it.
#[test]
fn a_commit_whose_rename_fails_keeps_the_config_of_the_image_it_leaves() {
    each_fs("commit-fails", |fs, pool, path| {
        let v = create_origin(pool, "appvms/vm/private", MIB);
        let f = pool.start(&v).unwrap();
        write_at(&f, 0, &pattern(6, 4096));
        pool.resize(&v, 2 * MIB, false).unwrap();
        drop(f);
        let before = config_on_disk(path, &v);
        let img = image_path(path, &v);
        let failed = while_immutable(&img, || pool.stop(&v));
        assert!(failed.is_err(), "[{}] {failed:?}", fs.name);
        let after = config_on_disk(path, &v);
        for key in ["size", "dirty_size", "generation"] {
            assert_eq!(after[key], before[key], "[{}] {key}", fs.name);
        }
        assert_eq!(pool.info(&v).unwrap().size, MIB, "[{}]", fs.name);
        // The next start commits the run first, at its size.
        drop(pool.start(&v).unwrap());
        pool.stop(&v).unwrap();
        assert_eq!(pool.info(&v).unwrap().size, 2 * MIB, "[{}]", fs.name);
        assert_eq!(config_on_disk(path, &v)["size"], 2 * MIB);
        assert_eq!(read_committed(path, &v, 0, 4096), pattern(6, 4096));
    });
}

#[test]
fn resize_of_a_running_volume_changes_only_the_dirty_image() {
    each_fs("resize-running", |fs, pool, path| {
        let o = create_origin(pool, "appvms/vm/private", MIB);
        let s = create_snapshot(pool, "appvms/vm/root", MIB, &o);
        let t = create_kind(pool, "appvms/vm/volatile", MIB, NewKind::Volatile);
        for v in [&o, &s, &t] {
            let f = pool.start(v).unwrap();
            assert_eq!(
                pool.resize(v, 2 * MIB, false).unwrap(),
                ResizeOutcome::Running
            );
            assert_eq!(f.metadata().unwrap().len(), 2 * MIB, "[{}] {v}", fs.name);
            assert_eq!(pool.info(v).unwrap().size, 2 * MIB);
            drop(f);
        }
        assert_eq!(
            std::fs::metadata(image_path(path, &o)).unwrap().len(),
            MIB,
            "the committed image is untouched while running"
        );
        for v in [&o, &s, &t] {
            pool.stop(v).unwrap();
        }
        // Origin: persists at commit. Volatile: persists. Snapshot: follows
        // its source again.
        assert_eq!(pool.info(&o).unwrap().size, 2 * MIB, "[{}]", fs.name);
        assert_eq!(
            std::fs::metadata(image_path(path, &o)).unwrap().len(),
            2 * MIB
        );
        assert_eq!(pool.info(&t).unwrap().size, 2 * MIB);
        let f = pool.start(&t).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 2 * MIB);
        drop(f);
        pool.stop(&t).unwrap();
        // The snapshot's source is now 2 MiB; shrink the source back to see
        // that the snapshot follows it and not its own running resize.
        pool.resize(&o, MIB, true).unwrap();
        assert_eq!(
            pool.info(&s).unwrap().size,
            MIB,
            "[{}] snapshot follows its source",
            fs.name
        );
        let f = pool.start(&s).unwrap();
        assert_eq!(f.metadata().unwrap().len(), MIB);
        drop(f);
        pool.stop(&s).unwrap();
    });
}

#[test]
fn same_size_resize_is_a_no_op_and_shrink_needs_allow_shrink() {
    each_fs("resize-noop", |fs, pool, path| {
        let v = create_origin(pool, "appvms/vm/private", 2 * MIB);
        let ino = std::fs::metadata(image_path(path, &v)).unwrap().ino();
        assert_eq!(
            pool.resize(&v, 2 * MIB, false).unwrap(),
            ResizeOutcome::Unchanged
        );
        assert_eq!(
            std::fs::metadata(image_path(path, &v)).unwrap().ino(),
            ino,
            "[{}] no-op keeps the file",
            fs.name
        );
        let e = pool.resize(&v, MIB, false).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Refused, "{e}");
        assert!(e.to_string().contains("--allow-shrink"), "{e}");
        assert_eq!(
            std::fs::metadata(image_path(path, &v)).unwrap().len(),
            2 * MIB
        );
        pool.resize(&v, MIB, true).unwrap();
        assert_eq!(std::fs::metadata(image_path(path, &v)).unwrap().len(), MIB);
    });
}

#[test]
fn volumes_whose_names_share_a_prefix_never_touch_each_other() {
    each_fs("prefix", |fs, pool, path| {
        let priv_ = create_origin(pool, "appvms/vm/priv", MIB);
        let private = create_origin(pool, "appvms/vm/private", MIB);
        write_cycle(pool, &private, 0, &pattern(1, 4096));
        write_cycle(pool, &private, 0, &pattern(2, 4096));
        write_cycle(pool, &priv_, 0, &pattern(3, 4096));
        // Plant leftovers of `private` that a prefix glob of `priv` would
        // match, and a running-looking state; then reopen (recovery) and
        // work `priv` hard.
        let dir = vm_dir(path, &private);
        std::fs::write(dir.join("private-dirty.img~tmp"), b"x").unwrap();
        let before: Vec<String> = files_of(path, &private)
            .into_iter()
            .filter(|f| f.starts_with("private"))
            .collect();
        let ids_before = revision_ids(pool, &private);
        pool.set(&priv_, Property::RevisionsToKeep(0)).unwrap();
        write_cycle(pool, &priv_, 0, &pattern(4, 4096));
        pool.resize(&priv_, 2 * MIB, false).unwrap();
        pool.remove(&priv_).unwrap();
        let after: Vec<String> = files_of(path, &private)
            .into_iter()
            .filter(|f| f.starts_with("private"))
            .collect();
        assert_eq!(
            after, before,
            "[{}] priv's operations touched private's files",
            fs.name
        );
        assert_eq!(revision_ids(pool, &private), ids_before);
        assert_eq!(read_committed(path, &private, 0, 4096), pattern(2, 4096));
    });
    // Recovery of `priv` must not remove `private`'s temporary file either
    // (only `private`'s own recovery does).
    for fs in filesystems() {
        let (pool, path) = new_pool(&fs, "prefix-recovery");
        let p = create_origin(&pool, "appvms/vm/priv", MIB);
        let q = create_origin(&pool, "appvms/vm/private", MIB);
        drop(pool);
        let dir = vm_dir(&path, &p);
        std::fs::write(dir.join("priv-dirty.img~tmp"), b"x").unwrap();
        std::fs::write(dir.join("private.img~resize"), b"y").unwrap();
        // Make `private`'s config unreadable so only `priv` recovers.
        let meta = path.join(".reflinkfs/volumes/appvms/vm/private.json");
        let good = std::fs::read(&meta).unwrap();
        std::fs::write(&meta, b"{broken").unwrap();
        let pool = Pool::open(&path).unwrap();
        let files = files_of(&path, &p);
        assert!(
            !files.contains(&"priv-dirty.img~tmp".to_owned()),
            "[{}] own temp removed",
            fs.name
        );
        assert!(
            files.contains(&"private.img~resize".to_owned()),
            "[{}] priv's recovery removed private's file",
            fs.name
        );
        drop(pool);
        std::fs::write(&meta, good).unwrap();
        let pool = Pool::open(&path).unwrap();
        assert!(!files_of(&path, &q).contains(&"private.img~resize".to_owned()));
        drop(pool);
    }
}

#[test]
fn a_pool_with_a_missing_image_still_opens() {
    for fs in filesystems() {
        let (pool, path) = new_pool(&fs, "missing");
        let gone = create_origin(&pool, "appvms/a/private", MIB);
        let ok = create_origin(&pool, "appvms/b/private", MIB);
        drop(pool);
        std::fs::remove_file(image_path(&path, &gone)).unwrap();
        let pool = Pool::open(&path).unwrap();
        let list = pool.list().unwrap();
        let state = |v: &str| list.iter().find(|i| i.vid == v).unwrap().state;
        assert_eq!(
            state("appvms/a/private"),
            VolumeStateName::Missing,
            "[{}]",
            fs.name
        );
        assert_eq!(state("appvms/b/private"), VolumeStateName::Stopped);
        let e = pool.start(&gone).unwrap_err();
        assert!(matches!(e, Error::MissingImage { .. }), "{e}");
        assert!(e.to_string().contains("private.img"), "{e}");
        write_cycle(&pool, &ok, 0, b"fine");
        assert_eq!(read_committed(&path, &ok, 0, 4), b"fine");
        assert!(
            !pool.check(None).unwrap().is_empty(),
            "check reports the missing image"
        );
    }
}

#[test]
fn optional_volumes_without_an_image_are_skipped() {
    each_fs("optional", |_, pool, path| {
        let v = vid("kernels/k1/modules");
        let mut o = CreateOptions::origin(MIB);
        o.optional = true;
        pool.create(&v, &o).unwrap();
        std::fs::remove_file(image_path(path, &v)).unwrap();
        assert!(pool
            .list()
            .unwrap()
            .iter()
            .all(|i| i.vid != "kernels/k1/modules"));
        assert_eq!(pool.check(None).unwrap(), vec![]);
    });
}

#[test]
fn read_only_pool_refuses_rw_and_revisions_with_the_pools_reason() {
    for fs in filesystems() {
        let path = scratch_dir(&fs, "ro").join("pool");
        let opts = InitOptions {
            setup_check: fs.reflink,
            revisions_to_keep: 1,
            read_only: true,
        };
        let pool = Pool::init(&path, &opts).unwrap();
        let v = create_origin(&pool, "kernels/k1/vmlinuz", MIB);
        let info = pool.info(&v).unwrap();
        assert!(
            !info.rw && info.revisions_to_keep == 0,
            "[{}] forced defaults",
            fs.name
        );
        for prop in [
            Property::Rw(true),
            Property::RevisionsToKeep(1),
            Property::RevisionsToKeep(-1),
        ] {
            let e = pool.set(&v, prop).unwrap_err();
            assert_eq!(e.class(), ErrorClass::Refused, "{e}");
            assert!(e.to_string().contains("read-only"), "[{}] {e}", fs.name);
        }
        let mut o = CreateOptions::origin(MIB);
        o.rw = Some(true);
        let e = pool.create(&vid("kernels/k1/initramfs"), &o).unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
        pool.set(&v, Property::Rw(false)).unwrap();
        assert!(!pool.info(&v).unwrap().rw);
    }
}

#[test]
fn a_second_owner_is_refused_with_the_holders_pid() {
    each_fs("lock", |_, _pool, path| {
        let e = Pool::open(path).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Busy);
        assert!(
            e.to_string().contains(&std::process::id().to_string()),
            "{e}"
        );
    });
}

#[test]
fn recovery_commits_a_leftover_dirty_image_and_drops_snapshot_leftovers() {
    for fs in filesystems() {
        let (pool, path) = new_pool(&fs, "recover");
        let o = create_origin(&pool, "appvms/vm/private", MIB);
        let s = create_snapshot(&pool, "appvms/vm/root", MIB, &o);
        write_cycle(&pool, &o, 0, &pattern(1, 4096));
        let fo = pool.start(&o).unwrap();
        let fs_ = pool.start(&s).unwrap();
        write_at(&fo, 0, &pattern(2, 4096));
        write_at(&fs_, 0, &pattern(3, 4096));
        // The process "dies" with both running: the pool is dropped without
        // stop.
        drop((fo, fs_, pool));
        let pool = Pool::open(&path).unwrap();
        assert_eq!(
            read_committed(&path, &o, 0, 4096),
            pattern(2, 4096),
            "[{}] the last written data is kept",
            fs.name
        );
        assert_eq!(revision_ids(&pool, &o), ["2"]);
        assert!(!vm_dir(&path, &s).join("root-dirty.img").exists());
        assert_eq!(pool.check(None).unwrap(), vec![]);
    }
}

#[test]
fn legacy_revision_names_are_recognised_and_bad_names_ignored() {
    each_fs("legacy", |fs, pool, path| {
        let v = create_origin(pool, "appvms/vm/private", MIB);
        pool.set(&v, Property::RevisionsToKeep(3)).unwrap();
        let dir = vm_dir(path, &v);
        std::fs::write(
            dir.join("private.img@2020-01-02T03:04:05Z"),
            vec![7u8; MIB as usize],
        )
        .unwrap();
        std::fs::write(dir.join("private.img.x@garbage"), b"?").unwrap();
        let revs = pool.revisions(&v).unwrap();
        assert_eq!(revs.len(), 1, "[{}] {revs:?}", fs.name);
        assert_eq!(
            revs[0].id,
            RevisionId::Legacy("2020-01-02T03:04:05Z".into())
        );
        pool.revert(&v, Some("2020-01-02T03:04:05Z")).unwrap();
        assert_eq!(read_committed(path, &v, 0, 16), vec![7u8; 16]);
        // The numbered revision saved by the revert sorts after the legacy one.
        let ids = revision_ids(pool, &v);
        assert_eq!(ids, ["@2020-01-02T03:04:05Z", "1"]);
    });
}

#[test]
fn files_are_created_with_mode_0600() {
    each_fs("modes", |fs, pool, path| {
        let (v, _f) = running_origin(pool);
        for name in files_of(path, &v) {
            let mode = std::fs::metadata(vm_dir(path, &v).join(&name))
                .unwrap()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "[{}] {name}", fs.name);
        }
        pool.stop(&v).unwrap();
    });
}

#[test]
fn remove_is_refused_while_running_and_cleans_everything() {
    each_fs("remove", |fs, pool, path| {
        let (v, f) = running_origin(pool);
        assert_eq!(pool.remove(&v).unwrap_err().class(), ErrorClass::Busy);
        drop(f);
        pool.stop(&v).unwrap();
        pool.remove(&v).unwrap();
        assert!(
            !vm_dir(path, &v).exists(),
            "[{}] the empty VM directory is removed",
            fs.name
        );
        assert!(!path.join(".reflinkfs/volumes/appvms/vm").exists());
        assert!(matches!(pool.info(&v).unwrap_err(), Error::NoSuchVolume(_)));
        // A volume with the same vid starts fresh.
        let v = create_origin(pool, "appvms/vm/private", MIB);
        assert_eq!(read_committed(path, &v, 0, 1), [0]);
        assert!(revision_ids(pool, &v).is_empty());
    });
}

#[test]
fn usage_reports_shared_and_exclusive_bytes() {
    for fs in filesystems() {
        let (pool, _) = new_pool(&fs, "usage");
        let v = create_origin(&pool, "appvms/vm/private", 8 * MIB);
        write_cycle(&pool, &v, 0, &pattern(1, 4 * MIB as usize));
        write_cycle(&pool, &v, 0, &pattern(2, MIB as usize));
        let u = pool.info(&v).unwrap().usage.unwrap();
        assert!(u.total.allocated >= 5 * MIB, "[{}] {u:?}", fs.name);
        assert_eq!(u.total.allocated, u.total.shared + u.total.exclusive);
        if fs.reflink {
            // The revision and the image share the 3 MiB the last commit
            // did not overwrite.
            assert!(u.total.shared >= 3 * MIB, "[{}] {u:?}", fs.name);
        } else {
            assert_eq!(u.total.shared, 0, "[{}] copy mode shares nothing", fs.name);
        }
        let p = pool.pool_info().unwrap();
        assert!(p.backing.size > 0 && p.pool_allocated >= 5 * MIB, "{p:?}");
        // The scratch filesystems are named after their type; a pool on
        // the temporary directory may be on anything.
        if fs.name != "tmp" {
            assert_eq!(p.backing.filesystem, fs.name);
        }
    }
}

/// Issue 17 part 1: a pinned revision outlives every prune (100 restarts
/// of a VM that writes each time, a lower revisions_to_keep, a revert to
/// it, a reopen), does not count against revisions_to_keep, and goes only
/// when unpinned or with `remove --force`.
#[test]
fn a_pinned_revision_outlives_every_prune() {
    each_fs("pins", |fs, pool, path| {
        let ctx = fs.name.clone();
        let v = create_origin(pool, "appvms/vm/private", MIB);
        write_cycle(pool, &v, 0, &pattern(1, 4096));
        write_cycle(pool, &v, 0, &pattern(2, 4096));
        // Revision 2 holds pattern 1; pin it.
        assert_eq!(revision_ids(pool, &v), ["2"], "[{ctx}]");
        let (r, _) = pool
            .pin_revision(&v, "2", Some("before the upgrade".into()))
            .unwrap();
        assert_eq!(r.id.to_string(), "2");
        for i in 0..100u8 {
            write_cycle(pool, &v, 4096, &pattern(i, 512));
        }
        let revs = pool.revisions(&v).unwrap();
        let pinned: Vec<_> = revs.iter().filter(|r| r.pin.is_some()).collect();
        assert_eq!(pinned.len(), 1, "[{ctx}] {revs:?}");
        assert_eq!(pinned[0].id.to_string(), "2");
        assert_eq!(
            pinned[0].pin.as_ref().unwrap().note.as_deref(),
            Some("before the upgrade")
        );
        assert!(
            pinned[0].exclusive.is_some(),
            "[{ctx}] its own bytes are shown"
        );
        assert_eq!(
            revs.len(),
            2,
            "[{ctx}] one pinned + revisions_to_keep=1: {revs:?}"
        );
        pool.set(&v, Property::RevisionsToKeep(0)).unwrap();
        assert_eq!(revision_ids(pool, &v), ["2"], "[{ctx}] set keeps the pin");
        // Unlinking it is refused (EPERM through the mount).
        let e = pool.remove_revision(&v, "2").unwrap_err();
        assert_eq!(e.errno(), libc::EPERM, "[{ctx}] {e}");
        // A revert to it keeps it, in constant time: a link of its file.
        pool.set(&v, Property::RevisionsToKeep(1)).unwrap();
        pool.revert(&v, Some("2")).unwrap();
        let dir = vm_dir(path, &v);
        let rev2 = revision_files(path, "appvms/vm/private")
            .into_iter()
            .find(|f| f.starts_with("private.img.2@"))
            .expect("revision 2 stays");
        assert_eq!(
            std::fs::metadata(dir.join(&rev2)).unwrap().ino(),
            std::fs::metadata(image_path(path, &v)).unwrap().ino(),
            "[{ctx}] the revert linked the revision"
        );
        assert_eq!(read_committed(path, &v, 0, 4096), pattern(1, 4096));
        // Start, write, stop: the pinned revision is untouched.
        write_cycle(pool, &v, 0, &pattern(7, 4096));
        assert!(revision_ids(pool, &v).contains(&"2".to_string()), "[{ctx}]");
        let f = File::open(dir.join(&rev2)).unwrap();
        assert_eq!(
            read_at(&f, 0, 4096),
            pattern(1, 4096),
            "[{ctx}] pinned data intact"
        );
        // Remove needs --force and names the pin.
        let e = pool.remove(&v).unwrap_err();
        assert!(
            e.to_string().contains("pinned revisions (2)"),
            "[{ctx}] {e}"
        );
        assert!(pool.info(&v).is_ok());
        let (_, was) = pool.unpin_revision(&v, "2").unwrap();
        assert!(was);
        write_cycle(pool, &v, 0, &pattern(8, 4096));
        assert!(
            !revision_ids(pool, &v).contains(&"2".to_string()),
            "[{ctx}] unpinned, pruned"
        );
        pool.pin_revision(&v, &revision_ids(pool, &v)[0], None)
            .unwrap();
        pool.remove_forced(&v, true).unwrap();
        assert!(pool.info(&v).is_err());
    });
}

/// Issue 17 part 2: `discard-changes` and a revert of a running volume
/// happen at its stop; `cancel-pending` withdraws them; snapshot, volatile
/// and revisions_to_keep=-1 volumes, and stopped ones, refuse.
#[test]
fn queued_changes_happen_at_the_stop() {
    each_fs("pending", |fs, pool, path| {
        let ctx = fs.name.clone();
        let (v, f) = running_origin(pool);
        write_at(&f, 0, b"dropped");
        pool.discard_changes(&v).unwrap();
        assert!(pool.info(&v).unwrap().pending.is_some());
        assert_eq!(pool.pending_changes().len(), 1);
        write_at(&f, 0, b"dropped too");
        drop(f);
        let revs_before = revision_ids(pool, &v);
        assert_eq!(pool.stop(&v).unwrap(), StopOutcome::Discarded, "[{ctx}]");
        assert_eq!(
            read_committed(path, &v, 0, 1),
            b"x",
            "[{ctx}] as at the start"
        );
        assert_eq!(
            revision_ids(pool, &v),
            revs_before,
            "[{ctx}] no new revision"
        );
        assert_eq!(pool.info(&v).unwrap().pending, None);

        // Withdrawn: the run commits as usual.
        let f = pool.start(&v).unwrap();
        write_at(&f, 0, b"kept");
        pool.discard_changes(&v).unwrap();
        assert!(pool.cancel_pending(&v).unwrap());
        assert!(!pool.cancel_pending(&v).unwrap());
        drop(f);
        assert!(matches!(
            pool.stop(&v).unwrap(),
            StopOutcome::Committed { .. }
        ));
        assert_eq!(read_committed(path, &v, 0, 4), b"kept", "[{ctx}]");

        // A revert of the running volume is queued, then done at the stop.
        let target = revision_ids(pool, &v).last().unwrap().clone();
        let f = pool.start(&v).unwrap();
        write_at(&f, 0, b"gone");
        let queued = pool.revert_or_queue(&v, Some(&target)).unwrap();
        assert!(
            matches!(queued, reflinkfs::engine::RevertOutcome::Queued { .. }),
            "{queued:?}"
        );
        drop(f);
        assert!(
            matches!(pool.stop(&v).unwrap(), StopOutcome::Reverted { .. }),
            "[{ctx}]"
        );
        assert_eq!(
            read_committed(path, &v, 0, 1),
            b"x",
            "[{ctx}] revision {target}'s data"
        );
        assert!(
            revision_ids(pool, &v).contains(&target),
            "[{ctx}] the target stays"
        );
        // A queued revert whose target was removed by hand: the run is
        // dropped all the same, and nothing stays queued for the next run.
        let before = read_committed(path, &v, 0, 4096);
        let f = pool.start(&v).unwrap();
        write_at(&f, 0, b"also gone");
        let t = revision_ids(pool, &v)[0].clone();
        pool.revert_or_queue(&v, Some(&t)).unwrap();
        let file = revision_files(path, "appvms/vm/private")
            .into_iter()
            .find(|n| n.starts_with(&format!("private.img.{t}@")))
            .unwrap();
        std::fs::remove_file(vm_dir(path, &v).join(file)).unwrap();
        drop(f);
        assert_eq!(pool.stop(&v).unwrap(), StopOutcome::Discarded, "[{ctx}]");
        assert_eq!(read_committed(path, &v, 0, 4096), before, "[{ctx}]");
        assert_eq!(pool.info(&v).unwrap().pending, None, "[{ctx}]");
        // Stopped: a revert is at once.
        let done = pool.revert_or_queue(&v, None).unwrap();
        assert!(
            matches!(done, reflinkfs::engine::RevertOutcome::Done { .. }),
            "{done:?}"
        );

        // Refusals, which change nothing.
        let e = pool.discard_changes(&v).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Refused, "[{ctx}] not running: {e}");
        let tpl = template(pool, 3);
        let snap = create_snapshot(pool, "appvms/s/root", MIB, &tpl);
        let _run = pool.start(&snap).unwrap();
        let e = pool.discard_changes(&snap).unwrap_err();
        assert!(e.to_string().contains("never commits"), "[{ctx}] {e}");
        pool.stop(&snap).unwrap();
        let w = create_origin(pool, "appvms/w/private", MIB);
        pool.set(&w, Property::RevisionsToKeep(-1)).unwrap();
        let _run = pool.start(&w).unwrap();
        let e = pool.discard_changes(&w).unwrap_err();
        assert!(e.to_string().contains("only copy"), "[{ctx}] {e}");
        pool.stop(&w).unwrap();
        assert_eq!(pool.pending_changes(), vec![]);
    });
}

/// A revert links the revision it goes back to: recovery at the next open
/// must not take that revision for a half-made commit's (the same file as
/// `N.img`) and remove it.
#[test]
fn recovery_keeps_a_revision_a_revert_linked() {
    for fs in filesystems() {
        let (pool, path) = new_pool(&fs, "revert-link-reopen");
        let v = create_origin(&pool, "appvms/vm/private", MIB);
        pool.set(&v, Property::RevisionsToKeep(2)).unwrap();
        write_cycle(&pool, &v, 0, &pattern(1, 4096));
        write_cycle(&pool, &v, 0, &pattern(2, 4096));
        pool.pin_revision(&v, "1", None).unwrap();
        pool.revert(&v, Some("2")).unwrap();
        pool.revert(&v, Some("1")).unwrap();
        let before = revision_ids(&pool, &v);
        drop(pool);
        let pool = Pool::open(&path).unwrap();
        assert_eq!(revision_ids(&pool, &v), before, "[{}]", fs.name);
        assert_eq!(read_committed(&path, &v, 0, 4096), vec![0u8; 4096]);
        assert!(pool.check(None).unwrap().is_empty());
    }
}
