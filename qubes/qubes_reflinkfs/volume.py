"""A volume of a reflinkfs pool, as qubesd sees it.

The volume's data and lifecycle live in reflinkfs. qubesd's event loop
is never blocked on it: the coroutines run their requests in the
executor, with timeouts; the synchronous properties answer from what the
driver keeps (refreshed by the coroutines) or with a short request that
never mounts anything. With the pool's
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
import functools
import inspect
import logging
import os
import time

import qubes.storage

from .control import QUICK_TIMEOUT, REQUEST_TIMEOUT
from .errors import ReflinkfsError, wrap
from .props import as_bool, pushed
from .threads import in_background, in_thread

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
    # What the synchronous properties answer from: the last usage seen
    # (bytes, time.monotonic() of the reading) and revisions.
    _usage = None
    _usage_pending = False
    _revisions = None

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

    def _quick(self, op, **fields):
        """A request made on qubesd's loop (a synchronous property): a
        short timeout, and never a mount (ReflinkfsError with cause
        `not-mounted` instead)."""
        return self.pool.call(op, vid=self.vid, timeout=QUICK_TIMEOUT, mount=False, **fields)

    async def _acall(self, op, fd=None, timeout=REQUEST_TIMEOUT, **fields):
        """A request in the executor, mounting the pool if needed."""
        vid = fields.pop("vid", self.vid)
        if vid is not None:
            fields["vid"] = vid
        return await in_thread(
            functools.partial(self.pool.call, op, fd=fd, timeout=timeout, **fields))

    async def _ainfo(self):
        info = await self._acall("volume_info", brief=True)
        self._keep(info)
        return info

    def _keep(self, info):
        """Keeps what the synchronous properties answer from."""
        if info.get("size") is not None:
            self._size = int(info["size"])
        usage = info.get("usage")
        if isinstance(usage, dict):
            try:
                self._usage = (int(usage["total"]["allocated"]), time.monotonic())
            except (KeyError, TypeError, ValueError):
                pass
        revs = info.get("revisions")
        if isinstance(revs, list) and self.save_on_stop:
            self._revisions = _revisions_of(revs)

    # -- properties qubesd sets ----------------------------------------

    rw = pushed("_rw", as_bool, lambda v, rw: v._set("rw", str(rw).lower()))
    revisions_to_keep = pushed(
        "_revisions_to_keep", int,
        lambda v, n: v.save_on_stop and v._set("revisions_to_keep", str(n)))

    def _set(self, prop, value):
        """`qvm-volume config`: reflinkfs hears of it now if its pool is
        mounted, else at the volume's next start (which brings rw and
        revisions_to_keep in line)."""
        try:
            return self._quick("volume_set", property=prop, value=value)
        except ReflinkfsError as e:
            if e.cause == "not-mounted":
                return None
            raise

    # -- what qubesd reads (synchronous: on its event loop) ---------------

    @property
    def path(self):
        """What Xen attaches: the loop device of `volume attach`, or the
        mount's NAME-dirty.img."""
        if self.pool.attach:
            if self._device is None:
                try:
                    self._device = self.pool.attached_device(self.vid, timeout=QUICK_TIMEOUT,
                                                             mount=False)
                except ReflinkfsError:
                    pass
            if self._device is not None:
                return self._device
        return os.path.join(self.pool.known_mountpoint, self.vid + "-dirty.img")

    def block_device(self):
        return qubes.storage.BlockDevice(self.path, self.name, None, self.rw,
                                         self.domain, self.devtype)

    @property
    def size(self):
        """The size reflinkfs had at the driver's last request about this
        volume (qubes.xml's until then): qubes.xml is written from it, and
        reading it never asks anyone."""
        return self._size

    @size.setter
    def size(self, value):
        # qubesd releases that set the size attribute (4.0) set what a
        # create will use; reflinkfs keeps the real one.
        self._size = int(value)

    #: Seconds a usage reading is fresh.
    USAGE_FRESH = 30

    @property
    def usage(self):
        """The allocated bytes at the last reading. A reading counts every
        extent of the volume's files, so it is never made on qubesd's loop:
        a stale one there starts a new one in the executor and answers the
        old; outside a loop it is made at once (with a short timeout)."""
        now = time.monotonic()
        if self._usage is not None and now - self._usage[1] < self.USAGE_FRESH:
            return self._usage[0]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            self._read_usage()
        elif not self._usage_pending:
            self._usage_pending = True
            in_background(self._read_usage)
        return self._usage[0] if self._usage is not None else 0

    def _read_usage(self):
        try:
            info = self.pool.call("volume_info", vid=self.vid, brief=False, mount=False,
                                  timeout=REQUEST_TIMEOUT)
            self._usage = (int(info["usage"]["total"]["allocated"]), time.monotonic())
        except (ReflinkfsError, KeyError, TypeError, ValueError) as e:
            log.debug("volume %s: usage: %s", self.vid, e)
        finally:
            self._usage_pending = False

    @property
    def revisions(self):
        """{revision: ISO-8601 UTC time}, oldest first (the last known
        while the pool is not mounted)."""
        if not self.save_on_stop:
            return {}
        try:
            self._revisions = _revisions_of(self._quick("volume_revisions"))
        except ReflinkfsError as e:
            if e.cause != "not-mounted":
                raise
        return dict(self._revisions or {})

    def is_dirty(self):
        if not self.save_on_stop:
            return False
        try:
            return self._quick("volume_info", brief=True)["state"] in UNCOMMITTED
        except ReflinkfsError as e:
            # No daemon, no run: a dirty image left by a crash is committed
            # when the pool is mounted again.
            if e.cause == "not-mounted":
                return False
            raise

    def is_outdated(self):
        """Whether the next start takes a newer image of the source: one
        the source committed since this run began, or another source
        (`qvm-prefs VM template`)."""
        if not self.snap_on_start:
            return False
        try:
            info = self._quick("volume_info", brief=True)
        except ReflinkfsError as e:
            if e.cause == "not-mounted":
                return False
            raise
        if self.source is not None and info.get("source") not in (None, self.source.vid):
            return True
        return bool(info.get("is_outdated"))

    # -- lifecycle -------------------------------------------------------

    @_locked
    async def create(self):
        fields = {"size": self.size_at_create(), "read_only": not self.rw}
        if self.snap_on_start and self.save_on_stop:
            raise ReflinkfsError(
                "{}: a volume that is both snap_on_start and save_on_stop is not "
                "supported by reflinkfs".format(self.vid), kind="unsupported")
        if self.snap_on_start:
            if self.source is None:
                raise ReflinkfsError("{}: a snapshot volume needs a source".format(self.vid),
                                     kind="invalid-input")
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
        await self._release_dependents()
        try:
            await self._acall("volume_remove")
        except ReflinkfsError as e:
            if not e.is_("not-found", "no-such-volume"):
                raise
        self.pool.forget_volume(self.vid)

    async def _release_dependents(self):
        """The snapshot volumes reflinkfs still has as snapshots of this
        one, but qubesd no longer does (their VM moved to another template
        and has not started since), get their new source now: else the
        removal of an old template would be refused for them."""
        if self.snap_on_start:
            return
        volumes = await self._acall("volume_list", vid=None)
        for other in volumes:
            if other.get("source") != self.vid:
                continue
            ours = self.pool._volumes.get(other["vid"])  # pylint: disable=protected-access
            if ours is None or ours.source is None or ours.source.vid == self.vid:
                continue
            log.info("volume %s: source %s (was %s), before %s is removed", ours.vid,
                     ours.source.vid, self.vid, self.vid)
            await self._acall("volume_set", vid=ours.vid, property="source",
                              value=ours.source.vid)

    async def verify(self):
        info = await self._ainfo()
        if self.snap_on_start and self.source is not None and \
                info.get("source") not in (None, self.source.vid):
            # A new source, which start() will give reflinkfs: that one
            # must be there.
            source = await self._acall("volume_info", vid=self.source.vid, brief=True)
            if source["state"] in ("missing", "corrupt"):
                raise ReflinkfsError("{}: its source {}: {}".format(
                    self.vid, self.source.vid, source.get("problem") or source["state"]),
                    kind="not-found")
        self._check(info)
        return True

    def _check(self, info):
        if info["state"] in ("missing", "corrupt"):
            raise ReflinkfsError(
                "{}: {}".format(self.vid, info.get("problem") or info["state"]),
                kind="not-found" if info["state"] == "missing" else "corrupt")
        if info["state"] == "held":
            raise ReflinkfsError(
                "{}: its last run is not committed yet: it is still written outside "
                "reflinkfs (a loop device that outlived its VM?), or its stop was "
                "interrupted and the daemon retries it; see `reflinkfs status` and "
                "the daemon's log".format(self.vid),
                kind="busy")

    @_locked
    async def start(self):
        """Brings reflinkfs in line with qubes.xml (the record): a stale
        import is dropped, and the source, rw and revisions_to_keep are
        qubesd's; then, with `attach`, the volume starts on its loop
        device (without, the loop device's open of `path` starts it)."""
        info = await self._ainfo()
        if info["state"] == "importing":
            # An import whose end never came (its Import script died):
            # file-reflink drops it at start too.
            log.warning("volume %s: dropping an import that was never ended", self.vid)
            await self._acall("volume_import_abort")
            info = await self._ainfo()
        if self.snap_on_start and self.source is not None and \
                info.get("source") != self.source.vid:
            log.info("volume %s: source %s (was %s)", self.vid, self.source.vid,
                     info.get("source"))
            await self._acall("volume_set", property="source", value=self.source.vid)
            info = await self._ainfo()
        if info["rw"] != self.rw:
            await self._acall("volume_set", property="rw", value=str(self.rw).lower())
        if self.save_on_stop and info["revisions_to_keep"] != self.revisions_to_keep:
            await self._acall("volume_set", property="revisions_to_keep",
                              value=str(self.revisions_to_keep))
        self._check(info)
        if self.pool.attach:
            await self._attach()
        return self

    async def _attach(self):
        try:
            attached = await self._acall("volume_attach", read_only=not self.rw)
            self._device = attached["device"]
        except ReflinkfsError as e:
            # Still attached from before (qubesd restarted while its VM ran).
            if not e.is_("busy", "already-attached"):
                raise
            self._device = await in_thread(self.pool.attached_device, self.vid)
            if self._device is None:
                raise

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
                              timeout_ms=int(self.pool.stop_timeout * 1000),
                              timeout=self.pool.stop_timeout + REQUEST_TIMEOUT)
            # What qubesd reads next (size, revisions) as it is now.
            await self._ainfo()
        except ReflinkfsError as e:
            if e.is_("not-found", "no-such-volume"):
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
            except ReflinkfsError as e:
                if e.is_("refused", "not-attached"):
                    self._device = None
                    return
                if not e.is_("busy", "device-in-use") or loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.2)

    # -- administration ----------------------------------------------------

    @_locked
    async def revert(self, revision=None):
        """Goes back to `revision` (default: the newest), which stays. On a
        running volume the revert is queued for its stop, whose writes are
        then dropped: qubesd does not refuse `qvm-volume revert` of a
        running qube, and this is what it can honestly mean."""
        reply = await self._acall("volume_revert", revision=revision)
        if reply.get("queued"):
            log.info("volume %s: revert to %s queued for its stop", self.vid,
                     reply.get("revision"))
        await self._ainfo()
        return self

    # -- beyond qubesd's API (issue 17): for dom0 tools and scripts --------

    @_locked
    async def pin_revision(self, revision, note=None):
        """Pins `revision`: no commit, revert or revisions_to_keep prunes
        it, and it does not count against revisions_to_keep."""
        fields = {"revision": str(revision)}
        if note is not None:
            fields["note"] = str(note)
        await self._acall("volume_pin", **fields)
        return self

    @_locked
    async def unpin_revision(self, revision):
        await self._acall("volume_unpin", revision=str(revision))
        return self

    @property
    def pinned_revisions(self):
        """{revision: note or None} of the pinned revisions."""
        revs = self._quick("volume_revisions")
        return {r["id"]: (r.get("pin") or {}).get("note") for r in revs if r.get("pin")}

    @_locked
    async def discard_changes(self):
        """The running volume's current run ends without a commit: at its
        stop it is as it was at the run's start. The qube runs on."""
        await self._acall("volume_discard_changes")
        return self

    @_locked
    async def cancel_pending(self):
        """Withdraws a queued discard or revert; True when one was queued."""
        reply = await self._acall("volume_cancel_pending")
        return bool(reply.get("cancelled"))

    @_locked
    async def resize(self, size):
        size = int(size)
        info = await self._ainfo()
        if size < int(info["size"]):
            raise ReflinkfsError(
                "{}: shrinking is not allowed (reflinkfs volume resize "
                "--allow-shrink does it, losing the data past the end)".format(self.vid),
                kind="refused")
        await self._acall("volume_resize", size=size)
        self._size = size
        return self

    async def export(self):
        """A path to read the committed data from: the mount's NAME.img,
        which shows the state from before a running VM started."""
        if not self.save_on_stop:
            raise NotImplementedError(
                "{}: only volumes saved on stop have data to export".format(self.vid))
        where = await in_thread(lambda: self.pool.mounted_at)
        return os.path.join(where, self.vid + ".img")

    async def export_end(self, path):
        pass

    @_locked
    async def import_data(self, size):
        """A sparse file of `size` bytes, reading as zeros, for qubesd to
        write the data into in place; nothing changes until
        import_data_end(True). An import of this process that was never
        ended (its Import script died) is dropped by the daemon and begun
        anew; one of a qubesd that is gone, the daemon has dropped."""
        if not self.save_on_stop:
            raise ReflinkfsError(
                "{}: only volumes saved on stop take imported data".format(self.vid),
                kind="refused")
        begun = await self._acall("volume_import_begin", size=int(size))
        return begun["path"]

    @_locked
    async def import_data_end(self, success):
        await self._acall("volume_import_end", success=bool(success))
        await self._ainfo()

    @_locked
    async def import_volume(self, src_volume):
        """Copies another volume's committed data in: by reflink from this
        pool (or another pool on the same filesystem), else a sparse copy."""
        if not self.save_on_stop:
            return self
        if isinstance(src_volume, ReflinkfsVolume) and src_volume.pool is self.pool:
            await self._acall("volume_clone", vid=None, src=src_volume.vid, dst=self.vid)
            await self._ainfo()
            return self
        path = await _maybe(src_volume.export())
        try:
            try:
                data = open(path, "rb")  # pylint: disable=consider-using-with
            except OSError as e:
                raise wrap(e, "{}: reading {}".format(self.vid, path)) from e
            with data:
                size = os.fstat(data.fileno()).st_size or int(src_volume.size)
                # A data copy: as long as it takes (in the executor).
                await self._acall("volume_import", fd=data.fileno(), size=size, timeout=None,
                                  source="{} of pool {}".format(src_volume.vid,
                                                                src_volume.pool))
        finally:
            await _maybe(src_volume.export_end(path))
        await self._ainfo()
        return self


def _revisions_of(revs):
    return {r["id"]: r["timestamp"].rstrip("Z") for r in revs}
