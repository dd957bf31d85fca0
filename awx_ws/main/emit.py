"""Emit a notification to every subscriber of a group, from sync or async code."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
from typing import Any

from channels.layers import (
    DEFAULT_CHANNEL_LAYER,
    BaseChannelLayer,
    channel_layers,
    get_channel_layer,
)
from django.core.serializers.json import DjangoJSONEncoder
from redis.exceptions import RedisError

from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import EmitError, RedisUnavailable
from awx_ws.main.protocol import validate_group_name

logger = logging.getLogger(__name__)


def build_message(group: str, payload: Any) -> dict[str, str]:
    """The channel-layer message for payload: its JSON serialised once, as AWX's consumers expect.

    `group` rides along so a BroadcastConsumer, which receives it as a group member, knows which
    group to name when it forwards the message to a peer node.
    """
    validate_group_name(group)
    return {"type": "internal.message", "text": json.dumps(payload, cls=DjangoJSONEncoder), "group": group}


def _describe(layer: BaseChannelLayer) -> str:
    describe = getattr(layer, "describe_hosts", None)
    return describe() if describe else str(layer)


async def _group_send(layer: BaseChannelLayer, group: str, message: dict[str, str]) -> None:
    timeout = ws_settings.EMIT_TIMEOUT
    try:
        await asyncio.wait_for(layer.group_send(group, message), timeout)
    except TimeoutError as exc:
        raise RedisUnavailable(
            f"emit to {group!r} took longer than {timeout:g}s (AWX_WS_EMIT_TIMEOUT); "
            f"is Redis up at {_describe(layer)}?"
        ) from exc
    except (RedisError, OSError) as exc:
        raise RedisUnavailable(f"emit to {group!r} failed, Redis at {_describe(layer)}: {exc}") from exc


async def aemit_channel_notification(group: str, payload: Any) -> None:
    """Send payload to every subscriber of group; raises EmitError within EMIT_TIMEOUT on failure."""
    await _group_send(get_channel_layer(), group, build_message(group, payload))


class _Emitter:
    """One event loop in a daemon thread with its own channel layer, shared by a process's sync callers.

    asgiref's async_to_sync would start a fresh loop, hence fresh Redis connections, on every
    call from plain sync code (AWX's emit did the same with new_event_loop); this keeps one of each.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
        self.thread = threading.Thread(target=self._run, name="awx-ws-emit", daemon=True)

    def start(self) -> _Emitter:
        """Start the loop thread."""
        self.thread.start()
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def send(self, group: str, message: dict[str, str]) -> None:
        """Run one group_send on the emitter loop and wait for it."""
        future = asyncio.run_coroutine_threadsafe(_group_send(self.layer, group, message), self.loop)
        try:
            # _group_send enforces EMIT_TIMEOUT itself; the margin covers a stalled loop.
            future.result(ws_settings.EMIT_TIMEOUT + 1.0)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise RedisUnavailable(f"emit to {group!r} did not finish within AWX_WS_EMIT_TIMEOUT") from exc


_emitter: _Emitter | None = None
_emitter_lock = threading.Lock()


def _get_emitter() -> _Emitter:
    global _emitter
    with _emitter_lock:
        # A forked child (gunicorn worker, multiprocessing) inherits no running thread: start anew.
        if _emitter is None or _emitter.pid != os.getpid():
            _emitter = _Emitter().start()
        return _emitter


def emit_channel_notification(group: str, payload: Any) -> None:
    """Send payload to every subscriber of group, from any thread without a running event loop.

    Raises InvalidGroupName for a bad group and EmitError (RedisUnavailable) within
    AWX_WS_EMIT_TIMEOUT when Redis cannot take the message.
    """
    message = build_message(group, payload)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise EmitError(
            "emit_channel_notification() blocks; inside a running event loop await "
            "aemit_channel_notification() instead"
        )
    _get_emitter().send(group, message)
