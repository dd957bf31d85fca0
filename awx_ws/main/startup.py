"""A server process's start-up and shutdown work, run once under any ASGI server.

Start-up: the process marks itself live, removes channel-layer state of dead processes (the
purge, liveness.py), and starts its fan-out with its loops. It waits a bounded time for the layer
(AWX_WS_STARTUP_REDIS_WAIT) with one warning when the wait starts, never a crash loop (AWX #8696).

Who runs it:
- `python -m awx_ws.server` (and uvicorn, hypercorn...) send ASGI lifespan: start-up runs before
  the server listens; if it fails the server exits with the reason.
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
from redis.exceptions import RedisError

from awx_ws.main import connlimit, metrics, revocation
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import RedisUnavailable, StartupError
from awx_ws.main.layers import RedisChannelLayer
from awx_ws.main.liveness import purge_stale_state
from awx_ws.main.rabbitmq import RabbitmqChannelLayer, SyncProducerLayer
from awx_ws.main.retry import Backoff, spawn

logger = logging.getLogger(__name__)


async def _start_redis(layer: RedisChannelLayer, wait: float | None) -> None:
    """Mark this process live, then purge state of dead ones; wait up to `wait` s for Redis
    (None: one attempt, RedisUnavailable if it fails)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (wait or 0.0)
    backoff = Backoff(0.25, 5.0)
    while True:
        try:
            try:
                await layer.liveness.start()
            except (RedisError, OSError) as exc:
                raise RedisUnavailable(f"{layer.describe_hosts()}: {exc}") from exc
            report = await purge_stale_state(layer)
            break
        except RedisUnavailable as exc:
            if wait is None:
                raise
            delay = backoff.next_delay()
            if loop.time() + delay > deadline:
                raise StartupError(
                    f"Redis unreachable for {wait:g}s (AWX_WS_STARTUP_REDIS_WAIT), "
                    f"{backoff.failures} attempts: {exc}"
                ) from exc
            if backoff.failures == 1:
                logger.warning("waiting up to %gs for Redis: %s", wait, exc)
            await asyncio.sleep(delay)
    metrics.PURGED.labels("memberships").inc(report.memberships)
    metrics.PURGED.labels("queues").inc(report.queues)
    metrics.PURGED.labels("records").inc(report.records)
    logger.info(
        "start-up purge: removed %d group memberships, %d message queues, %d records of %d dead processes",
        report.memberships,
        report.queues,
        report.records,
        len(report.dead_processes),
    )


async def _start_rabbitmq(layer: RabbitmqChannelLayer, wait: float | None) -> None:
    """Wait (bounded) for the broker; there is nothing to purge, which is logged and counted."""
    wait = layer.connect_wait if wait is None else wait
    try:
        async with asyncio.timeout(wait):
            await asyncio.shield(layer.carehare_connection)
    except TimeoutError as exc:
        setting = "AWX_WS_STARTUP_REDIS_WAIT" if wait == ws_settings.STARTUP_REDIS_WAIT else "one attempt"
        raise StartupError(
            f"RabbitMQ unreachable for {wait:g}s ({setting}) at {layer.describe_hosts()}"
        ) from exc
    metrics.PURGE_SKIPPED.inc()
    # Each process's queue is exclusive: RabbitMQ deletes it, and its bindings, when the
    # process's connection goes, so a killed daphne leaves nothing behind to remove.
    logger.info(
        "start-up purge skipped: the RabbitMQ layer keeps no state outside live connections (%s)",
        layer.describe_hosts(),
    )


async def start_process(wait: float | None) -> None:
    """The start-up work on this process's channel layer; StartupError when it cannot be done
    within `wait` seconds (None: one attempt)."""
    layer: Any = get_channel_layer()
    if isinstance(layer, SyncProducerLayer):
        raise StartupError(
            "this process's RabbitMQ layer was made by sync code before the server started it, "
            "and can only send: call get_channel_layer() from async code in a server process"
        )
    if isinstance(layer, RabbitmqChannelLayer):
        await _start_rabbitmq(layer, wait)
    elif isinstance(layer, RedisChannelLayer):
        await _start_redis(layer, wait)
    else:
        raise StartupError(f"CHANNEL_LAYERS names {type(layer).__name__}: use CHANNEL_LAYER_BACKEND")
    try:
        await layer.fanout.start()
    except (RedisError, OSError) as exc:
        raise StartupError(f"the fan-out could not start on {layer.describe_hosts()}: {exc}") from exc
    if isinstance(layer, RedisChannelLayer):
        layer.fanout.adopt(connlimit.keep_counted(layer))
    else:
        layer.fanout.adopt(connlimit.keep_alive_in_database())


class Startup:
    """This process's start-up, done once and shared by whoever asks (lifespan, the reactor's
    start, the first connection), and its shutdown."""

    def __init__(self) -> None:
        self._task: asyncio.Future[None] | None = None
        self._retrying: asyncio.Task[None] | None = None
        self.done = False
        self.failure: StartupError | None = None

    async def run(self) -> None:
        """Do the start-up work (once; concurrent callers share it); StartupError if it failed."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        try:
            await start_process(ws_settings.STARTUP_REDIS_WAIT)
        except StartupError as exc:
            self.failure = exc
            raise
        except Exception as exc:  # a bug: the server must not half-start either way
            logger.exception("start-up failed unexpectedly")
            self.failure = StartupError(f"start-up failed: {exc!r}")
            raise self.failure from exc
        self.done = True
        logger.info("process %s start-up complete", os.getpid())

    def begin(self) -> None:
        """Start the work in the background (no lifespan); a failure is retried, not fatal."""
        if self._task is not None:
            return
        self._task = asyncio.ensure_future(self._run())
        self._task.add_done_callback(self._after_first_attempt)

    def _after_first_attempt(self, task: asyncio.Future[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        logger.error(
            "daphne pid %s cannot start: %s; refusing websockets and streams while retrying",
            os.getpid(),
            task.exception(),
        )
        self._retrying = spawn("start-up", self._retry, metric="startup")

    async def _retry(self, failures: int) -> None:
        await start_process(None)
        self.done, self.failure = True, None
        logger.info("process %s start-up complete: the channel layer is reachable again", os.getpid())
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
        unfinished = [t for t in (self._retrying, self._task) if t is not None and not t.done()]
        for task in unfinished:
            task.cancel()  # a start-up finishing now would write its state again
        await asyncio.gather(*unfinished, return_exceptions=True)
        if not self.done:
            return
        self.done = False
        await revocation.watcher.stop()
        layer: Any = get_channel_layer()
        await layer.fanout.stop()
        if isinstance(layer, RedisChannelLayer):
            await layer.liveness.stop()
        elif isinstance(layer, RabbitmqChannelLayer):
            await connlimit.counter.withdraw()
            await layer.close()
