//! The `reflinkfs` binary, driven end to end with `assert_cmd` against pools
//! on the scratch filesystems of `REFLINKFS_TEST_FS` (SPEC §2, §3, §5, §8).
//!
//! Every refusal is checked for its exit status (from `ErrorClass::ALL`),
//! for one clear `reflinkfs: error:` line on stderr, and for leaving the
//! disk exactly as it was: the whole scratch tree (pool and the files next
//! to it) is snapshotted before and after, with sizes, inodes, mtimes and
//! the content of small files.

mod common;

use assert_cmd::Command;
use common::{pattern, scratch_dir, TestFs};
use reflinkfs::ErrorClass;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

const MIB: usize = 1 << 20;
const MIB_U: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Running the binary.

/// A `reflinkfs` command with a clean environment: no `$REFLINKFS_POOL` and
/// no `RUST_LOG` from the caller, so stderr holds only what the CLI says.
fn reflinkfs() -> Command {
    let mut c = Command::cargo_bin("reflinkfs").expect("the reflinkfs binary is built");
    c.env_remove("REFLINKFS_POOL")
        .env_remove("RUST_LOG")
        .timeout(Duration::from_secs(120));
    c
}

fn s(p: &Path) -> String {
    p.to_str().expect("scratch paths are UTF-8").to_owned()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn code(class: ErrorClass) -> i32 {
    i32::from(class.exit_code())
}

/// Asserts success and returns stdout.
#[track_caller]
fn ok(fs: &TestFs, out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "[{}] {what}: expected success, got {}",
        fs.name,
        show(out)
    );
    text(&out.stdout)
}

/// Asserts the exit status of `class` and exactly one line on stderr, which
/// starts with `reflinkfs: error:` and says something. Returns that line.
#[track_caller]
fn fails(fs: &TestFs, out: &Output, class: ErrorClass, what: &str) -> String {
    let line = fails_logged(fs, out, class, what);
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.lines().count(),
        1,
        "[{}] {what}: expected one line on stderr, got {}",
        fs.name,
        show(out)
    );
    line
}

/// Like [`fails`], but log lines (warnings the pool's open prints about a
/// corrupt or planted file) may come before the one error line.
#[track_caller]
fn fails_logged(fs: &TestFs, out: &Output, class: ErrorClass, what: &str) -> String {
    assert_eq!(
        out.status.code(),
        Some(code(class)),
        "[{}] {what}: expected exit status {} ({}), got {}",
        fs.name,
        code(class),
        class.name(),
        show(out)
    );
    let stderr = text(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("reflinkfs: error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "[{}] {what}: expected one `reflinkfs: error:` line, got {}",
        fs.name,
        show(out)
    );
    assert_eq!(
        stderr.lines().last(),
        Some(errors[0]),
        "[{}] {what}: the error must be the last line, got {}",
        fs.name,
        show(out)
    );
    assert!(
        errors[0].len() > "reflinkfs: error: ".len() + 10,
        "[{}] {what}: the error says nothing: {}",
        fs.name,
        show(out)
    );
    errors[0].to_owned()
}

// ---------------------------------------------------------------------------
// A snapshot of a directory tree, to prove that nothing changed.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir {
        mode: u32,
    },
    File {
        size: u64,
        mode: u32,
        ino: u64,
        mtime: (i64, i64),
        /// The content, for files of at most 4 MiB.
        content: Option<Content>,
    },
    Symlink {
        target: PathBuf,
    },
    Other {
        mode: u32,
    },
    /// `.reflinkfs/lock`: every open writes its PID there, which is not a
    /// change of the pool's data.
    LockFile,
}

/// The content of a small file. Compared with memcmp, which is fast even
/// in a debug build; shown as its length and a checksum.
#[derive(Clone, PartialEq, Eq)]
struct Content(Vec<u8>);

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sum = self
            .0
            .iter()
            .fold(0u32, |a, &b| a.rotate_left(5) ^ u32::from(b));
        write!(f, "{} bytes, checksum {sum:08x}", self.0.len())
    }
}

type Tree = BTreeMap<String, Node>;

fn snapshot(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let ft = m.file_type();
            let node = if ft.is_symlink() {
                Node::Symlink {
                    target: std::fs::read_link(&path).unwrap(),
                }
            } else if ft.is_dir() {
                walk(root, &path, out);
                Node::Dir { mode: m.mode() }
            } else if ft.is_file() {
                let is_lock = path.file_name().is_some_and(|n| n == "lock")
                    && path
                        .parent()
                        .and_then(Path::file_name)
                        .is_some_and(|n| n == ".reflinkfs");
                if is_lock {
                    Node::LockFile
                } else {
                    Node::File {
                        size: m.len(),
                        mode: m.mode(),
                        ino: m.ino(),
                        mtime: (m.mtime(), m.mtime_nsec()),
                        content: (m.len() <= 4 * MIB_U)
                            .then(|| Content(std::fs::read(&path).unwrap())),
                    }
                }
            } else {
                Node::Other { mode: m.mode() }
            };
            out.insert(rel, node);
        }
    }
    let mut out = Tree::new();
    walk(root, root, &mut out);
    out
}

#[track_caller]
fn assert_same_tree(fs: &TestFs, before: &Tree, after: &Tree, what: &str) {
    if before == after {
        return;
    }
    let mut diff = String::new();
    for (k, v) in before {
        match after.get(k) {
            None => diff.push_str(&format!("  removed: {k} ({v:?})\n")),
            Some(w) if w != v => {
                diff.push_str(&format!("  changed: {k}\n    was {v:?}\n    now {w:?}\n"))
            }
            _ => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            diff.push_str(&format!("  created: {k} ({v:?})\n"));
        }
    }
    panic!("[{}] {what}: the disk changed:\n{diff}", fs.name);
}

// ---------------------------------------------------------------------------
// A pool made through the CLI, in a scratch directory of its own.

struct Fx {
    fs: TestFs,
    /// The scratch directory: the pool and the files next to it.
    dir: PathBuf,
    pool: PathBuf,
}

impl Fx {
    fn new(fs: &TestFs, test: &str) -> Fx {
        let dir = scratch_dir(fs, test);
        let pool = dir.join("pool");
        let fx = Fx {
            fs: fs.clone(),
            dir,
            pool,
        };
        let mut args = vec![
            "pool".to_owned(),
            "init".to_owned(),
            "--pool".to_owned(),
            s(&fx.pool),
        ];
        if !fs.reflink {
            args.push("--setup-check=no".into());
        }
        let out = reflinkfs().args(&args).output().unwrap();
        let said = ok(fs, &out, "pool init");
        let mode = if fs.reflink {
            "(reflink)"
        } else {
            "(copy mode)"
        };
        assert!(said.contains(mode), "[{}] pool init says {said:?}", fs.name);
        fx
    }

    /// Runs `GROUP COMMAND --pool POOL REST...`.
    fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, None)
    }

    fn run_with(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = reflinkfs();
        c.args(&args[..2])
            .arg("--pool")
            .arg(&self.pool)
            .args(&args[2..]);
        if let Some(input) = stdin {
            c.write_stdin(input.to_vec());
        }
        c.output().unwrap()
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        ok(&self.fs, &self.run(args), &args.join(" "))
    }

    /// Runs a command that must fail with `class` and change nothing.
    #[track_caller]
    fn refused(&self, args: &[&str], class: ErrorClass) -> String {
        self.refused_with(args, None, class, true)
    }

    #[track_caller]
    fn refused_with(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        class: ErrorClass,
        one_line: bool,
    ) -> String {
        let what = args.join(" ");
        let before = snapshot(&self.dir);
        let out = self.run_with(args, stdin);
        let line = if one_line {
            fails(&self.fs, &out, class, &what)
        } else {
            fails_logged(&self.fs, &out, class, &what)
        };
        assert_same_tree(&self.fs, &before, &snapshot(&self.dir), &what);
        line
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("[{}] {}: not JSON ({e}): {out}", self.fs.name, a.join(" ")))
    }

    fn info(&self, vid: &str) -> Value {
        self.json(&["volume", "info", vid])
    }

    /// The committed image (or revision) of `vid`, exported to stdout.
    fn export(&self, vid: &str, revision: Option<&str>) -> Vec<u8> {
        let mut args = vec!["volume", "export", vid, "-"];
        if let Some(r) = revision {
            args.extend(["--revision", r]);
        }
        let out = self.run(&args);
        ok(&self.fs, &out, &args.join(" "));
        out.stdout
    }

    fn revision_ids(&self, vid: &str) -> Vec<String> {
        self.json(&["volume", "revisions", vid])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Writes a file next to the pool and returns its path.
    fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }
}

fn zeros(len: usize) -> Vec<u8> {
    vec![0u8; len]
}

/// Another of the scratch filesystems than `fs`, if there is one.
fn other_fs(all: &[TestFs], fs: &TestFs) -> TestFs {
    all.iter().find(|f| f.root != fs.root).unwrap_or(fs).clone()
}

// ---------------------------------------------------------------------------
// 1. Bad input.

/// Volume ids that break SPEC §2.1, with why.
fn bad_vids() -> Vec<(String, &'static str)> {
    let long = "a".repeat(65);
    let mut v: Vec<(String, &'static str)> = [
        ("appvms/../private", "`..` as the VM"),
        ("../vm/private", "`..` as the class"),
        ("appvms/vm/..", "`..` as the name"),
        ("appvms/./private", "`.` as the VM"),
        ("appvms/vm/private/extra", "four components"),
        ("appvms/vm/private/", "a trailing slash"),
        ("/appvms/vm/private", "a leading slash"),
        ("appvms//private", "an empty VM"),
        ("appvms/vm", "two components"),
        ("private", "one component and no colon"),
        ("", "an empty vid"),
        ("appvms/vm/priv@1", "`@` in the name"),
        ("appvms/vm@1/private", "`@` in the VM"),
        (
            "appvms/vm/private.img@2024-01-01T00:00:00Z",
            "a legacy revision name",
        ),
        ("appvms/vm/priv~1", "`~` in the name"),
        ("appvms/vm/private.img~tmp", "a temporary file name"),
        ("appvms/vm/private-dirty", "the reserved suffix -dirty"),
        ("appvms/vm/private-import", "the reserved suffix -import"),
        (
            "appvms/vm/private-precache",
            "the reserved suffix -precache",
        ),
        ("appvms/vm/private-cow", "the reserved suffix -cow"),
        ("appvms/vm/private.img", "the reserved suffix .img"),
        ("appvms/vm/-private", "a name starting with -"),
        ("appvms/vm/.private", "a name starting with ."),
        ("appvms/vm/pri vate", "a space"),
        ("vm:..", "`..` as the name in VM:NAME"),
        ("..:private", "`..` as the VM in VM:NAME"),
        ("vm:priv@1", "`@` in VM:NAME"),
        ("vm:priv~1", "`~` in VM:NAME"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b))
    .collect();
    v.push((format!("appvms/vm/{long}"), "a 65-character name"));
    v.push((format!("appvms/{long}/private"), "a 65-character VM"));
    v.push((format!("{long}/vm/private"), "a 65-character class"));
    v.push((format!("vm:{long}"), "a 65-character name in VM:NAME"));
    v
}

/// A pool with an origin volume `appvms/vm/private` that has data and a
/// revision, a snapshot of it and a volatile volume, and an import file.
fn populated(fs: &TestFs, test: &str) -> (Fx, PathBuf) {
    let fx = Fx::new(fs, test);
    fx.ok(&["volume", "create", "appvms/vm/private", "--size", "1M"]);
    fx.ok(&[
        "volume",
        "create",
        "appvms/vm/root",
        "--size",
        "1M",
        "--snapshot-of",
        "appvms/vm/private",
    ]);
    fx.ok(&[
        "volume",
        "create",
        "appvms/vm/volatile",
        "--size",
        "1M",
        "--volatile",
    ]);
    let data = fx.file("data.img", &pattern(0x5a, MIB));
    fx.ok(&["volume", "import", "appvms/vm/private", &s(&data)]);
    assert_eq!(fx.revision_ids("appvms/vm/private"), ["1"], "[{}]", fs.name);
    (fx, data)
}

#[test]
fn bad_vids_are_refused_and_change_nothing() {
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-bad-vids");
        let dest = s(&fx.dir.join("export.img"));
        let data = s(&data);
        for (vid, why) in bad_vids() {
            let vid = vid.as_str();
            let cases: Vec<Vec<&str>> = vec![
                vec!["volume", "create", vid, "--size", "1M"],
                vec!["volume", "create", vid, "--size", "1M", "--volatile"],
                vec![
                    "volume",
                    "create",
                    vid,
                    "--size",
                    "1M",
                    "--snapshot-of",
                    "appvms/vm/private",
                ],
                vec![
                    "volume",
                    "create",
                    "appvms/vm/snap2",
                    "--size",
                    "1M",
                    "--snapshot-of",
                    vid,
                ],
                vec!["volume", "info", vid],
                vec!["volume", "info", vid, "--json"],
                vec!["volume", "remove", vid],
                vec!["volume", "revisions", vid],
                vec!["volume", "resize", vid, "2M"],
                vec!["volume", "revert", vid],
                vec!["volume", "set", vid, "rw", "false"],
                vec!["volume", "import", vid, &data],
                vec!["volume", "export", vid, &dest],
                vec!["volume", "clone", vid, "appvms/vm2/private"],
                vec!["volume", "clone", "appvms/vm/private", vid],
                vec!["pool", "check", "--volume", vid],
            ];
            for args in cases {
                let line = fx.refused(&args, ErrorClass::InvalidInput);
                assert!(
                    line.contains("invalid volume id"),
                    "[{}] {} ({why}): the message should say the vid is invalid: {line}",
                    fs.name,
                    args.join(" ")
                );
            }
        }
        // Valid vids that name no volume: not found, nothing changes.
        for args in [
            vec!["volume", "info", "appvms/vm/nosuch"],
            vec!["volume", "remove", "appvms/vm/nosuch"],
            vec!["volume", "info", "vm:nosuch"],
            vec!["volume", "remove", "nosuchvm:private"],
            vec!["volume", "resize", "appvms/nosuch/private", "2M"],
            vec!["volume", "export", "appvms/vm/nosuch", &dest],
            vec!["volume", "clone", "appvms/vm/nosuch", "appvms/vm2/private"],
            vec![
                "volume",
                "create",
                "appvms/vm/snap2",
                "--size",
                "1M",
                "--snapshot-of",
                "appvms/vm/nosuch",
            ],
        ] {
            fx.refused(&args, ErrorClass::NotFound);
        }
        // The longest allowed component (64 characters) is accepted.
        let max = format!("appvms/{}/{}", "b".repeat(64), "c".repeat(64));
        fx.ok(&["volume", "create", &max, "--size", "1M"]);
        assert_eq!(fx.info(&max)["vid"], max.as_str(), "[{}]", fs.name);
    }
}

/// `VM:NAME` whose NAME has a reserved suffix is an invalid vid too.
#[test]
fn short_vid_with_reserved_suffix_is_invalid() {
    for fs in common::filesystems() {
        let (fx, _) = populated(&fs, "cli-short-reserved");
        for name in [
            "private-dirty",
            "private-import",
            "private-precache",
            "private-cow",
            "private.img",
        ] {
            let vid = format!("vm:{name}");
            for args in [
                vec!["volume", "info", vid.as_str()],
                vec!["volume", "remove", vid.as_str()],
                vec!["volume", "create", vid.as_str(), "--size", "1M"],
            ] {
                fx.refused(&args, ErrorClass::InvalidInput);
            }
        }
    }
}

/// SPEC §2.1: invalid ids are rejected before any file is touched. A
/// `CLASS/VM/NAME` needs no pool to be checked, so a bad one must be refused
/// as such even when the pool cannot be opened (here: it is locked).
#[test]
fn bad_vid_is_refused_before_the_pool_is_opened() {
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-vid-first");
        let data = s(&data);
        let dest = s(&fx.dir.join("export.img"));
        let _held = reflinkfs::engine::Pool::open(&fx.pool).unwrap();
        for vid in [
            "appvms/../private",
            "appvms/vm/private-dirty",
            "appvms/vm/priv@1",
        ] {
            for args in [
                vec!["volume", "info", vid],
                vec!["volume", "remove", vid],
                vec!["volume", "revisions", vid],
                vec!["volume", "resize", vid, "2M"],
                vec!["volume", "revert", vid],
                vec!["volume", "set", vid, "rw", "false"],
                vec!["volume", "import", vid, &data],
                vec!["volume", "export", vid, &dest],
                vec!["volume", "clone", vid, "appvms/vm2/private"],
            ] {
                fx.refused(&args, ErrorClass::InvalidInput);
            }
        }
    }
}

const BAD_SIZES: [&str; 10] = [
    "0",
    "100",
    "-1",
    "99999999999999999999999",
    "17179869184T",
    "ten",
    "1.5G",
    "",
    "4X",
    "0x200",
];

#[test]
fn bad_sizes_are_refused_and_change_nothing() {
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-bad-sizes");
        let data = s(&data);
        for size in BAD_SIZES {
            let eq = format!("--size={size}");
            for args in [
                vec!["volume", "create", "appvms/vm/new", eq.as_str()],
                vec![
                    "volume",
                    "create",
                    "appvms/vm/new",
                    eq.as_str(),
                    "--volatile",
                ],
                vec![
                    "volume",
                    "create",
                    "appvms/vm/new",
                    eq.as_str(),
                    "--snapshot-of",
                    "appvms/vm/private",
                ],
                // The size is checked before the vid and the pool.
                vec!["volume", "create", "appvms/vm/private", eq.as_str()],
                vec!["volume", "resize", "appvms/vm/private", "--", size],
                vec!["volume", "resize", "appvms/vm/volatile", "--", size],
                vec![
                    "volume",
                    "resize",
                    "appvms/vm/private",
                    "--allow-shrink",
                    "--",
                    size,
                ],
                vec!["volume", "import", "appvms/vm/private", &data, eq.as_str()],
            ] {
                let line = fx.refused(&args, ErrorClass::InvalidInput);
                assert!(
                    line.contains("invalid size"),
                    "[{}] {}: the message should say the size is invalid: {line}",
                    fs.name,
                    args.join(" ")
                );
            }
        }
    }
}

/// A negative size typed the natural way (`--size -1`, `resize VID -1`)
/// must reach the size check, like `--revisions-to-keep -2` does.
#[test]
fn negative_size_without_equals_is_an_invalid_size() {
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-negative-size");
        let data = s(&data);
        for args in [
            vec!["volume", "create", "appvms/vm/new", "--size", "-1"],
            vec!["volume", "create", "appvms/vm/new", "--size", "-4K"],
            vec!["volume", "resize", "appvms/vm/private", "-1"],
            vec![
                "volume",
                "resize",
                "appvms/vm/private",
                "-1M",
                "--allow-shrink",
            ],
            vec![
                "volume",
                "import",
                "appvms/vm/private",
                &data,
                "--size",
                "-1",
            ],
        ] {
            fx.refused(&args, ErrorClass::InvalidInput);
        }
    }
}

#[test]
fn bad_revisions_and_properties_are_refused() {
    for fs in common::filesystems() {
        let (fx, _) = populated(&fs, "cli-bad-props");
        for args in [
            vec![
                "volume",
                "create",
                "appvms/vm/new",
                "--size",
                "1M",
                "--revisions-to-keep",
                "-2",
            ],
            vec![
                "volume",
                "create",
                "appvms/vm/new",
                "--size",
                "1M",
                "--revisions-to-keep=-2",
            ],
            vec![
                "volume",
                "create",
                "appvms/vm/new",
                "--size",
                "1M",
                "--revisions-to-keep",
                "two",
            ],
            vec![
                "volume",
                "create",
                "appvms/vm/new",
                "--size",
                "1M",
                "--revisions-to-keep",
                "1.5",
            ],
            vec![
                "volume",
                "set",
                "appvms/vm/private",
                "revisions_to_keep",
                "-2",
            ],
            vec![
                "volume",
                "set",
                "appvms/vm/private",
                "revisions_to_keep",
                "-100",
            ],
            vec![
                "volume",
                "set",
                "appvms/vm/private",
                "revisions_to_keep",
                "three",
            ],
            vec![
                "volume",
                "set",
                "appvms/vm/private",
                "revisions_to_keep",
                "99999999999999999999",
            ],
            vec!["volume", "set", "appvms/vm/private", "colour", "blue"],
            vec!["volume", "set", "appvms/vm/private", "size", "2M"],
            vec![
                "volume",
                "set",
                "appvms/vm/private",
                "source",
                "appvms/vm/root",
            ],
            vec!["volume", "set", "appvms/vm/private", "rw", "maybe"],
            vec!["volume", "set", "appvms/vm/private", "rw", "2"],
            vec!["volume", "set", "appvms/vm/private", "rw", ""],
            // Checked before the vid: also for a volume that does not exist.
            vec![
                "volume",
                "set",
                "appvms/vm/nosuch",
                "revisions_to_keep",
                "-2",
            ],
        ] {
            let line = fx.refused(&args, ErrorClass::InvalidInput);
            assert!(
                line.contains("invalid value for"),
                "[{}] {}: the message should name the property: {line}",
                fs.name,
                args.join(" ")
            );
        }
        // Snapshot and volatile volumes keep no revisions.
        fx.refused(
            &["volume", "set", "appvms/vm/root", "revisions_to_keep", "2"],
            ErrorClass::Refused,
        );
        fx.refused(
            &[
                "volume",
                "set",
                "appvms/vm/volatile",
                "revisions_to_keep",
                "1",
            ],
            ErrorClass::Refused,
        );
        fx.refused(
            &[
                "volume",
                "create",
                "appvms/vm/v2",
                "--size",
                "1M",
                "--volatile",
                "--revisions-to-keep",
                "2",
            ],
            ErrorClass::InvalidInput,
        );
        // `pool init --revisions-to-keep -2` creates nothing.
        let other = fx.dir.join("pool2");
        let mut args = vec![
            "pool".to_owned(),
            "init".into(),
            "--pool".into(),
            s(&other),
            "--revisions-to-keep".into(),
            "-2".into(),
        ];
        if !fs.reflink {
            args.push("--setup-check=no".into());
        }
        let before = snapshot(&fx.dir);
        let out = reflinkfs().args(&args).output().unwrap();
        fails(
            &fs,
            &out,
            ErrorClass::InvalidInput,
            "pool init --revisions-to-keep -2",
        );
        assert_same_tree(
            &fs,
            &before,
            &snapshot(&fx.dir),
            "pool init --revisions-to-keep -2",
        );
        // The values at the limits are accepted.
        fx.ok(&[
            "volume",
            "set",
            "appvms/vm/private",
            "revisions_to_keep",
            "-1",
        ]);
        fx.ok(&[
            "volume",
            "set",
            "appvms/vm/private",
            "revisions_to_keep",
            "0",
        ]);
        fx.ok(&["volume", "set", "appvms/vm/private", "rw", "false"]);
        assert_eq!(fx.info("appvms/vm/private")["rw"], false, "[{}]", fs.name);
    }
}

#[test]
fn corrupt_metadata_is_reported_and_never_rewritten() {
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-corrupt");
        let data = s(&data);
        fx.ok(&["volume", "create", "appvms/vm/other", "--size", "1M"]);
        let meta = fx.pool.join(".reflinkfs/volumes/appvms/vm/private.json");
        let garbage: &[u8] = b"{ \"format\": 1, this is not JSON \x00\xff\n";
        std::fs::write(&meta, garbage).unwrap();
        let meta_md = std::fs::symlink_metadata(&meta).unwrap();
        let image = fx.pool.join("appvms/vm/private.img");
        let image_bytes = std::fs::read(&image).unwrap();
        let meta_shown = s(&meta);

        // Its own operations fail with exit 8 and name the file.
        let dest = s(&fx.dir.join("export.img"));
        for args in [
            vec!["volume", "info", "appvms/vm/private"],
            vec!["volume", "info", "appvms/vm/private", "--json"],
            vec!["volume", "info", "vm:private"],
            vec!["volume", "revisions", "appvms/vm/private"],
            vec!["volume", "resize", "appvms/vm/private", "2M"],
            vec!["volume", "revert", "appvms/vm/private"],
            vec!["volume", "set", "appvms/vm/private", "rw", "false"],
            vec![
                "volume",
                "set",
                "appvms/vm/private",
                "revisions_to_keep",
                "3",
            ],
            vec!["volume", "import", "appvms/vm/private", &data],
            vec!["volume", "export", "appvms/vm/private", &dest],
            vec!["volume", "export", "appvms/vm/private", "-"],
            vec!["volume", "clone", "appvms/vm/private", "appvms/vm2/private"],
            vec!["volume", "clone", "appvms/vm/other", "appvms/vm/private"],
            // A snapshot of it cannot read its source.
            vec!["volume", "export", "appvms/vm/root", "-"],
            vec!["volume", "clone", "appvms/vm/root", "appvms/vm2/root"],
        ] {
            let line = fx.refused_with(&args, None, ErrorClass::Corrupt, false);
            assert!(
                line.contains(&meta_shown),
                "[{}] {}: the error should name {meta_shown}: {line}",
                fs.name,
                args.join(" ")
            );
        }
        // Removing it: refused while a snapshot depends on it, then refused
        // because its config cannot be read.
        let out = fx.refused_with(
            &["volume", "remove", "appvms/vm/private"],
            None,
            ErrorClass::Refused,
            false,
        );
        assert!(out.contains("appvms/vm/root"), "[{}] {out}", fs.name);
        fx.ok(&["volume", "remove", "appvms/vm/root"]);
        let line = fx.refused_with(
            &["volume", "remove", "appvms/vm/private"],
            None,
            ErrorClass::Corrupt,
            false,
        );
        assert!(
            line.contains(&meta_shown),
            "[{}] volume remove: {line}",
            fs.name
        );
        // Creating it again is refused (it exists, though unreadable).
        let out = fx.run(&["volume", "create", "appvms/vm/private", "--size", "1M"]);
        assert!(
            matches!(out.status.code(), Some(c) if c == code(ErrorClass::Exists) || c == code(ErrorClass::Corrupt)),
            "[{}] volume create over a corrupt config must be refused, got {}",
            fs.name,
            show(&out)
        );
        // `pool check` reports it.
        let out = fx.run(&["pool", "check"]);
        assert_eq!(
            out.status.code(),
            Some(code(ErrorClass::Corrupt)),
            "[{}] pool check: {}",
            fs.name,
            show(&out)
        );
        assert!(
            text(&out.stdout).contains(&meta_shown),
            "[{}] pool check: {}",
            fs.name,
            show(&out)
        );

        // The pool still works: list shows it as corrupt, others work.
        let out = fx.ok(&["volume", "list"]);
        let row = out
            .lines()
            .find(|l| l.starts_with("appvms/vm/private "))
            .unwrap_or_else(|| {
                panic!(
                    "[{}] volume list: no row for the corrupt volume:\n{out}",
                    fs.name
                )
            });
        assert!(row.contains("corrupt"), "[{}] volume list: {row}", fs.name);
        let list = fx.json(&["volume", "list"]);
        let entry = list
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vid"] == "appvms/vm/private")
            .unwrap_or_else(|| {
                panic!(
                    "[{}] volume list --json: no corrupt volume: {list}",
                    fs.name
                )
            });
        assert_eq!(entry["state"], "corrupt", "[{}] {entry}", fs.name);
        assert!(
            entry["problem"]
                .as_str()
                .unwrap_or("")
                .contains(&meta_shown),
            "[{}] the problem should name the file: {entry}",
            fs.name
        );
        assert_eq!(
            fx.info("appvms/vm/other")["state"],
            "stopped",
            "[{}]",
            fs.name
        );
        fx.ok(&["volume", "create", "appvms/vm/third", "--size", "1M"]);
        fx.ok(&["volume", "import", "appvms/vm/other", &data]);
        assert_eq!(
            fx.export("appvms/vm/other", None),
            std::fs::read(&data).unwrap(),
            "[{}]",
            fs.name
        );
        fx.ok(&["volume", "remove", "appvms/vm/third"]);

        // After all that, the corrupt file is exactly as it was written.
        let now = std::fs::symlink_metadata(&meta).unwrap();
        assert_eq!(
            std::fs::read(&meta).unwrap(),
            garbage,
            "[{}] {meta_shown} was rewritten",
            fs.name
        );
        assert_eq!(
            (now.ino(), now.mtime(), now.mtime_nsec()),
            (meta_md.ino(), meta_md.mtime(), meta_md.mtime_nsec()),
            "[{}] {meta_shown} was replaced",
            fs.name
        );
        assert_eq!(
            std::fs::read(&image).unwrap(),
            image_bytes,
            "[{}] the corrupt volume's image changed",
            fs.name
        );
    }
}

/// Plants a symlink named `name` in the VM directory of `appvms/vm/private`
/// pointing at `target`, in place of whatever was there.
fn plant_symlink(fx: &Fx, name: &str, target: &Path) -> PathBuf {
    let link = fx.pool.join("appvms/vm").join(name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(target, &link).unwrap();
    link
}

#[track_caller]
fn assert_outside_intact(
    fs: &TestFs,
    outside: &Path,
    bytes: &[u8],
    md: &std::fs::Metadata,
    what: &str,
) {
    let now = std::fs::symlink_metadata(outside).unwrap();
    assert_eq!(
        std::fs::read(outside).unwrap(),
        bytes,
        "[{}] {what}: the file outside the pool was written",
        fs.name
    );
    assert_eq!(
        (now.mtime(), now.mtime_nsec(), now.ino()),
        (md.mtime(), md.mtime_nsec(), md.ino()),
        "[{}] {what}: the file outside the pool was touched",
        fs.name
    );
}

#[test]
fn symlink_planted_as_image_is_never_followed() {
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-symlink-img");
        let data = s(&data);
        let outside_bytes = pattern(0xee, MIB);
        let outside = fx.file("outside.img", &outside_bytes);
        let outside_md = std::fs::symlink_metadata(&outside).unwrap();
        let link = plant_symlink(&fx, "private.img", &outside);
        let dest = fx.dir.join("export.img");
        let dest_s = s(&dest);

        for (args, stdin) in [
            (vec!["volume", "resize", "appvms/vm/private", "2M"], None),
            (
                vec![
                    "volume",
                    "resize",
                    "appvms/vm/private",
                    "512K",
                    "--allow-shrink",
                ],
                None,
            ),
            (vec!["volume", "revert", "appvms/vm/private"], None),
            (vec!["volume", "revert", "appvms/vm/private", "1"], None),
            (vec!["volume", "export", "appvms/vm/private", &dest_s], None),
            (vec!["volume", "export", "appvms/vm/private", "-"], None),
            (vec!["volume", "import", "appvms/vm/private", &data], None),
            (
                vec!["volume", "import", "appvms/vm/private", "-"],
                Some(pattern(1, MIB)),
            ),
            (
                vec!["volume", "clone", "appvms/vm/private", "appvms/vm2/private"],
                None,
            ),
            (
                vec!["volume", "clone", "appvms/vm/private", "appvms/vm/copy"],
                None,
            ),
            // Into it: the new data must not land in (or through) the link.
            (
                vec!["volume", "clone", "appvms/vm/volatile", "appvms/vm/private"],
                None,
            ),
            (
                vec!["volume", "clone", "appvms/vm/root", "appvms/vm/private"],
                None,
            ),
            // A snapshot of it reads the source image.
            (vec!["volume", "export", "appvms/vm/root", "-"], None),
        ] {
            let what = args.join(" ");
            let before = snapshot(&fx.dir);
            let out = fx.run_with(&args, stdin.as_deref());
            assert!(
                !out.status.success(),
                "[{}] {what}: must fail, got {}",
                fs.name,
                show(&out)
            );
            let stderr = text(&out.stderr);
            let line = stderr.lines().last().unwrap_or("");
            assert!(
                line.starts_with("reflinkfs: error:"),
                "[{}] {what}: {}",
                fs.name,
                show(&out)
            );
            assert!(
                out.stdout.is_empty(),
                "[{}] {what}: wrote {} bytes to stdout",
                fs.name,
                out.stdout.len()
            );
            assert_same_tree(&fs, &before, &snapshot(&fx.dir), &what);
            assert_outside_intact(&fs, &outside, &outside_bytes, &outside_md, &what);
            assert!(!dest.exists(), "[{}] {what}: left {dest_s}", fs.name);
            if !what.contains("volatile") {
                assert_eq!(
                    out.status.code(),
                    Some(code(ErrorClass::Corrupt)),
                    "[{}] {what}: a planted symlink is exit 8, got {}",
                    fs.name,
                    show(&out)
                );
                assert!(
                    line.contains("private.img"),
                    "[{}] {what}: the error should name the file: {line}",
                    fs.name
                );
            }
        }
        // `pool check` reports it; info says what is wrong.
        let out = fx.run(&["pool", "check"]);
        assert_eq!(
            out.status.code(),
            Some(code(ErrorClass::Corrupt)),
            "[{}] pool check: {}",
            fs.name,
            show(&out)
        );
        assert!(
            text(&out.stdout).contains(&s(&link)),
            "[{}] pool check: {}",
            fs.name,
            show(&out)
        );
        let out = fx.run(&["pool", "check", "--json"]);
        let problems: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            problems
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["path"] == s(&link).as_str()),
            "[{}] pool check --json: {problems}",
            fs.name
        );
        let info = fx.info("appvms/vm/private");
        assert_ne!(info["state"], "stopped", "[{}] {info}", fs.name);
        // Still a symlink, and the outside file is as it was.
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink(),
            "[{}]",
            fs.name
        );
        assert_outside_intact(
            &fs,
            &outside,
            &outside_bytes,
            &outside_md,
            "after every command",
        );
        // Removing the volume removes the link, never its target.
        let _ = fx.run(&["volume", "remove", "appvms/vm/root"]);
        let _ = fx.run(&["volume", "remove", "appvms/vm/private"]);
        assert_outside_intact(&fs, &outside, &outside_bytes, &outside_md, "volume remove");
    }
}

#[test]
fn symlinks_planted_as_dirty_image_revision_or_directory_are_never_followed() {
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-symlink-other");
        let data_s = s(&data);
        let outside_bytes = pattern(0xdd, MIB);
        let outside = fx.file("outside.img", &outside_bytes);
        let outside_md = std::fs::symlink_metadata(&outside).unwrap();
        let image = fx.pool.join("appvms/vm/private.img");
        let committed = std::fs::read(&image).unwrap();

        // A dirty image: recovery on open must not commit the outside file.
        let link = plant_symlink(&fx, "private-dirty.img", &outside);
        for args in [
            vec!["volume", "resize", "appvms/vm/private", "2M"],
            vec!["volume", "revert", "appvms/vm/private", "1"],
            vec!["volume", "import", "appvms/vm/private", &data_s],
        ] {
            let what = args.join(" ");
            let before = snapshot(&fx.dir);
            let out = fx.run(&args);
            assert!(
                !out.status.success(),
                "[{}] {what}: must fail, got {}",
                fs.name,
                show(&out)
            );
            assert_same_tree(&fs, &before, &snapshot(&fx.dir), &what);
        }
        assert_eq!(
            fx.export("appvms/vm/private", None),
            committed,
            "[{}] dirty symlink",
            fs.name
        );
        let out = fx.run(&["pool", "check"]);
        assert_eq!(
            out.status.code(),
            Some(code(ErrorClass::Corrupt)),
            "[{}] pool check: {}",
            fs.name,
            show(&out)
        );
        assert!(
            text(&out.stdout).contains("private-dirty.img"),
            "[{}] {}",
            fs.name,
            show(&out)
        );
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink(),
            "[{}]",
            fs.name
        );
        assert_eq!(std::fs::read(&image).unwrap(), committed, "[{}]", fs.name);
        std::fs::remove_file(&link).unwrap();

        // A revision: revert and export of it must not read the outside file.
        let rev: String = fx.json(&["volume", "revisions", "appvms/vm/private"])[0]["file_name"]
            .as_str()
            .unwrap()
            .to_owned();
        let link = plant_symlink(&fx, &rev, &outside);
        let dest = fx.dir.join("export.img");
        for args in [
            vec!["volume", "revert", "appvms/vm/private", "1"],
            vec!["volume", "revert", "appvms/vm/private"],
            vec![
                "volume",
                "export",
                "appvms/vm/private",
                "-",
                "--revision",
                "1",
            ],
            vec![
                "volume",
                "export",
                "appvms/vm/private",
                &s(&dest),
                "--revision",
                "1",
            ],
        ] {
            let what = args.join(" ");
            let before = snapshot(&fx.dir);
            let out = fx.run(&args);
            fails_logged(&fs, &out, ErrorClass::Corrupt, &what);
            assert!(
                out.stdout.is_empty(),
                "[{}] {what}: wrote {} bytes to stdout",
                fs.name,
                out.stdout.len()
            );
            assert_same_tree(&fs, &before, &snapshot(&fx.dir), &what);
            assert!(!dest.exists(), "[{}] {what}: left the export file", fs.name);
        }
        assert_eq!(
            fx.export("appvms/vm/private", None),
            committed,
            "[{}] revision symlink",
            fs.name
        );
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink(),
            "[{}]",
            fs.name
        );

        // A VM directory: nothing is created through it.
        let outside_dir = fx.dir.join("outside-dir");
        std::fs::create_dir(&outside_dir).unwrap();
        std::os::unix::fs::symlink(&outside_dir, fx.pool.join("appvms/evil")).unwrap();
        for args in [
            vec!["volume", "create", "appvms/evil/private", "--size", "1M"],
            vec![
                "volume",
                "create",
                "appvms/evil/volatile",
                "--size",
                "1M",
                "--volatile",
            ],
            vec![
                "volume",
                "clone",
                "appvms/vm/private",
                "appvms/evil/private",
            ],
        ] {
            let what = args.join(" ");
            let before = snapshot(&fx.dir);
            let out = fx.run(&args);
            assert!(
                !out.status.success(),
                "[{}] {what}: must fail, got {}",
                fs.name,
                show(&out)
            );
            assert_same_tree(&fs, &before, &snapshot(&fx.dir), &what);
        }
        assert_eq!(
            std::fs::read_dir(&outside_dir).unwrap().count(),
            0,
            "[{}] something was created through the link",
            fs.name
        );
        assert_outside_intact(
            &fs,
            &outside,
            &outside_bytes,
            &outside_md,
            "after every command",
        );
    }
}

fn no_reflink_filesystems() -> Vec<TestFs> {
    common::filesystems()
        .into_iter()
        .filter(|f| f.name == "ext4" || f.name == "tmp")
        .collect()
}

#[test]
fn init_without_reflinks_needs_setup_check_no() {
    for fs in no_reflink_filesystems() {
        let dir = scratch_dir(&fs, "cli-setup-check");
        let pool = dir.join("pool");
        std::fs::create_dir(&pool).unwrap();
        let before = snapshot(&dir);
        for extra in [
            &[][..],
            &["--setup-check=yes"][..],
            &["--setup-check", "yes"][..],
        ] {
            let out = reflinkfs()
                .args(["pool", "init", "--pool", &s(&pool)])
                .args(extra)
                .output()
                .unwrap();
            if fs.name == "tmp" && out.status.success() {
                eprintln!("the fallback directory makes reflinks; nothing to check there");
                return;
            }
            let line = fails(&fs, &out, ErrorClass::Unsupported, "pool init");
            assert!(
                line.contains("setup-check"),
                "[{}] the error should name --setup-check=no: {line}",
                fs.name
            );
            assert!(
                !pool.join(".reflinkfs").exists(),
                "[{}] pool init left .reflinkfs",
                fs.name
            );
            assert_same_tree(
                &fs,
                &before,
                &snapshot(&dir),
                "pool init without --setup-check=no",
            );
        }
        // A bad value of the option is a usage error.
        let out = reflinkfs()
            .args(["pool", "init", "--pool", &s(&pool), "--setup-check=maybe"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "[{}] --setup-check=maybe: {}",
            fs.name,
            show(&out)
        );
        assert_same_tree(
            &fs,
            &before,
            &snapshot(&dir),
            "pool init --setup-check=maybe",
        );
        // With `=no` it makes a copy-mode pool.
        let out = reflinkfs()
            .args(["pool", "init", "--pool", &s(&pool), "--setup-check=no"])
            .output()
            .unwrap();
        assert!(
            ok(&fs, &out, "pool init --setup-check=no").contains("copy mode"),
            "[{}]",
            fs.name
        );
        let info: Value = serde_json::from_slice(
            &reflinkfs()
                .args(["pool", "info", "--json", "--pool", &s(&pool)])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert_eq!(info["copy_mode"], true, "[{}] {info}", fs.name);
    }
}

/// When the pool directory does not exist yet, a refused init must not
/// leave it behind either.
#[test]
fn refused_init_does_not_create_the_pool_directory() {
    for fs in no_reflink_filesystems() {
        let dir = scratch_dir(&fs, "cli-setup-check-new");
        let pool = dir.join("pool");
        let out = reflinkfs()
            .args(["pool", "init", "--pool", &s(&pool)])
            .output()
            .unwrap();
        if fs.name == "tmp" && out.status.success() {
            return;
        }
        fails(&fs, &out, ErrorClass::Unsupported, "pool init");
        assert!(
            !pool.exists(),
            "[{}] a refused pool init left {}",
            fs.name,
            pool.display()
        );
    }
}

#[test]
fn second_init_of_a_pool_is_refused() {
    for fs in common::filesystems() {
        let (fx, _) = populated(&fs, "cli-reinit");
        let before = snapshot(&fx.dir);
        for extra in [
            &["--setup-check=no"][..],
            &[][..],
            &["--read-only"][..],
            &["--revisions-to-keep", "5"][..],
        ] {
            let out = reflinkfs()
                .args(["pool", "init", "--pool", &s(&fx.pool)])
                .args(extra)
                .output()
                .unwrap();
            let what = format!("second pool init {}", extra.join(" "));
            if extra.is_empty() && !fs.reflink {
                // Without reflinks the check may refuse first (exit 9);
                // either way nothing changes.
                assert!(
                    matches!(out.status.code(), Some(c) if c == code(ErrorClass::Exists) || c == code(ErrorClass::Unsupported)),
                    "[{}] {what}: {}",
                    fs.name,
                    show(&out)
                );
            } else {
                let line = fails(&fs, &out, ErrorClass::Exists, &what);
                assert!(line.contains("already"), "[{}] {what}: {line}", fs.name);
            }
            assert_same_tree(&fs, &before, &snapshot(&fx.dir), &what);
        }
        assert_eq!(fx.revision_ids("appvms/vm/private"), ["1"], "[{}]", fs.name);
    }
}

// ---------------------------------------------------------------------------
// 2. End to end.

#[test]
fn cli_end_to_end() {
    let all = common::filesystems();
    for fs in &all {
        let fs = fs.clone();
        let fx = Fx::new(&fs, "cli-e2e");
        let n = &fs.name;

        // The pool.
        let pinfo = fx.json(&["pool", "info"]);
        assert_eq!(pinfo["copy_mode"], !fs.reflink, "[{n}] {pinfo}");
        assert_eq!(pinfo["read_only"], false, "[{n}] {pinfo}");
        assert_eq!(pinfo["revisions_to_keep"], 1, "[{n}] {pinfo}");
        assert!(fx.ok(&["pool", "info"]).contains("mode:"), "[{n}]");
        assert!(fx.ok(&["volume", "list"]).starts_with("VID"), "[{n}]");
        assert_eq!(fx.json(&["volume", "list"]), serde_json::json!([]), "[{n}]");

        // Create the three types, and a snapshot of a snapshot.
        fx.ok(&["volume", "create", "vm-templates/tpl/root", "--size", "1M"]);
        let said = fx.ok(&[
            "volume",
            "create",
            "appvms/work/private",
            "--size",
            "1M",
            "--revisions-to-keep",
            "2",
        ]);
        assert!(said.contains("appvms/work/private"), "[{n}] {said}");
        fx.ok(&[
            "volume",
            "create",
            "appvms/work/root",
            "--size",
            "1M",
            "--snapshot-of",
            "vm-templates/tpl/root",
        ]);
        fx.ok(&[
            "volume",
            "create",
            "appvms/work/volatile",
            "--size",
            "512K",
            "--volatile",
        ]);
        fx.ok(&[
            "volume",
            "create",
            "appvms/disp1/root",
            "--size",
            "1M",
            "--snapshot-of",
            "work:root",
        ]);
        // VM:NAME for a new volume of an existing VM.
        assert!(
            fx.ok(&["volume", "create", "work:data", "--size", "4K"])
                .contains("appvms/work/data"),
            "[{n}]"
        );
        fx.refused(
            &["volume", "create", "work:data", "--size", "4K"],
            ErrorClass::Exists,
        );
        fx.refused(
            &["volume", "create", "appvms/work/private", "--size", "1M"],
            ErrorClass::Exists,
        );
        fx.refused(
            &["volume", "create", "newvm:data", "--size", "4K"],
            ErrorClass::InvalidInput,
        );
        fx.refused(
            &[
                "volume",
                "create",
                "appvms/x/y",
                "--size",
                "1M",
                "--snapshot-of",
                "appvms/work/volatile",
            ],
            ErrorClass::Refused,
        );

        // list, text and JSON.
        let list = fx.json(&["volume", "list"]);
        let rows: BTreeMap<String, Value> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["vid"].as_str().unwrap().to_owned(), v.clone()))
            .collect();
        let vids: Vec<&str> = rows.keys().map(String::as_str).collect();
        assert_eq!(
            vids,
            [
                "appvms/disp1/root",
                "appvms/work/data",
                "appvms/work/private",
                "appvms/work/root",
                "appvms/work/volatile",
                "vm-templates/tpl/root"
            ],
            "[{n}] {list}"
        );
        let check = |vid: &str, ty: &str, size: u64, rtk: i64, source: Value| {
            let v = &rows[vid];
            assert_eq!(v["type"], ty, "[{n}] {vid}: {v}");
            assert_eq!(v["state"], "stopped", "[{n}] {vid}: {v}");
            assert_eq!(v["size"], size, "[{n}] {vid}: {v}");
            assert_eq!(v["rw"], true, "[{n}] {vid}: {v}");
            assert_eq!(v["revisions_to_keep"], rtk, "[{n}] {vid}: {v}");
            assert_eq!(v["source"], source, "[{n}] {vid}: {v}");
            assert_eq!(v["revisions"], serde_json::json!([]), "[{n}] {vid}: {v}");
        };
        check("vm-templates/tpl/root", "origin", MIB_U, 1, Value::Null);
        check("appvms/work/private", "origin", MIB_U, 2, Value::Null);
        check(
            "appvms/work/root",
            "snapshot",
            MIB_U,
            0,
            "vm-templates/tpl/root".into(),
        );
        check(
            "appvms/work/volatile",
            "volatile",
            512 << 10,
            0,
            Value::Null,
        );
        check(
            "appvms/disp1/root",
            "snapshot",
            MIB_U,
            0,
            "appvms/work/root".into(),
        );
        check("appvms/work/data", "origin", 4096, 1, Value::Null);
        let text_list = fx.ok(&["volume", "list"]);
        for (vid, v) in &rows {
            let line = text_list
                .lines()
                .find(|l| l.split_whitespace().next() == Some(vid))
                .unwrap_or_else(|| panic!("[{n}] volume list has no {vid}:\n{text_list}"));
            assert!(line.contains(v["type"].as_str().unwrap()), "[{n}] {line}");
        }

        // info: JSON, text, and the VM:NAME short form.
        let info = fx.info("work:private");
        assert_eq!(info["vid"], "appvms/work/private", "[{n}] {info}");
        assert_eq!(info["type"], "origin", "[{n}] {info}");
        assert_eq!(
            info["image"],
            s(&fx.pool.join("appvms/work/private.img")).as_str(),
            "[{n}] {info}"
        );
        assert!(info["usage"].is_object(), "[{n}] info has usage: {info}");
        let disp = fx.info("disp1:root");
        assert_eq!(disp["source"], "appvms/work/root", "[{n}] {disp}");
        assert_eq!(
            disp["resolved_source"], "vm-templates/tpl/root",
            "[{n}] {disp}"
        );
        let t = fx.ok(&["volume", "info", "tpl:root"]);
        assert!(
            t.lines()
                .any(|l| l.starts_with("vid:") && l.ends_with("vm-templates/tpl/root")),
            "[{n}] {t}"
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with("type:") && l.ends_with("origin")),
            "[{n}] {t}"
        );
        assert_eq!(
            fx.ok(&["volume", "revisions", "work:private"]),
            "no revisions\n",
            "[{n}]"
        );

        // import from a file and from stdin; export to a file and stdout.
        let a = pattern(0xa5, MIB);
        let b = pattern(0x3c, MIB);
        let a_file = fx.file("a.img", &a);
        let said = fx.ok(&["volume", "import", "appvms/work/private", &s(&a_file)]);
        assert!(said.contains("revision 1"), "[{n}] {said}");
        let out = fx.run_with(&["volume", "import", "appvms/work/private", "-"], Some(&b));
        assert!(ok(&fs, &out, "import -").contains("revision 2"), "[{n}]");
        let exported = fx.dir.join("exported.img");
        fx.ok(&["volume", "export", "appvms/work/private", &s(&exported)]);
        assert_eq!(
            std::fs::read(&exported).unwrap(),
            b,
            "[{n}] export to a file"
        );
        assert_eq!(
            fx.export("appvms/work/private", None),
            b,
            "[{n}] export to stdout"
        );
        assert_eq!(
            fx.export("work:private", Some("2")),
            a,
            "[{n}] export --revision 2"
        );
        assert_eq!(
            fx.export("appvms/work/private", Some("1")),
            zeros(MIB),
            "[{n}] export --revision 1"
        );
        // The destination must not exist.
        let line = fx.refused(
            &["volume", "export", "appvms/work/private", &s(&exported)],
            ErrorClass::Refused,
        );
        assert!(line.contains("exists"), "[{n}] {line}");
        assert_eq!(std::fs::read(&exported).unwrap(), b, "[{n}]");
        // revisions, text and JSON.
        let revs = fx.json(&["volume", "revisions", "appvms/work/private"]);
        assert_eq!(
            fx.revision_ids("appvms/work/private"),
            ["1", "2"],
            "[{n}] {revs}"
        );
        for r in revs.as_array().unwrap() {
            let id = r["id"].as_str().unwrap();
            let file = r["file_name"].as_str().unwrap();
            assert!(file.starts_with(&format!("private.img.{id}@")), "[{n}] {r}");
            assert!(
                file.ends_with(r["timestamp"].as_str().unwrap()),
                "[{n}] {r}"
            );
            assert!(
                fx.pool.join("appvms/work").join(file).is_file(),
                "[{n}] {r}"
            );
        }
        let t = fx.ok(&["volume", "revisions", "appvms/work/private"]);
        assert!(
            t.starts_with("REVISION") && t.lines().count() == 3,
            "[{n}] {t}"
        );
        assert_eq!(fx.info("appvms/work/private")["revisions"], revs, "[{n}]");

        // A wrong length is refused, and nothing changes.
        let short = fx.file("short.img", &pattern(7, MIB - 512));
        let line = fx.refused(
            &["volume", "import", "appvms/work/private", &s(&short)],
            ErrorClass::InvalidInput,
        );
        assert!(
            line.contains("1048064"),
            "[{n}] the error should give the length: {line}"
        );
        fx.refused_with(
            &["volume", "import", "appvms/work/private", "-"],
            Some(&pattern(7, MIB - 512)),
            ErrorClass::InvalidInput,
            true,
        );
        fx.refused_with(
            &["volume", "import", "appvms/work/private", "-"],
            Some(&[]),
            ErrorClass::InvalidInput,
            true,
        );
        fx.refused_with(
            &["volume", "import", "appvms/work/private", "-"],
            Some(&pattern(7, MIB + 1)),
            ErrorClass::InvalidInput,
            true,
        );
        fx.refused_with(
            &["volume", "import", "appvms/work/private", "-"],
            Some(&pattern(7, 2 * MIB)),
            ErrorClass::InvalidInput,
            true,
        );
        fx.refused(
            &[
                "volume",
                "import",
                "appvms/work/private",
                &s(&a_file),
                "--size",
                "2M",
            ],
            ErrorClass::InvalidInput,
        );
        fx.refused(
            &[
                "volume",
                "import",
                "appvms/work/private",
                &s(&fx.dir.join("nosuch")),
            ],
            ErrorClass::NotFound,
        );
        fx.refused(
            &["volume", "import", "appvms/work/volatile", &s(&a_file)],
            ErrorClass::Refused,
        );
        fx.refused(
            &["volume", "import", "appvms/work/root", &s(&a_file)],
            ErrorClass::Refused,
        );
        assert_eq!(
            fx.export("appvms/work/private", None),
            b,
            "[{n}] after refused imports"
        );
        // With --size, the data sets the new size.
        let two = pattern(0x77, 2 * MIB);
        fx.ok(&[
            "volume",
            "import",
            "work:data",
            &s(&fx.file("two.img", &two)),
            "--size",
            "2M",
        ]);
        assert_eq!(fx.info("appvms/work/data")["size"], 2 * MIB_U, "[{n}]");
        assert_eq!(fx.export("appvms/work/data", None), two, "[{n}]");

        // Snapshots read their resolved source; volatile has no data.
        assert_eq!(fx.export("appvms/work/root", None), zeros(MIB), "[{n}]");
        fx.ok(&["volume", "import", "vm-templates/tpl/root", &s(&a_file)]);
        assert_eq!(
            fx.export("appvms/work/root", None),
            a,
            "[{n}] snapshot export"
        );
        assert_eq!(
            fx.export("appvms/disp1/root", None),
            a,
            "[{n}] snapshot-of-snapshot export"
        );
        fx.refused(
            &["volume", "export", "appvms/work/volatile", "-"],
            ErrorClass::Refused,
        );
        fx.refused(
            &[
                "volume",
                "export",
                "appvms/work/root",
                "-",
                "--revision",
                "1",
            ],
            ErrorClass::Refused,
        );
        fx.refused(
            &["volume", "revert", "appvms/work/volatile"],
            ErrorClass::Refused,
        );

        // resize: grow, same size, shrink.
        let said = fx.ok(&["volume", "resize", "appvms/work/private", "2M"]);
        assert!(said.contains(&(2 * MIB).to_string()), "[{n}] {said}");
        assert_eq!(fx.info("appvms/work/private")["size"], 2 * MIB_U, "[{n}]");
        let mut grown = b.clone();
        grown.resize(2 * MIB, 0);
        assert_eq!(
            fx.export("appvms/work/private", None),
            grown,
            "[{n}] after growing"
        );
        let before = snapshot(&fx.dir);
        let said = fx.ok(&["volume", "resize", "appvms/work/private", "2048K"]);
        assert!(said.contains("nothing to do"), "[{n}] {said}");
        assert_same_tree(&fs, &before, &snapshot(&fx.dir), "same-size resize");
        let line = fx.refused(
            &["volume", "resize", "appvms/work/private", "1M"],
            ErrorClass::Refused,
        );
        assert!(line.contains("--allow-shrink"), "[{n}] {line}");
        fx.ok(&[
            "volume",
            "resize",
            "appvms/work/private",
            "1M",
            "--allow-shrink",
        ]);
        assert_eq!(fx.info("appvms/work/private")["size"], MIB_U, "[{n}]");
        assert_eq!(
            fx.export("appvms/work/private", None),
            b,
            "[{n}] after shrinking"
        );
        fx.ok(&["volume", "resize", "appvms/work/volatile", "1M"]);
        assert_eq!(fx.info("appvms/work/volatile")["size"], MIB_U, "[{n}]");
        assert_eq!(
            fx.revision_ids("appvms/work/private"),
            ["1", "2"],
            "[{n}] resize adds no revision"
        );

        // set revisions_to_keep and rw.
        fx.ok(&[
            "volume",
            "set",
            "appvms/work/private",
            "revisions_to_keep",
            "3",
        ]);
        assert_eq!(
            fx.info("appvms/work/private")["revisions_to_keep"],
            3,
            "[{n}]"
        );
        fx.ok(&["volume", "set", "work:private", "rw", "false"]);
        assert_eq!(fx.info("appvms/work/private")["rw"], false, "[{n}]");
        fx.refused(
            &["volume", "resize", "appvms/work/private", "2M"],
            ErrorClass::Refused,
        );
        fx.refused(
            &["volume", "import", "appvms/work/private", &s(&a_file)],
            ErrorClass::Refused,
        );
        fx.ok(&["volume", "set", "appvms/work/private", "rw", "true"]);
        assert_eq!(fx.info("appvms/work/private")["rw"], true, "[{n}]");
        // Lowering revisions_to_keep prunes at once, oldest first.
        fx.ok(&[
            "volume",
            "set",
            "appvms/work/private",
            "revisions_to_keep",
            "1",
        ]);
        assert_eq!(fx.revision_ids("appvms/work/private"), ["2"], "[{n}]");
        assert_eq!(fx.export("appvms/work/private", Some("2")), a, "[{n}]");

        // revert: an unknown revision lists the valid ones.
        let line = fx.refused(
            &["volume", "revert", "appvms/work/private", "99"],
            ErrorClass::NotFound,
        );
        assert!(
            line.contains("99") && line.contains("valid revisions: 2"),
            "[{n}] {line}"
        );
        let line = fx.refused(
            &["volume", "revert", "appvms/work/private", "1"],
            ErrorClass::NotFound,
        );
        assert!(line.contains("valid revisions: 2"), "[{n}] {line}");
        fx.refused(
            &[
                "volume",
                "export",
                "appvms/work/private",
                "-",
                "--revision",
                "1",
            ],
            ErrorClass::NotFound,
        );
        let said = fx.ok(&["volume", "revert", "appvms/work/private"]);
        assert!(
            said.contains("revision 3"),
            "[{n}] the previous image is saved: {said}"
        );
        assert_eq!(
            fx.export("appvms/work/private", None),
            a,
            "[{n}] after revert"
        );
        fx.ok(&["volume", "revert", "appvms/work/private", "3"]);
        assert_eq!(
            fx.export("appvms/work/private", None),
            b,
            "[{n}] after reverting the revert"
        );
        let line = fx.refused(
            &["volume", "revert", "appvms/work/volatile", "1"],
            ErrorClass::Refused,
        );
        assert!(line.contains("volatile"), "[{n}] {line}");

        // clone within the pool: new and existing destinations.
        fx.ok(&["volume", "resize", "appvms/work/private", "3M"]);
        let mut content = b.clone();
        content.resize(3 * MIB, 0);
        fx.ok(&[
            "volume",
            "clone",
            "appvms/work/private",
            "appvms/work2/private",
        ]);
        let c = fx.info("appvms/work2/private");
        assert_eq!(
            (c["size"].as_u64(), c["type"].as_str()),
            (Some(3 * MIB_U), Some("origin")),
            "[{n}] {c}"
        );
        assert_eq!(
            fx.export("appvms/work2/private", None),
            content,
            "[{n}] clone"
        );
        fx.ok(&["volume", "create", "appvms/work3/private", "--size", "4M"]);
        fx.ok(&["volume", "clone", "work:private", "appvms/work3/private"]);
        assert_eq!(
            fx.info("appvms/work3/private")["size"],
            3 * MIB_U,
            "[{n}] clone into an existing volume"
        );
        assert_eq!(fx.export("appvms/work3/private", None), content, "[{n}]");
        assert_eq!(
            fx.revision_ids("appvms/work3/private"),
            ["1"],
            "[{n}] its old image is a revision"
        );
        // A snapshot clones its source's data, at its source's size.
        fx.ok(&["volume", "clone", "appvms/work/root", "appvms/work4/root"]);
        assert_eq!(fx.export("appvms/work4/root", None), a, "[{n}]");
        fx.refused(
            &[
                "volume",
                "clone",
                "appvms/work/private",
                "appvms/work/private",
            ],
            ErrorClass::Refused,
        );
        fx.refused(
            &[
                "volume",
                "clone",
                "appvms/work/private",
                "appvms/work/volatile",
            ],
            ErrorClass::Refused,
        );

        // clone to a second pool, on another filesystem when there is one.
        let fs2 = other_fs(&all, &fs);
        let fx2 = Fx::new(&fs2, "cli-e2e-second");
        let said = fx.ok(&[
            "volume",
            "clone",
            "appvms/work/private",
            "appvms/work/private",
            "--to-pool",
            &s(&fx2.pool),
        ]);
        assert!(said.contains(&s(&fx2.pool)), "[{n} -> {}] {said}", fs2.name);
        assert_eq!(
            fx2.info("appvms/work/private")["size"],
            3 * MIB_U,
            "[{n} -> {}]",
            fs2.name
        );
        assert_eq!(
            fx2.export("appvms/work/private", None),
            content,
            "[{n} -> {}] clone to another pool",
            fs2.name
        );
        fx2.ok(&["volume", "create", "appvms/other/private", "--size", "8M"]);
        fx.ok(&[
            "volume",
            "clone",
            "tpl:root",
            "appvms/other/private",
            "--to-pool",
            &s(&fx2.pool),
        ]);
        assert_eq!(
            fx2.info("appvms/other/private")["size"],
            MIB_U,
            "[{n} -> {}]",
            fs2.name
        );
        assert_eq!(
            fx2.export("appvms/other/private", None),
            a,
            "[{n} -> {}]",
            fs2.name
        );
        assert!(
            fx.json(&["volume", "list"])
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v["vid"] != "appvms/other/private"),
            "[{n}] --to-pool created the clone in the source pool"
        );

        // remove.
        fx.ok(&["volume", "remove", "appvms/work2/private"]);
        fx.refused(
            &["volume", "info", "appvms/work2/private"],
            ErrorClass::NotFound,
        );
        assert!(
            !fx.pool.join("appvms/work2").exists(),
            "[{n}] the empty VM directory stays"
        );
        assert!(
            !fx.pool.join(".reflinkfs/volumes/appvms/work2").exists(),
            "[{n}] the config stays"
        );
        fx.refused(
            &["volume", "remove", "appvms/work2/private"],
            ErrorClass::NotFound,
        );
        let line = fx.refused(
            &["volume", "remove", "vm-templates/tpl/root"],
            ErrorClass::Refused,
        );
        assert!(
            line.contains("appvms/work/root"),
            "[{n}] the error should name the dependant: {line}"
        );
        for vid in [
            "appvms/disp1/root",
            "appvms/work/root",
            "vm-templates/tpl/root",
            "appvms/work/private",
        ] {
            fx.ok(&["volume", "remove", vid]);
        }
        assert!(!fx.pool.join("vm-templates/tpl").exists(), "[{n}]");
        let files: Vec<String> = std::fs::read_dir(fx.pool.join("appvms/work"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            files.iter().all(|f| f.starts_with("data")),
            "[{n}] remove left {files:?}"
        );
        let out = fx.run(&["pool", "check"]);
        assert_eq!(ok(&fs, &out, "pool check"), "no problems found\n", "[{n}]");
        let out = fx2.run(&["pool", "check"]);
        assert_eq!(
            ok(&fs2, &out, "pool check"),
            "no problems found\n",
            "[{}]",
            fs2.name
        );
    }
}

/// SPEC §5 revert: "Revision K stays in the list."
#[test]
fn revert_keeps_the_reverted_revision() {
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-revert-keeps");
        let b = pattern(0x11, MIB);
        fx.ok(&[
            "volume",
            "import",
            "appvms/vm/private",
            &s(&fx.file("b.img", &b)),
        ]);
        // revisions_to_keep=1: revision 2 holds the data of populated().
        assert_eq!(fx.revision_ids("appvms/vm/private"), ["2"], "[{}]", fs.name);
        fx.ok(&["volume", "revert", "appvms/vm/private", "2"]);
        assert_eq!(
            fx.export("appvms/vm/private", None),
            std::fs::read(&data).unwrap(),
            "[{}]",
            fs.name
        );
        let ids = fx.revision_ids("appvms/vm/private");
        assert!(
            ids.contains(&"2".to_owned()),
            "[{}] revision 2 is gone after the revert: {ids:?}",
            fs.name
        );
        assert!(
            ids.contains(&"3".to_owned()),
            "[{}] the image before the revert is not revision 3: {ids:?}",
            fs.name
        );
    }
}

// ---------------------------------------------------------------------------
// 3. Help.

#[test]
fn help_documents_every_exit_status() {
    let fs = &common::filesystems()[0];
    for args in [
        &["--help"][..],
        &["help"][..],
        &["volume", "create", "--help"][..],
        &["volume", "--help"][..],
        &["pool", "--help"][..],
        &["pool", "init", "--help"][..],
        &["pool", "check", "--help"][..],
        &["volume", "import", "--help"][..],
        &["volume", "export", "--help"][..],
        &["volume", "resize", "--help"][..],
        &["volume", "revert", "--help"][..],
        &["volume", "set", "--help"][..],
        &["volume", "clone", "--help"][..],
        &["volume", "remove", "--help"][..],
        &["volume", "info", "--help"][..],
        &["volume", "list", "--help"][..],
        &["volume", "revisions", "--help"][..],
    ] {
        let what = args.join(" ");
        let out = reflinkfs().args(args).output().unwrap();
        let help = ok(fs, &out, &what);
        assert!(
            help.contains("Exit status"),
            "[{}] {what} has no `Exit status`:\n{help}",
            fs.name
        );
        for (class, status, description) in ErrorClass::ALL {
            let documented = help.lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some(&status.to_string()) && l.contains(description)
            });
            assert!(
                documented,
                "[{}] {what} does not document exit status {status} ({class:?}):\n{help}",
                fs.name
            );
        }
        assert!(
            help.lines().any(|l| l.trim_start().starts_with("2 ")),
            "[{}] {what}: no status 2",
            fs.name
        );
        assert!(
            help.contains("REFLINKFS_POOL"),
            "[{}] {what}: no $REFLINKFS_POOL",
            fs.name
        );
    }
    // A usage error is exit 2.
    let out = reflinkfs().args(["volume", "frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}

// ---------------------------------------------------------------------------
// 4. $REFLINKFS_POOL.

#[test]
fn pool_from_the_environment() {
    for fs in common::filesystems() {
        let dir = scratch_dir(&fs, "cli-env");
        let pool = dir.join("pool");
        let env = |args: &[&str]| {
            let out = reflinkfs()
                .env("REFLINKFS_POOL", &pool)
                .args(args)
                .output()
                .unwrap();
            ok(&fs, &out, &args.join(" "))
        };
        let mut init = vec!["pool", "init"];
        if !fs.reflink {
            init.push("--setup-check=no");
        }
        env(&init);
        assert!(pool.join(".reflinkfs/pool.json").is_file(), "[{}]", fs.name);
        env(&["volume", "create", "appvms/vm/private", "--size", "1M"]);
        assert!(
            env(&["volume", "list"]).contains("appvms/vm/private"),
            "[{}]",
            fs.name
        );
        let info: Value =
            serde_json::from_str(&env(&["volume", "info", "vm:private", "--json"])).unwrap();
        assert_eq!(info["size"], MIB_U, "[{}]", fs.name);
        let data = pattern(9, MIB);
        let out = reflinkfs()
            .env("REFLINKFS_POOL", &pool)
            .args(["volume", "import", "appvms/vm/private", "-"])
            .write_stdin(data.clone())
            .output()
            .unwrap();
        ok(&fs, &out, "import with $REFLINKFS_POOL");
        let out = reflinkfs()
            .env("REFLINKFS_POOL", &pool)
            .args(["volume", "export", "appvms/vm/private", "-"])
            .output()
            .unwrap();
        ok(&fs, &out, "export with $REFLINKFS_POOL");
        assert_eq!(out.stdout, data, "[{}]", fs.name);
        // --pool wins over the environment.
        let out = reflinkfs()
            .env("REFLINKFS_POOL", dir.join("nosuch"))
            .args(["volume", "list", "--pool", &s(&pool)])
            .output()
            .unwrap();
        assert!(
            ok(&fs, &out, "--pool over $REFLINKFS_POOL").contains("appvms/vm/private"),
            "[{}]",
            fs.name
        );
        // A wrong pool from the environment is not found.
        let out = reflinkfs()
            .env("REFLINKFS_POOL", dir.join("nosuch"))
            .args(["volume", "list"])
            .output()
            .unwrap();
        let line = fails(
            &fs,
            &out,
            ErrorClass::NotFound,
            "volume list with a wrong $REFLINKFS_POOL",
        );
        assert!(line.contains("nosuch"), "[{}] {line}", fs.name);
        // Neither: a usage error that names the variable.
        let out = reflinkfs().args(["volume", "list"]).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "[{}] no pool at all: {}",
            fs.name,
            show(&out)
        );
        assert!(
            !pool.join("nosuch").exists() && !dir.join("nosuch").exists(),
            "[{}]",
            fs.name
        );
    }
}

// ---------------------------------------------------------------------------
// 5. The pool's lock.

#[test]
fn a_locked_pool_is_refused_with_the_holders_pid() {
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-lock");
        let data = s(&data);
        let held =
            reflinkfs::engine::Pool::open(&fx.pool).expect("open the pool in the test process");
        let pid = std::process::id().to_string();
        for args in [
            vec!["volume", "list"],
            vec!["volume", "info", "appvms/vm/private"],
            vec!["volume", "create", "appvms/vm/new", "--size", "1M"],
            vec!["volume", "import", "appvms/vm/private", &data],
            vec!["volume", "remove", "appvms/vm/root"],
            vec!["pool", "info"],
            vec!["pool", "check"],
        ] {
            let line = fx.refused(&args, ErrorClass::Busy);
            assert!(
                line.contains("process"),
                "[{}] {}: {line}",
                fs.name,
                args.join(" ")
            );
            assert!(
                line.split(|c: char| !c.is_ascii_digit()).any(|w| w == pid),
                "[{}] {}: the error should name PID {pid}: {line}",
                fs.name,
                args.join(" ")
            );
        }
        // --to-pool is locked too.
        let fx2 = Fx::new(&fs, "cli-lock-second");
        let held2 = reflinkfs::engine::Pool::open(&fx2.pool).unwrap();
        drop(held);
        let line = fx.refused(
            &[
                "volume",
                "clone",
                "appvms/vm/private",
                "appvms/vm/private",
                "--to-pool",
                &s(&fx2.pool),
            ],
            ErrorClass::Busy,
        );
        assert!(line.contains(&pid), "[{}] {line}", fs.name);
        drop(held2);
        // Released: the commands work again.
        assert!(
            fx.ok(&["volume", "list"]).contains("appvms/vm/private"),
            "[{}]",
            fs.name
        );
        fx.ok(&[
            "volume",
            "clone",
            "appvms/vm/private",
            "appvms/vm/private",
            "--to-pool",
            &s(&fx2.pool),
        ]);
    }
}

// ---------------------------------------------------------------------------
// More bad input and odd states found while writing the above.

/// SPEC §1.4: a volume whose files are missing is listed as `missing`, its
/// own operations fail clearly, and every other volume works. A missing
/// optional image is not listed and is not an error (§1.3).
#[test]
fn missing_images_do_not_break_the_pool() {
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-missing");
        let data = s(&data);
        fx.ok(&[
            "volume",
            "create",
            "appvms/k/modules",
            "--size",
            "1M",
            "--optional",
        ]);
        fx.ok(&["volume", "create", "appvms/vm2/private", "--size", "1M"]);
        assert_eq!(
            fx.info("appvms/k/modules")["optional"],
            true,
            "[{}]",
            fs.name
        );
        std::fs::remove_file(fx.pool.join("appvms/k/modules.img")).unwrap();
        std::fs::remove_file(fx.pool.join("appvms/vm2/private.img")).unwrap();

        let list = fx.json(&["volume", "list"]);
        let state = |vid: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .find(|v| v["vid"] == vid)
                .map(|v| v["state"].as_str().unwrap().to_owned())
        };
        assert_eq!(
            state("appvms/vm2/private").as_deref(),
            Some("missing"),
            "[{}] {list}",
            fs.name
        );
        assert_eq!(
            state("appvms/k/modules"),
            None,
            "[{}] a missing optional image is listed: {list}",
            fs.name
        );
        assert_eq!(
            state("appvms/vm/private").as_deref(),
            Some("stopped"),
            "[{}] {list}",
            fs.name
        );
        assert_eq!(
            fx.info("appvms/vm2/private")["state"],
            "missing",
            "[{}]",
            fs.name
        );
        for args in [
            vec!["volume", "export", "appvms/vm2/private", "-"],
            vec!["volume", "resize", "appvms/vm2/private", "2M"],
            vec![
                "volume",
                "clone",
                "appvms/vm2/private",
                "appvms/vm3/private",
            ],
        ] {
            let line = fx.refused(&args, ErrorClass::NotFound);
            assert!(
                line.contains("vm2/private.img"),
                "[{}] {}: {line}",
                fs.name,
                args.join(" ")
            );
        }
        // The other volumes work.
        fx.ok(&["volume", "import", "appvms/vm/private", &data]);
        assert_eq!(
            fx.export("appvms/vm/private", None),
            std::fs::read(&data).unwrap(),
            "[{}]",
            fs.name
        );
        fx.ok(&["volume", "create", "appvms/vm3/private", "--size", "1M"]);
        // check reports the missing image, not the optional one.
        let out = fx.run(&["pool", "check"]);
        assert_eq!(
            out.status.code(),
            Some(code(ErrorClass::Corrupt)),
            "[{}] {}",
            fs.name,
            show(&out)
        );
        let report = text(&out.stdout);
        assert!(report.contains("vm2/private.img"), "[{}] {report}", fs.name);
        assert!(!report.contains("modules"), "[{}] {report}", fs.name);
    }
}

/// A planted symlink in place of a VM directory makes that VM's volumes
/// fail, but must not take `volume list` and `pool info` down with it.
#[test]
fn a_symlinked_vm_directory_does_not_break_the_pool() {
    for fs in common::filesystems() {
        let (fx, _) = populated(&fs, "cli-symlink-vmdir");
        fx.ok(&["volume", "create", "appvms/other/private", "--size", "1M"]);
        let outside = fx.dir.join("outside-vm");
        std::fs::rename(fx.pool.join("appvms/vm"), &outside).unwrap();
        std::os::unix::fs::symlink(&outside, fx.pool.join("appvms/vm")).unwrap();
        let before = snapshot(&outside);

        let out = fx.run(&["pool", "check"]);
        assert_eq!(
            out.status.code(),
            Some(code(ErrorClass::Corrupt)),
            "[{}] {}",
            fs.name,
            show(&out)
        );
        assert!(
            text(&out.stdout).contains(&s(&fx.pool.join("appvms/vm"))),
            "[{}] {}",
            fs.name,
            show(&out)
        );
        fx.refused_with(
            &["volume", "export", "appvms/vm/private", "-"],
            None,
            ErrorClass::Corrupt,
            false,
        );
        assert_eq!(
            fx.info("appvms/other/private")["state"],
            "stopped",
            "[{}]",
            fs.name
        );

        let out = fx.run(&["volume", "list", "--json"]);
        ok(&fs, &out, "volume list with a symlinked VM directory");
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        let find = |vid: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .find(|v| v["vid"] == vid)
                .cloned()
        };
        assert_eq!(
            find("appvms/other/private").map(|v| v["state"].clone()),
            Some("stopped".into()),
            "[{}] {list}",
            fs.name
        );
        let vm =
            find("appvms/vm/private").unwrap_or_else(|| panic!("[{}] not listed: {list}", fs.name));
        assert_ne!(vm["state"], "stopped", "[{}] {vm}", fs.name);
        let out = fx.run(&["pool", "info"]);
        ok(&fs, &out, "pool info with a symlinked VM directory");
        assert_same_tree(
            &fs,
            &before,
            &snapshot(&outside),
            "the directory outside the pool",
        );
    }
}

/// Clone into an existing volume is "committed as an import of DST"
/// (SPEC §5), and import refuses a volume with rw=false.
#[test]
fn clone_into_a_read_only_volume_is_refused() {
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-clone-ro");
        fx.ok(&[
            "volume",
            "create",
            "appvms/ro/private",
            "--size",
            "1M",
            "--read-only",
        ]);
        assert_eq!(fx.info("appvms/ro/private")["rw"], false, "[{}]", fs.name);
        fx.refused(
            &["volume", "import", "appvms/ro/private", &s(&data)],
            ErrorClass::Refused,
        );
        fx.refused(
            &["volume", "clone", "appvms/vm/private", "appvms/ro/private"],
            ErrorClass::Refused,
        );
    }
}

/// Runs the binary with stdin and stdout given as files.
fn run_with_files(
    args: &[&str],
    stdin: std::process::Stdio,
    stdout: std::process::Stdio,
) -> Output {
    let program = reflinkfs().get_program().to_owned();
    std::process::Command::new(program)
        .env_remove("REFLINKFS_POOL")
        .env_remove("RUST_LOG")
        .args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

/// `volume export VID -` with stdout redirected to a file writes at the
/// file's offset, like any program writing to stdout: what was written
/// before (`{ echo header; reflinkfs volume export VID -; } > f`, or
/// `>> f`) must survive.
#[test]
fn export_to_a_regular_file_stdout_keeps_what_was_there() {
    use std::io::Write;
    for fs in common::filesystems() {
        let (fx, data) = populated(&fs, "cli-export-stdout-file");
        let image = std::fs::read(&data).unwrap();
        let mut expected = b"HEADER".to_vec();
        expected.extend_from_slice(&image);
        let args = [
            "volume",
            "export",
            "--pool",
            &s(&fx.pool),
            "appvms/vm/private",
            "-",
        ];

        // `{ printf HEADER; reflinkfs volume export VID -; } > out`
        let out_path = fx.dir.join("out-offset");
        let mut f = std::fs::File::create(&out_path).unwrap();
        f.write_all(b"HEADER").unwrap();
        let out = run_with_files(&args, std::process::Stdio::null(), f.into());
        ok(&fs, &out, "export to a regular file at offset 6");
        assert!(
            std::fs::read(&out_path).unwrap() == expected,
            "[{}] export - > file at an offset: the header was lost",
            fs.name
        );

        // `printf HEADER > out; reflinkfs volume export VID - >> out`
        let out_path = fx.dir.join("out-append");
        std::fs::write(&out_path, b"HEADER").unwrap();
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&out_path)
            .unwrap();
        let out = run_with_files(&args, std::process::Stdio::null(), f.into());
        let got = std::fs::read(&out_path).unwrap();
        assert!(
            got.starts_with(b"HEADER"),
            "[{}] export - >> file destroyed the file ({} bytes left): {}",
            fs.name,
            got.len(),
            show(&out)
        );
        ok(&fs, &out, "export >> file");
        assert!(
            got == expected,
            "[{}] export - >> file: wrong content",
            fs.name
        );
    }
}

/// `volume import VID -` reads stdin from where it stands, also when stdin
/// is a regular file (`{ read-a-header; reflinkfs volume import VID -; } < f`).
#[test]
fn import_from_a_regular_file_stdin_starts_at_its_offset() {
    use std::io::{Seek, SeekFrom, Write};
    for fs in common::filesystems() {
        let (fx, _) = populated(&fs, "cli-import-stdin-file");
        let image = pattern(0x42, MIB);
        let path = fx.dir.join("with-header.img");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&[0xffu8; 512]).unwrap();
        f.write_all(&image).unwrap();
        drop(f);
        let mut f = std::fs::File::open(&path).unwrap();
        f.seek(SeekFrom::Start(512)).unwrap();
        let out = run_with_files(
            &[
                "volume",
                "import",
                "--pool",
                &s(&fx.pool),
                "appvms/vm/private",
                "-",
            ],
            f.into(),
            std::process::Stdio::piped(),
        );
        ok(&fs, &out, "import from a regular-file stdin at offset 512");
        assert!(
            fx.export("appvms/vm/private", None) == image,
            "[{}] wrong data imported",
            fs.name
        );
    }
}
