#!/usr/bin/env python3
"""The metadata and liveness part of the benchmarks (issue 10), run by
`benches/meta` (and `benches/run --meta`).

  meta.py scale BIN FS_DIR N [--samples K]     one pool of N volumes
  meta.py liveness BIN XFS_DIR EXT4_DIR [--secs S]
  meta.py report OUT_DIR                       JSON lines -> meta.md
  meta.py profile BIN FS_DIR N [--runs K]      where a cold ls -lR and a
                                               cold lookup spend the daemon's time

Everything is measured against something measured in the same run (the
plain pool directory, the idle mount); nothing here is a pass or fail.
"""

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time

from benchlib import load_jsonl

MIB = 1 << 20


def sh(*args, **kw):
    return subprocess.run(list(args), check=True, capture_output=True, text=True, **kw)


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def state(path):
    try:
        return os.getxattr(path, "user.reflinkfs.state").decode()
    except OSError:
        return None


def wait_state(path, want, timeout=600):
    end = time.time() + timeout
    while state(path) != want:
        if time.time() > end:
            raise SystemExit(f"meta: {path} not {want} after {timeout}s")
        time.sleep(0.002)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def daemon_pid(pool):
    with open(os.path.join(pool, ".reflinkfs/lock")) as f:
        return int(f.read().strip())


def make_pool(binary, pool, n):
    """A pool of n volumes in n/3 VMs (private, root: origins; volatile),
    written directly in the documented on-disk format: the CLI would open
    the whole pool once per volume."""
    sh(binary, "pool", "init", "--pool", pool)
    sh(binary, "volume", "create", "--pool", pool, "appvms/template/private", "--size", "1M")
    tpl_path = os.path.join(pool, ".reflinkfs/volumes/appvms/template/private.json")
    with open(tpl_path) as f:
        tpl = json.load(f)
    sh(binary, "volume", "remove", "--pool", pool, "appvms/template/private")
    names = ["private", "root", "volatile"]
    made = 0
    vm = 0
    while made < n:
        vmname = f"vm{vm:05d}"
        meta = os.path.join(pool, ".reflinkfs/volumes/appvms", vmname)
        img = os.path.join(pool, "appvms", vmname)
        os.makedirs(meta, mode=0o700, exist_ok=True)
        os.makedirs(img, mode=0o700, exist_ok=True)
        for name in names:
            if made >= n:
                break
            cfg = dict(tpl)
            cfg["vid"] = f"appvms/{vmname}/{name}"
            cfg["incarnation"] = random.getrandbits(63) + 1
            if name == "volatile":
                cfg.update(snap_on_start=False, save_on_stop=False, revisions_to_keep=0)
            else:
                fd = os.open(os.path.join(img, f"{name}.img"), os.O_WRONLY | os.O_CREAT, 0o600)
                os.ftruncate(fd, MIB)
                os.close(fd)
            with open(os.path.join(meta, f"{name}.json"), "w") as f:
                json.dump(cfg, f)
            made += 1
        vm += 1
    os.sync()
    return [f"appvms/vm{i // 3:05d}/{names[i % 3]}" for i in range(n)]


def mount(binary, pool, mnt, opts=""):
    os.makedirs(mnt, exist_ok=True)
    args = [binary, "mount", pool, mnt] + (["-o", opts] if opts else [])
    t0 = time.perf_counter()
    sh(*args)
    return time.perf_counter() - t0


def unmount(binary, mnt):
    subprocess.run([binary, "unmount", mnt], capture_output=True)


def timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def cmd_scale(args):
    binary, fsdir, n = args[0], args[1], int(args[2])
    samples = int(args[args.index("--samples") + 1]) if "--samples" in args else 2000
    pool, mnt = os.path.join(fsdir, f"pool{n}"), os.path.join(fsdir, f"mnt{n}")
    vids = make_pool(binary, pool, n)
    out = {"part": "scale", "volumes": n}
    drop_caches()
    out["mount_s"] = mount(binary, pool, mnt)
    pid = daemon_pid(pool)
    out["rss_after_mount_kib"] = rss_kib(pid)
    rng = random.Random(n)
    # lookup + getattr, cold: the kernel's dentries and inodes are dropped
    # before each stat, so every one asks the daemon (and the daemon's own
    # lstats find the backing filesystem's caches cold too).
    # The control: a stat of the image in the pool directory itself, just
    # as cold. What grows with the pool in both is the filesystem's.
    lat, native = [], []
    origins = [v for v in vids if not v.endswith("volatile")]
    for _ in range(max(samples // 6, 50)):
        v = rng.choice(origins)
        for path, acc in (
            (os.path.join(mnt, f"{v}-dirty.img"), lat),
            (os.path.join(pool, f"{v}.img"), native),
        ):
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")
            t0 = time.perf_counter()
            os.stat(path)
            acc.append(time.perf_counter() - t0)
    out["lookup_cold_p50_us"] = pct(lat, 50) * 1e6
    out["lookup_cold_p99_us"] = pct(lat, 99) * 1e6
    out["native_cold_p50_us"] = pct(native, 50) * 1e6
    out["native_cold_p99_us"] = pct(native, 99) * 1e6
    # The same stats, cached: the kernel keeps names and attributes until
    # the daemon says they changed.
    lat = []
    for _ in range(samples):
        v = rng.choice(vids)
        p = os.path.join(mnt, f"{v}-dirty.img")
        t0 = time.perf_counter()
        os.stat(p)
        lat.append(time.perf_counter() - t0)
    out["stat_p50_us"] = pct(lat, 50) * 1e6
    out["stat_p99_us"] = pct(lat, 99) * 1e6
    # ls -lR of the mount against the pool directory, warm, best of three.
    def ls(d):
        return timed(lambda: subprocess.run(["ls", "-lR", d], stdout=subprocess.DEVNULL, check=True))
    out["ls_lR_mount_s"] = min(ls(mnt) for _ in range(3))
    out["ls_lR_pool_s"] = min(ls(pool) for _ in range(3))
    out["ls_ratio"] = out["ls_lR_mount_s"] / out["ls_lR_pool_s"]
    # ls -lR again with every cache dropped first (drop_caches=3: the
    # kernel's dentries, inodes and listings of the mount, and the backing
    # filesystem's, metadata buffers included), in turns, median of five:
    # what a first look at a pool costs, where the daemon's own work shows.
    cold_mount, cold_pool = [], []
    for _ in range(5):
        for d, acc in ((mnt, cold_mount), (pool, cold_pool)):
            drop_caches()
            acc.append(ls(d))
    out["ls_lR_cold_mount_s"] = statistics.median(cold_mount)
    out["ls_lR_cold_pool_s"] = statistics.median(cold_pool)
    out["ls_cold_ratio"] = out["ls_lR_cold_mount_s"] / out["ls_lR_cold_pool_s"]
    # open+close of an unmodified volume, until it is stopped again.
    oc = []
    origins = [v for v in vids if not v.endswith("volatile")]
    for _ in range(min(50, len(origins))):
        p = os.path.join(mnt, f"{rng.choice(origins)}-dirty.img")
        t0 = time.perf_counter()
        fd = os.open(p, os.O_RDWR)
        os.close(fd)
        wait_state(p, "stopped")
        oc.append(time.perf_counter() - t0)
    out["open_close_p50_ms"] = pct(oc, 50) * 1e3
    out["open_close_p99_ms"] = pct(oc, 99) * 1e3
    out["rss_after_kib"] = rss_kib(pid)
    unmount(binary, mnt)
    print(json.dumps(out), flush=True)


def cmd_profile(args):
    """Where a cold `ls -lR` and a cold lookup of N volumes spend their
    time: the daemon's syscalls (`strace -c -f` attached to it) and its
    instructions and CPU time (`perf stat`, when perf works here), over
    `--runs` cold runs (drop_caches=3 before each ls, =2 before each
    stat), and the same ls of the pool directory for comparison."""
    binary, fsdir, n = args[0], args[1], int(args[2])
    runs = int(args[args.index("--runs") + 1]) if "--runs" in args else 3
    pool, mnt = os.path.join(fsdir, f"ppool{n}"), os.path.join(fsdir, f"pmnt{n}")
    vids = make_pool(binary, pool, n)
    mount(binary, pool, mnt)
    pid = daemon_pid(pool)
    rng = random.Random(n)
    origins = [v for v in vids if not v.endswith("volatile")]

    def ls_cold(d):
        drop_caches()
        return timed(lambda: subprocess.run(["ls", "-lR", d], stdout=subprocess.DEVNULL, check=True))

    def lookups_cold():
        for _ in range(200):
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")
            os.stat(os.path.join(mnt, f"{rng.choice(origins)}-dirty.img"))

    def traced(tool, work):
        out = os.path.join(fsdir, "trace.txt")
        if tool == "strace":
            cmd = ["strace", "-c", "-f", "-o", out, "-p", str(pid)]
        else:
            cmd = ["perf", "stat", "-e", "task-clock,context-switches,instructions:u,instructions:k", "-o", out, "-p", str(pid)]
        p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        r = work()
        p.send_signal(signal.SIGINT)
        p.wait()
        with open(out) as f:
            return r, f.read()

    print(f"== {n} volumes: cold ls -lR, {runs} runs, seconds (mount, pool)")
    ls_cold(mnt)
    for _ in range(runs):
        print(f"{ls_cold(mnt):.4f} {ls_cold(pool):.4f}")
    for d in (mnt, pool):
        out = os.path.join(fsdir, "client.txt")
        drop_caches()
        subprocess.run(["strace", "-c", "-o", out, "ls", "-lR", d], stdout=subprocess.DEVNULL, check=True)
        with open(out) as f:
            print(f"== ls -lR of {'the mount' if d == mnt else 'the pool directory'}, cold, under strace -c")
            print(f.read())
    for tool in ("strace", "perf"):
        if tool == "perf" and subprocess.run(["perf", "stat", "-e", "instructions", "true"], capture_output=True).returncode:
            print("== perf does not work here")
            continue
        t, rep = traced(tool, lambda: ls_cold(mnt))
        print(f"== the daemon under {tool} during one cold ls -lR of the mount ({t:.3f} s)")
        print(rep)
        t, rep = traced(tool, lambda: timed(lookups_cold))
        print(f"== the daemon under {tool} during 200 cold lookups ({t:.3f} s)")
        print(rep)
    if subprocess.run(["perf", "record", "-o", "/dev/null", "true"], capture_output=True).returncode == 0:
        data = os.path.join(fsdir, "perf.data")
        p = subprocess.Popen(["perf", "record", "-F", "4999", "-g", "-o", data, "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        t = ls_cold(mnt)
        p.send_signal(signal.SIGINT)
        p.wait()
        rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,symbol",
                              "-g", "none", "--percent-limit", "0.7"], capture_output=True, text=True).stdout
        print(f"== the daemon's CPU samples during one cold ls -lR of the mount ({t:.3f} s), by function")
        print("\n".join(l for l in rep.splitlines() if l.strip() and not l.startswith("#")))
    unmount(binary, mnt)


class Sampler:
    """stat and fsync of volume A through the mount, and of a plain file on
    the same filesystem (the control: what the filesystem itself does under
    the same load), in turns, until told to stop."""

    def __init__(self, path, native):
        self.paths = [path, native]
        if not os.path.exists(native):
            with open(native, "wb") as f:
                f.truncate(64 * MIB)
        self.fds = [os.open(p, os.O_RDWR) for p in self.paths]
        self.block = os.urandom(4096)

    def run(self, until):
        # [mount stat, mount fsync, native stat, native fsync]
        out = [[], [], [], []]
        i = 0
        while not until():
            for k in (0, 1):
                t0 = time.perf_counter()
                os.stat(self.paths[k])
                t1 = time.perf_counter()
                os.pwrite(self.fds[k], self.block, (i % 64) * 4096)
                t2 = time.perf_counter()
                os.fsync(self.fds[k])
                t3 = time.perf_counter()
                out[2 * k].append(t1 - t0)
                out[2 * k + 1].append(t3 - t2)
            i += 1
        return out

    def close(self):
        for fd in self.fds:
            os.close(fd)


def summary(name, samples):
    stat, fsync, nstat, nfsync = samples
    us = lambda xs, p: pct(xs, p) * 1e6 if xs else None
    return {
        "condition": name,
        "samples": len(stat),
        "stat_p50_us": us(stat, 50),
        "stat_p99_us": us(stat, 99),
        "fsync_p50_us": us(fsync, 50),
        "fsync_p99_us": us(fsync, 99),
        "native_stat_p99_us": us(nstat, 99),
        "native_fsync_p99_us": us(nfsync, 99),
    }


def scattered_writes(path, n, size):
    fd = os.open(path, os.O_RDWR)
    block = os.urandom(4096)
    stride = size // n // 4096 * 4096
    for i in range(n):
        os.pwrite(fd, block, i * stride)
    return fd


def cmd_liveness(args):
    binary, xfs, ext4 = args[0], args[1], args[2]
    secs = float(args[args.index("--secs") + 1]) if "--secs" in args else 2.0
    extents = int(args[args.index("--extents") + 1]) if "--extents" in args else 10000
    copy_mib = int(args[args.index("--copy-mib") + 1]) if "--copy-mib" in args else 1024
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 3
    results = []

    # XFS: A is sampled while B commits, and while an import waits.
    pool, mnt = os.path.join(xfs, "livepool"), os.path.join(xfs, "livemnt")
    sh(binary, "pool", "init", "--pool", pool)
    for v, size in (("appvms/a/private", "64M"), ("appvms/b/private", "10G"), ("appvms/c/private", "64M")):
        sh(binary, "volume", "create", "--pool", pool, v, "--size", size)
    mount(binary, pool, mnt)
    a = Sampler(os.path.join(mnt, "appvms/a/private-dirty.img"), os.path.join(xfs, "native-a"))
    t_end = time.time() + secs
    results.append(summary("idle", a.run(lambda: time.time() > t_end)))

    acc, commit_s = [[], [], [], []], []
    b = os.path.join(mnt, "appvms/b/private-dirty.img")
    for _ in range(rounds):
        fd = scattered_writes(b, extents, 10 << 30)
        t0 = time.perf_counter()
        os.close(fd)
        got = a.run(lambda: state(b) == "stopped")
        commit_s.append(time.perf_counter() - t0)
        for k in range(4):
            acc[k] += got[k]
    r = summary(f"B commits {extents} dirty extents", acc)
    r["commit_s"] = statistics.median(commit_s)
    results.append(r)

    # An import of C from a pipe nobody feeds.
    imp = subprocess.Popen(
        [binary, "volume", "import", "--pool", pool, "appvms/c/private", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.2)
    t_end = time.time() + secs
    results.append(summary("C imports from a stalled pipe", a.run(lambda: time.time() > t_end)))
    imp.kill()
    imp.wait()
    a.close()
    wait_state(os.path.join(mnt, "appvms/a/private-dirty.img"), "stopped")
    unmount(binary, mnt)

    # ext4 (copy mode): A2 is sampled while B2 starts, copying its data.
    pool, mnt = os.path.join(ext4, "livepool"), os.path.join(ext4, "livemnt")
    sh(binary, "pool", "init", "--pool", pool, "--setup-check=no")
    for v, size in (("appvms/a/private", "64M"), ("appvms/b/private", f"{copy_mib}M")):
        sh(binary, "volume", "create", "--pool", pool, v, "--size", size)
    data = os.path.join(ext4, "data.img")
    with open(data, "wb") as f:
        chunk = os.urandom(MIB)
        for _ in range(copy_mib):
            f.write(chunk)
    sh(binary, "volume", "import", "--pool", pool, "appvms/b/private", data)
    os.unlink(data)
    mount(binary, pool, mnt)
    a = Sampler(os.path.join(mnt, "appvms/a/private-dirty.img"), os.path.join(ext4, "native-a"))
    t_end = time.time() + secs
    results.append(summary("idle (ext4)", a.run(lambda: time.time() > t_end)))
    b = os.path.join(mnt, "appvms/b/private-dirty.img")
    acc, start_s = [[], [], [], []], []
    for _ in range(rounds):
        drop_caches()
        done = threading.Event()
        opened = []

        def opener():
            t0 = time.perf_counter()
            opened.append(os.open(b, os.O_RDONLY))
            start_s.append(time.perf_counter() - t0)
            done.set()

        t = threading.Thread(target=opener)
        t.start()
        got = a.run(done.is_set)
        t.join()
        os.close(opened[0])
        wait_state(b, "stopped")
        for k in range(4):
            acc[k] += got[k]
    r = summary(f"B starts in copy mode ({copy_mib} MiB)", acc)
    r["start_s"] = statistics.median(start_s)
    results.append(r)
    a.close()
    unmount(binary, mnt)
    for r in results:
        r["part"] = "liveness"
        print(json.dumps(r), flush=True)


def fmt(v, d=1):
    return "-" if v is None else f"{v:.{d}f}"


def cmd_report(args):
    out_dir = args[0]
    rows = load_jsonl(os.path.join(out_dir, "meta.json"))
    scale = [r for r in rows if r["part"] == "scale"]
    live = [r for r in rows if r["part"] == "liveness"]
    md = ["# Metadata and liveness", ""]
    md += [
        "| volumes | mount (s) | RSS after mount (MiB) | RSS after (MiB) | lookup cold p50 (µs) | p99 (µs) | native cold p50 (µs) | p99 (µs) | stat cached p50 (µs) | p99 (µs) | ls -lR mount (s) | ls -lR pool (s) | ratio | cold ls -lR mount (s) | cold ls -lR pool (s) | cold ratio | open+close p50 (ms) | p99 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in scale:
        md.append(
            f"| {r['volumes']} | {fmt(r['mount_s'], 3)} | {fmt(r['rss_after_mount_kib'] / 1024)} | "
            f"{fmt(r['rss_after_kib'] / 1024)} | {fmt(r['lookup_cold_p50_us'])} | {fmt(r['lookup_cold_p99_us'])} | "
            f"{fmt(r['native_cold_p50_us'])} | {fmt(r['native_cold_p99_us'])} | "
            f"{fmt(r['stat_p50_us'])} | {fmt(r['stat_p99_us'])} | "
            f"{fmt(r['ls_lR_mount_s'], 3)} | {fmt(r['ls_lR_pool_s'], 3)} | {fmt(r['ls_ratio'], 2)} | "
            f"{fmt(r.get('ls_lR_cold_mount_s'), 3)} | {fmt(r.get('ls_lR_cold_pool_s'), 3)} | {fmt(r.get('ls_cold_ratio'), 2)} | "
            f"{fmt(r['open_close_p50_ms'], 2)} | {fmt(r['open_close_p99_ms'], 2)} |"
        )
    if scale:
        small, big = scale[0], scale[-1]
        ratio = big["lookup_cold_p99_us"] / small["lookup_cold_p99_us"]
        over_small = small["lookup_cold_p99_us"] - small["native_cold_p99_us"]
        over_big = big["lookup_cold_p99_us"] - big["native_cold_p99_us"]
        md += [
            "",
            f"- cold lookup p99 at {big['volumes']} volumes / at {small['volumes']}: {ratio:.2f} (target ≤ 2): {'met' if ratio <= 2 else 'missed'}; "
            f"what the mount adds to the native cold stat: {over_small:.0f} µs at {small['volumes']}, {over_big:.0f} µs at {big['volumes']}",
            f"- ls -lR ratio at {big['volumes']} volumes: {big['ls_ratio']:.2f} (target ≤ 3): {'met' if big['ls_ratio'] <= 3 else 'missed'}",
        ]
        for r in scale:
            if r["volumes"] >= 1000 and r.get("ls_cold_ratio") is not None:
                md.append(
                    f"- ls -lR ratio with caches dropped at {r['volumes']} volumes: {r['ls_cold_ratio']:.2f} (target ≤ 3): {'met' if r['ls_cold_ratio'] <= 3 else 'missed'}"
                )
        md += [
            f"- mount at {big['volumes']} volumes: {big['mount_s']:.3f} s (target < 1 s): {'met' if big['mount_s'] < 1 else 'missed'}",
            f"- RSS at {big['volumes']} volumes: {big['rss_after_kib'] / 1024:.1f} MiB (target < 64 MiB): {'met' if big['rss_after_kib'] < 65536 else 'missed'}",
        ]
    md += [
        "",
        "| condition | samples | stat p50 (µs) | stat p99 (µs) | fsync p50 (µs) | fsync p99 (µs) | p99 vs idle (stat, fsync) | native file: p99 vs idle (stat, fsync) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    idle = None
    for r in live:
        if r["condition"].startswith("idle"):
            idle = r
        vs, nvs = "-", "-"
        if idle and idle is not r:
            vs = f"{r['stat_p99_us'] / idle['stat_p99_us']:.2f}, {r['fsync_p99_us'] / idle['fsync_p99_us']:.2f}"
            nvs = f"{r['native_stat_p99_us'] / idle['native_stat_p99_us']:.2f}, {r['native_fsync_p99_us'] / idle['native_fsync_p99_us']:.2f}"
        extra = ""
        if "commit_s" in r:
            extra = f" (commit {r['commit_s']:.2f} s)"
        if "start_s" in r:
            extra = f" (start {r['start_s']:.2f} s)"
        md.append(
            f"| {r['condition']}{extra} | {r['samples']} | {fmt(r['stat_p50_us'])} | {fmt(r['stat_p99_us'])} | "
            f"{fmt(r['fsync_p50_us'])} | {fmt(r['fsync_p99_us'])} | {vs} | {nvs} |"
        )
    with open(os.path.join(out_dir, "meta.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


COMMANDS = {"scale": cmd_scale, "liveness": cmd_liveness, "report": cmd_report, "profile": cmd_profile}

if __name__ == "__main__":
    cmd = COMMANDS.get(sys.argv[1]) if len(sys.argv) > 1 else None
    if cmd is None:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(cmd(sys.argv[2:]) or 0)
