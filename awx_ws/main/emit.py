"""Emit a notification to every subscriber of a group, from sync or async code."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any

from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.module_loading import import_string
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from awx_ws.main import metrics
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import BrokerUnavailable, EmitError, RedisUnavailable
from awx_ws.main.layers import RedisChannelLayer
from awx_ws.main.protocol import validate_group_name
from awx_ws.main.rabbitmq import RabbitmqChannelLayer, blocking_emitter

logger = logging.getLogger(__name__)


def build_message(group: str, payload: Any) -> dict[str, str]:
    """The channel-layer message for payload: its JSON serialised once, as AWX's consumers expect.

    Exactly what AWX sends, `{"type": "internal.message", "text": ...}`; the layer adds the group
    when it sends (layers.with_group), as it does for any producer's group_send.
    """
    validate_group_name(group)
    return {"type": "internal.message", "text": json.dumps(payload, cls=DjangoJSONEncoder)}


def _unavailable(exc: BaseException, group: str, layer: Any, timeout: float) -> EmitError:
    """Our error for a failed emit, naming the setting or the address at fault."""
    service = getattr(layer, "service", "Redis")
    error = BrokerUnavailable if service == "RabbitMQ" else RedisUnavailable
    where = layer.describe_hosts() if hasattr(layer, "describe_hosts") else type(layer).__name__
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return error(
            f"emit to {group!r} took longer than {timeout:g}s (AWX_WS_EMIT_TIMEOUT); "
            f"is {service} up at {where}?"
        )
    return error(f"emit to {group!r} failed, {service} at {where}: {exc}")


async def _group_send(layer: BaseChannelLayer, group: str, message: dict[str, str]) -> None:
    timeout = ws_settings.EMIT_TIMEOUT
    try:
        async with asyncio.timeout(timeout):
            await layer.group_send(group, message)
    except (TimeoutError, RedisError, OSError) as exc:
        metrics.REDIS_ERRORS.labels("emit").inc()
        raise _unavailable(exc, group, layer, timeout) from exc


async def aemit_channel_notification(group: str, payload: Any) -> None:
    """Send payload to every subscriber of group; raises EmitError within EMIT_TIMEOUT on failure."""
    await _group_send(get_channel_layer(), group, build_message(group, payload))


def uses_rabbitmq() -> bool:
    """True when CHANNEL_LAYERS names the RabbitMQ layer (which sync code must not instantiate)."""
    return _is_rabbitmq(settings.CHANNEL_LAYERS[DEFAULT_CHANNEL_LAYER]["BACKEND"])


@functools.cache  # asked on every sync emit: resolve each backend path once
def _is_rabbitmq(backend_path: str) -> bool:
    backend = import_string(backend_path)
    return isinstance(backend, type) and issubclass(backend, RabbitmqChannelLayer)


def emit_channel_notification(group: str, payload: Any) -> None:
    """Send payload to every subscriber of group, from any thread without a running event loop.

    Raises InvalidGroupName for a bad group and EmitError (RedisUnavailable, BrokerUnavailable)
    within AWX_WS_EMIT_TIMEOUT per round trip when the layer cannot take the message. On Redis it
    runs in the calling thread on a pooled blocking connection: no event loop, no thread hop, no
    new connection per call (AWX created an event loop per call). On RabbitMQ it hands the publish
    to the process's one emit loop thread (rabbitmq.BlockingEmitter).
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
    timeout = ws_settings.EMIT_TIMEOUT
    if uses_rabbitmq():
        try:
            blocking_emitter.call(lambda rabbitmq: rabbitmq.group_send(group, message), timeout)
        except (TimeoutError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("emit").inc()
            raise _unavailable(exc, group, blocking_emitter, timeout) from exc
        return
    layer = get_channel_layer()
    if not isinstance(layer, RedisChannelLayer):
        raise EmitError(
            "emit_channel_notification() needs one of awx_ws's channel layers (CHANNEL_LAYER_BACKEND)"
        )
    try:
        layer.group_send_blocking(group, message, timeout)
    except (RedisError, OSError) as exc:
        metrics.REDIS_ERRORS.labels("emit").inc()
        raise _unavailable(exc, group, layer, timeout) from exc
