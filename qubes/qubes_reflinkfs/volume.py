"""A volume of a reflinkfs pool, as qubesd sees it.

The volume's data and lifecycle live in reflinkfs. With the pool's
`attach` (the default), `start()` has reflinkfs put a loop device straight
on the volume's running image (`volume attach`: the start, a reflink
snapshot, happens then), `block_device()` gives Xen that device (`phy:`),
and `stop()` detaches it, which commits the run. Without it, `start()` only
makes sure the pool is mounted and the volume can start; the loop device
Xen's block script puts on `block_device()`'s path (the mount's
`NAME-dirty.img`) starts it with its open and commits it with its last
close, and `stop()` waits for that commit.
"""

import asyncio
import inspect
import logging
import os

import qubes.storage

from .props import as_bool, pushed

log = logging.getLogger("qubes.storage.reflinkfs")

# The keyword arguments qubesd's Volume takes; qubes.xml may carry keys of
# newer releases, which are dropped (with a note) rather than refused.
KNOWN = ("revisions_to_keep", "rw", "save_on_stop", "size", "snap_on_start", "source",
         "ephemeral")

# The states of a volume whose last run is not committed yet.
UNCOMMITTED = ("starting", "running", "held", "committing", "dirty")

_locked = getattr(qubes.storage.Volume, "locked", lambda method: method)


async def _maybe(value):
    """Awaits what a method of another driver gave, if it is awaitable."""
    if inspect.isawaitable(value):
        return await value
    return value


class ReflinkfsVolume(qubes.storage.Volume):
    """One volume; its vid is the reflinkfs volume id CLASS/VM/NAME."""

    _ready = False
    # The loop device of `volume attach`, while the volume is attached.
    _device = None

    def __init__(self, name, pool, vid, **kwargs):
        unknown = sorted(set(kwargs) - set(KNOWN))
        for key in unknown:
            log.info("volume %s: ignoring the unknown option %s", vid, key)
            kwargs.pop(key)
        for key in ("rw", "save_on_stop", "snap_on_start"):
            if key in kwargs:
                kwargs[key] = as_bool(kwargs[key])
        for key in ("size", "revisions_to_keep"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = int(kwargs[key])
        self._rw = as_bool(kwargs.get("rw", False))
        self._revisions_to_keep = int(kwargs.get("revisions_to_keep", 0))
        super().__init__(name, pool, vid, **kwargs)
        self._ready = True

    # -- requests --------------------------------------------------------

    def _call(self, op, **fields):
        return self.pool.call(op, vid=self.vid, **fields)

    async def _acall(self, op, fd=None, **fields):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, lambda: self.pool.call(op, fd=fd, vid=self.vid, **fields))

    def _info(self):
        return self._call("volume_info", brief=True)

    # -- properties qubesd sets ----------------------------------------

    rw = pushed("_rw", as_bool, lambda v, rw: v._set("rw", str(rw).lower()))
    revisions_to_keep = pushed(
        "_revisions_to_keep", int,
        lambda v, n: v.save_on_stop and v._set("revisions_to_keep", str(n)))

    def _set(self, prop, value):
        return self._call("volume_set", property=prop, value=value)

    # -- what qubesd reads -----------------------------------------------

    @property
    def path(self):
        """What Xen attaches: the loop device of `volume attach`, or the
        mount's NAME-dirty.img."""
        if self.pool.attach:
            if self._device is None:
                self._device = self.pool.attached_device(self.vid)
            if self._device is not None:
                return self._device
        return os.path.join(self.pool.mounted_at, self.vid + "-dirty.img")

    def block_device(self):
        return qubes.storage.BlockDevice(self.path, self.name, None, self.rw,
                                         self.domain, self.devtype)

    @property
    def size(self):
        try:
            return int(self._info()["size"])
        except qubes.storage.StoragePoolException:
            return self._size

    @size.setter
    def size(self, value):
        # qubesd releases that set the size attribute (4.0) set what a
        # create will use; reflinkfs keeps the real one.
        self._size = int(value)

    @property
    def usage(self):
        try:
            info = self._call("volume_info", brief=False)
            return int(info["usage"]["total"]["allocated"])
        except (qubes.storage.StoragePoolException, KeyError, TypeError):
            return 0

    @property
    def revisions(self):
        """{revision: ISO-8601 UTC time}, oldest first."""
        if not self.save_on_stop:
            return {}
        revs = self._call("volume_revisions")
        return {r["id"]: r["timestamp"].rstrip("Z") for r in revs}

    def is_dirty(self):
        if not self.save_on_stop:
            return False
        return self._info()["state"] in UNCOMMITTED

    def is_outdated(self):
        if not self.snap_on_start:
            return False
        return bool(self._info().get("is_outdated"))

    # -- lifecycle -------------------------------------------------------

    @_locked
    async def create(self):
        fields = {"size": self.size_at_create(), "read_only": not self.rw}
        if self.snap_on_start and self.save_on_stop:
            raise qubes.storage.StoragePoolException(
                "{}: a volume that is both snap_on_start and save_on_stop is not "
                "supported by reflinkfs".format(self.vid))
        if self.snap_on_start:
            if self.source is None:
                raise qubes.storage.StoragePoolException(
                    "{}: a snapshot volume needs a source".format(self.vid))
            fields["snapshot_of"] = self.source.vid
        elif self.save_on_stop:
            fields["revisions_to_keep"] = self.revisions_to_keep
        else:
            fields["volatile"] = True
        await self._acall("volume_create", **fields)
        return self

    def size_at_create(self):
        return int(self._size)

    @_locked
    async def remove(self):
        try:
            await self._acall("volume_remove")
        except qubes.storage.StoragePoolException as e:
            if "does not exist" not in str(e):
                raise
        self.pool.forget_volume(self.vid)

    async def verify(self):
        info = await self._acall("volume_info", brief=True)
        if info["state"] in ("missing", "corrupt"):
            raise qubes.storage.StoragePoolException(
                "{}: {}".format(self.vid, info.get("problem") or info["state"]))
        if info["state"] == "held":
            raise qubes.storage.StoragePoolException(
                "{}: its last run is still written outside reflinkfs (a loop device "
                "that outlived its VM?); see `reflinkfs status`".format(self.vid))
        return True

    @_locked
    async def start(self):
        """Makes sure the pool is mounted and the volume can start; the
        start itself is the loop device's open of `path`."""
        info = await self._acall("volume_info", brief=True)
        # qubesd's view of rw and revisions_to_keep wins (qubes.xml is the
        # record), should reflinkfs's differ.
        loop = asyncio.get_running_loop()
        if info["rw"] != self.rw:
            await loop.run_in_executor(None, self._set, "rw", str(self.rw).lower())
        if self.save_on_stop and info["revisions_to_keep"] != self.revisions_to_keep:
            await loop.run_in_executor(None, self._set, "revisions_to_keep",
                                       str(self.revisions_to_keep))
        await self.verify()
        if self.pool.attach:
            await self._attach()
        return self

    async def _attach(self):
        try:
            attached = await self._acall("volume_attach", read_only=not self.rw)
            self._device = attached["device"]
        except qubes.storage.StoragePoolException as e:
            # Still attached from before (qubesd restarted while its VM ran).
            if "already attached" not in str(e):
                raise
            loop = asyncio.get_running_loop()
            self._device = await loop.run_in_executor(None, self.pool.attached_device,
                                                      self.vid)

    @_locked
    async def stop(self):
        """Returns once the volume's last run is committed (or discarded)
        and durable. qubesd calls it after the domain is gone, when the
        loop device may still be letting go, and at its own start for
        every halted VM."""
        try:
            if self.pool.attach:
                await self._detach()
            await self._acall("volume_wait_stopped",
                              timeout_ms=int(self.pool.stop_timeout * 1000))
        except qubes.storage.StoragePoolException as e:
            if "does not exist" in str(e):
                return self
            raise
        return self

    async def _detach(self):
        """Detaches the loop device once Xen lets go of it (blkback may
        release it a moment after the domain is gone): retried until
        `stop_timeout`, then the refusal, naming who uses it, stands."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pool.stop_timeout
        while True:
            try:
                await self._acall("volume_detach")
                self._device = None
                return
            except qubes.storage.StoragePoolException as e:
                if "is not attached" in str(e):
                    self._device = None
                    return
                if "in use" not in str(e) or loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.2)

    # -- administration ----------------------------------------------------

    @_locked
    async def revert(self, revision=None):
        if self.is_dirty():
            raise qubes.storage.StoragePoolException(
                "{}: cannot revert while it runs (or waits to be committed)".format(self.vid))
        await self._acall("volume_revert", revision=revision)
        return self

    @_locked
    async def resize(self, size):
        size = int(size)
        if size < self.size:
            raise qubes.storage.StoragePoolException(
                "{}: shrinking is not allowed (reflinkfs volume resize "
                "--allow-shrink does it, losing the data past the end)".format(self.vid))
        await self._acall("volume_resize", size=size)
        self._size = size
        return self

    async def export(self):
        """A path to read the committed data from: the mount's NAME.img,
        which shows the state from before a running VM started."""
        if not self.save_on_stop:
            raise NotImplementedError(
                "{}: only volumes saved on stop have data to export".format(self.vid))
        return os.path.join(self.pool.mounted_at, self.vid + ".img")

    async def export_end(self, path):
        pass

    @_locked
    async def import_data(self, size):
        """A sparse file of `size` bytes, reading as zeros, for qubesd to
        write the data into in place; nothing changes until
        import_data_end(True)."""
        if not self.save_on_stop:
            raise qubes.storage.StoragePoolException(
                "{}: only volumes saved on stop take imported data".format(self.vid))
        begun = await self._acall("volume_import_begin", size=int(size))
        return begun["path"]

    @_locked
    async def import_data_end(self, success):
        await self._acall("volume_import_end", success=bool(success))

    @_locked
    async def import_volume(self, src_volume):
        """Copies another volume's committed data in: by reflink from this
        pool (or another pool on the same filesystem), else a sparse copy."""
        if not self.save_on_stop:
            return self
        if isinstance(src_volume, ReflinkfsVolume) and src_volume.pool is self.pool:
            await self._acall_clone(src_volume)
            return self
        path = await _maybe(src_volume.export())
        try:
            with open(path, "rb") as data:
                size = os.fstat(data.fileno()).st_size or int(src_volume.size)
                await self._acall("volume_import", fd=data.fileno(), size=size,
                                  source="{} of pool {}".format(src_volume.vid,
                                                                src_volume.pool))
        finally:
            await _maybe(src_volume.export_end(path))
        return self

    async def _acall_clone(self, src_volume):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, lambda: self.pool.call("volume_clone", src=src_volume.vid, dst=self.vid))
