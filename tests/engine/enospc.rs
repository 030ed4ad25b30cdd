//! ENOSPC: on a nearly full scratch filesystem, a commit, a start, an
//! import and a resize fail cleanly (or succeed whole), and the old state
//! stays intact. Runs on the small XFS and ext4 filesystems that
//! scripts/test makes for this test alone.

use crate::common;

use common::*;
use reflinkfs::engine::{Pool, Property, StopOutcome};
use reflinkfs::ErrorClass;
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Writes a file of non-zero bytes until the filesystem is full.
fn fill(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("filler");
    let mut f = File::create(&path).unwrap();
    let block = vec![0x5au8; 1 << 20];
    loop {
        match f.write(&block) {
            Ok(n) if n == block.len() => {}
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Then the last small blocks, so almost nothing is left.
    let small = vec![0x5au8; 4096];
    while f.write(&small).is_ok_and(|n| n > 0) {}
    let _ = f.sync_all();
    path
}

fn no_leftovers(path: &Path, v: &reflinkfs::engine::ValidVid, ctx: &str) {
    for f in files_of(path, v) {
        assert!(
            !f.contains('~') && !f.ends_with("-import.img"),
            "{ctx}: leftover {f}"
        );
    }
}

#[test]
fn operations_on_a_full_filesystem_fail_cleanly() {
    let small = small_filesystems();
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert!(!small.is_empty(), "CI=true but no small filesystem to fill");
    }
    for fs in small {
        let dir = scratch_dir(&fs, "enospc");
        let path = dir.join("pool");
        let pool = Pool::init(
            &path,
            &reflinkfs::engine::InitOptions {
                setup_check: fs.reflink,
                revisions_to_keep: 2,
                read_only: false,
            },
        )
        .unwrap();
        let size = 8 * MIB;
        let v = create_origin(&pool, "appvms/vm/private", size);
        let old = pattern(0x11, size as usize);
        write_cycle(&pool, &v, 0, &old);
        // The import source lives outside the full filesystem.
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), pattern(0x22, size as usize)).unwrap();

        // A running volume whose writes will hit ENOSPC.
        let running = pool.start(&v).ok();
        let filler = fill(&dir);
        let ctx = format!("[{}]", fs.name);

        // Commit: the VM's writes fail with ENOSPC or land; the commit
        // either succeeds whole or fails and keeps the dirty image.
        let mut wrote_new = false;
        if let Some(f) = running {
            let new = pattern(0x33, size as usize);
            use std::os::unix::fs::FileExt;
            wrote_new = f.write_all_at(&new, 0).is_ok() && f.sync_all().is_ok();
            drop(f);
            match pool.stop(&v) {
                Ok(StopOutcome::Committed { .. }) | Ok(StopOutcome::Unchanged) => {}
                Ok(other) => panic!("{ctx}: {other:?}"),
                Err(e) => eprintln!("{ctx}: stop on a full filesystem failed cleanly: {e}"),
            }
        } else {
            eprintln!("{ctx}: start failed before the fill (fine)");
        }

        // Import: needs space for a full copy from another filesystem.
        let before = std::fs::read(image_path(&path, &v)).unwrap();
        let e = pool
            .import(&v, &File::open(src.path()).unwrap(), None)
            .expect_err("an import of 8 MiB of new data onto a full filesystem");
        assert!(
            matches!(e.class(), ErrorClass::NoSpace | ErrorClass::Busy),
            "{ctx}: {e}"
        );
        if e.class() == ErrorClass::NoSpace {
            assert_eq!(e.class().exit_code(), 7);
        }
        assert_eq!(
            std::fs::read(image_path(&path, &v)).unwrap(),
            before,
            "{ctx}: the import changed the image"
        );
        no_leftovers(&path, &v, &ctx);

        // Start in copy mode needs a full copy: ENOSPC, nothing left.
        if !fs.reflink {
            // A stop that failed above kept its dirty image (the VM's data):
            // a start must keep it too, not make a new one.
            let dirty = vm_dir(&path, &v).join("private-dirty.img");
            let kept_by_stop = dirty.exists();
            let e = pool
                .start(&v)
                .expect_err("a copy-mode start on a full filesystem");
            assert!(
                matches!(e.class(), ErrorClass::NoSpace | ErrorClass::Busy),
                "{ctx}: {e}"
            );
            no_leftovers(&path, &v, &ctx);
            assert!(
                !dirty.exists() || kept_by_stop || e.class() == ErrorClass::Busy,
                "{ctx}: a failed start left a dirty image: {e}"
            );
        }

        // Free the space: the pool recovers everything and works again.
        std::fs::remove_file(&filler).unwrap();
        drop(pool);
        let pool = Pool::open(&path).unwrap();
        let img = std::fs::read(image_path(&path, &v)).unwrap();
        let new = pattern(0x33, size as usize);
        assert!(
            img == old || (img == new && wrote_new),
            "{ctx}: the committed image is neither whole old nor whole new"
        );
        no_leftovers(&path, &v, &ctx);
        assert!(
            pool.check(None).unwrap().is_empty(),
            "{ctx}: {:?}",
            pool.check(None)
        );
        pool.set(&v, Property::RevisionsToKeep(1)).unwrap();
        write_cycle(&pool, &v, 0, b"after");
        pool.import(&v, &File::open(src.path()).unwrap(), None)
            .unwrap();
        assert_eq!(
            std::fs::read(image_path(&path, &v)).unwrap(),
            pattern(0x22, size as usize)
        );
    }
}
