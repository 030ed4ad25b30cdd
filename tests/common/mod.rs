//! Shared helpers of the integration tests.
//!
//! `scripts/test` makes scratch XFS (reflink=1), btrfs and ext4 filesystems
//! on loop devices and names them in `REFLINKFS_TEST_FS`
//! (`xfs=/mnt/a,btrfs=/mnt/b,ext4=/mnt/c`). Without it, a plain `cargo test`
//! falls back to a temporary directory in copy mode and says so; in CI
//! (`CI=true`) a missing filesystem is a failure, never a skip.
#![allow(dead_code)]

pub mod cli;
pub mod mount;
pub mod tree;

/// Ends the test here unless `$ready` holds: a `require…` check, which
/// skips with a message outside CI and fails in CI.
#[allow(unused_macros)]
macro_rules! need {
    ($ready:expr) => {
        if !$ready {
            return;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use need;

use reflinkfs::engine::{CreateOptions, InitOptions, NewKind, Pool, ValidVid};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Clone)]
pub struct TestFs {
    /// `xfs`, `btrfs`, `ext4` or `tmp`.
    pub name: String,
    pub root: PathBuf,
    /// Whether pools here use reflinks (XFS, btrfs) or copy mode.
    pub reflink: bool,
}

pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

fn parse_fs_list(var: &str) -> Option<Vec<TestFs>> {
    let v = std::env::var(var).ok().filter(|v| !v.is_empty())?;
    Some(
        v.split(',')
            .map(|item| {
                let (name, path) = item
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{var}: expected NAME=PATH, got {item:?}"));
                let root = PathBuf::from(path);
                assert!(root.is_dir(), "{var}: {path} is not a directory");
                TestFs {
                    name: name.to_owned(),
                    reflink: name != "ext4" && name != "tmp",
                    root,
                }
            })
            .collect(),
    )
}

static FALLBACK: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();

/// The filesystems every scenario runs on.
pub fn filesystems() -> Vec<TestFs> {
    init_logging();
    if let Some(list) = parse_fs_list("REFLINKFS_TEST_FS") {
        let names: Vec<&str> = list.iter().map(|f| f.name.as_str()).collect();
        if in_ci() {
            for want in ["xfs", "btrfs", "ext4"] {
                assert!(
                    names.contains(&want),
                    "CI=true but REFLINKFS_TEST_FS has no {want} filesystem"
                );
            }
        }
        return list;
    }
    assert!(
        !in_ci(),
        "CI=true but REFLINKFS_TEST_FS is not set: run the tests through scripts/test, \
         which makes the scratch XFS, btrfs and ext4 filesystems"
    );
    eprintln!(
        "WARNING: REFLINKFS_TEST_FS is not set; running on a temporary directory in copy \
         mode only. Run scripts/test for XFS, btrfs and ext4."
    );
    let dir = FALLBACK.get_or_init(|| tempfile::tempdir().expect("tempdir"));
    vec![TestFs {
        name: "tmp".into(),
        root: dir.path().to_owned(),
        reflink: false,
    }]
}

/// The scratch XFS, where a test runs on one filesystem only; without
/// `scripts/test`, the fallback directory.
pub fn xfs() -> TestFs {
    let all = filesystems();
    all.iter()
        .find(|f| f.name == "xfs")
        .cloned()
        .unwrap_or_else(|| all[0].clone())
}

/// Another of the scratch filesystems than `fs`, if there is one.
pub fn other_fs(fs: &TestFs) -> TestFs {
    let all = filesystems();
    all.iter().find(|f| f.root != fs.root).unwrap_or(fs).clone()
}

/// The small filesystems the ENOSPC tests fill up.
pub fn small_filesystems() -> Vec<TestFs> {
    init_logging();
    match parse_fs_list("REFLINKFS_TEST_SMALL_FS") {
        Some(list) => list,
        None => {
            assert!(
                !in_ci(),
                "CI=true but REFLINKFS_TEST_SMALL_FS is not set: run the tests through scripts/test"
            );
            eprintln!(
                "WARNING: REFLINKFS_TEST_SMALL_FS is not set; the ENOSPC test has nothing to fill"
            );
            Vec::new()
        }
    }
}

/// Whether the build has failpoints (`--features failpoints`, which
/// scripts/test passes). In CI a build without them is a failure.
pub fn require_failpoints() -> bool {
    if reflinkfs::engine::failpoint::ENABLED {
        return true;
    }
    assert!(
        !in_ci(),
        "CI=true but this build has no failpoints: build and test with --features failpoints (scripts/test does)"
    );
    eprintln!("SKIPPING (not in CI): this build has no failpoints; run with --features failpoints");
    false
}

pub fn init_logging() {
    let _ = env_logger::builder()
        .is_test(true)
        .filter_level(log::LevelFilter::Info)
        .parse_default_env()
        .try_init();
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty directory on `fs` for one test.
pub fn scratch_dir(fs: &TestFs, test: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = fs.root.join(format!("{test}-{}-{n}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A new pool on `fs`: reflink mode where the filesystem has reflinks,
/// copy mode elsewhere.
pub fn new_pool(fs: &TestFs, test: &str) -> (Pool, PathBuf) {
    new_pool_with(fs, test, 1)
}

pub fn new_pool_with(fs: &TestFs, test: &str, revisions_to_keep: i64) -> (Pool, PathBuf) {
    let path = scratch_dir(fs, test).join("pool");
    let opts = InitOptions {
        setup_check: fs.reflink,
        revisions_to_keep,
        read_only: false,
    };
    let pool = Pool::init(&path, &opts)
        .unwrap_or_else(|e| panic!("[{}] pool init in {}: {e}", fs.name, path.display()));
    assert_eq!(
        pool.config().copy_mode,
        !fs.reflink,
        "[{}] pool mode",
        fs.name
    );
    (pool, path)
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> String {
    p.to_str().expect("scratch paths are UTF-8").to_owned()
}

pub fn vid(s: &str) -> ValidVid {
    s.parse().unwrap()
}

pub const MIB: u64 = 1 << 20;

pub fn create_origin(pool: &Pool, v: &str, size: u64) -> ValidVid {
    let id = vid(v);
    pool.create(&id, &CreateOptions::origin(size)).unwrap();
    id
}

pub fn create_kind(pool: &Pool, v: &str, size: u64, kind: NewKind) -> ValidVid {
    let id = vid(v);
    let mut o = CreateOptions::origin(size);
    o.kind = kind;
    pool.create(&id, &o).unwrap();
    id
}

/// A new snapshot volume `v` of `source`.
pub fn create_snapshot(pool: &Pool, v: &str, size: u64, source: &ValidVid) -> ValidVid {
    create_kind(pool, v, size, NewKind::SnapshotOf(source.clone()))
}

/// Fills a 4 KiB-aligned block pattern unique to `tag` at `off`.
pub fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i as u8).wrapping_mul(31)).collect()
}

pub fn write_at(f: &File, off: u64, data: &[u8]) {
    f.write_all_at(data, off).unwrap();
}

pub fn read_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).unwrap();
    buf
}

/// Starts `v`, writes `data` at `off`, stops it; returns the stop outcome.
pub fn write_cycle(
    pool: &Pool,
    v: &ValidVid,
    off: u64,
    data: &[u8],
) -> reflinkfs::engine::StopOutcome {
    let f = pool.start(v).unwrap();
    write_at(&f, off, data);
    drop(f);
    pool.stop(v).unwrap()
}

/// Reads `len` bytes at `off` of the committed image of `v`.
pub fn read_committed(pool_path: &Path, v: &ValidVid, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(image_path(pool_path, v)).unwrap();
    read_at(&f, off, len)
}

pub fn image_path(pool_path: &Path, v: &ValidVid) -> PathBuf {
    pool_path
        .join(v.class())
        .join(v.vm())
        .join(format!("{}.img", v.name()))
}

pub fn vm_dir(pool_path: &Path, v: &ValidVid) -> PathBuf {
    pool_path.join(v.class()).join(v.vm())
}

/// The sorted file names in a VM's image directory.
pub fn files_of(pool_path: &Path, v: &ValidVid) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(vm_dir(pool_path, v)) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// The revision files of volume `v` in its VM directory, sorted:
/// `NAME.img.K@TS`, and the older `NAME.img@TS`.
pub fn revision_files(pool_path: &Path, v: &str) -> Vec<String> {
    let v = vid(v);
    let revision = |f: &String| {
        f.strip_prefix(v.name())
            .and_then(|rest| rest.strip_prefix(".img"))
            .is_some_and(|rest| rest.starts_with(['.', '@']) && rest.contains('@'))
    };
    files_of(pool_path, &v)
        .into_iter()
        .filter(revision)
        .collect()
}

/// Revision numbers of `v`, oldest first.
pub fn revision_ids(pool: &Pool, v: &ValidVid) -> Vec<String> {
    pool.revisions(v)
        .unwrap()
        .iter()
        .map(|r| r.id.to_string())
        .collect()
}

/// Where the config of volume `v` is stored.
pub fn config_path(pool_path: &Path, v: &ValidVid) -> PathBuf {
    pool_path
        .join(".reflinkfs/volumes")
        .join(v.class())
        .join(v.vm())
        .join(format!("{}.json", v.name()))
}

/// The config of volume `v` as stored on disk.
pub fn config_on_disk(pool_path: &Path, v: &ValidVid) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(config_path(pool_path, v)).unwrap()).unwrap()
}

/// Writes the config of volume `v` by hand, as an older pool or a hand
/// edit has it (the engine would refuse to make it).
pub fn plant_config(pool_path: &Path, v: &ValidVid, cfg: serde_json::Value) {
    let path = config_path(pool_path, v);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
}
