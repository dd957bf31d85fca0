"""Emit a notification to every subscriber of a group, from sync or async code."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Iterable
from typing import Any

from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils.module_loading import import_string

from awx_ws.main import metrics
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import BatchEmitError, EmitError, LayerUnavailable
from awx_ws.main.history import SHARE_KEY, validate_share
from awx_ws.main.layers import ServiceLayer, service_layer, service_layer_class
from awx_ws.main.messages import without_share
from awx_ws.main.protocol import validate_group_name

logger = logging.getLogger(__name__)


def build_message(group: str, payload: Any, share: str | None = None) -> dict[str, str]:
    """The channel-layer message for payload: its JSON serialised once, as AWX's consumers expect.

    Exactly what AWX sends, `{"type": "internal.message", "text": ...}`; the layer adds the group
    when it sends (layers.with_group), as it does for any producer's group_send. share names the
    history share the group's history counts against (history.history_share; an organization,
    `org-<id>`): our layers take it off before members receive the message (with_group).
    """
    validate_group_name(group)
    message = {"type": "internal.message", "text": json.dumps(payload, cls=DjangoJSONEncoder)}
    if share is not None:
        message[SHARE_KEY] = validate_share(share)
    return message


def _emit_error(exc: LayerUnavailable, group: str, timeout: float) -> LayerUnavailable:
    """Our error for a failed emit, naming the setting or the address at fault."""
    if exc.timed_out:
        message = (
            f"emit to {group!r} took longer than {timeout:g}s (AWX_WS_EMIT_TIMEOUT); "
            f"is {exc.service} up at {exc.where}?"
        )
    else:
        message = f"emit to {group!r} failed, {exc.service} at {exc.where}: {exc}"
    return type(exc)(message, where=exc.where, timed_out=exc.timed_out)


async def _group_send(layer: BaseChannelLayer, group: str, message: dict[str, str]) -> None:
    timeout = ws_settings.EMIT_TIMEOUT
    if service_layer(layer) is None:  # another package's layer: the share means nothing to it
        message = without_share(message)
    try:
        async with asyncio.timeout(timeout):
            await layer.group_send(group, message)
    except (TimeoutError, OSError) as exc:  # LayerUnavailable is an OSError
        metrics.layer_error("emit")
        # Our layers, and the send-only RabbitMQ layer sync code gets, say where they failed.
        unavailable = getattr(layer, "unavailable", None)
        if unavailable is None:
            raise EmitError(f"emit to {group!r} failed on {type(layer).__name__}: {exc!r}") from exc
        raise _emit_error(unavailable(exc), group, timeout) from exc


async def aemit_channel_notification(group: str, payload: Any, *, share: str | None = None) -> None:
    """Send payload to every subscriber of group; raises EmitError within EMIT_TIMEOUT on failure."""
    await _group_send(get_channel_layer(), group, build_message(group, payload, share))


def layer_class() -> type[ServiceLayer] | None:
    """The class CHANNEL_LAYERS names for the default layer, if it is one of ours (sync code must
    not make the RabbitMQ layer, so the class is asked, not an instance)."""
    return _service_layer(settings.CHANNEL_LAYERS[DEFAULT_CHANNEL_LAYER]["BACKEND"])


@functools.cache  # asked on every sync emit: resolve each backend path once
def _service_layer(backend_path: str) -> type[ServiceLayer] | None:
    return service_layer_class(import_string(backend_path))


def _sync_backend(caller: str) -> type[ServiceLayer]:
    """The layer class a sync emit uses; EmitError when called inside an event loop (it blocks),
    or when the default layer is not one of ours."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise EmitError(f"{caller}() blocks; inside a running event loop await a{caller}() instead")
    backend = layer_class()
    if backend is None:
        raise EmitError(f"{caller}() needs one of awx_ws's channel layers (CHANNEL_LAYER_BACKEND)")
    return backend


def emit_channel_notification(group: str, payload: Any, *, share: str | None = None) -> None:
    """Send payload to every subscriber of group, from any thread without a running event loop.

    Raises InvalidGroupName for a bad group and EmitError (RedisUnavailable, BrokerUnavailable)
    within AWX_WS_EMIT_TIMEOUT per round trip when the layer cannot take the message. On Redis it
    runs in the calling thread on a pooled blocking connection: no event loop, no thread hop, no
    new connection per call (AWX created an event loop per call). On RabbitMQ it hands the publish
    to the process's one emit loop thread (layers/rabbitmq_sync.BlockingEmitter). share: the
    history share of the group (build_message), by default its kind.
    """
    message = build_message(group, payload, share)
    backend = _sync_backend("emit_channel_notification")
    timeout = ws_settings.EMIT_TIMEOUT
    try:
        backend.send_blocking(group, message, timeout)
    except LayerUnavailable as exc:
        metrics.layer_error("emit")
        raise _emit_error(exc, group, timeout) from exc


def _built(messages: Iterable[tuple[str, Any]], share: str | None) -> list[tuple[str, dict[str, str]]]:
    """Every message built (and its group checked) before any is sent: a bad one sends nothing."""
    return [(group, build_message(group, payload, share)) for group, payload in messages]


async def aemit_channel_notifications(
    messages: Iterable[tuple[str, Any]], *, share: str | None = None
) -> None:
    """Send each (group, payload) in order, as one batch: one round trip on Redis (AWX's callback
    receiver saves events in bulk, then emits each). BatchEmitError within AWX_WS_EMIT_TIMEOUT
    when it fails, saying which messages were sent, which not and which may have been."""
    built = _built(messages, share)
    if not built:
        return
    given = get_channel_layer()
    layer = service_layer(given)
    try:
        async with asyncio.timeout(ws_settings.EMIT_TIMEOUT):
            if layer is not None:
                await layer.group_send_many(built)
            else:  # another package's layer: Channels' API, one message at a time
                await _send_each(given, built)
    except BatchEmitError:
        metrics.layer_error("emit")
        raise
    except TimeoutError as exc:
        metrics.layer_error("emit")
        cause = layer.unavailable(exc) if layer is not None else LayerUnavailable(str(exc), timed_out=True)
        raise BatchEmitError(cause, sent=[], unsent=[], unknown=list(range(len(built)))) from exc


async def _send_each(layer: BaseChannelLayer, built: list[tuple[str, dict[str, str]]]) -> None:
    for index, (group, message) in enumerate(built):
        try:
            await layer.group_send(group, without_share(message))
        except OSError as exc:
            cause = LayerUnavailable(f"{type(layer).__name__}: {exc!r}")
            raise BatchEmitError(
                cause, sent=list(range(index)), unsent=list(range(index + 1, len(built))), unknown=[index]
            ) from exc


def emit_channel_notifications(messages: Iterable[tuple[str, Any]], *, share: str | None = None) -> None:
    """emit_channel_notification for a batch, from any thread without a running event loop: in
    order, in one round trip on Redis; BatchEmitError when it fails (see the async twin)."""
    built = _built(messages, share)
    if not built:
        return
    backend = _sync_backend("emit_channel_notifications")
    try:
        backend.send_many_blocking(built, ws_settings.EMIT_TIMEOUT)
    except BatchEmitError:
        metrics.layer_error("emit")
        raise


def _emit_committed(messages: list[tuple[str, Any]], share: str | None) -> None:
    try:
        emit_channel_notifications(messages, share=share)  # one batch: one round trip on Redis
    except EmitError as exc:
        # The change is committed; the notifications are what is lost. Say so, loudly enough.
        groups = sorted({group for group, _ in messages})
        logger.error("notifications to %s not all delivered: %s", ", ".join(groups), exc)


def emit_on_commit(messages: list[tuple[str, Any]], share: str | None = None) -> None:
    """Emit messages, in order, as one batch after the current transaction commits; never if it
    rolls back. A failure is logged: the change stays committed and clients catch up over REST."""
    if messages:
        if share is not None:
            validate_share(share)  # a bad share fails now, in the caller's transaction
        transaction.on_commit(lambda: _emit_committed(messages, share))
