#!/usr/bin/env python3
"""The precache part of the benchmarks (issue 16), run by `benches/precache`
(and `benches/run --precache`).

  precache.py cycles BIN POOL MNT VID --label L [--repeat K]
      K start/commit cycles through the mount (first open of -dirty.img,
      a 4 KiB write, close, wait for the commit) and K through
      `volume attach` / `volume detach` (a 4 KiB write to the device
      between them); one JSON line per cycle.
  precache.py cp IMG DEST [--repeat K]
      cp --reflink=always of the committed image, with a sync of the copy.
  precache.py revert BIN POOL VID [--repeat K]
      pins two revisions, then K times `volume revert` to each in turn
      (issue 17: a link of the revision renamed over NAME.img); the median.
  precache.py report OUT_DIR
      OUT_DIR/precache.json (JSON lines) -> OUT_DIR/precache.md

Nothing here is a pass or fail: the numbers are compared with each other.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from benchlib import load_jsonl, start_and_commit, wait_stopped


def run(*args):
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout


def cmd_cycles(args):
    binary, pool, mnt, vid = args[:4]
    label = args[args.index("--label") + 1]
    repeat = int(args[args.index("--repeat") + 1]) if "--repeat" in args else 5
    dirty = os.path.join(mnt, vid + "-dirty.img")
    precache = os.path.join(pool, vid + "-precache.img")
    block = os.urandom(4096)
    wait_stopped(dirty)
    for i in range(repeat):
        had = os.path.exists(precache)
        start_ms, commit_ms = start_and_commit(dirty, block)
        out = {"label": label, "via": "mount", "repeat": i, "precache_found": had,
               "start_ms": start_ms, "commit_ms": commit_ms}
        print(json.dumps(out), flush=True)
    for i in range(repeat):
        had = os.path.exists(precache)
        t0 = time.perf_counter()
        dev = run(binary, "volume", "attach", "--pool", pool, vid).strip()
        t1 = time.perf_counter()
        fd = os.open(dev, os.O_WRONLY)
        os.pwrite(fd, block, 0)
        os.fsync(fd)
        os.close(fd)
        t2 = time.perf_counter()
        run(binary, "volume", "detach", "--pool", pool, vid)
        t3 = time.perf_counter()
        out = {"label": label, "via": "attach", "repeat": i, "precache_found": had,
               "start_ms": (t1 - t0) * 1e3, "commit_ms": (t3 - t2) * 1e3}
        print(json.dumps(out), flush=True)


def cmd_cp(args):
    img, dest = args[0], args[1]
    repeat = int(args[args.index("--repeat") + 1]) if "--repeat" in args else 5
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(["cp", "--reflink=always", img, dest], check=True)
        subprocess.run(["sync", dest], check=True)
        times.append((time.perf_counter() - t0) * 1e3)
        os.unlink(dest)
    print(json.dumps({"label": "cp --reflink", "cp_ms": statistics.median(times)}))


def cmd_revert(args):
    binary, pool, vid = args[:3]
    repeat = int(args[args.index("--repeat") + 1]) if "--repeat" in args else 5
    def newest():
        revs = json.loads(run(binary, "volume", "revisions", "--pool", pool, vid, "--json"))
        return revs[-1]["id"]

    # Two pinned revisions of the image's size, gone back to in turn: every
    # timed revert really replaces N.img (a revert to the revision that
    # already is N.img's file does nothing).
    a = newest()
    run(binary, "volume", "revisions", "--pool", pool, "pin", vid, a)
    run(binary, "volume", "revert", "--pool", pool, vid, a)
    b = newest()
    run(binary, "volume", "revisions", "--pool", pool, "pin", vid, b)
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        run(binary, "volume", "revert", "--pool", pool, vid, b if i % 2 == 0 else a)
        times.append((time.perf_counter() - t0) * 1e3)
    # The CLI's own start and the request's round trip, for comparison.
    t0 = time.perf_counter()
    run(binary, "volume", "info", "--pool", pool, vid, "--json")
    info_ms = (time.perf_counter() - t0) * 1e3
    print(json.dumps({"label": "revert to a pinned revision",
                      "revert_ms": statistics.median(times), "info_ms": info_ms}))


def cmd_report(args):
    out = args[0]
    rows = load_jsonl(os.path.join(out, "precache.json"))
    cases = sorted({r["extents"] for r in rows})
    lines = [
        "# Start latency with and without the precache",
        "",
        "Median of each row's cycles, in ms. *start*: the first open of",
        "`-dirty.img` through the mount, or `reflinkfs volume attach` (which",
        "also runs the CLI and sets up the loop device); *commit*: from the",
        "close (or the 4 KiB write's fsync on the device) until the volume is",
        "stopped, detach included. *with*: the default (the commit before",
        "each start made the precache); *without*: the daemon run with",
        "`REFLINKFS_PRECACHE=off` (each start reflinks `NAME.img`). `cp",
        "--reflink`: `cp --reflink=always` of the committed image and a sync",
        "of the copy, the cost of one reflink of the image by itself.",
        "",
        "| extents (found) | via | start with | start without | commit with | commit without | cp --reflink |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]

    def med(ext, via, label, key):
        xs = [r[key] for r in rows if r["extents"] == ext and r.get("via") == via
              and r.get("label") == label and key in r]
        return statistics.median(xs) if xs else None

    def fmt(v):
        return "–" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")

    for ext in cases:
        found = next((r["actual_extents"] for r in rows
                      if r["extents"] == ext and "actual_extents" in r), None)
        cp = next((r["cp_ms"] for r in rows if r["extents"] == ext and "cp_ms" in r), None)
        for via in ("mount", "attach"):
            cells = [med(ext, via, "with", "start_ms"), med(ext, via, "without", "start_ms"),
                     med(ext, via, "with", "commit_ms"), med(ext, via, "without", "commit_ms")]
            lines.append(f"| {ext:,} ({found:,}) | {via} | " + " | ".join(fmt(c) for c in cells)
                         + f" | {fmt(cp)} |")
    reverts = [r for r in rows if "revert_ms" in r]
    if reverts:
        lines += [
            "",
            "## Revert to a pinned revision (issue 17)",
            "",
            "`reflinkfs volume revert VID K` through the daemon, K a pinned",
            "revision as large as the image (a hard link of it renamed over",
            "`NAME.img`, and the replaced image kept as a revision): the median,",
            "in ms, CLI start included, beside one `volume info --json` (the CLI's",
            "start and a request's round trip alone). Goal: under 50 ms at",
            "100,000 extents.",
            "",
            "| extents | revert | volume info |",
            "|---:|---:|---:|",
        ]
        for r in sorted(reverts, key=lambda r: r["extents"]):
            lines.append(f"| {r['extents']:,} | {fmt(r['revert_ms'])} | {fmt(r['info_ms'])} |")
    used = [r for r in rows if r.get("label") == "with" and "precache_found" in r]
    if used and not all(r["precache_found"] for r in used):
        lines += ["", "Note: some *with* cycles found no precache before their start."]
    with open(os.path.join(out, "precache.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"cycles": cmd_cycles, "cp": cmd_cp, "revert": cmd_revert,
     "report": cmd_report}[cmd](args)


if __name__ == "__main__":
    main()
