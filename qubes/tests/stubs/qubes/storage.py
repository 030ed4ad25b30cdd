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


class Storage:
    """A VM's volumes, driven in the order qubesd drives them: written from
    the storage API documentation's description of qubesd's flows (VM
    start: verify every volume, then start them all at once; stop: all at
    once; removal: stop, then remove each; clone: create, then import the
    source's data)."""

    def __init__(self, vm):
        self.vm = vm
        for name, conf in vm.volume_config.items():
            self.init_volume(name, conf)

    def init_volume(self, name, config):
        config.setdefault("name", name)
        if "source" in config:
            if config["source"] is None:
                # A snapshot's source is its template's volume of the same
                # name, down the chain (DispVM -> AppVM -> TemplateVM).
                template = self.vm.template
                while template is not None:
                    source = template.volumes[name]
                    config["source"] = source
                    config["pool"] = source.pool
                    config["size"] = source.size
                    if source.source is None:
                        break
                    template = template.template
            elif isinstance(config["source"], str):
                pool = self.vm.app.get_pool(config["pool"])
                config["source"] = pool.volumes[config["source"]]
        if "pool" not in config:
            config["pool"] = self.vm.app.default_pool
        pool = self.vm.app.get_pool(config["pool"])
        volume = pool.init_volume(self.vm, dict(config))
        self.vm.volumes[name] = volume
        return volume

    async def create(self):
        await asyncio.gather(*(v.create() for v in self.vm.volumes.values()))

    async def verify(self):
        await asyncio.gather(*(v.verify() for v in self.vm.volumes.values()))
        return True

    async def start(self):
        await asyncio.gather(*(v.start() for v in self.vm.volumes.values()))

    async def stop(self):
        await asyncio.gather(*(v.stop() for v in self.vm.volumes.values()))

    async def remove(self):
        """Errors are logged, not raised (qubesd removes the VM from
        qubes.xml first): they are returned here for the tests to see."""
        errors = []
        try:
            await self.stop()
        except (IOError, OSError) as e:
            errors.append(e)
        for v in list(self.vm.volumes.values()):
            try:
                await v.remove()
            except Exception as e:  # pylint: disable=broad-except
                errors.append(e)
        return errors

    async def clone_volume(self, src_vm, name):
        config = self.vm.volume_config[name]
        pool = self.vm.app.get_pool(config["pool"])
        dst = pool.init_volume(self.vm, dict(config))
        await dst.create()
        await dst.import_volume(src_vm.volumes[name])
        self.vm.volumes[name] = dst
        return dst

    async def clone(self, src_vm):
        self.vm.volumes = {}
        await asyncio.gather(*(self.clone_volume(src_vm, n) for n in self.vm.volume_config))

    async def import_data(self, name, size):
        volume = self.vm.volumes[name]
        return await volume.import_data(volume.size if size is None else size)

    async def import_data_end(self, name, success):
        return await self.vm.volumes[name].import_data_end(success=success)

    def block_devices(self):
        for v in self.vm.volumes.values():
            yield v.block_device()
