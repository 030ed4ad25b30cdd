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
sys.path.insert(0, os.path.join(CHECKOUT, "tests", "pylib"))

from testenv import IN_CI, binary, require, scratch_xfs_from_env  # noqa: E402

MIB = 1 << 20


def scratch_root():
    """The scratch XFS of scripts/test, else (outside CI) a temporary
    directory, where pools are made in copy mode."""
    path = scratch_xfs_from_env()
    if path is not None:
        return path, True
    if IN_CI:
        pytest.fail("CI=true but REFLINKFS_TEST_FS names no xfs: run through scripts/test")
    return tempfile.gettempdir(), False


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
        options.setdefault("attach", self.mode == "attach")
        if not self.reflink:
            options.setdefault("setup_check", "False")
        # As qubesd passes them: every option a string.
        pool = qubes_reflinkfs.ReflinkfsPool(name=name, **{k: str(v) for k, v in options.items()})
        self.run(pool.setup())
        self.pools.append(pool)
        return pool

    def app(self, pool):
        """A qubesd stand-in with `pool` as its default pool."""
        return App(self, {pool.name: pool}, pool)

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
                for a in pool.call("status", mount=False).get("attached", []):
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
            # A mount whose daemon a test killed is no mount to ismount
            # (ENOTCONN): it goes too.
            try:
                pool._clear_stale_mounts()  # pylint: disable=protected-access
            except Exception as e:  # pylint: disable=broad-except
                print("cleanup of pool {}: {}".format(pool.name, e))
        self.loop.close()


def driver_config(base, monkeypatch):
    """The dom0 file naming the binary (root's, mode 0644) and the driver's
    record of its mounts, both in the test's directory."""
    import qubes_reflinkfs.pool

    conf = os.path.join(base, "qubes-driver.conf")
    with open(conf, "w") as f:
        f.write("# the binary qubesd runs\nREFLINKFS={}\n".format(binary()))
    os.chmod(conf, 0o644)
    monkeypatch.setattr(qubes_reflinkfs.pool, "CONFIG_FILE", conf)
    monkeypatch.setattr(qubes_reflinkfs.pool, "STATE_DIR", os.path.join(base, "run"))
    return conf


@pytest.fixture(params=["attach", "file"])
def host(request, monkeypatch):
    require("losetup", "blockdev", "dd")
    root, reflink = scratch_root()
    base = tempfile.mkdtemp(prefix="q-{}-".format(request.node.name[5:25]), dir=root)
    os.chmod(base, 0o755)
    driver_config(base, monkeypatch)
    h = Host(base, reflink, request.param)
    try:
        yield h
    finally:
        h.close()
        shutil.rmtree(base, ignore_errors=True)


MIB4 = 4 * MIB

# The volumes of each class of VM, as qubesd configures them.
DEFAULT_VOLUMES = {
    "TemplateVM": {
        "root": {"snap_on_start": False, "save_on_stop": True, "rw": True, "size": MIB4},
        "private": {"snap_on_start": False, "save_on_stop": True, "rw": True, "size": MIB4},
        "volatile": {"snap_on_start": False, "save_on_stop": False, "rw": True,
                     "size": 2 * MIB},
    },
    "AppVM": {
        "root": {"snap_on_start": True, "save_on_stop": False, "rw": True, "source": None},
        "private": {"snap_on_start": False, "save_on_stop": True, "rw": True, "size": MIB4},
        "volatile": {"snap_on_start": False, "save_on_stop": False, "rw": True,
                     "size": 2 * MIB},
    },
    "DispVM": {
        "root": {"snap_on_start": True, "save_on_stop": False, "rw": True, "source": None},
        "private": {"snap_on_start": True, "save_on_stop": False, "rw": True, "source": None},
        "volatile": {"snap_on_start": False, "save_on_stop": False, "rw": True,
                     "size": 2 * MIB},
    },
}


class QubesVM:
    """What qubesd's VM object gives its storage: a name, a class, a
    template, volume configs, volumes."""

    def __init__(self, app, klass, name, template=None, volume_config=None):
        self.app = app
        self.klass = klass
        self.name = name
        self.template = template
        self.dir_path_prefix = "vm-templates" if klass == "TemplateVM" else "appvms"
        self.volume_config = volume_config or {
            n: dict(c, name=n) for n, c in DEFAULT_VOLUMES[klass].items()}
        self.volumes = {}
        self.storage = None

    def set_template(self, template):
        """`qvm-prefs VM template T` (the VM is halted): qubesd gives each
        snapshot volume whose source follows the template a fresh config
        and re-initialises it; it never calls create()."""
        self.template = template
        for name, conf in DEFAULT_VOLUMES[self.klass].items():
            if conf.get("snap_on_start") and conf.get("source", 0) is None:
                config = dict(conf, name=name)
                self.volume_config[name] = config
                self.storage.init_volume(name, config)


class App:
    """qubesd's view: pools, VMs, qubes.xml."""

    def __init__(self, host, pools, default_pool):
        self.host = host
        self.pools = pools
        self.default_pool = default_pool
        self.domains = {}

    def get_pool(self, pool):
        return self.pools[pool] if isinstance(pool, str) else pool

    def add_vm(self, klass, name, template=None, create=True):
        """qvm-create (or a DispVM's creation): the VM, then its volumes."""
        import qubes.storage

        vm = QubesVM(self, klass, name, template)
        self.domains[name] = vm
        vm.storage = qubes.storage.Storage(vm)
        if create:
            self.host.run(vm.storage.create())
        return vm

    def clone_vm(self, src, name):
        """qvm-clone: a new VM of the same class and template, its volumes
        made and filled from the source's."""
        import qubes.storage

        vm = QubesVM(self, src.klass, name, src.template)
        self.domains[name] = vm
        vm.storage = qubes.storage.Storage(vm)
        self.host.run(vm.storage.clone(src))
        self.host.run(vm.storage.verify())
        return vm

    def remove_vm(self, vm):
        """qvm-remove: out of qubes.xml first, then its storage; a storage
        failure is only logged (returned here)."""
        del self.domains[vm.name]
        errors = self.host.run(vm.storage.remove())
        self.save()
        return errors

    def start(self, vm):
        """qubesd's VM start: verify, start, then Xen attaches each block
        device; qubes.xml is saved."""
        self.host.run(vm.storage.verify())
        self.host.run(vm.storage.start())
        devs = {v.name: self.host.attach(v) for v in vm.volumes.values()}
        self.save()
        return devs

    def shutdown(self, vm, devs, lag=0.3):
        pending = [self.host.detach(d, after=lag) for d in devs.values()]
        self.host.run(vm.storage.stop())
        for p in pending:
            if p is not None:
                p.wait()

    def save(self):
        """qubes.xml: every pool's config and every volume's, as strings."""
        import xml.etree.ElementTree as ET

        root = ET.Element("qubes")
        pools = ET.SubElement(root, "pools")
        for pool in self.pools.values():
            ET.SubElement(pools, "pool", {k: str(v) for k, v in pool.config.items()})
        domains = ET.SubElement(root, "domains")
        for vm in self.domains.values():
            d = ET.SubElement(domains, "domain", {"class": vm.klass, "name": vm.name})
            if vm.template is not None:
                d.set("template", vm.template.name)
            vc = ET.SubElement(d, "volume-config")
            for v in vm.volumes.values():
                ET.SubElement(vc, "volume", {k: str(x) for k, x in v.config.items()})
        self.xml = ET.tostring(root)
        return self.xml

    def reload(self):
        """qubesd restarted: new pool objects from qubes.xml, then every
        VM (templates first), its volumes from their saved configs."""
        import xml.etree.ElementTree as ET

        import qubes.storage
        import qubes_reflinkfs

        root = ET.fromstring(self.save())
        pools = {}
        for node in root.find("pools"):
            attrs = dict(node.attrib)
            assert attrs.pop("driver") == "reflinkfs"
            pools[attrs["name"]] = qubes_reflinkfs.ReflinkfsPool(**attrs)
        app = App(self.host, pools, pools[self.default_pool.name])
        nodes = {n.get("name"): n for n in root.find("domains")}

        def load(name):
            if name in app.domains:
                return app.domains[name]
            node = nodes[name]
            template = load(node.get("template")) if node.get("template") else None
            config = {}
            for v in node.find("volume-config"):
                c = {k: (x == "True" if x in ("True", "False") else x)
                     for k, x in v.attrib.items()}
                config[c["name"]] = c
            vm = QubesVM(app, node.get("class"), name, template, config)
            app.domains[name] = vm
            vm.storage = qubes.storage.Storage(vm)
            return vm

        for name in nodes:
            load(name)
        return app


def write(dev, data, offset=0):
    with open(dev, "r+b", buffering=0) as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def read(path, length, offset=0):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
