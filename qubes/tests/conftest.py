"""Fixtures of the driver's tests: a real reflinkfs pool on the scratch XFS
that scripts/test makes (REFLINKFS_TEST_FS), mounted by the driver, driven
the way qubesd drives it; and the stand-in `qubes` package.

In CI (CI=true) a missing scratch filesystem, binary or tool is a failure,
never a skip.
"""

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(HERE, "stubs"))
sys.path.insert(0, os.path.dirname(HERE))

IN_CI = os.environ.get("CI") == "true"
MIB = 1 << 20


def binary():
    path = os.environ.get("REFLINKFS_BIN") or os.path.join(CHECKOUT, "target/debug/reflinkfs")
    if not os.access(path, os.X_OK):
        pytest.fail("no reflinkfs binary at {} (cargo build, or set REFLINKFS_BIN)".format(path))
    return path


def scratch_root():
    """The scratch XFS of scripts/test, else (outside CI) a temporary
    directory, where pools are made in copy mode."""
    for item in os.environ.get("REFLINKFS_TEST_FS", "").split(","):
        name, _, path = item.partition("=")
        if name == "xfs" and os.path.isdir(path):
            return path, True
    if IN_CI:
        pytest.fail("CI=true but REFLINKFS_TEST_FS names no xfs: run through scripts/test")
    return tempfile.gettempdir(), False


def require(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            if IN_CI:
                pytest.fail("CI=true but {} is missing".format(tool))
            pytest.skip("{} is missing".format(tool))


class VM:
    """What init_volume reads of a qubesd VM."""

    def __init__(self, name, template=False):
        self.name = name
        self.dir_path_prefix = "vm-templates" if template else "appvms"


class Host:
    """One test's pools, mounts and loop devices, all removed at the end."""

    def __init__(self, base, reflink, mode):
        self.base = base
        self.reflink = reflink
        # "attach": Xen gets reflinkfs's own loop device (phy:); "file":
        # the mount's NAME-dirty.img, which its block script loops.
        self.mode = mode
        self.pools = []
        self.loops = []
        self.loop = asyncio.new_event_loop()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def pool(self, name="vmpool", **options):
        import qubes_reflinkfs

        options.setdefault("dir_path", os.path.join(self.base, name))
        options.setdefault("mountpoint", os.path.join(self.base, name + "-mnt"))
        options.setdefault("reflinkfs", binary())
        options.setdefault("attach", self.mode == "attach")
        if not self.reflink:
            options.setdefault("setup_check", "False")
        # As qubesd passes them: every option a string.
        pool = qubes_reflinkfs.ReflinkfsPool(name=name, **{k: str(v) for k, v in options.items()})
        self.run(pool.setup())
        self.pools.append(pool)
        return pool

    def volume(self, pool, vm, name, size=4 * MIB, **config):
        config.setdefault("rw", True)
        return pool.init_volume(vm, dict(config, name=name, size=size))

    def attach(self, volume):
        """What Xen's block script does with block_device(): a device is
        used as it is (phy:); a file gets a loop device (its open starts
        the volume)."""
        path = volume.block_device().path
        if path.startswith("/dev/"):
            return path
        dev = subprocess.run(["losetup", "--find", "--show", path],
                             check=True, capture_output=True, text=True).stdout.strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev, after=0.0):
        """Detaches a loop device, now or (as at a VM's teardown) a moment
        after stop() is called. A device of `volume attach` is the
        driver's to detach: the domain just stops using it."""
        if dev not in self.loops:
            return None
        self.loops.remove(dev)
        if after:
            return subprocess.Popen(["sh", "-c", "sleep {}; losetup -d {}".format(after, dev)])
        subprocess.run(["losetup", "-d", dev], check=True)
        return None

    def cli(self, pool, *args):
        out = subprocess.run([binary()] + list(args) + ["--pool", pool.dir_path],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def close(self):
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        for pool in self.pools:
            # Volumes still attached (a test that failed midway): detached
            # first, so no loop device outlives the test.
            try:
                for a in pool.call("status").get("attached", []):
                    subprocess.run([binary(), "volume", "detach", "--force", a["vid"],
                                    "--pool", pool.dir_path], capture_output=True)
            except Exception as e:
                print("cleanup of pool {}: {}".format(pool.name, e))
            try:
                pool._destroy()
            except Exception as e:  # the test's failure is the one to see
                print("cleanup of pool {}: {}".format(pool.name, e))
            if os.path.ismount(pool.mountpoint):
                done = subprocess.run([binary(), "unmount", pool.mountpoint],
                                      capture_output=True)
                if done.returncode != 0:
                    subprocess.run(["umount", "-l", pool.mountpoint], capture_output=True)
        self.loop.close()


@pytest.fixture(params=["attach", "file"])
def host(request):
    require("losetup", "blockdev", "dd")
    root, reflink = scratch_root()
    base = tempfile.mkdtemp(prefix="q-{}-".format(request.node.name[5:25]), dir=root)
    os.chmod(base, 0o755)
    h = Host(base, reflink, request.param)
    try:
        yield h
    finally:
        h.close()
        shutil.rmtree(base, ignore_errors=True)


def write(dev, data, offset=0):
    with open(dev, "r+b", buffering=0) as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def read(path, length, offset=0):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
