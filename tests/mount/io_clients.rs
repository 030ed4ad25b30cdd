//! Real I/O clients on a mounted pool (issue 3): a loop device with ext4
//! and `fstrim` (discard end to end), `fsx` and `fio`, each on a
//! `-dirty.img` through the mount, as a hypervisor or a VM would use it.
//!
//! The daemon is started with `reflinkfs mount`; every mount and loop device
//! is a guard of `common::mount`, declared in the order that makes the drops
//! right when a test fails: `Mounted` first, then `Loop`, then the
//! `BlockMount` of the ext4 inside it (dropped first).

use crate::common;

use common::mount::*;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

const DIRTY: &str = "appvms/vm/private-dirty.img";
const COMMITTED: &str = "appvms/vm/private.img";
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------
// Helpers.

/// A new pool on `fs` keeping `keep` revisions, with the origin volume
/// `appvms/vm/private` of `size` bytes, mounted with `opts`.
fn mounted(fs: &TestFs, test: &str, size: u64, keep: i64, opts: &str) -> Mounted {
    let path = prepared_pool(fs, test, keep, |pool| {
        create_origin(pool, "appvms/vm/private", size);
    });
    let m = Mounted::beside(&path, opts);
    let want = if opts.contains("passthrough=off") {
        "daemon"
    } else {
        "passthrough"
    };
    assert_eq!(
        xattr(&m.mnt, "user.reflinkfs.io_mode").as_deref(),
        Some(want),
        "[{}] I/O mode of a mount with {opts:?}",
        fs.name
    );
    m
}

/// The scratch directory of a mounted pool (the pool's parent).
fn scratch_of(m: &Mounted) -> PathBuf {
    m.pool.parent().unwrap().to_owned()
}

/// Unmounts and, the test having passed, removes its scratch directory
/// (a failing test leaves it, with the daemon's log, for a look).
fn finish(m: Mounted) {
    let dir = scratch_of(&m);
    m.unmount();
    std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
}

/// Revision files of `appvms/vm/private` in the pool directory, sorted.
fn revisions(pool: &Path) -> Vec<String> {
    revision_files(pool, "appvms/vm/private")
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last lines of the daemon's log, for failure messages.
fn log_tail(m: &Mounted) -> String {
    tail(&daemon_log(&m.pool), 40)
}

/// The tails of a command's output, for failure messages.
fn show(out: &Output) -> String {
    format!(
        "{:?}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 60),
        tail(&String::from_utf8_lossy(&out.stderr), 60)
    )
}

fn read_all(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        .read_to_end(&mut v)
        .unwrap();
    v
}

/// The first offset where `a` and `b` differ, for failure messages.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Incompressible bytes: xorshift64.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let w = self.0.to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

// ---------------------------------------------------------------------------
// Discard end to end: ext4 on a loop device on `private-dirty.img`.

const BIG: u64 = 256 * MIB;

/// Bytes `fstrim -v` says it trimmed: `DIR: 1.1 GiB (1181917184 bytes) trimmed`.
fn trimmed_bytes(out: &str) -> u64 {
    out.split_once('(')
        .and_then(|(_, rest)| rest.split_once(" bytes"))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot parse fstrim -v output {out:?}"))
}

fn discard_case(fs: &TestFs, direct_io: bool) {
    let t0 = Instant::now();
    let ctx = format!(
        "[{} loop direct-io={}]",
        fs.name,
        if direct_io { "on" } else { "off" }
    );
    let m = mounted(fs, "discard", GIB, 1, "");
    let backing = m.pool.join(DIRTY);
    let revs_before = revisions(&m.pool);

    // FUSE-NOTES: with XFS behind passthrough, direct I/O needs 4 KiB
    // sectors on the loop device.
    let sector = (direct_io && fs.name == "xfs").then_some(4096);
    let lo = Loop::attach(&m.path(DIRTY), direct_io, sector);
    let name = lo.dev.trim_start_matches("/dev/").to_owned();
    let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap();
    assert_eq!(
        dio.trim(),
        if direct_io { "1" } else { "0" },
        "{ctx} {} direct I/O in use",
        lo.dev
    );
    let granularity =
        std::fs::read_to_string(format!("/sys/block/{name}/queue/discard_granularity")).unwrap();
    assert_eq!(
        granularity.trim(),
        "4096",
        "{ctx} discard granularity of {} (statfs f_bsize of the mount)",
        lo.dev
    );
    // No lazy initialisation: a background ext4lazyinit thread would write
    // the inode tables while the allocation is measured.
    run_ok(Command::new("mkfs.ext4").args([
        "-q",
        "-F",
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
        &lo.dev,
    ]));
    let inner = scratch_of(&m).join("ext4");
    let bm = BlockMount::mount(&lo.dev, &inner);

    // A small file that stays, then the big one that is deleted.
    let marker = pattern(0x5a, 64 * 1024);
    {
        let mut f = File::create(inner.join("marker")).unwrap();
        f.write_all(&marker).unwrap();
        f.sync_all().unwrap();
    }
    run_ok(&mut Command::new("sync"));
    let alloc_start = allocated(&backing);
    let t_write = Instant::now();
    {
        let mut f = File::create(inner.join("big")).unwrap();
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15 ^ u64::from(direct_io));
        let mut buf = vec![0u8; 4 << 20];
        for _ in 0..BIG / buf.len() as u64 {
            noise.fill(&mut buf);
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }
    run_ok(&mut Command::new("sync"));
    let write_secs = t_write.elapsed().as_secs_f64();
    let alloc_full = allocated(&backing);
    assert!(
        alloc_full >= alloc_start + BIG * 9 / 10,
        "{ctx} the 256 MiB written inside ext4 should be allocated in the backing file \
         {}: {alloc_start} bytes before, {alloc_full} after",
        backing.display()
    );

    std::fs::remove_file(inner.join("big")).unwrap();
    run_ok(&mut Command::new("sync"));
    let out = run_ok(Command::new("fstrim").arg("-v").arg(&inner));
    let trimmed = trimmed_bytes(&out);
    let alloc_trimmed = allocated(&backing);
    let dropped = alloc_full.saturating_sub(alloc_trimmed);
    println!(
        "{ctx} wrote 256 MiB in {write_secs:.1} s ({:.0} MiB/s); fstrim trimmed {trimmed} bytes \
         ({:.1} MiB); backing dirty file allocated: {alloc_start} bytes before the write \
         ({:.1} MiB), {alloc_full} after it ({:.1} MiB), {alloc_trimmed} after fstrim \
         ({:.1} MiB): dropped {:.1} MiB = {:.1}% of the deleted 256 MiB",
        mib(BIG) / write_secs,
        mib(trimmed),
        mib(alloc_start),
        mib(alloc_full),
        mib(alloc_trimmed),
        mib(dropped),
        dropped as f64 * 100.0 / BIG as f64
    );
    assert!(
        trimmed >= BIG,
        "{ctx} fstrim trimmed only {trimmed} bytes after 256 MiB were deleted: {out}"
    );
    // The issue asks for 90% on XFS; btrfs and ext4 (copy mode) give it
    // back just as fully (100% on all three when this was written), so the
    // same bound holds everywhere.
    assert!(
        dropped >= BIG * 9 / 10,
        "{ctx} after fstrim the backing file's allocation dropped by {dropped} bytes \
         ({alloc_full} -> {alloc_trimmed}), less than 90% of the 256 MiB deleted\n\
         daemon log:\n{}",
        log_tail(&m)
    );

    // Unmount, detach, and the last release commits.
    bm.unmount();
    lo.detach();
    m.wait_stopped(DIRTY);
    assert!(
        !backing.exists(),
        "{ctx} the dirty image is gone after the commit"
    );

    let img = m.pool.join(COMMITTED);
    let fsck = run(Command::new("fsck.ext4").args(["-n", "-f"]).arg(&img));
    assert!(
        fsck.status.success(),
        "{ctx} fsck.ext4 -n -f {} is not clean: {}",
        img.display(),
        show(&fsck)
    );
    let cat = run(Command::new("debugfs")
        .args(["-R", "cat /marker"])
        .arg(&img));
    assert!(cat.status.success(), "{ctx} debugfs: {}", show(&cat));
    assert!(
        cat.stdout == marker,
        "{ctx} /marker in the committed image: {} bytes, first difference at {:?}",
        cat.stdout.len(),
        first_difference(&cat.stdout, &marker)
    );
    let ls = run_ok(Command::new("debugfs").args(["-R", "ls -l /"]).arg(&img));
    assert!(
        !ls.contains(" big"),
        "{ctx} the deleted file is in the committed image:\n{ls}"
    );
    // The same bytes through the mount's read-only N.img.
    {
        let through = File::open(m.path(COMMITTED)).unwrap();
        let direct = File::open(&img).unwrap();
        assert!(
            read_at(&through, 0, 4 << 20) == read_at(&direct, 0, 4 << 20),
            "{ctx} N.img through the mount shows the committed image"
        );
    }

    let revs_after = revisions(&m.pool);
    let new: Vec<&String> = revs_after
        .iter()
        .filter(|r| !revs_before.contains(r))
        .collect();
    assert_eq!(
        new.len(),
        1,
        "{ctx} exactly one new revision: before {revs_before:?}, after {revs_after:?}"
    );
    println!(
        "{ctx} committed private.img: fsck clean, marker intact, allocated {:.1} MiB; \
         new revision {}; case took {:.1} s",
        mib(allocated(&img)),
        new[0],
        t0.elapsed().as_secs_f64()
    );
    finish(m);
}

const DISCARD_TOOLS: &[&str] = &[
    "losetup",
    "mkfs.ext4",
    "fsck.ext4",
    "debugfs",
    "fstrim",
    "sync",
];

#[test]
fn discard_end_to_end_buffered_loop() {
    for fs in mount_filesystems(DISCARD_TOOLS) {
        discard_case(&fs, false);
    }
}

#[test]
fn discard_end_to_end_direct_io_loop() {
    for fs in mount_filesystems(DISCARD_TOOLS) {
        discard_case(&fs, true);
    }
}

// ---------------------------------------------------------------------------
// fsx.

/// The fsx configuration (fsx 0.3.2, the Rust rewrite).
///
/// - Its fixed-size mode, `blockmode`, is the only mode that opens the file
///   without `O_CREAT | O_TRUNC` (which the mount refuses with EPERM, as
///   it refuses shrinking): in the default mode fsx truncates the file at
///   its first open, and starts its model from an empty file. `blockmode`
///   never changes the size; it takes the file's size as `flen`, so the
///   volume is created with the size fsx works on (`FSX_LEN`).
/// - `blockmode` refuses `truncate` and `posix_fallocate` (both may change
///   the size) and also `close_open` ("error: cannot use close_open with
///   blockmode", exit 2; checked below). Every other operation is on:
///   read, write, mapread, mapwrite, invalidate (msync MS_INVALIDATE),
///   fsync, fdatasync, punch_hole (fallocate PUNCH_HOLE|KEEP_SIZE),
///   copy_file_range, sendfile and posix_fadvise.
/// - So the close/open is done between fsx processes instead: one fsx
///   sequence of `FSX_SEGMENTS * FSX_OPS` operations (one seed) is run as
///   segments, `-b FIRST -N LAST`, each its own process. Each exit is the
///   last close, which commits; each start is a first open, which starts a
///   new snapshot. fsx itself rewrites its whole model at the start of a
///   segment (`-b` writes the simulated image), so the test checks what fsx
///   cannot: after each commit `N.img` holds exactly what a reference run of
///   the same segment left in a plain file, and a new open of `-dirty.img`
///   shows those same bytes.
const FSX_CONFIG: &str = r#"
blockmode = true
nosizechecks = true

[opsize]
min = 0
max = 65536
align = 1

[weights]
close_open = 0
truncate = 0
posix_fallocate = 0
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
fsync = 1
fdatasync = 1
punch_hole = 4
copy_file_range = 4
sendfile = 2
posix_fadvise = 2
"#;

const FSX_LEN: u64 = MIB;
const FSX_SEGMENTS: u64 = 5;
const FSX_OPS: u64 = 4000;
const FSX_SEED: u64 = 20_250_301;

/// `fsx` on PATH, or where `cargo install` puts it.
fn fsx_bin() -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", "command -v fsx"])
        .output()
        .ok()?;
    if out.status.success() {
        return Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cargo/bin/fsx");
    p.is_file().then_some(p)
}

fn fsx_or_skip() -> Option<PathBuf> {
    let found = fsx_bin();
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !ci,
            "CI=true but fsx is missing: cargo install --locked fsx"
        );
        eprintln!("SKIPPING (not in CI): fsx is missing (cargo install --locked fsx)");
    }
    found
}

/// Runs one fsx segment on `file`; returns its output. With `-v`, fsx
/// logs each operation it performs on stderr.
fn fsx_segment(
    fsx: &Path,
    conf: &Path,
    artifacts: &Path,
    first: u64,
    last: u64,
    file: &Path,
) -> Output {
    std::fs::create_dir_all(artifacts).unwrap();
    run(Command::new(fsx)
        .arg("-v")
        .arg("-f")
        .arg(conf)
        .arg("-P")
        .arg(artifacts)
        .args(["-S", &FSX_SEED.to_string()])
        .args(["-b", &first.to_string(), "-N", &last.to_string()])
        .arg(file)
        .env("NO_COLOR", "1"))
}

/// Counts the operations fsx logged (`-v`) by kind, from step `first` on:
/// lines like `[INFO  fsx]   12 punch_hole   0x1ea1 ..`. (With `-b`, fsx
/// 0.3.2 still performs and logs some of the simulated steps, such as
/// copy_file_range, before it writes the simulated image over the file.)
fn tally_fsx_ops(stderr: &[u8], first: u64, counts: &mut BTreeMap<String, u64>) {
    for line in String::from_utf8_lossy(stderr).lines() {
        let Some(rest) = line.strip_prefix("[INFO  fsx]") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        if words
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= first)
        {
            if let Some(op) = words.next() {
                let op = match op.split('(').next().unwrap() {
                    "msync" => "invalidate",
                    other => other,
                };
                *counts.entry(op.to_owned()).or_default() += 1;
            }
        }
    }
}

/// The kinds of operations `FSX_CONFIG` turns on, as fsx logs them.
const FSX_OPS_ON: [&str; 11] = [
    "read",
    "write",
    "mapread",
    "mapwrite",
    "invalidate",
    "fsync",
    "fdatasync",
    "punch_hole",
    "copy_file_range",
    "sendfile",
    "posix_fadvise",
];

fn fsx_case(opts: &str) {
    need!(require(&[]));
    let Some(fsx) = fsx_or_skip() else {
        return;
    };
    let t0 = Instant::now();
    let fs = xfs();
    let ctx = format!("[{} fsx {opts:?}]", fs.name);
    let keep = FSX_SEGMENTS as i64 + 1;
    let m = mounted(&fs, "fsx", FSX_LEN, keep, opts);
    let dir = scratch_of(&m);
    let conf = dir.join("fsx.toml");
    std::fs::write(&conf, FSX_CONFIG).unwrap();

    // Why the close/open is between processes: fsx refuses it in blockmode.
    let probe_conf = dir.join("fsx-probe.toml");
    std::fs::write(
        &probe_conf,
        "blockmode = true\n[weights]\ntruncate = 0\nclose_open = 1\n",
    )
    .unwrap();
    let probe = run(Command::new(&fsx)
        .arg("-f")
        .arg(&probe_conf)
        .arg("-P")
        .arg(&dir)
        .args(["-N", "1"])
        .arg(dir.join("no-such-file")));
    assert!(
        !probe.status.success()
            && String::from_utf8_lossy(&probe.stderr)
                .contains("cannot use close_open with blockmode"),
        "this fsx accepts close_open in blockmode: give close_open a weight in FSX_CONFIG \
         instead of running segments. {}",
        show(&probe)
    );

    // The reference: the same segments on a plain file of the same size.
    let reference = dir.join("fsx-reference.img");
    File::create(&reference).unwrap().set_len(FSX_LEN).unwrap();
    let dirty = m.path(DIRTY);
    let committed = m.pool.join(COMMITTED);
    let mut fsx_secs = 0.0;
    let mut counts = BTreeMap::new();
    for seg in 0..FSX_SEGMENTS {
        let (first, last) = (seg * FSX_OPS + 1, (seg + 1) * FSX_OPS);
        let sctx = format!("{ctx} segment {} (ops {first}..={last})", seg + 1);
        let revs_before = revisions(&m.pool);
        if seg > 0 {
            // A new first open starts a snapshot of the last commit. A
            // read-only run changes nothing and adds no revision.
            let want = read_all(&reference);
            let got = read_all(&dirty);
            assert!(
                got == want,
                "{sctx}: a new open of -dirty.img differs from the last commit at {:?}",
                first_difference(&got, &want)
            );
            m.wait_stopped(DIRTY);
            assert_eq!(revisions(&m.pool), revs_before, "{sctx}: read-only run");
        }

        let out = fsx_segment(
            &fsx,
            &conf,
            &dir.join("fsx-ref-artifacts"),
            first,
            last,
            &reference,
        );
        assert!(
            out.status.success(),
            "{sctx}: fsx on a plain file: {}",
            show(&out)
        );

        let t = Instant::now();
        let out = fsx_segment(&fsx, &conf, &dir.join("fsx-artifacts"), first, last, &dirty);
        fsx_secs += t.elapsed().as_secs_f64();
        tally_fsx_ops(&out.stderr, first, &mut counts);
        assert!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("All operations completed A-OK!"),
            "{sctx}: fsx through the mount failed: {}\ndaemon log:\n{}",
            show(&out),
            log_tail(&m)
        );

        // fsx's exit is the last close: the commit follows.
        m.wait_stopped(DIRTY);
        let want = read_all(&reference);
        let got = read_all(&committed);
        assert!(
            got == want,
            "{sctx}: the committed image differs from fsx's result at {:?}\ndaemon log:\n{}",
            first_difference(&got, &want),
            log_tail(&m)
        );
        let through = read_all(&m.path(COMMITTED));
        assert!(
            through == want,
            "{sctx}: N.img through the mount differs from the commit at {:?}",
            first_difference(&through, &want)
        );
        let revs_after = revisions(&m.pool);
        assert_eq!(
            revs_after.len(),
            revs_before.len() + 1,
            "{sctx}: one new revision per commit: {revs_before:?} -> {revs_after:?}"
        );
    }
    let ops = FSX_SEGMENTS * FSX_OPS;
    let performed: u64 = counts.values().sum();
    println!(
        "{ctx} fsx: {ops} operations through the mount ({performed} logged) in \
         {FSX_SEGMENTS} runs with a commit after each, zero failures; {:.1} s in fsx \
         ({:.0} ops/s); test took {:.1} s; by kind: {counts:?}",
        fsx_secs,
        ops as f64 / fsx_secs,
        t0.elapsed().as_secs_f64()
    );
    for op in FSX_OPS_ON {
        assert!(
            counts.get(op).is_some_and(|&n| n > 0),
            "{ctx} fsx never performed {op}: {counts:?}"
        );
    }
    finish(m);
}

#[test]
fn fsx_blockmode_passthrough() {
    fsx_case("");
}

#[test]
fn fsx_blockmode_passthrough_off() {
    fsx_case("passthrough=off");
}

// ---------------------------------------------------------------------------
// fio.

const FIO_SIZE: u64 = 128 * MIB;
/// fio's `--runtime`: the whole randwrite job (32768 writes, then reading
/// all back) takes a few seconds at the speeds of these machines, so a job
/// cut by this budget is a failure, not a slow pass.
const FIO_BUDGET_SECS: u64 = 60;

fn fio_json(out: &Output, what: &str) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("{what}: no JSON from fio: {}", show(out)));
    serde_json::from_str(&text[start..])
        .unwrap_or_else(|e| panic!("{what}: fio JSON does not parse ({e}): {}", show(out)))
}

/// fio with `--verify=crc32c`, libaio, iodepth 16 and O_DIRECT on
/// `filename`, as a `rw` job of `FIO_SIZE` bytes. `continue_on_error=verify`
/// makes fio count every verify error (`total_err` in the JSON) instead of
/// stopping at the first; with it, fio exits 0 even when blocks are bad, so
/// the JSON is what the tests check.
fn fio(filename: &Path, rw: &str, extra: &[&str]) -> Output {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=randwrite",
        &format!("--rw={rw}"),
        "--bs=4k",
        "--ioengine=libaio",
        "--iodepth=16",
        "--direct=1",
        "--verify=crc32c",
        "--continue_on_error=verify",
        // No verify state file left in the working directory.
        "--verify_state_save=0",
        "--thread",
        &format!("--runtime={FIO_BUDGET_SECS}"),
        &format!("--size={FIO_SIZE}"),
        "--output-format=json",
    ])
    .arg(format!("--filename={}", filename.display()))
    .args(extra);
    run(&mut cmd)
}

/// The job of fio's JSON, with `error` and `total_err` both 0.
fn fio_clean_job(out: &Output, ctx: &str) -> Value {
    let json = fio_json(out, ctx);
    assert!(out.status.success(), "{ctx} fio failed: {}", show(out));
    let job = json["jobs"][0].clone();
    assert_eq!(job["error"].as_i64(), Some(0), "{ctx} fio job error: {job}");
    assert_eq!(
        job["total_err"].as_i64(),
        Some(0),
        "{ctx} fio verify errors: {job}"
    );
    job
}

/// How long one `getxattr("security.capability")` of `path` takes: the
/// kernel asks it before every write to a FUSE file (`file_remove_privs`),
/// passthrough or not.
fn getxattr_secs(path: &Path) -> f64 {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = [0u8; 64];
    let t = Instant::now();
    // SAFETY: valid C strings and a writable buffer of the given length.
    unsafe {
        libc::getxattr(
            p.as_ptr(),
            c"security.capability".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    t.elapsed().as_secs_f64()
}

fn fio_case(opts: &str) {
    need!(require(&["fio", "filefrag"]));
    let t0 = Instant::now();
    let fs = xfs();
    let ctx = format!("[{} fio {opts:?}]", fs.name);
    let m = mounted(&fs, "fio", FIO_SIZE, 1, opts);
    let revs_before = revisions(&m.pool);
    let writes_before = m.root_counter("write_requests");

    let out = fio(&m.path(DIRTY), "randwrite", &[]);
    // fio's exit is the last close: let the commit finish before anything
    // can fail, so that the mount unmounts cleanly.
    m.wait_stopped(DIRTY);
    let daemon_writes = m.root_counter("write_requests") - writes_before;
    let job = fio_clean_job(&out, &ctx);
    let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let verified = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    let iops = job["write"]["iops"].as_f64().unwrap_or(0.0);
    let img = m.pool.join(COMMITTED);
    let extents = run_ok(Command::new("filefrag").arg(&img));
    let getxattr = getxattr_secs(&m.path(COMMITTED));
    println!(
        "{ctx} randwrite bs=4k libaio iodepth=16 direct=1 verify=crc32c: {iops:.0} write IOPS, \
         {written} bytes written, {verified} read back and verified, 0 errors; \
         {daemon_writes} write requests reached the daemon; committed image: {}; \
         one getxattr(security.capability) of N.img takes {:.1} ms",
        extents.trim().rsplit(": ").next().unwrap_or(""),
        getxattr * 1e3
    );
    assert!(
        written == FIO_SIZE,
        "{ctx} fio wrote {written} of {FIO_SIZE} bytes within its {FIO_BUDGET_SECS} s budget: \
         {iops:.0} write IOPS. The kernel sends getxattr(security.capability) before every \
         write to a FUSE file; one takes {:.1} ms here, on an image with {}\n\
         daemon log:\n{}",
        getxattr * 1e3,
        extents.trim(),
        log_tail(&m)
    );
    assert_eq!(verified, FIO_SIZE, "{ctx} bytes read back and verified");
    if opts.contains("passthrough=off") {
        assert!(
            daemon_writes > 0,
            "{ctx} with passthrough=off the daemon serves the writes"
        );
    }
    let revs_after = revisions(&m.pool);
    assert_eq!(
        revs_after.len(),
        revs_before.len() + 1,
        "{ctx} one new revision: {revs_before:?} -> {revs_after:?}"
    );

    // The committed image, read through the mount's read-only N.img, holds
    // every block fio wrote: a sequential read checks each block's
    // crc32c and offset header.
    let out = fio(&m.path(COMMITTED), "read", &["--readonly"]);
    let job = fio_clean_job(&out, &format!("{ctx} verify of N.img"));
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(FIO_SIZE),
        "{ctx} the verify read all of N.img"
    );
    println!(
        "{ctx} committed N.img verified block by block; test took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    finish(m);
}

#[test]
fn fio_randwrite_verify_passthrough() {
    fio_case("");
}

#[test]
fn fio_randwrite_verify_passthrough_off() {
    fio_case("passthrough=off");
}
