//! Administration of a mounted pool through its daemon's control socket:
//! online-offline parity, import and export round trips, clone, online
//! resize of a volume in use, and the socket's own defences.

use crate::common;

use common::cli::*;
use common::mount::*;
use common::*;
use reflinkfs::ErrorClass;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn sha256(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn sha256_bytes(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A pool (made offline) and where to mount it.
fn fresh_pool(fs: &TestFs, test: &str) -> (PathBuf, PathBuf) {
    let (pool, path) = new_pool(fs, test);
    drop(pool);
    let mnt = path.parent().unwrap().join("mnt");
    (path, mnt)
}

/// Replaces what legitimately differs between two runs: the pool's path,
/// revision timestamps, and byte counts that depend on allocation.
fn normalise(text: &str, pool: &Path) -> String {
    let s = text.replace(pool.to_str().unwrap(), "POOL");
    // Timestamps such as 2026-11-25T18:00:00Z.
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if i + 20 <= b.len()
            && b[i + 4] == b'-'
            && b[i + 10] == b'T'
            && b[i + 19] == b'Z'
            && b[i..i + 4].iter().all(u8::is_ascii_digit)
        {
            out.push_str("TIMESTAMP");
            i += 20;
        } else {
            let ch = s[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The script both runs execute: every command, including refusals.
fn parity_script(
    pool: &Path,
    data: &Path,
    short: &Path,
    out_dir: &Path,
) -> Vec<(Vec<String>, Option<i32>, String)> {
    let vars = [
        ("DATA", s(data)),
        ("SHORT", s(short)),
        ("EXPORT", s(&out_dir.join("export.img"))),
    ];
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let steps = [
        "volume create vm-templates/tpl/root --size 4M",
        "volume create appvms/app/root --size 4M --snapshot-of vm-templates/tpl/root",
        "volume create appvms/app/private --size 4M --json",
        "volume create appvms/app/volatile --size 1M --volatile",
        "volume create appvms/app/bad --size 100",
        "volume create appvms/../x --size 1M",
        "volume create appvms/app/private --size 4M",
        "volume list",
        "volume list --json",
        "volume info app:root",
        "volume import app:private DATA",
        "volume import app:private SHORT --json",
        "volume revisions app:private",
        "volume set app:private revisions_to_keep 3 --json",
        "volume set app:private revisions_to_keep -2",
        "volume set app:private colour blue",
        "volume import app:private DATA --json",
        "volume revisions pin app:private 1 --note keep",
        "volume revisions pin app:private 99",
        "volume revisions app:private",
        "volume remove app:private",
        "volume revisions app:private --json",
        "volume revert app:private 99",
        "volume revert app:private 1 --json",
        "volume revert app:private",
        "volume revisions unpin app:private 1 --json",
        "volume revisions unpin app:private 1",
        "volume discard-changes app:private",
        "volume cancel-pending app:private --json",
        "volume discard-changes app:root",
        "volume resize app:private 8M --json",
        "volume resize app:private 4M --json",
        "volume resize app:private 8M",
        "volume export app:private EXPORT --json",
        "volume export app:private EXPORT",
        "volume clone appvms/app/private appvms/app2/private --json",
        "volume info appvms/app2/private --json",
        "volume remove vm-templates/tpl/root",
        "volume remove appvms/app2/private --json",
        "volume info appvms/nope/private",
        "pool check",
        "pool check --json",
        "pool info --json",
    ];
    let mut results = Vec::new();
    for step in steps {
        let step = argv(step, &vars);
        let args: Vec<&str> = step.iter().map(String::as_str).collect();
        let out = rf(pool, &args);
        let mut shown = normalise(&String::from_utf8_lossy(&out.stdout), pool)
            .lines()
            // What a pinned revision holds alone depends on allocation.
            .map(|l| match (l.find(", holds "), l.find(" alone")) {
                (Some(a), Some(b)) if a < b => format!("{}{}", &l[..a], &l[b + 6..]),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        // Usage numbers depend on allocation; drop the lines and fields.
        if args.contains(&"--json") {
            if let Ok(mut v) = serde_json::from_str::<Value>(&shown) {
                strip_usage(&mut v);
                shown = v.to_string();
            }
        }
        let err = normalise(&String::from_utf8_lossy(&out.stderr), pool);
        let err_line = err
            .lines()
            .rfind(|l| l.starts_with("reflinkfs: error:"))
            .unwrap_or("")
            .to_owned();
        results.push((step, out.status.code(), format!("{shown}\n{err_line}")));
    }
    results
}

fn strip_usage(v: &mut Value) {
    match v {
        Value::Object(m) => {
            // Allocation, and the free space of the filesystem both pools
            // share, change between the runs.
            for k in [
                "usage",
                "used",
                "available",
                "free",
                "pool_allocated",
                "pool_shared",
                "exclusive",
                // Revision ids are random.
                "rev_id",
            ] {
                m.remove(k);
            }
            for (_, x) in m.iter_mut() {
                strip_usage(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_usage),
        _ => {}
    }
}

#[test]
fn the_same_commands_give_the_same_results_offline_and_mounted() {
    need!(require(&["sha256sum"]));
    let fs = xfs();
    let (offline, _) = fresh_pool(&fs, "parity-off");
    let (online, mnt) = fresh_pool(&fs, "parity-on");
    let base = offline.parent().unwrap().to_owned();
    let data = base.join("data.img");
    std::fs::write(&data, pattern(7, 4 * MIB as usize)).unwrap();
    let short = base.join("short.img");
    std::fs::write(&short, pattern(8, MIB as usize)).unwrap();
    let off = parity_script(&offline, &data, &short, &base);
    let _ = std::fs::remove_file(base.join("export.img"));
    let m = Mounted::mount(&online, &mnt, "");
    let on = parity_script(&online, &data, &short, &base);
    assert_eq!(off.len(), on.len());
    let mut refusals = 0;
    for ((step, code_off, out_off), (_, code_on, out_on)) in off.iter().zip(&on) {
        assert_eq!(
            code_off, code_on,
            "exit status of {step:?}\noffline: {out_off}\nonline: {out_on}"
        );
        assert_eq!(out_off, out_on, "output of {step:?}");
        refusals += usize::from(*code_off != Some(0));
    }
    assert!(
        refusals >= 8,
        "the script exercises refusals too ({refusals})"
    );
    // Every request type went through --json, online and offline, and
    // succeeded at least once that way.
    for cmd in [
        ["pool", "info"],
        ["pool", "check"],
        ["volume", "create"],
        ["volume", "list"],
        ["volume", "info"],
        ["volume", "revisions"],
        ["volume", "resize"],
        ["volume", "revert"],
        ["volume", "set"],
        ["volume", "import"],
        ["volume", "export"],
        ["volume", "clone"],
        ["volume", "remove"],
    ] {
        assert!(
            on.iter().any(|(step, code, out)| step[..2] == cmd
                && step.iter().any(|a| a == "--json")
                && *code == Some(0)
                && serde_json::from_str::<Value>(out.lines().next().unwrap_or("")).is_ok()),
            "{cmd:?} --json is in the script: {:?}",
            on.iter()
                .filter(|(step, _, _)| step[..2] == cmd)
                .collect::<Vec<_>>()
        );
    }
    let st = rf_json(&online, "status");
    assert_eq!(st["mounted"], true);
    assert_eq!(st["pid"], m.daemon_pid());
    let st = rf_json(&offline, "status");
    assert_eq!(st["mounted"], false);
}

#[test]
fn import_and_export_round_trips_through_files_and_pipes() {
    for fs in mount_filesystems(&["sha256sum"]) {
        for mounted in [false, true] {
            let (pool, mnt) = fresh_pool(&fs, "roundtrip");
            let base = pool.parent().unwrap().to_owned();
            let _m = mounted.then(|| Mounted::mount(&pool, &mnt, ""));
            let ctx = format!("[{}] mounted={mounted}", fs.name);
            rf_ok(&pool, "volume create appvms/vm/private --size 8M");
            let data = pattern(3, 8 * MIB as usize);
            let src = base.join("src.img");
            std::fs::write(&src, &data).unwrap();
            let want = sha256(&src);
            // From a file, out to a file.
            rf_ok(&pool, ["volume", "import", "vm:private", &s(&src)]);
            let out = base.join("out.img");
            rf_ok(&pool, ["volume", "export", "vm:private", &s(&out)]);
            assert_eq!(sha256(&out), want, "{ctx}");
            // From stdin, out to stdout.
            let data2 = pattern(4, 8 * MIB as usize);
            let import = |data: &[u8]| {
                rf_command(&pool, "volume import vm:private -")
                    .write_stdin(data.to_vec())
                    .output()
                    .unwrap()
            };
            let o = import(&data2);
            assert!(o.status.success(), "{ctx}: {}", show(&o));
            assert!(
                !text(&o.stderr).contains('['),
                "{ctx}: no progress bar when piped"
            );
            let o = rf(&pool, "volume export vm:private -");
            assert!(o.status.success());
            assert_eq!(sha256_bytes(&o.stdout), sha256_bytes(&data2), "{ctx}");
            // An older revision.
            let o = rf(&pool, "volume export vm:private - --revision 2");
            assert_eq!(
                sha256_bytes(&o.stdout),
                want,
                "{ctx}: revision 2 is the first import"
            );
            // A short stream is refused, and nothing changes.
            let revisions = || rf_ok(&pool, "volume revisions vm:private --json");
            let before = revisions();
            let o = import(&data2[..MIB as usize]);
            assert_eq!(o.status.code(), Some(3), "{ctx}: {}", show(&o));
            assert!(text(&o.stderr).contains("ended after"), "{ctx}");
            assert_eq!(revisions(), before, "{ctx}");
            let o = rf(&pool, "volume export vm:private -");
            assert_eq!(
                sha256_bytes(&o.stdout),
                sha256_bytes(&data2),
                "{ctx}: unchanged"
            );
            assert!(!pool.join("appvms/vm/private-import.img").exists(), "{ctx}");
        }
    }
}

#[test]
fn an_import_killed_midway_leaves_the_volume_unchanged() {
    need!(require(&["sh", "head"]));
    let fs = xfs();
    for mounted in [false, true] {
        let (pool, mnt) = fresh_pool(&fs, "killed");
        let _m = mounted.then(|| Mounted::mount(&pool, &mnt, ""));
        rf_ok(&pool, "volume create appvms/vm/private --size 64M");
        let before = rf_ok(&pool, "volume info vm:private --json");
        // A producer that sends 16 MiB and then stalls, in its own process
        // group, so the whole pipeline can be killed at once.
        let script = format!(
            "(head -c 16M /dev/urandom; sleep 60) | exec {} volume import vm:private - --pool {}",
            bin().display(),
            pool.display()
        );
        let mut child = Command::new("setsid")
            .args(["sh", "-c", &script])
            .spawn()
            .unwrap();
        let import = pool.join("appvms/vm/private-import.img");
        wait_for("the import to start writing", 30, || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&import).is_ok_and(|m| m.blocks() > 0)
        });
        // SAFETY: signalling the child's process group has no memory effects.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        // Online, the daemon sees the pipe end and refuses; offline, the
        // next open recovers. Either way the volume is unchanged.
        wait_for("the import to be abandoned", 30, || {
            rf(&pool, "volume info vm:private --json").status.success()
        });
        wait_for("the import file to go", 30, || !import.exists());
        let after = rf_ok(&pool, "volume info vm:private --json");
        let strip = |s: &str| {
            let mut v: Value = serde_json::from_str(s).unwrap();
            strip_usage(&mut v);
            v
        };
        assert_eq!(strip(&after), strip(&before), "mounted={mounted}");
    }
}

#[test]
fn a_same_filesystem_import_of_4_gib_shares_every_extent() {
    need!(require(&["filefrag"]));
    let Some(fs) = filesystems().into_iter().find(|f| f.reflink) else {
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "CI=true needs a reflink filesystem"
        );
        return;
    };
    for mounted in [false, true] {
        let (pool, mnt) = fresh_pool(&fs, "reflink-import");
        let _m = mounted.then(|| Mounted::mount(&pool, &mnt, ""));
        let size = 4u64 << 30;
        rf_ok(&pool, "volume create appvms/vm/big --size 4G");
        // A 4 GiB image with 16 data extents of 4 MiB, beside the pool on
        // the same filesystem.
        let src = pool.parent().unwrap().join("big-src.img");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        for i in 0..16u64 {
            f.write_all_at(&pattern(i as u8 + 1, 4 * MIB as usize), i * (size / 16))
                .unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        rf_ok(&pool, ["volume", "import", "vm:big", &s(&src)]);
        let img = pool.join("appvms/vm/big.img");
        let out = run_ok(Command::new("filefrag").args(["-v"]).arg(&img));
        let extents: Vec<&str> = out
            .lines()
            .filter(|l| {
                l.trim_start()
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
                    && l.contains("..")
            })
            .collect();
        assert!(!extents.is_empty(), "{out}");
        for e in &extents {
            assert!(
                e.contains("shared"),
                "mounted={mounted}: an extent was copied, not shared:\n{out}"
            );
        }
        println!("mounted={mounted}: {} extents, all shared", extents.len());
        std::fs::remove_file(&src).unwrap();
    }
}

#[test]
fn clone_within_a_pool_and_to_another_filesystem() {
    need!(require(&[]));
    let fs = xfs();
    let other = other_fs(&fs);
    for mounted in [false, true] {
        let (pool, mnt) = fresh_pool(&fs, "clone-a");
        let (pool2, mnt2) = fresh_pool(&other, "clone-b");
        let _m = mounted.then(|| Mounted::mount(&pool, &mnt, ""));
        let _m2 = mounted.then(|| Mounted::mount(&pool2, &mnt2, ""));
        rf_ok(&pool, "volume create appvms/a/private --size 6M");
        let src = pool.parent().unwrap().join("c.img");
        std::fs::write(&src, pattern(5, 6 * MIB as usize)).unwrap();
        rf_ok(&pool, ["volume", "import", "a:private", &s(&src)]);
        rf_ok(&pool, "volume clone appvms/a/private appvms/b/private");
        rf_ok(&pool2, "volume create appvms/z/private --size 1M");
        for dst in ["appvms/z/private", "appvms/y/private"] {
            let to = s(&pool2);
            rf_ok(
                &pool,
                ["volume", "clone", "appvms/a/private", dst, "--to-pool", &to],
            );
        }
        for (p, v) in [
            (&pool, "appvms/b/private"),
            (&pool2, "appvms/z/private"),
            (&pool2, "appvms/y/private"),
        ] {
            let info = rf_json(p, ["volume", "info", v]);
            assert_eq!(
                info["size"],
                6 * MIB,
                "mounted={mounted} {v}: the size follows the source"
            );
            let o = rf(p, ["volume", "export", v, "-"]);
            assert_eq!(
                o.stdout,
                pattern(5, 6 * MIB as usize),
                "mounted={mounted} {v}"
            );
        }
        assert!(std::fs::read_dir(pool2.join(".reflinkfs"))
            .unwrap()
            .all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("clone~")));
    }
}

#[test]
fn an_online_resize_updates_the_loop_device() {
    for fs in mount_filesystems(&["losetup", "blockdev"]) {
        let (pool, mnt) = fresh_pool(&fs, "online-resize");
        let m = Mounted::mount(&pool, &mnt, "");
        rf_ok(&pool, "volume create appvms/vm/private --size 64M");
        let lo = Loop::attach(&m.path("appvms/vm/private-dirty.img"), false, None);
        let size = || {
            run_ok(Command::new("blockdev").arg("--getsize64").arg(&lo.dev))
                .trim()
                .parse::<u64>()
                .unwrap()
        };
        assert_eq!(size(), 64 * MIB);
        let out = rf_ok(&pool, "volume resize vm:private 96M");
        assert!(out.contains("running image resized"), "{out}");
        assert_eq!(
            size(),
            96 * MIB,
            "[{}] the loop device sees the new size",
            fs.name
        );
        lo.detach();
        m.wait_stopped("appvms/vm/private-dirty.img");
        assert_eq!(
            std::fs::metadata(pool.join("appvms/vm/private.img"))
                .unwrap()
                .len(),
            96 * MIB,
            "committed"
        );
    }
}

/// Sends raw bytes on the control socket and reads the reply line.
fn raw_request(sock: &Path, bytes: &[u8]) -> Value {
    let mut s = UnixStream::connect(sock).unwrap();
    // The daemon may stop reading early (oversized requests); ignore EPIPE.
    let _ = s.write_all(bytes);
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
}

#[test]
fn the_socket_refuses_bad_requests_and_keeps_serving() {
    need!(require(&["runuser"]));
    // Under /tmp, so that another user can reach the socket's directory.
    let base = tempfile::Builder::new()
        .prefix("reflinkfs-sock")
        .tempdir_in("/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    let pool = base.path().join("pool");
    rf_ok(&pool, "pool init --setup-check=no");
    rf_ok(&pool, "volume create appvms/vm/private --size 1M");
    let m = Mounted::mount(&pool, &base.path().join("mnt"), "");
    let sock = pool.join(".reflinkfs/control.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is 0600");

    for (what, bytes) in [
        ("malformed JSON", b"{not json\n".to_vec()),
        (
            "an unknown operation",
            b"{\"protocol\":\"1.0\",\"request\":{\"op\":\"format_disk\"}}\n".to_vec(),
        ),
        ("a 10 MiB line", vec![b'x'; 10 << 20]),
        (
            "an import without a file descriptor",
            b"{\"protocol\":\"1.0\",\"request\":{\"op\":\"volume_import\",\"vid\":\"vm:private\",\"size\":null,\"source\":\"x\"}}\n"
                .to_vec(),
        ),
    ] {
        let reply = raw_request(&sock, &bytes);
        assert!(reply.get("error").is_some(), "{what}: {reply}");
        assert_eq!(reply["error"]["code"], 3, "{what}: {reply}");
        assert_eq!(reply["protocol"], reflinkfs::control::protocol_version().as_str(), "{what}: {reply}");
        // Still serving.
        let ok = raw_request(&sock, b"{\"protocol\":\"1.0\",\"request\":{\"op\":\"status\"}}\n");
        assert_eq!(ok["ok"]["result"], "status", "after {what}: {ok}");
        assert_eq!(ok["ok"]["data"]["mounted"], true, "after {what}: {ok}");
    }

    // A client of another major version, or one from before versions, is
    // refused with a message that names both versions and what to do.
    for (what, bytes) in [
        ("an unversioned client", b"{\"op\":\"status\"}\n".to_vec()),
        (
            "a client of major version 2",
            b"{\"protocol\":\"2.7\",\"request\":{\"op\":\"status\"}}\n".to_vec(),
        ),
        (
            "a newer minor with an unknown request",
            b"{\"protocol\":\"1.9\",\"request\":{\"op\":\"volume_teleport\"}}\n".to_vec(),
        ),
    ] {
        let reply = raw_request(&sock, &bytes);
        let msg = reply["error"]["message"].as_str().unwrap_or_default();
        if what.contains("minor") {
            // Same major: understood as far as it can be; the unknown
            // request is bad input, not a version clash.
            assert_eq!(reply["error"]["code"], 3, "{what}: {reply}");
            continue;
        }
        assert_eq!(reply["error"]["kind"], "protocol", "{what}: {reply}");
        assert_eq!(reply["error"]["code"], 11, "{what}: {reply}");
        assert!(
            msg.contains("control protocol")
                && msg.contains(&reflinkfs::control::protocol_version()),
            "{what}: {msg}"
        );
    }

    // Another user is refused by SO_PEERCRED, even when the socket's mode
    // would let them connect.
    for d in [base.path(), pool.as_path(), &pool.join(".reflinkfs")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run(Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(bin())
        .args(["volume", "list", "--pool"])
        .arg(&pool));
    assert_eq!(out.status.code(), Some(6), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("may not administer"),
        "{}",
        show(&out)
    );
    let log = daemon_log(&pool);
    assert!(
        log.contains("refused a request from uid"),
        "the refusal is logged"
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(rf_ok(&pool, "volume list").contains("appvms/vm/private"));
    m.unmount();
}

/// Serves one connection on `sock` with `reply`, as a daemon of another
/// reflinkfs would, and returns what the client sent.
fn fake_daemon(sock: &Path, reply: &'static str) -> std::thread::JoinHandle<String> {
    let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        (&s).write_all(reply.as_bytes()).unwrap();
        line
    })
}

#[test]
fn the_cli_refuses_a_daemon_of_another_major_version() {
    let base = tempfile::tempdir().unwrap();
    let pool = base.path().join("pool");
    run_ok(
        Command::new(bin())
            .args(["pool", "init", "--setup-check=no", "--pool"])
            .arg(&pool),
    );
    let sock = pool.join(".reflinkfs/control.sock");
    for (reply, names) in [
        (
            "{\"protocol\":\"2.0\",\"ok\":{\"result\":\"volumes\",\"data\":[]}}\n",
            "control protocol 2.0",
        ),
        // A daemon from before versions answered with prose.
        (
            "{\"ok\":{\"text\":\"appvms/vm/private\"}}\n",
            "0 (unversioned)",
        ),
    ] {
        let _ = std::fs::remove_file(&sock);
        let daemon = fake_daemon(&sock, reply);
        let out = rf(&pool, "volume list");
        let sent: Value = serde_json::from_str(&daemon.join().unwrap()).unwrap();
        assert_eq!(
            sent["protocol"],
            reflinkfs::control::protocol_version().as_str(),
            "the client says its version"
        );
        assert_eq!(sent["request"]["op"], "volume_list");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(11), "{err}");
        assert!(
            err.contains(names) && err.contains("unmount the pool and mount it again"),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "nothing is printed as a result");
    }
}

#[test]
fn completions_and_man_page_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_ok(Command::new(bin()).args(["completions", shell]));
        assert!(
            out.contains("reflinkfs") && out.contains("volume"),
            "{shell}"
        );
    }
    let man = run_ok(Command::new(bin()).arg("manpage"));
    assert!(
        man.starts_with(".ie") || man.contains(".TH"),
        "{}",
        &man[..man.len().min(200)]
    );
}

/// One request, as JSON, to a mounted pool's socket.
fn request(pool: &Path, req: Value) -> Value {
    let msg = serde_json::json!({
        "protocol": reflinkfs::control::protocol_version(),
        "request": req,
    });
    let mut line = serde_json::to_vec(&msg).unwrap();
    line.push(b'\n');
    raw_request(&pool.join(".reflinkfs/control.sock"), &line)
}

#[test]
fn an_import_written_in_place_commits_or_drops_and_changes_nothing_else() {
    let fs = xfs();
    let (pool, mnt) = fresh_pool(&fs, "import-in-place");
    rf_ok(&pool, "volume create appvms/a/private --size 4M");
    // Offline there is no daemon to keep an import between two requests.
    let out = rf(&pool, "volume info a:private");
    assert!(out.status.success());
    let p = reflinkfs::engine::Pool::open(&pool).unwrap();
    let offline = reflinkfs::control::execute(
        &p,
        serde_json::from_value(
            serde_json::json!({"op": "volume_import_begin", "vid": "a:private", "size": 4096}),
        )
        .unwrap(),
        None,
        None,
        None,
    );
    assert!(offline.unwrap_err().to_string().contains("mounted"));
    drop(p);
    let m = Mounted::mount(&pool, &mnt, "");
    let begin = |size: u64| {
        let r = request(
            &pool,
            serde_json::json!({"op": "volume_import_begin", "vid": "a:private", "size": size}),
        );
        assert_eq!(r["ok"]["result"], "import_begun", "{r}");
        PathBuf::from(r["ok"]["data"]["path"].as_str().unwrap())
    };
    let end = |success: bool| {
        request(
            &pool,
            serde_json::json!({"op": "volume_import_end", "vid": "a:private", "success": success}),
        )
    };
    // Written in place, as qubesd's dd does: the file exists, sized, zero.
    let path = begin(8 * MIB);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);
    assert_eq!(
        rf_json(&pool, "volume info a:private")["state"],
        "importing"
    );
    run_ok(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", path.display()),
        "bs=1M",
        "count=2",
        "conv=notrunc,sparse,nocreat",
        "status=none",
    ]));
    let want = sha256(&path);
    let r = end(true);
    assert_eq!(r["ok"]["data"]["committed"], true, "{r}");
    let info = rf_json(&pool, "volume info a:private");
    assert_eq!(
        (info["size"].as_u64(), info["state"].as_str()),
        (Some(8 * MIB), Some("stopped"))
    );
    assert_eq!(sha256(&pool.join("appvms/a/private.img")), want);
    assert!(!path.exists(), "the import file became the image");
    // A failed writer: dropped, nothing changes.
    let path = begin(8 * MIB);
    std::fs::write(&path, b"partial").unwrap_or(());
    assert_eq!(end(false)["ok"]["data"]["committed"], false);
    assert_eq!(sha256(&pool.join("appvms/a/private.img")), want);
    assert!(!path.exists());
    // A file that was replaced instead of written in place: refused.
    let path = begin(8 * MIB);
    std::fs::write(&path, b"not in place").unwrap();
    let r = end(true);
    assert_eq!(r["error"]["kind"], "invalid-input", "{r}");
    assert_eq!(sha256(&pool.join("appvms/a/private.img")), want);
    // Replaced by a rename, with the right size: refused all the same.
    let path = begin(8 * MIB);
    let new = path.with_extension("new");
    std::fs::write(&new, pattern(9, 8 * MIB as usize)).unwrap();
    std::fs::rename(&new, &path).unwrap();
    let r = end(true);
    assert_eq!(r["error"]["kind"], "invalid-input", "{r}");
    assert_eq!(sha256(&pool.join("appvms/a/private.img")), want);
    // An end without a begin.
    assert_eq!(end(true)["error"]["kind"], "refused");
    assert_eq!(rf_json(&pool, "volume info a:private")["state"], "stopped");
    m.unmount();
}

#[test]
fn waiting_for_a_stop_returns_once_committed_or_names_the_holder() {
    let fs = xfs();
    let (pool, mnt) = fresh_pool(&fs, "wait-stopped");
    rf_ok(&pool, "volume create appvms/a/private --size 4M");
    let m = Mounted::mount(&pool, &mnt, "");
    let wait = |ms: u64| {
        request(
            &pool,
            serde_json::json!({"op": "volume_wait_stopped", "vid": "a:private", "timeout_ms": ms}),
        )
    };
    // Not running: at once.
    assert_eq!(wait(1)["ok"]["result"], "stopped");
    // Open: the wait runs out, naming who holds the file.
    let f = open_rw(&m.path("appvms/a/private-dirty.img"));
    write_at(&f, 0, &pattern(1, 4096));
    let r = wait(300);
    let msg = r["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(r["error"]["kind"], "busy", "{r}");
    assert!(
        msg.contains("running") && msg.contains(&format!("(PID {})", std::process::id())),
        "{msg}"
    );
    // Closed while a waiter waits: it returns once the commit is done.
    let waiter = std::thread::spawn({
        let pool = pool.clone();
        move || {
            let msg = serde_json::json!({
                "protocol": reflinkfs::control::protocol_version(),
                "request": {"op": "volume_wait_stopped", "vid": "a:private", "timeout_ms": 30000},
            });
            let mut line = serde_json::to_vec(&msg).unwrap();
            line.push(b'\n');
            raw_request(&pool.join(".reflinkfs/control.sock"), &line)
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    drop(f);
    let r = waiter.join().unwrap();
    assert_eq!(r["ok"]["result"], "stopped", "{r}");
    let revs = rf_json(&pool, "volume revisions a:private");
    assert_eq!(
        revs.as_array().unwrap().len(),
        1,
        "committed when the wait returned"
    );
    m.unmount();
}

/// A process other than the test's that sends one request to a pool's
/// socket and prints the reply, then lives until its stdin closes.
fn other_client(pool: &Path, req: Value) -> std::process::Child {
    let msg = serde_json::json!({
        "protocol": reflinkfs::control::protocol_version(),
        "request": req,
    });
    let script = "import socket, sys\n\
        s = socket.socket(socket.AF_UNIX)\n\
        s.connect(sys.argv[1])\n\
        s.sendall(sys.argv[2].encode() + b'\\n')\n\
        r = b''\n\
        while not r.endswith(b'\\n'):\n\
        \x20   c = s.recv(65536)\n\
        \x20   if not c: break\n\
        \x20   r += c\n\
        sys.stdout.write(r.decode())\n\
        sys.stdout.flush()\n\
        sys.stdin.read()\n";
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(pool.join(".reflinkfs/control.sock"))
        .arg(msg.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The reply an [`other_client`] printed.
fn reply_of(child: &mut std::process::Child) -> Value {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
}

/// Qubes' restore killed before `import_data_end` (issue 16): the import
/// must not wedge the volume until the pool is remounted.
#[test]
fn an_import_whose_writer_is_gone_is_dropped_and_changes_nothing() {
    need!(require(&["python3"]));
    let fs = xfs();
    let (pool, mnt) = fresh_pool(&fs, "import-stale");
    rf_ok(&pool, "volume create appvms/a/private --size 4M");
    let m = Mounted::mount(&pool, &mnt, "");
    m.write_and_close("appvms/a/private-dirty.img", 0, &pattern(3, MIB as usize));
    let want = sha256(&pool.join("appvms/a/private.img"));
    let begin_req =
        serde_json::json!({"op": "volume_import_begin", "vid": "a:private", "size": 4 * MIB});
    let state = || rf_json(&pool, "volume info a:private")["state"].clone();
    let import_file = pool.join("appvms/a/private-import.img");

    // 1. Begun by a process that then exits (qubesd restarted): the
    //    daemon drops it by itself.
    let mut gone = other_client(&pool, begin_req.clone());
    let r = reply_of(&mut gone);
    assert_eq!(r["ok"]["result"], "import_begun", "{r}");
    assert_eq!(state(), "importing");
    drop(gone.stdin.take());
    gone.wait().unwrap();
    wait_for("the orphaned import to be dropped", 30, || {
        state() == "stopped"
    });
    assert!(!import_file.exists(), "its file is removed");
    assert!(daemon_log(&pool).contains("has exited; dropping the import"));

    // 2. Begun again by the same process (the Import script killed, qubesd
    //    alive, the restore tried again): the new begin replaces it.
    let first = request(&pool, begin_req.clone());
    assert_eq!(first["ok"]["result"], "import_begun", "{first}");
    std::fs::write(&import_file, b"").ok();
    let again = request(&pool, begin_req.clone());
    assert_eq!(again["ok"]["result"], "import_begun", "{again}");
    assert_eq!(std::fs::metadata(&import_file).unwrap().len(), 4 * MIB);

    // 3. Another live process's import is not taken over…
    let r = request(
        &pool,
        serde_json::json!({"op": "volume_import_abort", "vid": "a:private"}),
    );
    assert_eq!(r["ok"]["data"]["aborted"], true, "{r}");
    let mut other = other_client(&pool, begin_req.clone());
    assert_eq!(reply_of(&mut other)["ok"]["result"], "import_begun");
    let r = request(&pool, begin_req.clone());
    assert_eq!(
        (r["error"]["kind"].as_str(), r["error"]["cause"].as_str()),
        (Some("busy"), Some("importing")),
        "{r}"
    );
    // …nor can the volume start meanwhile; `volume import --abort` drops it.
    let e = open_rw_error(&m.path("appvms/a/private-dirty.img"));
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    let out = rf_ok(&pool, "volume import --abort a:private");
    assert!(out.contains("import dropped"), "{out}");
    assert_eq!(state(), "stopped");
    assert!(!import_file.exists());
    let out = rf_json(&pool, "volume import --abort a:private");
    assert_eq!(out["aborted"], false, "{out}");
    drop(other.stdin.take());
    other.wait().unwrap();
    // The end of an import that was dropped says so.
    let r = request(
        &pool,
        serde_json::json!({"op": "volume_import_end", "vid": "a:private", "success": true}),
    );
    assert_eq!(r["error"]["kind"], "refused", "{r}");
    assert_eq!(sha256(&pool.join("appvms/a/private.img")), want);
    m.unmount();

    // 4. Without the daemon: a leftover import file goes at the pool's
    //    open, and --abort finds nothing to drop.
    std::fs::write(&import_file, b"left over").unwrap();
    let out = rf_ok(&pool, "volume import --abort a:private");
    assert!(out.contains("no import in progress"), "{out}");
    assert!(!import_file.exists());
    assert_eq!(sha256(&pool.join("appvms/a/private.img")), want);
    // Neither FILE nor --abort: a usage error, nothing touched.
    let out = rf(&pool, "volume import a:private");
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}

/// `qvm-prefs work template tplB` (issue 16): a stopped snapshot volume's
/// source changes, offline and online; refused while it runs, for a cycle,
/// a missing source and a volume that is not a snapshot.
#[test]
fn a_snapshot_volumes_source_changes_while_it_is_stopped() {
    let fs = xfs();
    let (pool, mnt) = fresh_pool(&fs, "set-source");
    for t in ["a", "b"] {
        rf_ok(
            &pool,
            format!("volume create vm-templates/{t}/root --size 1M").as_str(),
        );
    }
    rf_ok(
        &pool,
        "volume create appvms/w/root --size 1M --snapshot-of vm-templates/a/root",
    );
    rf_ok(
        &pool,
        "volume create appvms/d/root --size 1M --snapshot-of appvms/w/root",
    );
    let m = Mounted::mount(&pool, &mnt, "");
    m.write_and_close("vm-templates/a/root-dirty.img", 0, b"template A");
    m.write_and_close("vm-templates/b/root-dirty.img", 0, b"template B");
    m.unmount();
    let checks = || {
        let info = rf_json(&pool, "volume info w:root");
        assert_eq!(info["source"], "vm-templates/a/root", "{info}");
        // Offline and online alike.
        let out = rf_ok(&pool, "volume set w:root source b:root");
        assert!(out.contains("vm-templates/b/root"), "{out}");
        let info = rf_json(&pool, "volume info w:root");
        assert_eq!(info["source"], "vm-templates/b/root", "{info}");
        assert_eq!(info["resolved_source"], "vm-templates/b/root", "{info}");
        // A disposable's root follows through its chain.
        let info = rf_json(&pool, "volume info d:root");
        assert_eq!(info["resolved_source"], "vm-templates/b/root", "{info}");
        // Refusals change nothing.
        for (args, class) in [
            ("w:root source appvms/d/root", ErrorClass::Refused),
            ("w:root source appvms/w/root", ErrorClass::Refused),
            ("w:root source vm-templates/nope/root", ErrorClass::NotFound),
            ("a:root source b:root", ErrorClass::Refused),
            ("w:root source not/a/v@lid", ErrorClass::InvalidInput),
        ] {
            rf_fails(&pool, format!("volume set {args}").as_str(), class);
        }
        assert_eq!(
            rf_json(&pool, "volume info w:root")["source"],
            "vm-templates/b/root"
        );
        // Back, for the other run.
        rf_ok(&pool, "volume set w:root source vm-templates/a/root");
    };
    checks();
    let m = Mounted::mount(&pool, &mnt, "");
    checks();
    rf_ok(&pool, "volume set w:root source b:root");
    // The next start is of the new source.
    let f = open_rw(&m.path("appvms/w/root-dirty.img"));
    assert_eq!(read_at(&f, 0, 10), b"template B");
    // Refused while it runs.
    let r = request(
        &pool,
        serde_json::json!({"op": "volume_set", "vid": "w:root", "property": "source", "value": "a:root"}),
    );
    assert_eq!(
        (r["error"]["kind"].as_str(), r["error"]["cause"].as_str()),
        (Some("busy"), Some("running")),
        "{r}"
    );
    drop(f);
    m.wait_stopped("appvms/w/root-dirty.img");
    // The old template has no dependant left: it can go (the upgrade).
    rf_ok(&pool, "volume remove vm-templates/a/root");
    m.unmount();
}

/// A pool with one origin volume, `c/v/panic`, mounted with the panic
/// points `points` armed (REFLINKFS_FAILPOINT): they fire for it alone.
fn panic_volume_mounted(test: &str, points: &str) -> Mounted {
    let path = prepared_pool(&xfs(), test, 1, |pool| {
        create_origin(pool, "c/v/panic", MIB);
    });
    Mounted::mount_with(
        &path,
        &path.parent().unwrap().join("mnt"),
        "",
        &[("REFLINKFS_FAILPOINT", points)],
    )
}

/// Issue 18: a panic in a committer thread, in a stop or a start on the
/// mount, or in a control request, fails that piece of work alone: the
/// volume comes back usable (opens, takes writes, commits) and the mount
/// and its control socket answer. Each panic point fires once for the
/// volume named `panic` (REFLINKFS_FAILPOINT lists them).
#[test]
fn panics_in_committers_stops_starts_and_control_requests_leave_the_volume_usable() {
    need!(require_failpoints());
    let m = panic_volume_mounted("panic-workers", "start.io,stop.io,committer,control");
    let dirty = m.path("c/v/panic-dirty.img");
    let vid = vid("c/v/panic");
    // The start panics: that open fails, the next one starts it.
    let e = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dirty)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // The committer panics before its stop: the run goes on, and the
    // next last close stops it; that stop panics (the run held, the dirty
    // image kept); the daemon's held retry commits it; the next run
    // commits as usual.
    for (round, tag) in [(0, 1u8), (1, 2), (2, 3)] {
        let f = open_rw(&dirty);
        use std::os::unix::fs::FileExt;
        f.write_all_at(&pattern(tag, 4096), 4096 * round).unwrap();
        f.sync_all().unwrap();
        drop(f);
        match round {
            // Nothing to wait for: the committer's panic leaves it running.
            0 => std::thread::sleep(std::time::Duration::from_millis(1500)),
            _ => m.wait_stopped("c/v/panic-dirty.img"),
        }
    }
    // The control request panics once (the client sees the connection
    // closed); the socket serves on.
    let first = rf(&m.pool, "volume info c/v/panic");
    assert!(!first.status.success(), "{}", show(&first));
    let info = rf_json(&m.pool, "volume info c/v/panic");
    assert_eq!(info["state"], "stopped", "{info}");
    for (round, tag) in [(0u64, 1u8), (1, 2), (2, 3)] {
        assert!(
            read_committed(&m.pool, &vid, 4096 * round, 4096) == pattern(tag, 4096),
            "round {round}'s write is lost"
        );
    }
    std::fs::metadata(m.path("c/v/panic.img")).unwrap();
    let log = daemon_log(&m.pool);
    for what in [
        "its start panicked",
        "its stop panicked; its dirty image is kept, and the daemon retries the stop",
        "the retry of its interrupted stop went through",
        "the stop at its last close panicked",
        "a control request panicked",
    ] {
        assert!(log.contains(what), "no {what:?} in the log:\n{log}");
    }
    // The root's counter counts what the guards caught, besides requests:
    // the start (its open), the committer, the stop (on a committer
    // thread) and the control request.
    assert_eq!(
        m.root_counter("panics"),
        4,
        "the guards' panics are counted"
    );
    m.unmount();
}

/// A stop that panics again at the unmount (the retry of a run its first
/// panicked stop left held) fails alone: the daemon stops it as it can
/// (after 3 panics in a row, stopped with its dirty image kept) and exits
/// cleanly, and the next pool open commits the kept image. Before, the
/// panic went up through fuser's `destroy` and killed the daemon.
#[test]
fn a_stop_that_keeps_panicking_does_not_kill_the_daemon_at_unmount() {
    need!(require_failpoints());
    let m = panic_volume_mounted("panic-unmount", "stop.io=3");
    let f = open_rw(&m.path("c/v/panic-dirty.img"));
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pattern(7, 4096), 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let pool = m.pool.clone();
    m.unmount();
    let log = daemon_log(&pool);
    for what in [
        "its stop panicked; its dirty image is kept",
        "its stop panicked 3 times in a row",
        "the pool is closed",
    ] {
        assert!(log.contains(what), "no {what:?} in the log:\n{log}");
    }
    // The next pool open commits what the stops kept.
    drop(reflinkfs::engine::Pool::open(&pool).unwrap());
    assert!(
        read_committed(&pool, &vid("c/v/panic"), 0, 4096) == pattern(7, 4096),
        "the run's write is lost"
    );
}
