//! The pool: `pool init` and `pool info`, `$REFLINKFS_POOL`, the pool's
//! lock, and the help.

use super::*;

fn no_reflink_filesystems() -> Vec<TestFs> {
    common::filesystems()
        .into_iter()
        .filter(|f| f.name == "ext4" || f.name == "tmp")
        .collect()
}

#[test]
fn init_without_reflinks_needs_setup_check_no() {
    for fs in no_reflink_filesystems() {
        let n = &fs.name;
        let dir = scratch_dir(&fs, "cli-setup-check");
        let pool = dir.join("pool");
        std::fs::create_dir(&pool).unwrap();
        let before = tree_nodes(&dir);
        for extra in ["", "--setup-check=yes", "--setup-check yes"] {
            let out = rf(&pool, format!("pool init {extra}").as_str());
            if fs.name == "tmp" && out.status.success() {
                eprintln!("the fallback directory makes reflinks; nothing to check there");
                return;
            }
            let line = failed(&out, ErrorClass::Unsupported, &format!("[{n}] pool init"));
            assert!(
                line.contains("setup-check"),
                "[{n}] the error should name --setup-check=no: {line}"
            );
            assert!(
                !pool.join(".reflinkfs").exists(),
                "[{n}] pool init left .reflinkfs"
            );
            let what = format!("[{n}] pool init without --setup-check=no");
            assert_same_tree(&before, &tree_nodes(&dir), &what);
        }
        // A bad value of the option is a usage error.
        let out = rf(&pool, "pool init --setup-check=maybe");
        let what = format!("[{n}] --setup-check=maybe");
        assert_eq!(out.status.code(), Some(2), "{what}: {}", show(&out));
        assert_same_tree(&before, &tree_nodes(&dir), &what);
        // With `=no` it makes a copy-mode pool.
        let said = rf_ok(&pool, "pool init --setup-check=no");
        assert!(said.contains("copy mode"), "[{n}]");
        let info = rf_json(&pool, "pool info");
        assert_eq!(info["copy_mode"], true, "[{n}] {info}");
    }
}

/// When the pool directory does not exist yet, a refused init must not
/// leave it behind either.
#[test]
fn refused_init_does_not_create_the_pool_directory() {
    for fs in no_reflink_filesystems() {
        let n = &fs.name;
        let pool = scratch_dir(&fs, "cli-setup-check-new").join("pool");
        let out = rf(&pool, "pool init");
        if fs.name == "tmp" && out.status.success() {
            return;
        }
        failed(&out, ErrorClass::Unsupported, &format!("[{n}] pool init"));
        assert!(
            !pool.exists(),
            "[{n}] a refused pool init left {}",
            pool.display()
        );
    }
}

#[test]
fn second_init_of_a_pool_is_refused() {
    for (n, (fx, _)) in on_each_fs(|fs| populated(fs, "cli-reinit")) {
        let before = tree_nodes(&fx.dir);
        for extra in [
            "--setup-check=no",
            "",
            "--read-only",
            "--revisions-to-keep 5",
        ] {
            let out = fx.run(format!("pool init {extra}").as_str());
            let what = format!("[{n}] second pool init {extra}");
            if extra.is_empty() && !fx.fs.reflink {
                // Without reflinks the check may refuse first (exit 9);
                // either way nothing changes.
                let refusals = [ErrorClass::Exists, ErrorClass::Unsupported].map(code);
                assert!(
                    out.status.code().is_some_and(|c| refusals.contains(&c)),
                    "{what}: {}",
                    show(&out)
                );
            } else {
                let line = failed(&out, ErrorClass::Exists, &what);
                assert!(line.contains("already"), "{what}: {line}");
            }
            assert_same_tree(&before, &tree_nodes(&fx.dir), &what);
        }
        assert_eq!(fx.revision_ids("appvms/vm/private"), ["1"], "[{n}]");
    }
}

#[test]
fn a_new_pool_has_the_defaults_and_no_volumes() {
    for (n, fx) in on_each_fs(|fs| Fx::new(fs, "cli-new-pool")) {
        let pinfo = fx.json("pool info");
        assert_eq!(pinfo["copy_mode"], !fx.fs.reflink, "[{n}] {pinfo}");
        assert_eq!(pinfo["read_only"], false, "[{n}] {pinfo}");
        assert_eq!(pinfo["revisions_to_keep"], 1, "[{n}] {pinfo}");
        assert!(fx.ok("pool info").contains("mode:"), "[{n}]");
        assert!(fx.ok("volume list").starts_with("VID"), "[{n}]");
        assert_eq!(fx.json("volume list"), serde_json::json!([]), "[{n}]");
    }
}

// ---------------------------------------------------------------------------
// $REFLINKFS_POOL.

#[test]
fn pool_from_the_environment() {
    for fs in common::filesystems() {
        let n = &fs.name;
        let dir = scratch_dir(&fs, "cli-env");
        let pool = dir.join("pool");
        let env = |pool: &Path, args: &[&str], stdin: &[u8]| {
            reflinkfs()
                .env("REFLINKFS_POOL", pool)
                .args(args)
                .write_stdin(stdin)
                .output()
                .unwrap()
        };
        let env_ok = |args: &[&str]| {
            let what = format!("[{n}] {} with $REFLINKFS_POOL", args.join(" "));
            succeeded(&env(&pool, args, b""), &what)
        };
        env_ok(&init_args(&fs, &[]));
        assert!(pool.join(".reflinkfs/pool.json").is_file(), "[{n}]");
        env_ok(&["volume", "create", "appvms/vm/private", "--size", "1M"]);
        assert!(
            env_ok(&["volume", "list"]).contains("appvms/vm/private"),
            "[{n}]"
        );
        let info = env_ok(&["volume", "info", "vm:private", "--json"]);
        let info: Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["size"], MIB_U, "[{n}]");
        let data = pattern(9, MIB);
        let out = env(
            &pool,
            &["volume", "import", "appvms/vm/private", "-"],
            &data,
        );
        succeeded(&out, &format!("[{n}] import with $REFLINKFS_POOL"));
        let out = env(&pool, &["volume", "export", "appvms/vm/private", "-"], b"");
        succeeded(&out, &format!("[{n}] export with $REFLINKFS_POOL"));
        assert_eq!(out.stdout, data, "[{n}]");
        // --pool wins over the environment.
        let nosuch = dir.join("nosuch");
        let out = env(&nosuch, &["volume", "list", "--pool", &s(&pool)], b"");
        let listed = succeeded(&out, &format!("[{n}] --pool over $REFLINKFS_POOL"));
        assert!(listed.contains("appvms/vm/private"), "[{n}]");
        // A wrong pool from the environment is not found.
        let out = env(&nosuch, &["volume", "list"], b"");
        let what = format!("[{n}] volume list with a wrong $REFLINKFS_POOL");
        let line = failed(&out, ErrorClass::NotFound, &what);
        assert!(line.contains("nosuch"), "[{n}] {line}");
        // Neither: a usage error that names the variable.
        let out = reflinkfs().args(["volume", "list"]).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "[{n}] no pool at all: {}",
            show(&out)
        );
        assert!(!pool.join("nosuch").exists() && !nosuch.exists(), "[{n}]");
    }
}

// ---------------------------------------------------------------------------
// The pool's lock.

#[test]
fn a_locked_pool_is_refused_with_the_holders_pid() {
    for (n, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-lock")) {
        let held =
            reflinkfs::engine::Pool::open(&fx.pool).expect("open the pool in the test process");
        let pid = std::process::id().to_string();
        for command in [
            "volume list",
            "volume info appvms/vm/private",
            "volume create appvms/vm/new --size 1M",
            "volume import appvms/vm/private DATA",
            "volume remove appvms/vm/root",
            "pool info",
            "pool check",
        ] {
            let args = argv(command, &[("DATA", &data)]);
            let line = fx.refused(&args, ErrorClass::Busy);
            assert!(line.contains("process"), "[{n}] {command}: {line}");
            assert!(
                line.split(|c: char| !c.is_ascii_digit()).any(|w| w == pid),
                "[{n}] {command}: the error should name PID {pid}: {line}"
            );
        }
        // --to-pool is locked too.
        let fx2 = Fx::new(&fx.fs, "cli-lock-second");
        let held2 = reflinkfs::engine::Pool::open(&fx2.pool).unwrap();
        drop(held);
        let to_pool = s(&fx2.pool);
        let clone = "volume clone appvms/vm/private appvms/vm/private --to-pool TO";
        let clone = argv(clone, &[("TO", &to_pool)]);
        let line = fx.refused(&clone, ErrorClass::Busy);
        assert!(line.contains(&pid), "[{n}] {line}");
        drop(held2);
        // Released: the commands work again.
        assert!(fx.ok("volume list").contains("appvms/vm/private"), "[{n}]");
        fx.ok(&clone);
    }
}

// ---------------------------------------------------------------------------
// Help.

#[test]
fn help_documents_every_exit_status() {
    let n = &common::filesystems()[0].name;
    for args in [
        "--help",
        "help",
        "volume create --help",
        "volume --help",
        "pool --help",
        "pool init --help",
        "pool check --help",
        "volume import --help",
        "volume export --help",
        "volume resize --help",
        "volume revert --help",
        "volume set --help",
        "volume clone --help",
        "volume remove --help",
        "volume info --help",
        "volume list --help",
        "volume revisions --help",
    ] {
        let out = reflinkfs().args(args.split(' ')).output().unwrap();
        let help = succeeded(&out, &format!("[{n}] {args}"));
        assert!(
            help.contains("Exit status"),
            "[{n}] {args} has no `Exit status`:\n{help}"
        );
        for (class, status, description) in ErrorClass::ALL {
            let documented = help.lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some(&status.to_string()) && l.contains(description)
            });
            assert!(
                documented,
                "[{n}] {args} does not document exit status {status} ({class:?}):\n{help}"
            );
        }
        assert!(
            help.lines().any(|l| l.trim_start().starts_with("2 ")),
            "[{n}] {args}: no status 2"
        );
        assert!(
            help.contains("REFLINKFS_POOL"),
            "[{n}] {args}: no $REFLINKFS_POOL"
        );
    }
    // A usage error is exit 2.
    let out = reflinkfs().args(["volume", "frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}
