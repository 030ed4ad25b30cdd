"""How long each call of the Qubes driver blocks qubesd's event loop.

Drives the driver (qubes/qubes_reflinkfs) on an asyncio loop, as qubesd
does, against a pool on DIR; times every callback the loop runs (each
step of a coroutine, each synchronous property) and reports, per driver
call, the longest stretch the loop was blocked in it: p50 and p99 over
ROUNDS rounds. Usage: qubes_loop.py DIR ROUNDS OUT.md
"""

import asyncio
import asyncio.events
import collections
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "qubes/tests/stubs"), os.path.join(ROOT, "qubes")]

import qubes_reflinkfs  # noqa: E402
import qubes_reflinkfs.pool  # noqa: E402

_run = asyncio.events.Handle._run
_current = {"max": 0.0, "on": False}


def _timed_run(self):
    t = time.perf_counter()
    try:
        return _run(self)
    finally:
        if _current["on"]:
            _current["max"] = max(_current["max"], time.perf_counter() - t)


asyncio.events.Handle._run = _timed_run


class VM:
    def __init__(self, name, prefix="appvms"):
        self.name = name
        self.dir_path_prefix = prefix


def main():
    base, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conf = os.path.join(base, "driver.conf")
    with open(conf, "w") as f:
        f.write("REFLINKFS={}\n".format(os.environ["REFLINKFS_BIN"]))
    qubes_reflinkfs.pool.CONFIG_FILE = conf
    qubes_reflinkfs.pool.STATE_DIR = os.path.join(base, "run")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    samples = collections.defaultdict(list)

    def coro(name, make):
        _current.update(max=0.0, on=True)
        try:
            return loop.run_until_complete(make())
        finally:
            _current["on"] = False
            samples[name].append(_current["max"])

    def sync(name, fn):
        async def step():
            return fn()
        return coro(name, step)

    pool = qubes_reflinkfs.ReflinkfsPool(name="bench", dir_path=os.path.join(base, "pool"),
                                         mountpoint=os.path.join(base, "mnt"))
    coro("pool setup (mount)", pool.setup)
    tpl = pool.init_volume(VM("tpl", "vm-templates"), dict(name="root", save_on_stop=True,
                                                             rw=True, size=64 << 20))
    coro("create", tpl.create)
    for i in range(rounds):
        vm = VM("vm{}".format(i))
        vols = [pool.init_volume(vm, dict(name="private", save_on_stop=True, rw=True,
                                          size=64 << 20)),
                pool.init_volume(vm, dict(name="root", snap_on_start=True, rw=True,
                                          source=tpl, size=64 << 20)),
                pool.init_volume(vm, dict(name="volatile", rw=True, size=16 << 20))]
        for v in vols:
            coro("create", v.create)
        for v in vols:
            coro("verify", v.verify)
            coro("start", v.start)
            sync("block_device()", v.block_device)
        priv = vols[0]
        sync("size", lambda: priv.size)
        sync("usage", lambda: priv.usage)
        sync("is_dirty()", priv.is_dirty)
        sync("config (qubes.xml save)", lambda: priv.config)
        sync("is_outdated()", vols[1].is_outdated)
        for v in vols:
            coro("stop", v.stop)
        sync("revisions", lambda: priv.revisions)
        coro("resize", lambda: priv.resize(96 << 20))
        path = coro("import_data", lambda: priv.import_data(96 << 20))
        with open(path, "r+b") as f:
            f.write(b"x" * 4096)
        coro("import_data_end", lambda: priv.import_data_end(True))
        coro("revert", priv.revert)
        for v in vols:
            coro("remove", v.remove)
    pool._destroy()
    loop.close()

    def ms(x):
        return "{:.2f}".format(x * 1000)

    lines = ["| call | samples | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name, xs in samples.items():
        xs = sorted(xs)
        p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
        lines.append("| {} | {} | {} | {} | {} |".format(name, len(xs), ms(statistics.median(xs)),
                                                         ms(p99), ms(xs[-1])))
    text = "\n".join(lines) + "\n"
    with open(out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
