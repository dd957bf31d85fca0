"""A server process's start-up and shutdown work, run once under any ASGI server.

Start-up: the layer's own work (`ServiceLayer.start_process`: on Redis the process marks itself
live and removes state of dead processes, layers/redis_presence.py), then its fan-out with its loops, and the
loop keeping the node's connection counts (connlimit.py). It waits a bounded time for the layer
(AWX_WS_STARTUP_LAYER_WAIT) with one warning when the wait starts, never a crash loop (AWX #8696).

Who runs it:
- `python -m awx_ws.server` (and uvicorn, hypercorn...) send ASGI lifespan: start-up runs before
  the server listens; if it fails the server exits with the reason.
- a worker process that a server's master spawned (hypercorn's, uvicorn's with --workers) ends
  with its master (master_watch.py): it does not stay behind, alive, when the master is killed.
  It fails no lifespan either: it keeps running and retries as below, since hypercorn 0.18's
  master exits 0 when its worker fails (`run()` loses the worker's exit code), so a supervisor
  would never restart it.
- plain `daphne` sends no lifespan: the router starts the work when daphne's reactor starts
  (daphne_hooks.when_server_runs), and every websocket and stream waits for it before it is
  accepted. If the wait runs out the process keeps running: it refuses those connections while
  a supervised loop retries the start-up, and serves once the layer is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from channels.layers import get_channel_layer

from awx_ws.main import connlimit, master_watch, revocation, topology
from awx_ws.main.conf import deprecated_in_use, ws_settings
from awx_ws.main.exceptions import LayerUnavailable, StartupError
from awx_ws.main.layers import service_layer
from awx_ws.main.retry import spawn

logger = logging.getLogger(__name__)


async def start_process(wait: float | None) -> None:
    """The start-up work on this process's channel layer; StartupError when it cannot be done
    within `wait` seconds (None: one attempt)."""
    given: Any = get_channel_layer()
    layer = service_layer(given)
    if layer is None:
        # channels_rabbitmq's layer made by sync code first is a send-only stand-in here.
        hint = getattr(given, "startup_hint", None) or "use CHANNEL_LAYER_BACKEND"
        raise StartupError(f"CHANNEL_LAYERS names {type(given).__name__}: {hint}")
    await layer.start_process(wait)
    try:
        await topology.refuse_relay_on_shared_layer(layer, f"daphne pid {os.getpid()}")
    except LayerUnavailable as exc:  # Redis lost just after it answered: a start-up failure like any
        raise StartupError(f"could not check which nodes share the channel layer: {exc}") from exc
    keeper = layer.connection_counts.keep_synced(connlimit.counter)
    if keeper is not None:
        layer.fanout.adopt(keeper)


class Startup:
    """This process's start-up, done once and shared by whoever asks (lifespan, the reactor's
    start, the first connection), and its shutdown."""

    def __init__(self) -> None:
        self._task: asyncio.Future[None] | None = None
        self._retrying: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.done = False
        self.failure: StartupError | None = None

    async def run(self) -> None:
        """Do the start-up work (once; concurrent callers share it); StartupError if it failed."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        for line in deprecated_in_use():
            logger.warning("%s", line)
        try:
            await start_process(ws_settings.STARTUP_LAYER_WAIT)
        except StartupError as exc:
            self.failure = exc
            raise
        except Exception as exc:  # a bug: the server must not half-start either way
            logger.exception("start-up failed unexpectedly")
            self.failure = StartupError(f"start-up failed: {exc!r}")
            raise self.failure from exc
        self._started("process %s start-up complete")

    def _started(self, line: str) -> None:
        self.done, self.failure = True, None
        logger.info(line, os.getpid())
        self._watch_master()

    def _watch_master(self) -> None:
        """Under a server's master, end with it (master_watch.py): once started, and as soon as
        a first start-up failed, since the worker then stays up retrying, holding the port."""
        if master_watch.master() is not None and self._watch is None:
            self._watch = spawn("master watch", self._end_with_master, metric="master_watch")

    async def _end_with_master(self, failures: int) -> None:
        await master_watch.end_with_master(self.stop)
        await asyncio.Event().wait()  # the process is ending: nothing more to do

    def begin(self) -> None:
        """Start the work in the background (no lifespan); a failure is retried, not fatal."""
        if self._task is not None:
            return
        self._task = asyncio.ensure_future(self._run())
        self._task.add_done_callback(self._after_first_attempt)

    def _after_first_attempt(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.keep_trying(task.exception())

    def keep_trying(self, failure: BaseException | None) -> None:
        """After a failed start-up: keep running, refusing websockets and streams, while a
        supervised loop retries it (no exit, so no crash loop: AWX #8696)."""
        logger.error(
            "process %s cannot start: %s; refusing websockets and streams while retrying",
            os.getpid(),
            failure,
        )
        self._retrying = spawn("start-up", self._retry, metric="startup")
        self._watch_master()

    async def _retry(self, failures: int) -> None:
        await start_process(None)
        self._started("process %s start-up complete: the channel layer is reachable again")
        await asyncio.Event().wait()  # done: nothing more to do until cancelled

    async def ready(self) -> bool:
        """Wait for the start-up to finish; False if it failed (the caller refuses the connection)."""
        if self.done:
            return True
        self.begin()
        if self.failure is None and self._task is not None:
            try:
                await asyncio.shield(self._task)
            except StartupError:
                pass
        return self.done

    async def stop(self) -> None:
        """Stop the loops, withdraw this process's memberships and liveness record (once; best
        effort)."""
        ours = [t for t in (self._retrying, self._task, self._watch) if t is not None]
        # The master watch stops the process itself: it must not cancel its own stop.
        unfinished = [t for t in ours if t is not asyncio.current_task() and not t.done()]
        for task in unfinished:
            task.cancel()  # a start-up finishing now would write its state again
        await asyncio.gather(*unfinished, return_exceptions=True)
        if not self.done:
            return
        self.done = False
        await revocation.watcher.stop()
        layer: Any = get_channel_layer()
        await layer.stop_process()
