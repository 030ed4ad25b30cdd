"""The parts of `qubes.storage` a storage driver uses, as the public API
documentation describes them: the Pool and Volume base classes, the
BlockDevice a volume gives to libvirt, and StoragePoolException. For the
driver's tests only; written here, not copied from Qubes."""

import asyncio
import functools


class StoragePoolException(Exception):
    """A storage error, shown to the qubesd user as it is."""


class BlockDevice:
    """What a volume gives libvirt: the path Xen's block script attaches."""

    def __init__(self, path, name, script=None, rw=True, domain=None, devtype="disk"):
        assert path and name, "a block device has a path and a name"
        assert script is None, "block scripts are gone (Qubes 4.2)"
        self.path = path
        self.name = name
        self.script = script
        self.rw = rw
        self.domain = domain
        self.devtype = devtype


class Volume:
    """The base of a driver's volumes (see the storage API page)."""

    devtype = "disk"
    domain = None
    path = None
    usage = 0

    def __init__(self, name, pool, vid, *, revisions_to_keep=0, rw=False,
                 save_on_stop=False, size=0, snap_on_start=False, source=None,
                 ephemeral=None, **kwargs):
        super().__init__(**kwargs)
        assert isinstance(pool, Pool), "a volume's pool is a Pool"
        if snap_on_start and source is None:
            raise StoragePoolException("a snap_on_start volume needs a source")
        if source is not None and not snap_on_start:
            raise StoragePoolException("a source is only for snap_on_start volumes")
        self.name = str(name)
        self.pool = pool
        self.vid = vid
        self.revisions_to_keep = int(revisions_to_keep)
        self.rw = rw
        self.save_on_stop = save_on_stop
        self._size = int(size)
        self.snap_on_start = snap_on_start
        self.source = source
        self.ephemeral = ephemeral
        self._lock = None

    @staticmethod
    def locked(method):
        """Runs a coroutine method under the volume's own lock: qubesd
        starts and stops a VM's volumes concurrently."""

        @functools.wraps(method)
        async def wrapper(self, *args, **kwargs):
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                return await method(self, *args, **kwargs)

        return wrapper

    @property
    def size(self):
        return self._size

    @property
    def config(self):
        config = {
            "name": self.name,
            "pool": str(self.pool),
            "vid": self.vid,
            "revisions_to_keep": self.revisions_to_keep,
            "rw": self.rw,
            "save_on_stop": self.save_on_stop,
            "snap_on_start": self.snap_on_start,
        }
        if self.size:
            config["size"] = self.size
        if self.source is not None:
            config["source"] = self.source.vid
        return config

    def block_device(self):
        return BlockDevice(self.path, self.name, None, self.rw, self.domain, self.devtype)

    def __str__(self):
        return str(self.vid)

    def __repr__(self):
        return "{!r}:{!r}".format(str(self.pool), self.vid)


class Pool:
    """The base of a driver's pools (see the storage API page)."""

    def __init__(self, *, name, revisions_to_keep=1, ephemeral_volatile=False):
        self.name = name
        self.revisions_to_keep = revisions_to_keep
        self.ephemeral_volatile = ephemeral_volatile

    @property
    def volumes(self):
        return {v.vid: v for v in self.list_volumes()}

    def __str__(self):
        return self.name
