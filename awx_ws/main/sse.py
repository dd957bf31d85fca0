"""`GET /api/v2/stream/?groups=...`: the same messages as the websocket, as Server-Sent Events.

Served by daphne (an ASGI app, not a Django view: the stream lives as long as the client). Each
event's `id:` is the stream's position over all its groups (history.py), so a browser's
EventSource resumes by itself: it sends the last id back as `Last-Event-ID` when it reconnects.

Unlike the classic recipe (a Redis pub/sub connection per client, noticed dead only when a later
write fails), a stream holds no Redis connection of its own: it is one more subscriber of the
process's fan-out, and it lets go of everything as soon as daphne reports the disconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
from asyncio import FIRST_COMPLETED
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.sessions import CookieMiddleware, SessionMiddleware

from awx_ws.main import connlimit, metrics, protocol, revocation
from awx_ws.main.access import readable_job_ids
from awx_ws.main.audience import Viewer, viewer_of
from awx_ws.main.auth import authenticate_scope, header, session_expiry
from awx_ws.main.backlog import SlowReader, connection_transport
from awx_ws.main.conf import ws_settings
from awx_ws.main.history import (
    GroupPosition,
    PositionError,
    format_stream_position,
    parse_stream_position,
)
from awx_ws.main.stats import process_stats
from awx_ws.main.streams import Stream

logger = logging.getLogger(__name__)

STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Tell nginx not to buffer this response (the location says so too).
    (b"x-accel-buffering", b"no"),
]


class HttpError(Exception):
    """A refusal before the stream starts: status and DRF-style detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def requested_groups(query: dict[str, list[str]], user_id: int) -> protocol.SubscribeRequest:
    """`groups=jobs-status_changed,job_events-42` as a SubscribeRequest (same rules as websockets)."""
    names = [name for value in query.get("groups", []) for name in value.split(",") if name]
    if not names:
        raise HttpError(400, "groups: name at least one group, e.g. ?groups=jobs-status_changed")
    by_kind: dict[str, list[Any]] = {}
    for name in names:
        kind, sep, item = name.partition("-")
        if not sep or not item:
            raise HttpError(400, f"groups: {name!r} is not <kind>-<item>")
        by_kind.setdefault(kind, []).append(item)
    try:
        return protocol.parse_subscribe({"groups": by_kind}, user_id, ws_settings.MAX_GROUPS_PER_CONNECTION)
    except protocol.ProtocolError as exc:
        raise HttpError(400, f"groups: {exc}") from exc


def event_block(position: str, text: str, event: str | None = None) -> bytes:
    """One SSE event: optional `event:`, `id:` and the data, one `data:` line per text line."""
    lines = [f"event: {event}"] if event else []
    lines.append(f"id: {position}")
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


class EventStreamApp:
    """The ASGI application behind /api/v2/stream/."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Authenticate, check access, replay what was missed, then stream until the client goes."""
        try:
            scope, user, groups, recover = await self._admit(scope)
        except HttpError as exc:
            await _refuse(send, exc)
            return
        layer = get_channel_layer()
        if not await connlimit.counter.acquire(layer, user.pk):
            limit = ws_settings.MAX_CONNECTIONS_PER_USER
            logger.info(
                "stream of user %s refused: AWX_WS_MAX_CONNECTIONS_PER_USER (%d) open", user.pk, limit
            )
            await _refuse(send, HttpError(403, f"too many open connections: at most {limit} per user"))
            return
        try:
            await self._serve(scope, user, groups, recover, receive, send)
        finally:
            # Shielded: daphne cancels a stream whose client went away, and the count must go.
            await asyncio.shield(connlimit.counter.release(layer, user.pk))

    async def _serve(
        self,
        scope: dict[str, Any],
        user: Any,
        groups: set[str],
        recover: dict[str, GroupPosition],
        receive: Any,
        send: Any,
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        slow_reader = SlowReader(connection_transport(scope), f"cutting off slow stream of user {user.pk} at")

        async def send_event(group: str, text: str, message_id: str | None, position: Any) -> None:
            if slow_reader.cut_off:
                return
            # The id covers every group of the stream, so a reconnect resumes all of them.
            body = event_block(format_stream_position(stream.positions), text)
            await send({"type": "http.response.body", "body": body, "more_body": True})
            if slow_reader.too_slow(len(body)):
                # Abort, not close: a close would wait to flush what the client is not reading;
                # daphne then reports the disconnect as usual.
                slow_reader.transport.abortConnection()

        stream = Stream(get_channel_layer(), send_event, transport="sse", viewer=await viewer_of(user))
        access = StreamAccess(scope, stream, groups, send, await session_expiry(scope))
        process_stats.streams += 1
        metrics.CONNECTIONS.labels("sse").inc()
        try:
            await self._start(send, stream, groups, recover)
            revocation.watcher.add(access)  # once started: a recheck never races the joins
            await _until_disconnect(receive, send, access.revoked)
        except OSError as exc:  # LayerUnavailable
            metrics.layer_error("stream")
            logger.warning("stream of user %s ended, channel layer unavailable: %s", user.pk, exc)
        finally:
            revocation.watcher.discard(access)
            process_stats.streams -= 1
            metrics.CONNECTIONS.labels("sse").dec()
            stream.leave_all()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _admit(
        self, scope: dict[str, Any]
    ) -> tuple[dict[str, Any], Any, set[str], dict[str, GroupPosition]]:
        if scope["method"] != "GET":
            raise HttpError(405, f'Method "{scope["method"]}" not allowed.')
        user, method = await authenticate_scope(scope, require_origin=False)
        if user is None:
            raise HttpError(401, "Authentication credentials were not provided or are invalid.")
        scope = dict(scope, user=user, auth=method)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        request = requested_groups(query, user.pk)
        groups = set(request.groups)
        denied = list(request.errors)
        for kind, ids in request.objects.items():
            allowed = await database_sync_to_async(readable_job_ids)(user, protocol.EVENT_KINDS[kind], ids)
            groups.update(f"{kind}-{i}" for i in ids if i in allowed)
            denied.extend(protocol.denied_object_error(kind, i) for i in sorted(ids) if i not in allowed)
        if denied:
            raise HttpError(403, "; ".join(denied))
        raw_id = header(scope, b"last-event-id")
        last_event_id = raw_id.decode("latin-1") if raw_id else (query.get("last_event_id") or [""])[0]
        try:
            positions = parse_stream_position(last_event_id) if last_event_id else {}
        except PositionError as exc:
            raise HttpError(400, f"Last-Event-ID: {exc}") from exc
        return scope, user, groups, {g: p for g, p in positions.items() if g in groups}

    async def _start(
        self, send: Any, stream: Stream, groups: set[str], recover: dict[str, GroupPosition]
    ) -> None:
        retry = int(ws_settings.SSE_RETRY * 1000)
        await send({"type": "http.response.body", "body": f"retry: {retry}\n\n".encode(), "more_body": True})
        try:
            await stream.join(groups, hold=frozenset(recover))
            if recover:
                replays = await stream.fetch(recover)
                resets = {g: r.reset for g, r in replays.items() if r.reset is not None}
                metrics.RESETS.labels("sse").inc(len(resets))
                if resets:
                    # First, so the client knows to refetch before anything else arrives.
                    notice = json.dumps({"groups": resets})
                    body = event_block(format_stream_position(stream.positions), notice, "stream-reset")
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                replayed = await stream.replay(recover, replays)
                metrics.REPLAYED.labels("sse").inc(sum(replayed.values()))
        finally:
            await stream.release()
        # An id-only block: sets the browser's last event id without firing an event, so even a
        # stream that never got a message resumes from here.
        body = f"id: {format_stream_position(stream.positions)}\n\n".encode()
        await send({"type": "http.response.body", "body": body, "more_body": True})


async def _refuse(send: Any, error: HttpError) -> None:
    body = json.dumps({"detail": str(error)}).encode()
    headers = [(b"content-type", b"application/json")]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Token"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _until_disconnect(receive: Any, send: Any, revoked: asyncio.Event) -> None:
    """Wait for the client to go (or its access to be revoked), with a keep-alive comment every
    SSE_KEEPALIVE seconds."""
    keepalive = ws_settings.SSE_KEEPALIVE
    disconnected = asyncio.ensure_future(_disconnect(receive))
    ended = asyncio.ensure_future(revoked.wait())
    try:
        while True:
            done, _ = await asyncio.wait(
                {disconnected, ended}, timeout=keepalive, return_when=FIRST_COMPLETED
            )
            if done:
                return
            await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
    finally:
        for waiter in (disconnected, ended):
            waiter.cancel()
        await asyncio.gather(disconnected, ended, return_exceptions=True)


async def _disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class StreamAccess:
    """One stream as revocation.py sees it: ended when its credential goes, groups left when
    only they do (told in an `access-changed` event carrying AWX's groups reply)."""

    def __init__(
        self, scope: dict[str, Any], stream: Stream, groups: set[str], send: Any, expiry: float | None
    ) -> None:
        self.scope = scope
        self.stream = stream
        self.groups = set(groups)
        self.send = send
        self.session_expiry = expiry
        self.revoked = asyncio.Event()

    @property
    def user_id(self) -> int:
        """The streaming user's id."""
        return int(self.scope["user"].pk)

    @property
    def viewer(self) -> Viewer | None:
        """What the streaming user may see of jobs, as last read."""
        return self.stream.viewer

    async def recheck(self) -> None:
        """End the stream if the credential is gone; leave groups the user may no longer read."""
        access = await revocation.reread(self.scope)
        if access is None:
            logger.info("ending stream of user %s: its credential was revoked", self.user_id)
            metrics.ACCESS_REVOKED.labels("sse", "closed").inc()
            self.revoked.set()
            return
        self.session_expiry, self.stream.viewer = access.session_expiry, access.viewer
        lost = await revocation.async_lost_groups(access.user, self.groups)
        if not lost:
            return
        for group in lost:
            self.stream.leave(group)
        self.groups -= lost
        metrics.ACCESS_REVOKED.labels("sse", "groups_left").inc(len(lost))
        notice = json.dumps(protocol.groups_reply(self.groups, lost, set()))
        body = event_block(format_stream_position(self.stream.positions), notice, "access-changed")
        await self.send({"type": "http.response.body", "body": body, "more_body": True})


def EventStreamStack() -> Any:  # noqa: N802 (named like Channels' AuthMiddlewareStack)
    """The stream app behind cookie and session middleware (for session-authenticated browsers)."""
    return CookieMiddleware(SessionMiddleware(EventStreamApp()))
