"""The pool: options, setup, the mount, and the volumes qubesd knows."""

import asyncio
import logging
import os
import subprocess
import threading

import qubes.storage

from . import control
from .props import as_bool, pushed
from .volume import ReflinkfsVolume

log = logging.getLogger("qubes.storage.reflinkfs")


async def in_thread(fn, *args):
    """Runs blocking work (a socket request, a mount) off qubesd's loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class ReflinkfsPool(qubes.storage.Pool):
    """A reflinkfs pool: `dir_path` holds it, `mountpoint` shows it.

    Options (`qvm-pool add NAME reflinkfs -o KEY=VALUE,...`):
    - `dir_path`: the pool directory (made and initialised by setup);
    - `mountpoint`: where the pool is mounted when the driver mounts it
      (default /run/qubes-reflinkfs/NAME); a pool already mounted elsewhere
      (by the systemd unit) is used where it is;
    - `reflinkfs`: the reflinkfs binary (default: `reflinkfs` on PATH);
    - `setup_check`: `False` makes a copy-mode pool on a filesystem without
      reflinks (every start is then a full copy);
    - `stop_timeout`: seconds a stop waits for the VM's loop device to let
      go of the volume before it fails (default 60);
    - `attach`: `True` (default) gives Xen a loop device reflinkfs puts
      straight on the volume's image (`volume attach`: no FUSE in the data
      path, native speed on every kernel); `False` gives it the mount's
      NAME-dirty.img, which Xen's block script puts a loop device on;
    - `revisions_to_keep`, `ephemeral_volatile`: as for every pool.
    """

    driver = "reflinkfs"

    def __init__(self, *, name, dir_path, mountpoint=None, reflinkfs="reflinkfs",
                 setup_check=True, stop_timeout=60, attach=True, revisions_to_keep=1,
                 ephemeral_volatile=False):
        self._ready = False
        self._revisions_to_keep = int(revisions_to_keep)
        super().__init__(name=name, revisions_to_keep=int(revisions_to_keep),
                         ephemeral_volatile=as_bool(ephemeral_volatile))
        self.dir_path = os.path.abspath(str(dir_path))
        self.mountpoint = str(mountpoint) if mountpoint else \
            os.path.join("/run/qubes-reflinkfs", name)
        self.reflinkfs = str(reflinkfs)
        self.setup_check = as_bool(setup_check)
        self.stop_timeout = float(stop_timeout)
        self.attach = as_bool(attach)
        self._volumes = {}
        self._mount_lock = threading.Lock()
        # Where the pool is mounted, once seen (None: not known yet).
        self._mounted_at = None
        self._ready = True

    # -- qubesd's properties -------------------------------------------

    @property
    def config(self):
        return {
            "name": self.name,
            "driver": self.driver,
            "dir_path": self.dir_path,
            "mountpoint": self.mountpoint,
            "reflinkfs": self.reflinkfs,
            "setup_check": str(self.setup_check),
            "stop_timeout": str(self.stop_timeout),
            "attach": str(self.attach),
            "revisions_to_keep": str(self.revisions_to_keep),
            "ephemeral_volatile": str(self.ephemeral_volatile),
        }

    # qubesd sets it after construction (`qvm-pool set`): the pool's own
    # default follows, so that volumes made outside qubesd agree.
    revisions_to_keep = pushed(
        "_revisions_to_keep", int,
        lambda p, n: p.call("pool_set", property="revisions_to_keep", value=str(n)))

    def _statvfs(self):
        try:
            return os.statvfs(self.dir_path)
        except OSError:
            return None

    @property
    def size(self):
        st = self._statvfs()
        return st.f_blocks * st.f_frsize if st else None

    @property
    def usage(self):
        st = self._statvfs()
        return (st.f_blocks - st.f_bfree) * st.f_frsize if st else None

    @property
    def usage_details(self):
        details = {}
        if self.size is not None:
            details["data_size"] = self.size
        if self.usage is not None:
            details["data_usage"] = self.usage
        return details

    def included_in(self, app):
        """The pool whose directory holds this one's (its space is theirs)."""
        search = getattr(qubes.storage, "search_pool_containing_dir", None)
        if search is None:
            return None
        others = [p for p in app.pools.values() if p is not self]
        return search(others, self.dir_path)

    # -- setup and teardown --------------------------------------------

    async def setup(self):
        await in_thread(self._setup)

    def _setup(self):
        os.makedirs(self.dir_path, exist_ok=True)
        if not os.path.exists(os.path.join(self.dir_path, ".reflinkfs", "pool.json")):
            args = ["pool", "init", "--pool", self.dir_path,
                    "--revisions-to-keep", str(self.revisions_to_keep)]
            if not self.setup_check:
                args.append("--setup-check=no")
            self._run(args)
        self.ensure_mounted()

    async def destroy(self):
        """qubesd removes a pool only once no volume is in it: unmount, and
        keep the data (as the file drivers do)."""
        await in_thread(self._destroy)

    def _destroy(self):
        try:
            status = control.request(self.dir_path, "status")
        except control.NotMounted:
            return
        if status.get("mountpoint"):
            self._run(["unmount", status["mountpoint"]])
        self._mounted_at = None

    # -- volumes -------------------------------------------------------

    def init_volume(self, vm, volume_config):
        config = dict(volume_config)
        config["pool"] = self
        config.setdefault("revisions_to_keep", self.revisions_to_keep)
        if not config.get("vid"):
            config["vid"] = "{}/{}/{}".format(vm.dir_path_prefix, vm.name, config["name"])
        volume = ReflinkfsVolume(**config)
        self._volumes[volume.vid] = volume
        return volume

    def list_volumes(self):
        return list(self._volumes.values())

    def get_volume(self, vid):
        return self._volumes[vid]

    def forget_volume(self, vid):
        self._volumes.pop(vid, None)

    # -- the daemon ----------------------------------------------------

    def _run(self, args):
        """Runs the reflinkfs CLI (init, mount, unmount only: everything
        else goes through the socket)."""
        cmd = [self.reflinkfs] + args
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                  stdin=subprocess.DEVNULL, check=False)
        except OSError as e:
            raise qubes.storage.StoragePoolException(
                "pool {}: cannot run {}: {}".format(self.name, self.reflinkfs, e)) from e
        if done.returncode != 0:
            lines = [l for l in done.stderr.splitlines() if l.strip()]
            raise qubes.storage.StoragePoolException(
                "pool {}: {}".format(self.name, lines[-1] if lines else
                                     "{} failed with status {}".format(" ".join(cmd),
                                                                        done.returncode)))
        return done.stdout

    def ensure_mounted(self):
        """Mounts the pool on `mountpoint` unless its daemon runs; gives
        where it is mounted."""
        try:
            return self._mountpoint_of(control.request(self.dir_path, "status"))
        except control.NotMounted:
            pass
        with self._mount_lock:
            try:
                return self._mountpoint_of(control.request(self.dir_path, "status"))
            except control.NotMounted:
                pass
            os.makedirs(self.mountpoint, exist_ok=True)
            log.info("pool %s: mounting %s on %s", self.name, self.dir_path, self.mountpoint)
            self._run(["mount", self.dir_path, self.mountpoint])
            return self._mountpoint_of(control.request(self.dir_path, "status"))

    def attached_device(self, vid):
        """The loop device `volume attach` has on `vid`, if any."""
        status = self.call("status")
        for a in status.get("attached", []):
            if a["vid"] == vid:
                return a["device"]
        return None

    def _mountpoint_of(self, status):
        where = status.get("mountpoint")
        if not where and status.get("waiting_for"):
            # (protocol 1.3) Unmounted; the daemon exits once it has
            # committed these volumes, which something still writes.
            raise qubes.storage.StoragePoolException(
                "pool {}: its daemon serves no mount (unmounted from {}); it exits once it "
                "has committed {}, still open for writing outside reflinkfs: detach that "
                "writer and start the VM again".format(self.name, status.get("detached_from"),
                                                       ", ".join(status["waiting_for"])))
        if not where:
            raise qubes.storage.StoragePoolException(
                "pool {}: its daemon serves no mount (lazily unmounted from {}); "
                "unmount it and start the VM again".format(self.name,
                                                          status.get("detached_from")))
        self._mounted_at = where
        return where

    @property
    def mounted_at(self):
        """Where the pool is mounted (mounting it if it is not)."""
        if self._mounted_at is None or not os.path.ismount(self._mounted_at):
            return self.ensure_mounted()
        return self._mounted_at

    def call(self, op, fd=None, timeout=None, **fields):
        """One request to the pool's daemon, mounting the pool first if
        needed; a refusal becomes the StoragePoolException qubesd expects,
        with reflinkfs's one-line message."""
        for attempt in (1, 2):
            try:
                return control.request(self.dir_path, op, fd=fd, timeout=timeout, **fields)
            except control.NotMounted:
                if attempt == 2:
                    raise qubes.storage.StoragePoolException(
                        "pool {}: not mounted".format(self.name)) from None
                self.ensure_mounted()
            except control.ControlError as e:
                raise qubes.storage.StoragePoolException(e.message) from e
            except OSError as e:
                raise qubes.storage.StoragePoolException(
                    "pool {}: talking to its daemon: {}".format(self.name, e)) from e
        raise AssertionError("unreachable")
