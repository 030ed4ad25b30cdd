//! The `reflinkfs` binary, driven end to end with `assert_cmd` against pools
//! on the scratch filesystems of `REFLINKFS_TEST_FS` (SPEC §2, §3, §5, §8).
//! Each test makes its own pool (or pools) on every filesystem.
//!
//! Every refusal is checked for its exit status (from `ErrorClass::ALL`),
//! for one clear `reflinkfs: error:` line on stderr, and for leaving the
//! disk exactly as it was: the whole scratch tree (pool and the files next
//! to it) is snapshotted before and after, with sizes, inodes, mtimes and
//! the content of small files.
//!
//! - `errors`: bad volume ids, sizes, revisions and properties;
//! - `corrupt`: corrupt configs, planted symlinks and missing images;
//! - `pool`: `pool init`, `pool info`, `$REFLINKFS_POOL`, the pool's lock
//!   and the help;
//! - `volume`: create, list, info, resize, set, clone and remove;
//! - `data`: import, export, revisions and revert.
#![allow(clippy::unwrap_used)] // in tests, a failed unwrap fails the test

#[path = "../common/mod.rs"]
mod common;

mod corrupt;
mod data;
mod errors;
mod pool;
mod volume;

use common::cli::*;
use common::tree::{assert_same_tree, tree_nodes};
use common::{pattern, s, scratch_dir, TestFs};
use reflinkfs::ErrorClass;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

const MIB: usize = 1 << 20;
const MIB_U: u64 = 1 << 20;

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
        let said = fx.ok(init_args(fs, &[]));
        let mode = if fs.reflink {
            "(reflink)"
        } else {
            "(copy mode)"
        };
        assert!(said.contains(mode), "[{}] pool init says {said:?}", fs.name);
        fx
    }

    /// `[FS] ARGS`, for messages.
    fn what(&self, args: &[String]) -> String {
        format!("[{}] {}", self.fs.name, args.join(" "))
    }

    /// Runs `GROUP COMMAND --pool POOL REST...`.
    fn run(&self, args: impl Args) -> Output {
        self.run_with(args, None)
    }

    fn run_with(&self, args: impl Args, stdin: Option<&[u8]>) -> Output {
        let mut c = rf_command(&self.pool, args);
        if let Some(input) = stdin {
            c.write_stdin(input.to_vec());
        }
        c.output().unwrap()
    }

    #[track_caller]
    fn ok(&self, args: impl Args) -> String {
        let args = args.words();
        succeeded(&self.run(&args), &self.what(&args))
    }

    /// Runs a command that must fail with `class` and change nothing.
    #[track_caller]
    fn refused(&self, args: impl Args, class: ErrorClass) -> String {
        self.refused_with(args, None, class, true)
    }

    /// [`Fx::refused`] for each of `commands`, with `vars` in place (see
    /// [`argv`]); returns each command as it ran, with its error line.
    #[track_caller]
    fn all_refused(
        &self,
        commands: &[&str],
        vars: &[(&str, &str)],
        class: ErrorClass,
    ) -> Vec<(String, String)> {
        let run = |command: &&str| {
            let args = argv(command, vars);
            let line = self.refused(&args, class);
            (args.join(" "), line)
        };
        commands.iter().map(run).collect()
    }

    /// [`Fx::refused`], with `stdin`, and where `one_line` is false, with
    /// log lines allowed before the error (see [`failed_logged`]).
    #[track_caller]
    fn refused_with(
        &self,
        args: impl Args,
        stdin: Option<&[u8]>,
        class: ErrorClass,
        one_line: bool,
    ) -> String {
        let args = args.words();
        let what = self.what(&args);
        let before = tree_nodes(&self.dir);
        let out = self.run_with(&args, stdin);
        let line = if one_line {
            failed(&out, class, &what)
        } else {
            failed_logged(&out, class, &what)
        };
        assert_same_tree(&before, &tree_nodes(&self.dir), &what);
        line
    }

    /// Runs a command that must fail, however it says so, and change
    /// nothing in the scratch directory; returns its output.
    #[track_caller]
    fn fails_unchanged(&self, args: impl Args, stdin: Option<&[u8]>) -> Output {
        let args = args.words();
        let what = self.what(&args);
        let before = tree_nodes(&self.dir);
        let out = self.run_with(&args, stdin);
        assert!(
            !out.status.success(),
            "{what}: must fail, got {}",
            show(&out)
        );
        assert_same_tree(&before, &tree_nodes(&self.dir), &what);
        out
    }

    fn json(&self, args: impl Args) -> Value {
        let mut a = args.words();
        a.push("--json".into());
        let out = self.ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {out}", self.what(&a)))
    }

    fn info(&self, vid: &str) -> Value {
        self.json(["volume", "info", vid])
    }

    /// The committed image (or revision) of `vid`, exported to stdout.
    fn export(&self, vid: &str, revision: Option<&str>) -> Vec<u8> {
        let mut args = vec!["volume", "export", vid, "-"];
        if let Some(r) = revision {
            args.extend(["--revision", r]);
        }
        let out = self.run(&args);
        succeeded(&out, &self.what(&args.words()));
        out.stdout
    }

    fn revision_ids(&self, vid: &str) -> Vec<String> {
        self.json(["volume", "revisions", vid])
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

    /// Runs `pool check`, which must find the pool corrupt and name
    /// `needle` in its report; returns the report.
    #[track_caller]
    fn check_finds(&self, needle: &str) -> String {
        let out = self.run("pool check");
        assert_eq!(
            out.status.code(),
            Some(code(ErrorClass::Corrupt)),
            "[{}] pool check: {}",
            self.fs.name,
            show(&out)
        );
        let report = text(&out.stdout);
        assert!(
            report.contains(needle),
            "[{}] pool check should name {needle}: {}",
            self.fs.name,
            show(&out)
        );
        report
    }
}

/// The words of `pool init EXTRA`, with `--setup-check=no` where `fs` has
/// no reflinks.
fn init_args<'a>(fs: &TestFs, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["pool", "init"];
    args.extend(extra);
    if !fs.reflink {
        args.push("--setup-check=no");
    }
    args
}

/// The entry of `vid` in the JSON of `volume list`.
fn listed<'a>(list: &'a Value, vid: &str) -> Option<&'a Value> {
    list.as_array().unwrap().iter().find(|v| v["vid"] == vid)
}

fn zeros(len: usize) -> Vec<u8> {
    vec![0u8; len]
}

/// `make` on each test filesystem in turn, with the filesystem's name:
/// `for (n, fx) in on_each_fs(|fs| Fx::new(fs, "test"))`.
fn on_each_fs<T>(make: impl Fn(&TestFs) -> T) -> impl Iterator<Item = (String, T)> {
    common::filesystems()
        .into_iter()
        .map(move |fs| (fs.name.clone(), make(&fs)))
}

/// A pool with an origin volume `appvms/vm/private` that has data and a
/// revision, a snapshot of it and a volatile volume, and an import file
/// (returned).
fn populated(fs: &TestFs, test: &str) -> (Fx, String) {
    let fx = Fx::new(fs, test);
    fx.ok("volume create appvms/vm/private --size 1M");
    fx.ok("volume create appvms/vm/root --size 1M --snapshot-of appvms/vm/private");
    fx.ok("volume create appvms/vm/volatile --size 1M --volatile");
    let data = fx.file("data.img", &pattern(0x5a, MIB));
    fx.ok(["volume", "import", "appvms/vm/private", &s(&data)]);
    assert_eq!(fx.revision_ids("appvms/vm/private"), ["1"], "[{}]", fs.name);
    (fx, s(&data))
}

// ---------------------------------------------------------------------------
// The volumes of the end-to-end tests.

/// A template's root; an AppVM `work` with an origin `private` keeping two
/// revisions, a `root` that is a snapshot of the template's, a 512 KiB
/// `volatile` and a small origin `data` (made by its short name); and a
/// disposable's root, a snapshot of work's.
const VOLUMES: [&str; 6] = [
    "volume create vm-templates/tpl/root --size 1M",
    "volume create appvms/work/private --size 1M --revisions-to-keep 2",
    "volume create appvms/work/root --size 1M --snapshot-of vm-templates/tpl/root",
    "volume create appvms/work/volatile --size 512K --volatile",
    "volume create appvms/disp1/root --size 1M --snapshot-of work:root",
    "volume create work:data --size 4K",
];

/// A new pool with [`VOLUMES`], and the data the tests import: `a` (also
/// in the file `a.img` beside the pool) and `b`.
struct Work {
    fx: Fx,
    a: Vec<u8>,
    b: Vec<u8>,
    a_file: String,
}

impl std::ops::Deref for Work {
    type Target = Fx;

    fn deref(&self) -> &Fx {
        &self.fx
    }
}

impl Work {
    fn new(fs: &TestFs, test: &str) -> Work {
        Work::with_creates(fs, test).0
    }

    /// [`Work::new`], and what each `volume create` said.
    fn with_creates(fs: &TestFs, test: &str) -> (Work, Vec<String>) {
        let fx = Fx::new(fs, test);
        let said = VOLUMES.iter().map(|create| fx.ok(*create)).collect();
        let a = pattern(0xa5, MIB);
        let a_file = s(&fx.file("a.img", &a));
        let b = pattern(0x3c, MIB);
        (Work { fx, a, b, a_file }, said)
    }

    /// [`Work::new`] where `a` was imported into `appvms/work/private` from
    /// its file, then `b` from stdin: the image is `b`, revision 2 `a` and
    /// revision 1 zeros. Also returns what the two imports said.
    fn imported(fs: &TestFs, test: &str) -> (Work, [String; 2]) {
        let w = Work::new(fs, test);
        let first = w.ok(["volume", "import", "appvms/work/private", &w.a_file]);
        let out = w.run_with("volume import appvms/work/private -", Some(&w.b));
        let second = succeeded(&out, &format!("[{}] import -", fs.name));
        (w, [first, second])
    }

    /// The template's root holds `a`, so the snapshots of it read `a`.
    fn import_template(&self) {
        self.ok(["volume", "import", "vm-templates/tpl/root", &self.a_file]);
    }
}
