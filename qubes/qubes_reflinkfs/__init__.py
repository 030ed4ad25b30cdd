"""The Qubes OS storage driver for reflinkfs pools.

qubesd manages every volume through a storage driver: a `qubes.storage.Pool`
subclass registered under the `qubes.storage` entry point (here, the driver
`reflinkfs`). This one keeps the volumes in a reflinkfs pool directory
(`dir_path`) and asks the pool's daemon for everything, over its control
socket (doc/CONTROL.md), never by reading the CLI's text. Xen attaches each
volume's `NAME-dirty.img` from the pool's mount (`mountpoint`): the loop
device's open starts the volume (a reflink snapshot), its last close
commits it.

    qvm-pool add vmpool reflinkfs -o dir_path=/var/lib/qubes-reflinkfs

The driver needs nothing beyond the standard library and qubesd's own
`qubes` package.
"""

from .pool import ReflinkfsPool
from .volume import ReflinkfsVolume

__all__ = ["ReflinkfsPool", "ReflinkfsVolume"]
