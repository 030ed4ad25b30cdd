#!/usr/bin/env python3
"""Helpers of benches/run: timing of a volume's start and commit, image
makers, daemon CPU and memory readings, and the reduction of fio's JSON
output to the results table, its JSON, the target checks and the plots.

    benchlib.py proc PID                       CPU seconds and peak RSS of a process
    benchlib.py machine                        busy CPU seconds and context switches of the machine
    benchlib.py settle [BUSY [MAX]]            wait until the CPUs are quiet; prints seconds waited
    benchlib.py offcpu PREFIX < perf-script    where PREFIX* threads slept (sched_switch stacks)
    benchlib.py snaptime FILE [--repeat N]     start and commit times of a volume
    benchlib.py mkimage FILE SIZE EXTENTS      a sparse image, 10% data in EXTENTS pieces
    benchlib.py timecmd -- CMD...              wall time of a command, in ms
    benchlib.py reduce RAW OUT [--check]       results from RAW/ into OUT/latest.*

Standard library only: it runs on a fresh machine's python3.
"""

import json
import os
import statistics
import subprocess
import sys
import time

MIB = 1 << 20
GIB = 1 << 30

# Job name -> the fio direction whose numbers the table shows.
PERF_JOBS = [
    "seqread-1m-qd1",
    "seqread-1m-qd16",
    "seqwrite-1m-qd1",
    "seqwrite-1m-qd16",
    "randread-4k-qd1",
    "randread-4k-qd16",
    "randwrite-4k-qd1",
    "randwrite-4k-qd16",
    "randwrite-4k-4jobs",
    "seqread-buffered",
    "seqwrite-buffered",
    "trim-64k",
]
VERIFY_JOB = "verify-4k-qd16"
PATHS = [
    "native",
    "passthrough",
    "daemon",
    "qsd",
    "loop-native",
    "loop-passthrough",
    "loop-daemon",
    "loop-qsd",
    "attach",
    "attach-daemon",
]
PATH_LABEL = {
    "native": "(a) native file",
    "passthrough": "(b) reflinkfs passthrough",
    "daemon": "(c) reflinkfs passthrough=off",
    "qsd": "(d) qemu-storage-daemon",
    "loop-native": "(e) loop over (a)",
    "loop-passthrough": "(e) loop over (b)",
    "loop-daemon": "(e) loop over (c)",
    "loop-qsd": "(e) loop over (d)",
    "attach": "(f) volume attach (a loop device on the image)",
    "attach-daemon": "(f) volume attach, pool mounted passthrough=off",
}


def direction(job):
    if "trim" in job:
        return "trim"
    if "read" in job:
        return "read"
    return "write"


def baseline(path):
    return "loop-native" if path.startswith(("loop-", "attach")) else "native"


# ---------------------------------------------------------------- proc


def proc_reading(pid):
    """(CPU seconds, user+system, of every thread; VmHWM in KiB)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may hold spaces; fields resume after its ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return ticks / os.sysconf("SC_CLK_TCK"), hwm


def cmd_proc(args):
    cpu, hwm = proc_reading(int(args[0]))
    print(json.dumps({"cpu_s": cpu, "hwm_kib": hwm}))


def machine_reading():
    """(busy CPU seconds of all CPUs, context switches) since boot, from /proc/stat.

    Busy is user + nice + system + irq + softirq + steal: every tick that
    was not idle or iowait, whoever spent it (fio, the daemon, kernel
    workers, interrupts)."""
    busy, ctxt = 0, 0
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields[0] == "cpu":
                v = [int(x) for x in fields[1:9]]
                busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
            elif fields[0] == "ctxt":
                ctxt = int(fields[1])
    return busy / os.sysconf("SC_CLK_TCK"), ctxt


def cmd_settle(args):
    """Waits until the machine is quiet: at most BUSY (default 0.15) of all
    CPUs busy over the last second, or MAX seconds (default 60) have
    passed. Prints the seconds waited. Work left by the previous job
    (XFS freeing a deleted image's extents in its inodegc worker,
    writeback) otherwise runs during the next measurement."""
    busy_max = float(args[0]) if args else 0.15
    limit = float(args[1]) if len(args) > 1 else 60.0
    ncpu = os.cpu_count() or 1
    start = time.monotonic()
    # Readings of the last second and a bit: the oldest is the window's start.
    window = [(start, machine_reading()[0])]
    while True:
        time.sleep(0.25)
        now, busy = time.monotonic(), machine_reading()[0]
        window.append((now, busy))
        while len(window) > 2 and now - window[1][0] >= 1.0:
            window.pop(0)
        t0, b0 = window[0]
        if now - t0 >= 1.0 and (busy - b0) / ((now - t0) * ncpu) <= busy_max:
            break
        if now - start >= limit:
            break
    print(f"{now - start:.2f}")


def cmd_machine(_args):
    busy, ctxt = machine_reading()
    print(json.dumps({"busy_s": busy, "ctxt": ctxt}))


def cmd_offcpu(args):
    """Summarises `perf script` output of sched:sched_switch samples (on
    stdin): where the threads whose name starts with PREFIX went to sleep,
    as the innermost kernel frames below schedule(), most frequent first."""
    prefix = args[0] if args else "fio"
    skip = {
        "__schedule", "schedule", "schedule_preempt_disabled", "schedule_timeout",
        "io_schedule", "io_schedule_timeout", "__cond_resched",
    }
    counts, total = {}, 0
    comm, stack = None, []

    def flush():
        nonlocal total
        if comm and comm.startswith(prefix) and stack:
            key = " <- ".join([f for f in stack if f not in skip][:7])
            counts[key] = counts.get(key, 0) + 1
            total += 1

    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            flush()
            comm, stack = None, []
        elif not line[0].isspace():
            comm, stack = line.split()[0], []
        else:
            parts = line.split()
            if len(parts) >= 3 and "kernel" in parts[-1]:
                stack.append(parts[1].split("+0x")[0])
    flush()
    print(f"# sleeps of {prefix}* threads: {total} sched_switch samples")
    for key, n in sorted(counts.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{100 * n / max(total, 1):5.1f}%  {key}")


# ---------------------------------------------------------------- snaptime


def state_of(path):
    return os.getxattr(path, "user.reflinkfs.state").decode()


def wait_stopped(path, timeout=600.0):
    """Polls the volume's state until it reads `stopped`; returns when."""
    deadline = time.monotonic() + timeout
    while True:
        if state_of(path) == "stopped":
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise SystemExit(f"snaptime: {path} still running after {timeout}s")
        time.sleep(0.0002)


def cmd_snaptime(args):
    """Opens FILE (a volume's -dirty.img), which starts the volume, writes
    4 KiB so the commit is a real one, closes it and polls the state xattr
    until the commit is done. Prints one JSON line per repeat."""
    path = args[0]
    repeat = 1
    if "--repeat" in args:
        repeat = int(args[args.index("--repeat") + 1])
    block = os.urandom(4096)
    wait_stopped(path)
    for i in range(repeat):
        start_ms, commit_ms = start_and_commit(path, block)
        print(
            json.dumps(
                {
                    "repeat": i,
                    "start_ms": start_ms,
                    "commit_ms": commit_ms,
                }
            ),
            flush=True,
        )


def start_and_commit(path, block):
    """One cycle of a stopped volume through the mount: opens `path` (its
    -dirty.img, which starts it), writes `block` at 0 so the commit is a
    real one, closes it and waits for the commit. Returns (start_ms,
    commit_ms): the open, and from the close until the state reads
    `stopped`."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDWR)
    t1 = time.perf_counter()
    os.pwrite(fd, block, 0)
    t2 = time.perf_counter()
    os.close(fd)
    t3 = wait_stopped(path)
    return (t1 - t0) * 1e3, (t3 - t2) * 1e3


# ---------------------------------------------------------------- mkimage


def cmd_mkimage(args):
    """A sparse image of SIZE bytes whose data, 10% of it, lies in EXTENTS
    pieces evenly spread, each followed by a hole (so the filesystem cannot
    merge them). The file is truncated to its size first, so no piece is
    written past EOF (no speculative preallocation fills the holes)."""
    path, size, extents = args[0], parse_size(args[1]), int(args[2])
    fraction = 0.10
    stride = (size // extents) // 4096 * 4096
    piece = int(stride * fraction) // 4096 * 4096
    if piece == 0 or stride <= piece:
        raise SystemExit("mkimage: too many extents for this size")
    buf = os.urandom(min(piece, 8 * MIB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for i in range(extents):
            off, left = i * stride, piece
            while left:
                n = os.pwrite(fd, buf[: min(left, len(buf))], off)
                off += n
                left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    print(json.dumps({"size": size, "extents": extents, "data": piece * extents}))


# ---------------------------------------------------------------- guardcost

FICLONE = 0x40049409
F_SETLEASE = 1024


def _ms(f, repeat=5):
    """The median time of f() in milliseconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def cmd_guardcost(args):
    """What each guard against a stale writer of a dirty image costs on
    IMAGE (made by mkimage): the read-lease probe reflinkfs does at every
    commit, the loop-device scan that names a holder, the /proc scan for
    mappings, a rename (the commit itself), and the copy a "commit a clone"
    design would add to every commit: FICLONE on XFS and btrfs, a sparse
    copy in copy mode. Prints one JSON line."""
    import fcntl
    import glob
    import shutil

    path = args[0]
    d = os.path.dirname(path)
    st = os.stat(path)
    out = {"image": path, "size": st.st_size, "allocated": st.st_blocks * 512}

    fd = os.open(path, os.O_RDONLY)

    def probe():
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)

    out["lease_probe_ms"] = _ms(probe, 101)

    def loop_scan():
        for b in glob.glob("/sys/block/loop*/loop/backing_file"):
            with open(b) as f:
                f.read()

    out["loop_devices"] = len(glob.glob("/sys/block/loop*/loop/backing_file"))
    out["loop_scan_ms"] = _ms(loop_scan, 21)

    want = f" {st.st_ino} "

    def maps_scan():
        for m in glob.glob("/proc/[0-9]*/maps"):
            try:
                with open(m) as f:
                    if want in f.read():
                        pass
            except OSError:
                pass

    out["processes"] = len(glob.glob("/proc/[0-9]*"))
    out["proc_maps_scan_ms"] = _ms(maps_scan, 5)

    a, b = os.path.join(d, "guard-a"), os.path.join(d, "guard-b")
    open(a, "w").close()
    out["rename_ms"] = _ms(lambda: (os.rename(a, b), os.rename(b, a)), 51) / 2
    os.unlink(a)

    clone = os.path.join(d, "guard-clone")

    def ficlone():
        dst = os.open(clone, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.ioctl(dst, FICLONE, fd)
            os.fsync(dst)
        finally:
            os.close(dst)
            os.unlink(clone)

    try:
        out["ficlone_ms"] = _ms(ficlone, 5)
    except OSError as e:
        out["ficlone_ms"] = None
        out["ficlone_error"] = str(e)

    def sparse_copy():
        subprocess.run(["cp", "--sparse=always", "--reflink=never", path, clone], check=True)
        dst = os.open(clone, os.O_RDONLY)
        os.fsync(dst)
        os.close(dst)
        os.unlink(clone)

    out["sparse_copy_ms"] = _ms(sparse_copy, 3)
    os.close(fd)
    shutil.disk_usage(d)
    print(json.dumps(out))


def parse_size(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s[-1].upper() in mult:
        return int(float(s[:-1]) * mult[s[-1].upper()])
    return int(s)


def cmd_timecmd(args):
    if args and args[0] == "--":
        args = args[1:]
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    print(f"{(time.perf_counter() - t0) * 1e3:.3f}")


# ---------------------------------------------------------------- reduce


def load_jsonl(path):
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    return out


def fio_numbers(fio_json, job):
    """The numbers of the job's main direction (and verify's checks)."""
    j = fio_json["jobs"][0]
    d = j[direction(job)] if job != VERIFY_JOB else j["write"]
    pct = d.get("clat_ns", {}).get("percentile", {})
    p99 = pct.get("99.000000")
    moved = sum(j[k]["io_bytes"] for k in ("read", "write"))
    out = {
        "mib_s": d["bw_bytes"] / MIB,
        "iops": d["iops"],
        "p99_us": p99 / 1e3 if p99 is not None else None,
        "io_bytes": d["io_bytes"],
        "bytes_moved": moved,
        "runtime_ms": j.get("job_runtime", d.get("runtime")),
        "all_ios": sum(j[k].get("total_ios", 0) for k in ("read", "write", "trim") if k in j),
        "fio_error": j.get("error", 0),
        "total_err": j.get("total_err", 0),
    }
    if job == VERIFY_JOB:
        out["verified_bytes"] = j["read"]["io_bytes"]
    return out


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{digits}f}"
    return str(v)


def reduce_results(raw, out_dir, check):
    meta = json.load(open(os.path.join(raw, "meta.json")))
    runs = load_jsonl(os.path.join(raw, "runs.jsonl"))
    snaps = load_jsonl(os.path.join(raw, "snapshot.jsonl"))
    daemons = load_jsonl(os.path.join(raw, "daemons.jsonl"))

    problems = []
    runs_by_key = {}  # (job, path) -> [dict per run]
    for r in runs:
        entry = dict(r)
        fj = os.path.join(raw, f"{r['job']}@{r['path']}#{r.get('rep', 1)}.json")
        try:
            with open(fj) as f:
                text = f.read()
            # fio may print notes before the JSON document.
            entry.update(fio_numbers(json.loads(text[text.index("{") :]), r["job"]))
        except (OSError, ValueError, KeyError) as e:
            entry["parse_error"] = str(e)
        runs_by_key.setdefault((r["job"], r["path"]), []).append(entry)
    # With --repeat, the run with the median IOPS stands for the pair (its
    # latency and CPU come with it); every run's IOPS is kept.
    results = {}
    all_runs = []
    for key, lst in runs_by_key.items():
        all_runs.extend(lst)
        ranked = sorted(lst, key=lambda e: e.get("iops") or 0)
        chosen = dict(ranked[(len(ranked) - 1) // 2])
        chosen["repeats"] = len(lst)
        chosen["iops_all"] = [e.get("iops") for e in lst]
        results[key] = chosen

    jobs = [j for j in PERF_JOBS + [VERIFY_JOB] if any(k[0] == j for k in results)]
    paths = [p for p in PATHS if any(k[1] == p for k in results)]

    for (job, path), e in results.items():
        e["ratio"] = ratio(e.get("iops"), results.get((job, baseline(path)), {}).get("iops"))
        if path in ("daemon", "loop-daemon"):
            peer = "qsd" if path == "daemon" else "loop-qsd"
            e["ratio_vs_qsd"] = ratio(e.get("iops"), results.get((job, peer), {}).get("iops"))
        gib = e.get("bytes_moved", 0) / GIB
        if e.get("cpu_s") is not None and gib > 0:
            e["cpu_s_per_gib"] = e["cpu_s"] / gib
        if e.get("machine_cpu_s") is not None and e.get("all_ios"):
            e["cpu_us_per_io"] = e["machine_cpu_s"] * 1e6 / e["all_ios"]
            e["ctxt_per_io"] = e["ctxt"] / e["all_ios"]

    # The smoke check: every path ran every job it was given and moved data.
    # Verify errors (fio error 84, EILSEQ) fail the run on the native and
    # reflinkfs paths; on qemu-storage-daemon's, a peer we only compare
    # with, they are reported as warnings (see doc/BENCHMARKS.md).
    warnings = []
    for e in sorted(all_runs, key=lambda e: (e["job"], e["path"], e.get("rep", 1))):
        job, path = e["job"], e["path"]
        why, warn = [], []
        if e.get("rc", 0) != 0:
            why.append(f"fio exit status {e['rc']}")
        if "parse_error" in e:
            why.append(f"no fio result ({e['parse_error']})")
        elif e.get("io_bytes", 0) <= 0:
            why.append("no I/O done")
        if e.get("setup_error"):
            why.append(e["setup_error"])
        errs = []
        if e.get("fio_error"):
            errs.append(f"fio error {e['fio_error']}")
        if e.get("total_err"):
            errs.append(f"{e['total_err']} I/O or verify errors")
        if errs:
            verify_only = job == VERIFY_JOB and e.get("fio_error") in (0, 84)
            (warn if verify_only and path.endswith("qsd") else why).extend(errs)
        # The peer's verify job can also end early (fio gives up after the
        # errors it found, "no I/O done"): still the peer's, still a warning.
        if job == VERIFY_JOB and path.endswith("qsd"):
            warn, why = why + warn, []
        run = f" (run {e.get('rep', 1)})" if e.get("rep", 1) > 1 else ""
        if why:
            problems.append(f"{job} on {path}{run}: " + "; ".join(why + warn))
        elif warn:
            warnings.append(f"{job} on {path}{run}: " + "; ".join(warn))
    # Each warning says, on its own line, whose error it is and how
    # reflinkfs fared in the same run.
    note = peer_corruption_note(all_runs)
    warnings = [f"{w}: {note}" for w in warnings]
    for p in PATHS:
        if p in meta.get("paths", []) and p not in paths:
            problems.append(f"path {p} has no result at all")

    targets = evaluate_targets(results, jobs, paths, snaps)
    daemon_summary = summarize_daemons(results, daemons, paths)
    snap_summary = summarize_snapshots(snaps)

    doc = {
        "meta": meta,
        "jobs": jobs,
        "paths": paths,
        "results": [
            dict(results[(j, p)]) for j in jobs for p in paths if (j, p) in results
        ],
        "daemons": daemon_summary,
        "snapshot": snap_summary,
        "targets": targets,
        "problems": problems,
        "warnings": warnings,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "latest.json"), "w") as f:
        json.dump(doc, f, indent=2)
    md = render_markdown(doc, results)
    with open(os.path.join(out_dir, "latest.md"), "w") as f:
        f.write(md)
    write_plot_data(out_dir, results, jobs, paths, snap_summary)
    print(md)
    for w in warnings:
        print(f"benches/run: warning: {w}", file=sys.stderr)
    if problems:
        print("\nbenches/run: paths that did not run cleanly:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    return 0


def reflinkfs_verify(runs):
    """The reflinkfs paths that ran the verify job, and their verify errors."""
    ours = sorted({e["path"] for e in runs
                   if e["job"] == VERIFY_JOB and "qsd" not in e["path"]
                   and e["path"] not in ("native", "loop-native")})
    errors = sum(e.get("total_err") or 0 for e in runs
                 if e["job"] == VERIFY_JOB and e["path"] in ours)
    failed = any(e.get("fio_error") or e.get("rc") for e in runs
                 if e["job"] == VERIFY_JOB and e["path"] in ours)
    return ours, errors, failed


def peer_corruption_note(runs):
    """What a verify error of qemu-storage-daemon means, for a person."""
    ours, errors, failed = reflinkfs_verify(runs)
    if not ours:
        how_we_did = "reflinkfs's paths did not run the verify job in this run"
    elif errors or failed:
        how_we_did = (f"reflinkfs had errors too ({errors} on {', '.join(ours)}): "
                      "see the paths that did not run cleanly")
    else:
        how_we_did = f"reflinkfs had none (0 verify errors on {', '.join(ours)})"
    return ("qemu-storage-daemon's own data corruption, measured "
            "(the peer we compare with, not reflinkfs; doc/BENCHMARKS.md, Verify); "
            + how_we_did)


def evaluate_targets(results, jobs, paths, snaps):
    perf = [j for j in jobs if j != VERIFY_JOB]
    t = []

    # (path, the path it is compared with, target): >= 0.95x a native path,
    # >= 1.0x qemu-storage-daemon's.
    ratio_targets = [
        ("passthrough", "native", "(b) passthrough >= 0.95x native on every job"),
        ("loop-passthrough", "loop-native",
         "(e) loop over passthrough >= 0.95x loop over native on every job"),
        ("attach", "loop-native",
         "(f) volume attach >= 0.95x loop over native on every job, trim included"),
        ("attach-daemon", "loop-native",
         "(f) volume attach, passthrough=off pool, >= 0.95x loop over native on every job"),
        ("daemon", "qsd", "(c) passthrough=off >= qemu-storage-daemon (d) on every job"),
        ("loop-daemon", "loop-qsd",
         "(e) loop over (c) >= loop over (d) on every job (not a stated target; shown for completeness)"),
    ]
    for path, base, desc in ratio_targets:
        key, threshold = ("ratio_vs_qsd", 1.0) if base.endswith("qsd") else ("ratio", 0.95)
        rows = []
        for j in perf:
            e = results.get((j, path))
            if e is None or (j, base) not in results:
                continue
            rows.append((j, e.get(key)))
        if not rows:
            continue
        known = [(j, r) for j, r in rows if r is not None]
        worst = min(known, key=lambda x: x[1]) if known else (None, None)
        missed = [f"{j} {r:.2f}x" for j, r in known if r < threshold]
        t.append(
            {
                "target": desc,
                "met": bool(known) and not missed and len(known) == len(rows),
                "worst_job": worst[0],
                "worst_ratio": worst[1],
                "missed": missed,
            }
        )

    def verify_bad(ps):
        out = []
        for p in ps:
            e = results.get((VERIFY_JOB, p))
            if e is not None and (e.get("total_err") or e.get("fio_error") or e.get("rc")):
                out.append(f"{p}: {e.get('total_err', 0)} errors, fio error {e.get('fio_error', 0)}")
        return out

    ours = [p for p in paths if "qsd" not in p and (VERIFY_JOB, p) in results]
    if ours:
        bad = verify_bad(ours)
        t.append(
            {
                "target": "zero fio verify errors at QD16 direct=1 in every mode (native and reflinkfs paths)",
                "met": not bad,
                "paths_checked": ours,
                "missed": bad,
            }
        )
    peers = [p for p in paths if "qsd" in p and (VERIFY_JOB, p) in results]
    if peers:
        bad = verify_bad(peers)
        if bad:
            bad[-1] += ": " + peer_corruption_note(list(results.values()))
        t.append(
            {
                "target": "zero fio verify errors on the peer qemu-storage-daemon (not our target; shown for completeness)",
                "met": not bad,
                "peer": True,
                "paths_checked": peers,
                "missed": bad,
            }
        )

    s = summarize_snapshots(snaps)
    xfs = {(r["size"], r["extents"]): r for r in s if r["fs"] == "xfs"}
    ten = xfs.get((10 * GIB, 100))
    if ten:
        total = ten["start_ms_median"] + ten["commit_ms_median"]
        t.append(
            {
                "target": "start+commit of a 10 GiB image (10% data, 100 extents) on XFS < 10 ms",
                "met": total < 10.0,
                "start_plus_commit_ms": total,
                "missed": [] if total < 10.0 else [f"{total:.1f} ms"],
            }
        )
    one, frag = xfs.get((1 * GIB, 100)), xfs.get((10 * GIB, 10000))
    big = xfs.get((100 * GIB, 100))
    if one and ten and frag:
        tot = lambda r: r["start_ms_median"] + r["commit_ms_median"]
        by_bytes = tot(ten) / tot(one)
        by_ext = tot(frag) / tot(ten)
        entry = {
            "target": "on XFS, cost grows with extent count, not with bytes",
            "x10_bytes_growth": by_bytes,
            "x100_extents_growth": by_ext,
        }
        if big:
            entry["x100_bytes_growth"] = tot(big) / tot(one)
        # Flat in bytes: ten times the bytes (same extent count) costs less
        # than twice as much; and a hundred times the extents costs more
        # than ten times the bytes does.
        entry["met"] = by_bytes < 2.0 and by_ext > by_bytes
        entry["missed"] = [] if entry["met"] else [
            f"x10 bytes -> {by_bytes:.2f}x, x100 extents -> {by_ext:.2f}x"
        ]
        t.append(entry)
    return t


def summarize_daemons(results, daemons, paths):
    out = []
    for p in paths:
        rows = [e for (j, pp), e in results.items() if pp == p and e.get("cpu_s") is not None]
        if not rows:
            continue
        # trim moves no data: its CPU is reported, not divided.
        data_rows = [e for e in rows if "trim" not in e["job"]]
        cpu = sum(e["cpu_s"] for e in data_rows)
        gib = sum(e.get("bytes_moved", 0) for e in data_rows) / GIB
        hwm = max((e.get("hwm_kib") or 0) for e in rows)
        for d in daemons:
            if d.get("path") == p:
                hwm = max(hwm, d.get("hwm_kib") or 0)
        out.append(
            {
                "path": p,
                "cpu_s": cpu,
                "gib_moved": gib,
                "cpu_s_per_gib": cpu / gib if gib else None,
                "trim_cpu_s": sum(e["cpu_s"] for e in rows if "trim" in e["job"]),
                "peak_rss_mib": hwm / 1024 if hwm else None,
            }
        )
    extra = [d for d in daemons if "requests" in d]
    for d in extra:
        for o in out:
            if o["path"] == d["path"]:
                o["requests"] = d["requests"]
    return out


def summarize_snapshots(snaps):
    groups = {}
    for r in snaps:
        key = (r["fs"], r["size"], r["extents"])
        g = groups.setdefault(key, {"start": [], "commit": [], "cp_sparse": [], "cp_reflink": []})
        for k in ("start", "commit"):
            if f"{k}_ms" in r:
                g[k].append(r[f"{k}_ms"])
        if "cp_sparse_ms" in r:
            g["cp_sparse"].append(r["cp_sparse_ms"])
        if "cp_reflink_ms" in r:
            g["cp_reflink"].append(r["cp_reflink_ms"])
        if "actual_extents" in r:
            g["actual_extents"] = r["actual_extents"]
        if "data" in r:
            g["data"] = r["data"]
        if "mode" in r:
            g["mode"] = r["mode"]
    med = lambda v: statistics.median(v) if v else None
    out = []
    order = {"xfs": 0, "btrfs": 1, "ext4": 2}
    for (fs, size, ext), g in sorted(groups.items(), key=lambda x: (order.get(x[0][0], 9), x[0][1], x[0][2])):
        out.append(
            {
                "fs": fs,
                "mode": g.get("mode"),
                "size": size,
                "extents": ext,
                "actual_extents": g.get("actual_extents"),
                "data": g.get("data"),
                "repeats": len(g["start"]),
                "start_ms_median": med(g["start"]),
                "start_ms_max": max(g["start"]) if g["start"] else None,
                "commit_ms_median": med(g["commit"]),
                "commit_ms_max": max(g["commit"]) if g["commit"] else None,
                "cp_sparse_ms": med(g["cp_sparse"]),
                "cp_reflink_ms": med(g["cp_reflink"]),
            }
        )
    return out


def iops_range(e):
    """' (min-max)' of the repeated runs' IOPS, or ''."""
    vals = [v for v in e.get("iops_all") or [] if v is not None]
    if len(vals) < 2:
        return ""
    return f" ({fmt(float(min(vals)))}–{fmt(float(max(vals)))})"


def render_markdown(doc, results):
    m = doc["meta"]
    L = []
    L.append(f"# reflinkfs benchmark results ({m.get('mode')})")
    L.append("")
    L.append(
        f"{m.get('date')} · Linux {m.get('kernel')} · {m.get('cpus')} CPUs ({m.get('cpu_model')}) · "
        f"{m.get('mem_gib')} GiB RAM · {m.get('fio')} · {m.get('qsd')} · reflinkfs {m.get('commit')}"
    )
    L.append("")
    L.append(
        f"Image {m.get('size')} on a scratch XFS (reflink=1) of {m.get('xfs_size')} on a loop device over a "
        f"file in /var/tmp; {m.get('runtime')} s per job; verify job {m.get('verify_size')}; "
        f"reflinkfs daemon {m.get('threads')} threads. Loop paths: `losetup --direct-io=on --sector-size 4096`."
    )
    if m.get("notes"):
        for n in m["notes"]:
            L.append("")
            L.append(f"Note: {n}")
    L.append("")

    if doc["targets"]:
        L.append("## Targets")
        L.append("")
        quick = doc["meta"].get("mode") == "quick"
        L.append("| target | met | evidence |")
        L.append("|---|---|---|")
        for t in doc["targets"]:
            if "worst_ratio" in t:
                ev = f"worst: {t['worst_job']} {fmt(t['worst_ratio'])}x"
                if t["missed"]:
                    ev += f"; below on {len(t['missed'])} jobs: " + ", ".join(t["missed"])
            elif "start_plus_commit_ms" in t:
                ev = f"{t['start_plus_commit_ms']:.2f} ms (median)"
            elif "x10_bytes_growth" in t:
                ev = (
                    f"10x bytes (same extents): {t['x10_bytes_growth']:.2f}x; "
                    f"100x extents (same bytes): {t['x100_extents_growth']:.2f}x"
                )
                if "x100_bytes_growth" in t:
                    ev += f"; 100x bytes: {t['x100_bytes_growth']:.2f}x"
            else:
                ev = "; ".join(t["missed"]) or "paths: " + ", ".join(t.get("paths_checked", []))
            speed = "paths_checked" not in t
            if quick and speed:
                # Half-second jobs on a shared machine say nothing of a speed.
                met = "not judged (--quick)"
            else:
                met = "yes" if t["met"] else "no (the peer's)" if t.get("peer") else "**NO**"
            L.append(f"| {t['target']} | {met} | {ev} |")
        L.append("")

    L.append("## I/O paths")
    L.append("")
    L.append(
        "MiB/s and IOPS of the job's direction (verify: its write phase), p99 completion "
        "latency, and the ratio of IOPS to the baseline in the same run: (a) for (b)-(d), "
        "loop over (a) for the loop paths. `vs qsd`: (c) against (d). `CPU s/GiB`: the "
        "daemon's user+system CPU during the job per GiB read or written. `machine CPU "
        "µs/IO`: the busy CPU time of the whole machine (fio, daemon, kernel workers, "
        "interrupts; /proc/stat) during the job, per I/O request; on a machine whose CPUs are "
        "saturated, this is what sets the IOPS. With --repeat: "
        "the run with the median IOPS, with the range of all runs in brackets."
    )
    L.append("")
    for job in doc["jobs"]:
        L.append(f"### {job}")
        L.append("")
        L.append("| path | MiB/s | IOPS | p99 µs | ratio | vs qsd | daemon CPU s/GiB | machine CPU µs/IO |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for p in doc["paths"]:
            e = results.get((job, p))
            if e is None:
                continue
            extra = ""
            if job == VERIFY_JOB:
                extra = f" (verified {e.get('verified_bytes', 0) // MIB} MiB, errors {e.get('total_err', 0)})"
            L.append(
                f"| {PATH_LABEL[p]}{extra} | {fmt(e.get('mib_s'))} | {fmt(e.get('iops'))}{iops_range(e)} | "
                f"{fmt(e.get('p99_us'))} | {fmt(e.get('ratio'))} | {fmt(e.get('ratio_vs_qsd'))} | "
                f"{fmt(e.get('cpu_s_per_gib'), 3)} | {fmt(e.get('cpu_us_per_io'), 1)} |"
            )
        L.append("")

    if doc["daemons"]:
        L.append("## Daemon cost")
        L.append("")
        L.append(
            "CPU seconds (user+system, all threads) of the process serving the path, "
            "summed over the data jobs (trim moves no data and is shown apart), per GiB "
            "those jobs read or wrote; peak RSS is VmHWM. reflinkfs: one daemon per mode "
            "for the whole run; qemu-storage-daemon: one per job, the largest peak shown."
        )
        L.append("")
        L.append("| path | GiB moved | CPU s | CPU s/GiB | trim CPU s | peak RSS MiB | requests seen by the daemon |")
        L.append("|---|---:|---:|---:|---:|---:|---|")
        for d in doc["daemons"]:
            req = d.get("requests")
            req = ", ".join(f"{k} {v}" for k, v in req.items()) if req else ""
            L.append(
                f"| {PATH_LABEL[d['path']]} | {fmt(d['gib_moved'])} | {fmt(d['cpu_s'])} | "
                f"{fmt(d['cpu_s_per_gib'], 3)} | {fmt(d['trim_cpu_s'])} | {fmt(d['peak_rss_mib'])} | {req} |"
            )
        L.append("")

    if doc["snapshot"]:
        L.append("## Snapshot (start) and commit cost")
        L.append("")
        L.append(
            "Start: `open()` of `-dirty.img` until it returns. Commit: from `close()` "
            "(after a 4 KiB write, so there is something to commit) until "
            "`user.reflinkfs.state` reads `stopped`. Medians of the repeats (max in "
            "brackets). `cp --sparse`: `cp --sparse=always --reflink=never` of the same "
            "image plus an fsync of the copy; `cp --reflink`: `cp --reflink=always` plus fsync."
        )
        L.append("")
        L.append("| fs (mode) | image | data | extents | start ms | commit ms | start+commit ms | cp --sparse ms | cp --reflink ms |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in doc["snapshot"]:
            tot = None
            if r["start_ms_median"] is not None and r["commit_ms_median"] is not None:
                tot = r["start_ms_median"] + r["commit_ms_median"]
            L.append(
                f"| {r['fs']} ({r.get('mode') or '?'}) | {r['size'] // GIB} GiB | "
                f"{(r.get('data') or 0) // MIB} MiB | {r['actual_extents'] if r['actual_extents'] is not None else r['extents']} | "
                f"{fmt(r['start_ms_median'])} ({fmt(r['start_ms_max'])}) | "
                f"{fmt(r['commit_ms_median'])} ({fmt(r['commit_ms_max'])}) | {fmt(tot)} | "
                f"{fmt(r['cp_sparse_ms'])} | {fmt(r['cp_reflink_ms'])} |"
            )
        L.append("")

    warnings = [f"{w} (not counted as a failure of the run)" for w in doc["warnings"]]
    bullet_section(L, "Warnings", warnings)
    bullet_section(L, "Paths that did not run cleanly", doc["problems"])
    return "\n".join(L)


def bullet_section(L, title, items):
    """Appends a `## title` section listing `items`, if there are any."""
    if items:
        L.append(f"## {title}")
        L.append("")
        for item in items:
            L.append(f"- {item}")
        L.append("")


def write_plot_data(out_dir, results, jobs, paths, snaps):
    """Data files for benches/lib/plot.gp."""
    with open(os.path.join(out_dir, "ratios.dat"), "w") as f:
        f.write("# job passthrough daemon qsd loop-passthrough loop-daemon loop-qsd\n")
        for j in jobs:
            row = [j]
            for p in ["passthrough", "daemon", "qsd", "loop-passthrough", "loop-daemon", "loop-qsd"]:
                r = results.get((j, p), {}).get("ratio")
                row.append(f"{r:.4f}" if r else "NaN")
            f.write(" ".join(row) + "\n")
    # One file per filesystem and series, so gnuplot draws each as a line.
    for fs in ("xfs", "btrfs", "ext4"):
        for series, pick, x in (
            ("size", lambda r: r["extents"] == 100, lambda r: r["size"] / GIB),
            ("extents", lambda r: r["size"] == 10 * GIB, lambda r: r["extents"]),
        ):
            with open(os.path.join(out_dir, f"snap-{series}-{fs}.dat"), "w") as f:
                f.write("# x start_commit_ms cp_sparse_ms cp_reflink_ms\n")
                rows = sorted((r for r in snaps if r["fs"] == fs and pick(r)), key=x)
                for r in rows:
                    tot = None
                    if r["start_ms_median"] is not None and r["commit_ms_median"] is not None:
                        tot = r["start_ms_median"] + r["commit_ms_median"]
                    vals = [tot, r["cp_sparse_ms"], r["cp_reflink_ms"]]
                    f.write(f"{x(r):g} " + " ".join(f"{v:.3f}" if v is not None else "NaN" for v in vals) + "\n")


COMMANDS = {
    "proc": cmd_proc,
    "machine": cmd_machine,
    "settle": cmd_settle,
    "offcpu": cmd_offcpu,
    "snaptime": cmd_snaptime,
    "mkimage": cmd_mkimage,
    "guardcost": cmd_guardcost,
    "timecmd": cmd_timecmd,
    "reduce": lambda args: reduce_results(args[0], args[1], "--check" in args),
}


def main():
    cmd = COMMANDS.get(sys.argv[1]) if len(sys.argv) > 1 else None
    if cmd is None:
        print(__doc__, file=sys.stderr)
        return 2
    return cmd(sys.argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main())
