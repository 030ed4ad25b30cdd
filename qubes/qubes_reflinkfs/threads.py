"""The driver's own threads: blocking work (a socket request, a mount, a
wait for a VM's stop) runs off qubesd's event loop, on a pool of the
driver's, so that ten VMs stopping at once never take the workers that
qubesd's own calls (`asyncio.to_thread`, other drivers) need."""

import asyncio
import concurrent.futures

#: Enough for many volumes waiting at once; each thread mostly sleeps.
EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=32,
                                                 thread_name_prefix="reflinkfs")


async def in_thread(fn, *args):
    """Runs `fn(*args)` on the driver's threads and awaits its result."""
    return await asyncio.get_running_loop().run_in_executor(EXECUTOR, fn, *args)


def in_background(fn, *args):
    """Starts `fn(*args)` on the driver's threads without waiting for it."""
    return EXECUTOR.submit(fn, *args)
