"""The RabbitMQ layer for code without an event loop: one emit loop thread per process
(BlockingEmitter), and the send-only layer sync code gets from get_channel_layer()
(SyncProducerLayer). channels_rabbitmq binds a layer to the loop that made it (rabbitmq.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import channel_layers
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import BrokerUnavailable, redact_url
from awx_ws.main.layers.base import service_layer

logger = logging.getLogger(__name__)

T = TypeVar("T")


class BrokerLayer(Protocol):
    """What the emitter uses of the RabbitMQ layer (rabbitmq.py, which imports this module)."""

    service: str

    def describe_hosts(self) -> str: ...

    async def connected(self) -> Any: ...

    async def group_send(self, group: str, message: dict[str, Any]) -> None: ...

    async def group_send_many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> None: ...

    async def send(self, channel: str, message: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


def broker_unavailable(exc: BaseException, where: Callable[[], str]) -> BrokerUnavailable:
    """exc (a lost or refused connection, or a timeout) as BrokerUnavailable naming where (the
    RABBITMQ_URL the failing layer uses); one that already says where is kept."""
    if isinstance(exc, BrokerUnavailable) and exc.where:
        return exc
    return BrokerUnavailable(str(exc), where=where(), timed_out=isinstance(exc, TimeoutError))


class BlockingEmitter:
    """Sync callers' way to a RabbitMQ layer: one event-loop thread per process, one layer on it.

    channels_rabbitmq binds a layer to the loop that created it, and sync code (gunicorn workers,
    `manage.py emit`) has none; AWX created a loop per call. Here a daemon thread runs one loop for
    the life of the process and callers hand it coroutines. A forked child starts its own.
    """

    service = "RabbitMQ"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._layer: BrokerLayer | None = None

    def _started(self) -> tuple[asyncio.AbstractEventLoop, BrokerLayer]:
        with self._lock:
            if self._loop is None or self._layer is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                threading.Thread(target=_run_loop, args=(loop,), name="awx_ws-emit", daemon=True).start()
                try:
                    self._layer = asyncio.run_coroutine_threadsafe(_make_layer(), loop).result()
                except BaseException:
                    loop.call_soon_threadsafe(loop.stop)  # no thread left behind per failed attempt
                    raise
                self._loop, self._pid = loop, os.getpid()
            return self._loop, self._layer

    def call(self, work: Callable[[BrokerLayer], Awaitable[T]], timeout: float) -> T:
        """Run work(layer) on the emitter's loop; TimeoutError after timeout seconds."""
        loop, layer = self._started()

        async def bounded() -> T:
            async with asyncio.timeout(timeout):
                return await work(layer)

        future = asyncio.run_coroutine_threadsafe(bounded(), loop)
        try:
            return future.result(timeout + 1.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer from the emit loop within {timeout:g}s") from None

    async def call_async(self, work: Callable[[BrokerLayer], Awaitable[T]], timeout: float) -> T:
        """call() for async code on another loop: awaits the emit loop instead of blocking."""
        loop, layer = await asyncio.to_thread(self._started)

        async def bounded() -> T:
            async with asyncio.timeout(timeout):
                return await work(layer)

        future = asyncio.run_coroutine_threadsafe(bounded(), loop)
        try:
            # Bounded here too: an emit loop stopped meanwhile (reset()) would never answer.
            async with asyncio.timeout(timeout + 1.0):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            future.cancel()
            raise

    def describe_hosts(self) -> str:
        """The broker address of the emit loop's layer (password redacted), naming RABBITMQ_URL."""
        return self._started()[1].describe_hosts()

    def ping(self, timeout: float) -> None:
        """Wait until the emit loop's layer is connected; BrokerUnavailable or TimeoutError if not."""
        self.call(lambda layer: layer.connected(), timeout)

    def reset(self) -> None:
        """Forget the loop and its layer (settings changed); the next call starts anew."""
        with self._lock:
            loop, layer = self._loop, self._layer
            self._loop = self._layer = None
        if loop is not None and layer is not None and self._pid == os.getpid():
            try:
                asyncio.run_coroutine_threadsafe(layer.close(), loop).result(5)
            except Exception as exc:  # it is being thrown away either way
                logger.debug("closing the emit loop's layer failed: %s", exc)
            loop.call_soon_threadsafe(loop.stop)


class SyncProducerLayer:
    """The RabbitMQ layer as code without an event loop gets it from get_channel_layer().

    Only producing works here: group_send and send run on the process's emit loop thread
    (BlockingEmitter), from whatever loop awaits them (async_to_sync makes one per call).
    Receiving needs a layer inside the server's event loop, and says so.
    """

    service = "RabbitMQ"
    keeps_history = False
    extensions = ["groups"]
    # Why a server process must not have this layer (startup.py says so).
    startup_hint = (
        "this process's RabbitMQ layer was made by sync code before the server started it, "
        "and can only send: call get_channel_layer() from async code in a server process"
    )

    def __init__(self, **config: Any) -> None:
        self.config = config

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Publish to group through the emit loop; BrokerUnavailable or TimeoutError when it cannot."""
        await blocking_emitter.call_async(
            lambda layer: layer.group_send(group, message), ws_settings.EMIT_TIMEOUT
        )

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send to one channel through the emit loop."""
        await blocking_emitter.call_async(
            lambda layer: layer.send(channel, message), ws_settings.EMIT_TIMEOUT
        )

    def describe_hosts(self) -> str:
        """The broker address (password redacted), naming RABBITMQ_URL."""
        return f"RABBITMQ_URL={redact_url(str(self.config.get('host', '')))}"

    def unavailable(self, exc: BaseException) -> BrokerUnavailable:
        """exc (a lost or refused connection, or a timeout) as BrokerUnavailable naming RABBITMQ_URL."""
        return broker_unavailable(exc, self.describe_hosts)

    def _consumer_only(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "this RabbitMQ layer was made outside an event loop, for sending only; receiving needs "
            "the layer of a running server (channels_rabbitmq binds a layer to its event loop)"
        )

    receive = new_channel = group_add = group_discard = flush = _consumer_only


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


async def _make_layer() -> BrokerLayer:
    layer = service_layer(channel_layers.make_backend(DEFAULT_CHANNEL_LAYER))
    if layer is None or layer.service != BlockingEmitter.service:
        raise ImproperlyConfigured("CHANNEL_LAYERS['default'] is no longer the RabbitMQ layer")
    return cast(BrokerLayer, layer)  # our RabbitMQ layer: it has all of BrokerLayer


blocking_emitter = BlockingEmitter()


def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "CHANNEL_LAYERS":
        blocking_emitter.reset()


setting_changed.connect(_reset)
