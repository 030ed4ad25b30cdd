"""A qubesd extension (entry point `qubes.ext`): since Qubes 4.2, `qvm-pool
remove` does not call the pool's destroy(); this unmounts the mount the
driver made of a pool qubesd removed, once no other pool uses its
directory."""

import qubes.ext

from .pool import sweep_unused_mounts
from .threads import in_thread


class ReflinkfsExtension(qubes.ext.Extension):
    """Unmounts the mounts of removed reflinkfs pools."""

    @qubes.ext.handler("pool-delete", system=True)
    async def on_pool_delete(self, app, event, pool, **kwargs):
        # pylint: disable=unused-argument
        if getattr(pool, "driver", None) != "reflinkfs":
            return
        used = {p.dir_path for p in app.pools.values()
                if p is not pool and getattr(p, "driver", None) == "reflinkfs"}
        await in_thread(sweep_unused_mounts, used)
