//! Volume names and the files they own (issue 9, part 1): `volume remove p`
//! once deleted the files of a sibling volume `p.img.7`, because a name
//! that merely started like one of `p`'s revisions was taken as `p`'s.
//!
//! - every file name one volume generates is owned by that volume and by no
//!   other volume of the VM, for any set of valid names;
//! - removing, pruning, reverting, committing or checking one volume never
//!   touches another's files, on a real pool;
//! - new names that look like another volume's files are refused.

use crate::common;

use common::tree::dir_files;
use common::*;
use proptest::prelude::*;
use reflinkfs::engine::config::FORMAT_VERSION;
use reflinkfs::engine::revision::revision_file_name;
use reflinkfs::engine::{Names, Pool, Property, ValidVid};
use std::path::Path;

/// Pieces that make names collide if anything can: the suffixes of our own
/// files, digits, dots and dashes.
const PIECES: &[&str] = &[
    "p", "q", ".img", ".7", "-dirty", "-import", "img", "1", "-", ".", "x", "_", "dirty",
];

fn name_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(PIECES), 1..5)
        .prop_map(|parts| parts.concat())
        .prop_filter("a valid volume id", |n| {
            ValidVid::new("appvms", "vm", n).is_ok()
        })
}

/// A set of names in one VM, most of them a base name with something
/// appended, since a name that extends another is where collisions hide.
fn names_strategy() -> impl Strategy<Value = Vec<String>> {
    (
        name_strategy(),
        prop::collection::vec(
            prop::collection::vec(prop::sample::select(PIECES), 1..4),
            1..4,
        ),
        prop::collection::vec(name_strategy(), 0..2),
    )
        .prop_map(|(base, tails, others)| {
            let mut set = std::collections::BTreeSet::new();
            set.insert(base.clone());
            for t in tails {
                set.insert(format!("{base}{}", t.concat()));
            }
            set.extend(others);
            set.into_iter()
                .filter(|n| ValidVid::new("appvms", "vm", n).is_ok())
                .collect::<Vec<_>>()
        })
        .prop_filter("two names or more", |v| v.len() >= 2)
}

/// Every name a volume generates: images, temporaries, revisions of both
/// forms.
fn files_of_name(name: &str) -> Vec<String> {
    let v = ValidVid::new("appvms", "vm", name).unwrap();
    let n = Names::of(&v);
    let ts = "2026-01-02T03:04:05Z";
    vec![
        n.img(),
        n.dirty(),
        n.import(),
        n.dirty_tmp(),
        n.img_tmp("resize"),
        n.img_tmp("revert"),
        revision_file_name(name, 1, ts),
        revision_file_name(name, 7, ts),
        revision_file_name(name, 123, ts),
        format!("{name}.img@{ts}"),
    ]
}

proptest! {
    #[test]
    fn no_file_is_owned_by_two_volumes(names in names_strategy()) {
        let vids: Vec<ValidVid> = names
            .iter()
            .map(|n| ValidVid::new("appvms", "vm", n).unwrap())
            .collect();
        for v in &vids {
            for f in files_of_name(v.name()) {
                prop_assert!(Names::of(v).owns(&f), "{} does not own its own {}", v, f);
                for o in vids.iter().filter(|o| *o != v) {
                    prop_assert!(!Names::of(o).owns(&f), "{} owns {}, a file of {}", o, f, v);
                }
            }
        }
    }
}

#[test]
fn the_reported_sibling_is_not_owned() {
    let p = vid("n/v/p");
    for f in [
        "p.img.7.img",
        "p.img.7.img.1@2026-01-02T03:04:05Z",
        "p.img.7-dirty.img",
        "p.img.7-import.img",
    ] {
        assert!(!Names::of(&p).owns(f), "p must not own {f}");
    }
}

#[test]
fn new_names_that_look_like_revisions_are_refused() {
    let fs = &filesystems()[0];
    let (pool, path) = new_pool(fs, "names-refused");
    for bad in ["n/v/p.img.7", "n/v/p.img-x", "n/v/p-dirty", "n/v/p.img"] {
        let Ok(v) = bad.parse::<ValidVid>() else {
            continue; // refused as an id already
        };
        let e = pool
            .create(&v, &reflinkfs::engine::CreateOptions::origin(MIB))
            .unwrap_err();
        assert!(e.to_string().contains(".img"), "{bad}: {e}");
        assert_eq!(e.class().exit_code(), 3, "{bad}: invalid input");
    }
    assert!(
        files_of(&path, &vid("n/v/x")).is_empty(),
        "nothing was made"
    );
    // clone to a new name goes through the same check
    let src = create_origin(&pool, "n/v/src", MIB);
    let e = pool
        .clone_volume(&src, &pool, &vid("n/v/dst.img.1"))
        .unwrap_err();
    assert!(e.to_string().contains(".img"), "{e}");
    // src's own files only: its image, and its precache in a reflink pool.
    let mut want = vec!["src.img".to_owned()];
    if fs.reflink {
        want.insert(0, "src-precache.img".to_owned());
    }
    assert_eq!(files_of(&path, &src), want);
}

/// Makes a volume the way an older pool (or a hand edit) has it: its name
/// may be one a new volume may no longer have.
fn plant_origin(pool_path: &Path, v: &ValidVid, tag: u8) {
    let cfg = serde_json::json!({
        "format": FORMAT_VERSION, "vid": v, "snap_on_start": false, "save_on_stop": true,
        "size": 64 * 1024, "rw": true, "revisions_to_keep": 2, "next_revision": 1,
        "generation": 0,
    });
    plant_config(pool_path, v, cfg);
    let dir = vm_dir(pool_path, v);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(image_path(pool_path, v), pattern(tag, 64 * 1024)).unwrap();
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Remove,
    Prune,
    Revert,
    Commit,
    Check,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Remove),
        Just(Op::Prune),
        Just(Op::Revert),
        Just(Op::Commit),
        Just(Op::Check),
    ]
}

fn one_case(names: &[String], target: usize, op: Op) -> Result<(), TestCaseError> {
    let fs = &filesystems()[0];
    let (pool, path) = new_pool(fs, "names-siblings");
    drop(pool);
    let vids: Vec<ValidVid> = names
        .iter()
        .map(|n| ValidVid::new("appvms", "vm", n).unwrap())
        .collect();
    for (i, v) in vids.iter().enumerate() {
        plant_origin(&path, v, i as u8);
    }
    let pool = Pool::open(&path).unwrap();
    for (i, v) in vids.iter().enumerate() {
        for round in 0..3u8 {
            write_cycle(&pool, v, 0, &pattern(i as u8 ^ (round << 4), 4096));
        }
    }
    prop_assert_eq!(pool.check(None).unwrap(), vec![]);
    let dir = vm_dir(&path, &vids[0]);
    let before = dir_files(&dir);
    let t = &vids[target];
    match op {
        Op::Remove => pool.remove(t).unwrap(),
        Op::Prune => pool.set(t, Property::RevisionsToKeep(0)).unwrap(),
        Op::Revert => {
            pool.revert(t, None).unwrap();
        }
        Op::Commit => {
            write_cycle(&pool, t, 0, b"changed");
        }
        Op::Check => {
            prop_assert_eq!(pool.check(Some(t)).unwrap(), vec![]);
        }
    }
    // Reopening runs recovery, which must not touch siblings either.
    drop(pool);
    let pool = Pool::open(&path).unwrap();
    prop_assert_eq!(pool.check(None).unwrap(), vec![]);
    let after = dir_files(&dir);
    for (file, state) in &before {
        let owner = vids.iter().find(|v| Names::of(v).owns(file)).unwrap();
        if owner == t {
            continue;
        }
        prop_assert_eq!(
            after.get(file),
            Some(state),
            "{:?} of {} changed {}",
            op,
            t,
            file
        );
    }
    for file in after.keys().filter(|f| !before.contains_key(*f)) {
        prop_assert!(Names::of(t).owns(file), "{:?} of {} made {}", op, t, file);
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn operations_on_one_volume_never_touch_a_siblings_files(
        names in names_strategy(),
        pick in any::<prop::sample::Index>(),
        op in op_strategy(),
    ) {
        let target = pick.index(names.len());
        one_case(&names, target, op)?;
    }
}

/// The exact case of the report: `p` and `p.img.7` side by side.
#[test]
fn removing_p_keeps_p_img_7() {
    for op in [Op::Remove, Op::Prune, Op::Revert, Op::Commit, Op::Check] {
        one_case(&["p".to_owned(), "p.img.7".to_owned()], 0, op).unwrap();
    }
}
