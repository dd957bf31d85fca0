"""A server's worker process ends with its master (hypercorn by default, uvicorn --workers N).

hypercorn serves the application from a worker process that its master spawns through
multiprocessing (`workers = 1` by default; uvicorn does the same with --workers). The worker
learns of its master's shutdown only through an event the master sets: when the master dies
without setting it (`kill -9` of the pid the user started, the OOM killer), the worker lives on
as an orphan that holds the port, serves its clients and renews its liveness record. Its group
memberships are a live process's, so no start-up purge may remove them, and a new server cannot
bind the port.

multiprocessing gives each process it starts (with the spawn method, which hypercorn and uvicorn
use: with fork, sibling workers would inherit the pipe's writing end too) a sentinel of its parent
(`multiprocessing.parent_process().sentinel`): a pipe whose writing end only the parent holds, so
it reads as ready (end of file) once the parent is gone. The worker waits on it in its event loop
(no thread, no polling); when it fires, the worker withdraws its state (its memberships and
liveness record, as on a clean stop) and ends itself with SIGTERM: a server that handles SIGTERM
in its workers shuts down its own way (uvicorn closes each websocket with 1012), one that does
not (hypercorn's worker) ends at once, and its clients reconnect to the next server.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

# Seconds a worker whose master is gone gives its server's own shutdown before it ends itself.
EXIT_BOUND = 10.0


def master() -> multiprocessing.process.BaseProcess | None:
    """The process that started this one through multiprocessing (a server's master), or None."""
    return multiprocessing.parent_process()


async def master_gone(sentinel: int) -> None:
    """Return once the process whose sentinel this is has ended."""
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(sentinel, readable)
    try:
        await gone
    finally:
        loop.remove_reader(sentinel)


async def end_with_master(withdraw: Callable[[], Awaitable[None]]) -> None:
    """Under a master: wait for it to end, then withdraw (`withdraw()`) and end this process."""
    parent = master()
    if parent is None:
        return
    await master_gone(parent.sentinel)
    logger.warning(
        "the server's master process %s is gone: worker %s withdraws its state and stops "
        "(its clients reconnect to the next server)",
        parent.pid,
        os.getpid(),
    )
    # Whatever happens below, the process ends within the bound: uvicorn's graceful shutdown
    # waits, unbounded, for every open connection, and an event stream never ends by itself (its
    # clients would stay on a process that no longer delivers); a withdrawal may hang too. What
    # was not withdrawn by then goes with the next start-up's purge (the pid no longer runs).
    asyncio.get_running_loop().call_later(EXIT_BOUND, os._exit, 0)
    try:
        await withdraw()
    finally:
        signal.raise_signal(signal.SIGTERM)
