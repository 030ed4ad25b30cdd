//! Incremental export and import (doc/DELTA.md): the change maps recorded
//! at commit never miss a change, `volume diff`, `volume export --delta /
//! --since` and `volume import --delta` work offline and through a mount,
//! Ceph's own `rbd` reads our streams and we read its, and a real Ceph
//! cluster takes and gives deltas.

use crate::common;

use common::cli::*;
use common::mount::{require, Mounted};
use common::*;
use reflinkfs::engine::Pool;
use reflinkfs::ErrorClass;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A small, seeded generator: a failing case prints its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn fallocate(f: &File, mode: libc::c_int, off: u64, len: u64) {
    // SAFETY: plain syscall on an open fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
}

/// One random change pattern on a running image of `size` bytes: data,
/// zeros written, holes punched, ranges zeroed in place, blocks rewritten
/// with the data they hold, and small unaligned writes.
fn change(f: &File, size: u64, rng: &mut Rng) -> String {
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(6) {
        let len = (1 + rng.below(16)) * 4096;
        let off = rng.below(size / 4096) * 4096;
        let len = len.min(size - off);
        let tag = rng.below(256) as u8;
        match rng.below(6) {
            0 => write_at(f, off, &pattern(tag, len as usize)),
            1 => write_at(f, off, &vec![0u8; len as usize]),
            2 => fallocate(
                f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            ),
            3 => fallocate(f, libc::FALLOC_FL_ZERO_RANGE, off, len),
            4 => {
                let same = read_at(f, off, len as usize);
                write_at(f, off, &same);
            }
            _ => {
                let off = rng.below(size - 200);
                write_at(f, off, &pattern(tag, 1 + rng.below(100) as usize));
            }
        }
        what.push(format!("{off}+{len}"));
    }
    what.join(",")
}

/// The bytes where the two files differ that no range of `ranges` covers
/// (a range past the end of `a` covers what `a` lacks).
fn missed(a: &[u8], b: &[u8], ranges: &[[u64; 2]]) -> u64 {
    let mut gaps = Vec::new();
    let mut at = 0usize;
    for [off, len] in ranges {
        assert!(*off as usize >= at, "ranges out of order: {ranges:?}");
        gaps.push((at, *off as usize));
        at = (*off + *len) as usize;
    }
    gaps.push((at, b.len()));
    let mut n = 0;
    for (s, e) in gaps {
        let e = e.min(b.len());
        if s >= e {
            continue;
        }
        if a.len() < e || a[s..e] != b[s..e] {
            n += (s..e).filter(|&i| a.get(i) != Some(&b[i])).count() as u64;
        }
    }
    n
}

/// The file of revision `k` of `v`.
fn rev_file(pool: &Pool, path: &Path, v: &reflinkfs::engine::ValidVid, k: &str) -> PathBuf {
    let r = pool.revisions(v).unwrap();
    let r = r.iter().find(|r| r.id.to_string() == k).unwrap();
    vm_dir(path, v).join(&r.file_name)
}

fn cases() -> u64 {
    std::env::var("REFLINKFS_DELTA_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// The exactness property: after any change pattern, every byte outside the
/// ranges `volume diff` reports is equal, from the change map recorded at
/// commit, along a chain of maps, and by comparing data where no map is.
#[test]
fn delta_diff_never_misses_a_changed_byte() {
    let all = filesystems();
    let per_fs = cases();
    for fs in all {
        let (pool, path) = new_pool_with(&fs, "delta-exact", 2);
        let size = 4 * MIB;
        let v = create_origin(&pool, "appvms/p/private", size);
        write_cycle(&pool, &v, 0, &pattern(1, size as usize));
        let seed = 0x9e37_79b9_7f4a_7c15 ^ fs.name.len() as u64;
        let mut rng = Rng(seed);
        let (mut total_missed, mut reported) = (0u64, 0u64);
        for case in 0..per_fs {
            let f = pool.start(&v).unwrap();
            let what = change(&f, size, &mut rng);
            drop(f);
            pool.stop(&v).unwrap();
            let revs = revision_ids(&pool, &v);
            let Some(k) = revs.last() else { continue };
            let rep = pool.diff(&v, k, None).unwrap();
            let want = if fs.reflink {
                "change map"
            } else {
                "extents and data"
            };
            assert_eq!(rep.method, want, "[{}] case {case}", fs.name);
            let old = std::fs::read(rev_file(&pool, &path, &v, k)).unwrap();
            let new = std::fs::read(image_path(&path, &v)).unwrap();
            let m = missed(&old, &new, &rep.ranges);
            assert_eq!(
                m, 0,
                "[{}] seed {seed:#x} case {case} ({what}): {m} changed bytes missed",
                fs.name
            );
            total_missed += m;
            reported += rep.changed_bytes;
            if revs.len() == 2 && case % 25 == 0 {
                // Across two commits: a chain of two maps.
                let older = std::fs::read(rev_file(&pool, &path, &v, &revs[0])).unwrap();
                let rep = pool.diff(&v, &revs[0], None).unwrap();
                assert_eq!(
                    missed(&older, &new, &rep.ranges),
                    0,
                    "[{}] chain, case {case}",
                    fs.name
                );
            }
        }
        // Without maps, extents and then data decide, as exactly.
        std::fs::remove_dir_all(path.join(".reflinkfs/changes")).ok();
        let revs = revision_ids(&pool, &v);
        let rep = pool.diff(&v, &revs[0], None).unwrap();
        assert_eq!(rep.method, "extents and data");
        let older = std::fs::read(rev_file(&pool, &path, &v, &revs[0])).unwrap();
        let new = std::fs::read(image_path(&path, &v)).unwrap();
        assert_eq!(missed(&older, &new, &rep.ranges), 0, "[{}] no map", fs.name);
        eprintln!(
            "[{}] {} change patterns, {total_missed} bytes missed, {reported} bytes reported changed",
            fs.name,
            per_fs
        );
    }
}

fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    assert!(out.status.success());
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn image_id(pool: &Path, v: &str) -> String {
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", "user.reflinkfs.revid"])
        .arg(image_path(pool, &vid(v)))
        .output()
        .unwrap();
    text(&out.stdout)
}

/// Writes `n` scattered 4 KiB blocks (one of them zeros, one punched) into
/// `v` of the closed pool at `path`, as one commit.
fn scatter(path: &Path, v: &str, n: u64, rng: &mut Rng) {
    let pool = Pool::open(path).unwrap();
    let v = vid(v);
    let size = pool.info_brief(&v).unwrap().size;
    let f = pool.start(&v).unwrap();
    for i in 0..n {
        let off = rng.below(size / 4096) * 4096;
        match i % 8 {
            0 => write_at(&f, off, &[0u8; 4096]),
            1 => fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                4096,
            ),
            _ => write_at(&f, off, &pattern(rng.below(256) as u8, 4096)),
        }
    }
    drop(f);
    pool.stop(&v).unwrap();
}

const V: &str = "appvms/work/private";

/// A source pool on `src_fs` whose V is `size` large and a target pool on
/// `dst_fs` whose V is 1 MiB (a full stream replaces it), both closed; and
/// a directory for the streams. Gives the source's, the target's and the
/// directory's paths.
fn source_and_target(
    src_fs: &TestFs,
    dst_fs: &TestFs,
    test: &str,
    size: u64,
) -> (PathBuf, PathBuf, PathBuf) {
    let (a, a_path) = new_pool_with(src_fs, &format!("{test}-src"), 3);
    let (b, b_path) = new_pool_with(dst_fs, &format!("{test}-dst"), 3);
    create_origin(&a, V, size);
    create_origin(&b, V, MIB);
    drop((a, b));
    (
        a_path,
        b_path,
        scratch_dir(src_fs, &format!("{test}-streams")),
    )
}

/// The committed images of V in the pools at `a` and `b` are equal.
#[track_caller]
fn assert_same_image(a: &Path, b: &Path, ctx: &str) {
    assert_eq!(
        sha256(&image_path(a, &vid(V))),
        sha256(&image_path(b, &vid(V))),
        "{ctx}"
    );
}

/// Full export, three rounds of changes (offline, with the source pool
/// mounted, with the target pool mounted) each sent with `export --since`
/// and applied with `import --delta`: the images are equal at every step,
/// and a delta onto the wrong base, or a truncated one, changes nothing.
#[test]
fn delta_replicates_a_volume_across_two_pools() {
    let fs = xfs();
    let (a_path, b_path, dir) = source_and_target(&fs, &other_fs(&fs), "delta", 16 * MIB);
    let mut rng = Rng(42);
    scatter(&a_path, V, 64, &mut rng);

    let full = dir.join("full.rbd");
    let out = rf_json(&a_path, ["volume", "export", V, "--delta", &s(&full)]);
    assert_eq!(out["kind"], "exported");
    assert!(out["from_id"].is_null());
    let mut id = out["to_id"].as_str().unwrap().to_owned();
    assert_eq!(id, image_id(&a_path, V));
    rf_ok(&b_path, ["volume", "import", V, "--delta", &s(&full)]);
    assert_same_image(&a_path, &b_path, "the full stream");
    assert_eq!(image_id(&b_path, V), id);

    let mut deltas = Vec::new();
    for round in 0..3 {
        scatter(&a_path, V, 40, &mut rng);
        let delta = dir.join(format!("d{round}.rbd"));
        let mounted_a = (round == 1).then(|| Mounted::beside(&a_path, ""));
        let mounted_b = (round == 2).then(|| Mounted::beside(&b_path, ""));
        // `--since` takes the id the last export ended at (or K).
        let since = if round == 0 {
            // Revision 1 is the empty image the volume was made with.
            "2".to_owned()
        } else {
            id.clone()
        };
        let out = rf_json(
            &a_path,
            ["volume", "export", V, "--since", &since, &s(&delta)],
        );
        assert_eq!(out["from_id"].as_str(), Some(id.as_str()), "round {round}");
        assert_eq!(
            out["method"],
            if fs.reflink {
                "change map"
            } else {
                "extents and data"
            }
        );
        let changed = out["changed_bytes"].as_u64().unwrap();
        assert!(
            changed <= 40 * 4096,
            "round {round}: {changed} bytes changed for 40 blocks"
        );
        assert!(out["stream_bytes"].as_u64().unwrap() <= changed + changed / 10 + 200);
        id = out["to_id"].as_str().unwrap().to_owned();
        let diff = rf_json(&b_path, ["volume", "import", V, "--delta", &s(&delta)]);
        assert_eq!(diff["to_id"].as_str(), Some(id.as_str()));
        drop((mounted_a, mounted_b));
        assert_same_image(&a_path, &b_path, &format!("round {round}"));
        deltas.push(delta);
    }

    // A delta onto the wrong base: refused, nothing changed.
    let before = (
        sha256(&image_path(&b_path, &vid(V))),
        files_of(&b_path, &vid(V)),
    );
    let err = rf_fails(
        &b_path,
        ["volume", "import", V, "--delta", &s(&deltas[0])],
        ErrorClass::Refused,
    );
    assert!(err.contains("applies onto revision id"), "{err}");
    // A truncated one: refused, nothing changed.
    scatter(&a_path, V, 10, &mut rng);
    let last = dir.join("last.rbd");
    rf_ok(&a_path, ["volume", "export", V, "--since", &id, &s(&last)]);
    let bytes = std::fs::read(&last).unwrap();
    let cut = dir.join("cut.rbd");
    std::fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
    let err = rf_fails(
        &b_path,
        ["volume", "import", V, "--delta", &s(&cut)],
        ErrorClass::InvalidInput,
    );
    assert!(err.contains("truncated") || err.contains("ends"), "{err}");
    assert_eq!(
        before,
        (
            sha256(&image_path(&b_path, &vid(V))),
            files_of(&b_path, &vid(V))
        )
    );
    rf_ok(&b_path, ["volume", "import", V, "--delta", &s(&last)]);
    assert_same_image(&a_path, &b_path, "the last delta");
}

/// `volume diff` in text and JSON, offline and through the mount, between
/// two revisions and to the committed image; and a stdout export.
#[test]
fn delta_diff_reports_the_changed_ranges_online_and_offline() {
    for fs in filesystems() {
        let (p, path) = new_pool_with(&fs, "delta-diff", 3);
        let v = create_origin(&p, V, 4 * MIB);
        write_cycle(&p, &v, 0, &pattern(1, 8192));
        write_cycle(&p, &v, 65536, &pattern(2, 4096));
        write_cycle(&p, &v, 1 << 20, &pattern(3, 512));
        drop(p);
        for online in [false, true] {
            let m = online.then(|| Mounted::beside(&path, ""));
            let j = rf_json(&path, ["volume", "diff", V, "--from", "3"]);
            assert_eq!(j["kind"], "diff");
            let ranges: Vec<(u64, u64)> = j["ranges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
                .collect();
            assert_eq!(ranges.len(), 1, "[{}] {j}", fs.name);
            assert!(ranges[0].0 <= 1 << 20 && ranges[0].0 + ranges[0].1 >= (1 << 20) + 512);
            assert!(ranges[0].1 <= 4096, "[{}] {j}", fs.name);
            let t = rf_ok(&path, ["volume", "diff", V, "--from", "2", "--to", "3"]);
            assert!(t.contains("65536 4096"), "[{}] {t}", fs.name);
            let err = rf_fails(
                &path,
                ["volume", "diff", V, "--from", "9"],
                ErrorClass::NotFound,
            );
            assert!(err.contains('9'), "{err}");
            // To stdout: the stream, and nothing else.
            let out = reflinkfs()
                .args([
                    "volume",
                    "export",
                    "--pool",
                    &s(&path),
                    V,
                    "--since",
                    "2",
                    "-",
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", show(&out));
            assert!(out.stdout.starts_with(b"rbd diff v1\n"));
            assert_eq!(out.stdout.last(), Some(&b'e'));
            drop(m);
        }
    }
}

fn rbd(args: &[&str]) -> String {
    let out = Command::new("rbd").args(args).output().unwrap();
    assert!(out.status.success(), "rbd {args:?}: {}", show(&out));
    text(&out.stdout)
}

fn need(tools: &[&str], what: &str) -> bool {
    if require(tools) {
        return true;
    }
    assert!(!in_ci(), "CI=true but {tools:?} are missing for {what}");
    eprintln!("SKIP {what}: {tools:?} missing (apt-get install ceph-common)");
    false
}

/// Ceph's own parser accepts our streams: `rbd merge-diff` (no cluster
/// needed) merges two deltas, and the merged one gives the same image.
#[test]
fn delta_streams_merge_with_rbd_merge_diff() {
    if !need(&["rbd"], "rbd merge-diff") {
        return;
    }
    let fs = xfs();
    let (a_path, b_path, dir) = source_and_target(&fs, &fs, "delta-merge", 8 * MIB);
    let mut rng = Rng(7);
    scatter(&a_path, V, 20, &mut rng);
    let full = dir.join("full.rbd");
    let out = rf_json(&a_path, ["volume", "export", V, "--delta", &s(&full)]);
    let mut id = out["to_id"].as_str().unwrap().to_owned();
    rf_ok(&b_path, ["volume", "import", V, "--delta", &s(&full)]);
    let mut ds = Vec::new();
    for i in 0..2 {
        scatter(&a_path, V, 30, &mut rng);
        let d = dir.join(format!("d{i}.rbd"));
        let out = rf_json(&a_path, ["volume", "export", V, "--since", &id, &s(&d)]);
        id = out["to_id"].as_str().unwrap().to_owned();
        ds.push(d);
    }
    let merged = dir.join("merged.rbd");
    rbd(&[
        "merge-diff",
        "--no-progress",
        &s(&ds[0]),
        &s(&ds[1]),
        &s(&merged),
    ]);
    rf_ok(&b_path, ["volume", "import", V, "--delta", &s(&merged)]);
    assert_same_image(&a_path, &b_path, "the merged delta");
}

/// A real Ceph cluster, both ways: our full export and two deltas applied
/// with `rbd import-diff` give the volume's image, with one RBD snapshot per
/// revision named by its id; and `rbd export-diff` of writes made with rbd,
/// applied with `volume import --delta`, gives the RBD image.
#[test]
fn delta_ceph_rbd_image_follows_a_volume_and_back() {
    if std::env::var_os("CEPH_CONF").is_none() {
        assert!(
            !in_ci(),
            "CI=true but CEPH_CONF is not set: scripts/test starts the Ceph cluster"
        );
        eprintln!("SKIP the Ceph test: CEPH_CONF is not set (scripts/test starts a cluster)");
        return;
    }
    let fs = xfs();
    let (a, a_path) = new_pool_with(&fs, "delta-ceph", 3);
    create_origin(&a, V, 8 * MIB);
    drop(a);
    let dir = scratch_dir(&fs, "delta-ceph-streams");
    let img = format!("rbd/rfs-{}", std::process::id());
    rbd(&["create", &img, "--size", "1"]);
    let mut rng = Rng(99);
    let mut ids: Vec<String> = Vec::new();
    for i in 0..3 {
        scatter(&a_path, V, 25, &mut rng);
        let f = dir.join(format!("s{i}.rbd"));
        let out = match i {
            0 => rf_json(&a_path, ["volume", "export", V, "--delta", &s(&f)]),
            _ => rf_json(
                &a_path,
                [
                    "volume",
                    "export",
                    V,
                    "--since",
                    ids[i - 1].as_str(),
                    &s(&f),
                ],
            ),
        };
        ids.push(out["to_id"].as_str().unwrap().to_owned());
        rbd(&["import-diff", "--no-progress", &s(&f), &img]);
        let raw = dir.join(format!("rbd{i}.raw"));
        rbd(&["export", "--no-progress", &img, &s(&raw)]);
        assert_eq!(
            sha256(&raw),
            sha256(&image_path(&a_path, &vid(V))),
            "step {i}"
        );
    }
    let snaps = rbd(&["snap", "ls", &img]);
    for id in &ids {
        assert!(snaps.contains(id.as_str()), "{id} not in {snaps}");
    }
    // Back: writes made with rbd, as a delta from our last id.
    rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4096",
        "--io-total",
        "256K",
        "--io-pattern",
        "rand",
        &img,
    ]);
    let next = "0123456789abcdef0123456789abcdef";
    rbd(&["snap", "create", &format!("{img}@{next}")]);
    let back = dir.join("back.rbd");
    rbd(&[
        "export-diff",
        "--no-progress",
        "--from-snap",
        &ids[2],
        &format!("{img}@{next}"),
        &s(&back),
    ]);
    let out = rf_json(&a_path, ["volume", "import", V, "--delta", &s(&back)]);
    assert_eq!(out["to_id"], next);
    let raw = dir.join("rbd-back.raw");
    rbd(&[
        "export",
        "--no-progress",
        &format!("{img}@{next}"),
        &s(&raw),
    ]);
    assert_eq!(sha256(&raw), sha256(&image_path(&a_path, &vid(V))));
    assert_eq!(image_id(&a_path, V), next);
    let _ = Command::new("rbd").args(["snap", "purge", &img]).output();
    let _ = Command::new("rbd")
        .args(["rm", "--no-progress", &img])
        .output();
    let _: PathBuf = dir;
}
