"""EventConsumer: one client's websocket, AWX's subscribe protocol (a peer node's relay link is
peer_consumer.py's).

Thin on purpose: parsing lives in protocol.py, access rules in access.py, authentication in
auth.py, the relay in relay.py. Consumers apply plans and pass `internal.message` events on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer

from awx_ws.main import metrics, protocol, revocation
from awx_ws.main.access import readable_job_ids
from awx_ws.main.audience import Viewer, viewer_of
from awx_ws.main.auth import session_expiry
from awx_ws.main.backlog import SLOW_CLIENT_CLOSE_CODE, SlowReader, connection_transport
from awx_ws.main.conf import ws_settings
from awx_ws.main.history import GroupPosition
from awx_ws.main.stats import process_stats
from awx_ws.main.streams import Stream

logger = logging.getLogger(__name__)


class EventConsumer(AsyncWebsocketConsumer):
    """A browser or token client subscribed to groups of AWX notifications.

    Group messages reach it through the process's fan-out (fanout.py): written straight to the
    socket under awx_ws.server, or through `deliver` (the ordinary ASGI send) under any other
    server. The consumer needs no channel of its own: its channel-layer alias names no layer, and
    Channels then creates no channel and no per-consumer receive loop.
    """

    channel_layer_alias = "awx_ws.fanout-delivers"
    subscribed: set[str]
    # daphne's protocol for this socket when awx_ws.server runs us (prepared-frame writes), else None.
    frame_protocol: Any = None
    # Counted in process_stats and the metrics once accepted.
    _counted = False
    transport = "websocket"

    async def connect(self) -> None:
        """Accept an authenticated client (auth.py refused the rest) and greet it as AWX does."""
        self.subscribed = set()
        self.fanout = get_channel_layer().fanout
        self.frame_protocol = self.scope.get("extensions", {}).get("awx_ws.protocol")
        # awx_ws.server's protocol checks every write itself; elsewhere our sends are checked here.
        transport = None if self.frame_protocol is not None else connection_transport(self.scope)
        self.slow_reader = SlowReader(transport)
        # Set once the client asks for ids or recovery; from then on its groups go through it.
        self.stream: Stream | None = None
        # Subscribe storms: each frame costs a token (AWX_WS SUBSCRIBE_RATE per SUBSCRIBE_WINDOW).
        self.rate = protocol.RateLimit(
            ws_settings.SUBSCRIBE_RATE, ws_settings.SUBSCRIBE_WINDOW, time.monotonic()
        )
        self._refused_since_log = 0
        # Subscribes and access rechecks (revocation.py) change the groups one at a time.
        self._changing = asyncio.Lock()
        self.session_expiry = await session_expiry(self.scope)
        # Job status messages reach it only for jobs its user may see (audience.py).
        self.viewer: Viewer | None = await viewer_of(self.scope["user"])
        await self.accept()
        self._counted = True
        process_stats.websockets += 1
        metrics.CONNECTIONS.labels("websocket").inc()
        revocation.watcher.add(self)
        await self.send_json({"accept": True, "user": self.scope["user"].pk})

    @property
    def user_id(self) -> int:
        """The connected user's id."""
        return int(self.scope["user"].pk)

    async def recheck(self) -> None:
        """Close with 4003 if the credential is gone; leave groups the user may no longer read."""
        access = await revocation.reread(self.scope)
        if access is None:
            logger.info("closing websocket of user %s: its credential was revoked", self.user_id)
            metrics.ACCESS_REVOKED.labels("websocket", "closed").inc()
            await self.close(code=revocation.ACCESS_REVOKED_CLOSE_CODE)
            return
        self.session_expiry, self.viewer = access.session_expiry, access.viewer
        if self.stream is not None:
            self.stream.viewer = self.viewer
        async with self._changing:
            lost = await revocation.async_lost_groups(access.user, self.subscribed)
            if not lost:
                return
            for group in lost:
                if self.stream is not None:
                    self.stream.leave(group)
                else:
                    self.fanout.leave(group, self)
            self.subscribed -= lost
        logger.info("user %s may no longer read %s: left", self.user_id, ", ".join(sorted(lost)))
        metrics.ACCESS_REVOKED.labels("websocket", "groups_left").inc(len(lost))
        await self.send_json(protocol.groups_reply(self.subscribed, lost, set()))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the consumer; whichever way it ends (even a crash or a cancel), release its groups."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._counted:
                process_stats.websockets -= 1
                metrics.CONNECTIONS.labels("websocket").dec()
            self._release()

    async def disconnect(self, code: int) -> None:
        """Leave every group the connection held."""
        self._release()

    def _release(self) -> None:
        # Synchronous: nothing can interrupt it half-way (fanout.py).
        revocation.watcher.discard(self)
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.leave_all()
        fanout = getattr(self, "fanout", None)
        if fanout is not None:
            fanout.release(self)
        self.subscribed = set()

    async def deliver(self, group: str, text: str, message_id: str | None) -> None:
        """One message of a group, through the ASGI send (servers without direct writes)."""
        await self.send(text_data=text)

    async def send(
        self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False
    ) -> None:
        """Send a frame; a client that stopped reading is closed with 4008 (backlog.py)."""
        await super().send(text_data=text_data, bytes_data=bytes_data, close=close)
        written = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if self.slow_reader.too_slow(written):
            await self.close(code=SLOW_CLIENT_CLOSE_CODE, reason="slow client: messages not read in time")

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Handle one client frame: validate, check access, replace the subscription set."""
        if not self.rate.allow(time.monotonic()):
            # One log line per burst, not one per frame: a flood must not flood the log too.
            if self._refused_since_log == 0:
                logger.info("user %s sends frames too fast; refusing them", self.scope["user"].pk)
            self._refused_since_log += 1
            await self.send_json({"error": self.rate.error()})
            return
        self._refused_since_log = 0
        try:
            message = protocol.decode_frame(text_data, bytes_data, ws_settings.MAX_FRAME_BYTES)
            if self.scope.get("auth") == "session" and not protocol.xrftoken_matches(
                message, self.scope.get("cookies", {}).get("csrftoken")
            ):
                raise protocol.ProtocolError(protocol.ACCESS_DENIED)  # xrftoken missing or wrong
            request = protocol.parse_subscribe(
                message, self.scope["user"].pk, ws_settings.MAX_GROUPS_PER_CONNECTION
            )
        except protocol.ProtocolError as exc:
            logger.info("refused frame from user %s: %s", self.scope["user"].pk, exc)
            await self.send_json(exc.reply())
            return
        try:
            async with self._changing:
                await self.subscribe(request)
        except OSError as exc:  # LayerUnavailable
            # The connection stays; what was joined before the failure stays joined.
            metrics.layer_error("subscribe")
            service = getattr(self.fanout.layer, "service", "its channel layer")
            logger.warning(
                "subscribe of user %s failed, %s unavailable: %s", self.scope["user"].pk, service, exc
            )
            await self.send_json(
                {"error": f"subscribe failed: the service cannot reach {service}, try again"}
            )
            await self.send_json(protocol.groups_reply(self.subscribed, set(), set()))

    async def subscribe(self, request: protocol.SubscribeRequest) -> None:
        """Replace the connection's groups with what the request names and the user may read."""
        errors = list(request.errors)
        wanted = set(request.groups) | await self._readable_objects(request.objects, errors)
        recover = self._recoverable(request.recover, wanted, errors)
        for error in errors:
            await self.send_json({"error": error})
        left = self.subscribed - wanted
        joined = wanted - self.subscribed
        if request.ids and self.stream is None:
            await self._use_stream(self.subscribed - left)
        if self.stream is None:
            await self._subscribe_shared(left, joined)
            return
        await self._subscribe_stream(self.stream, left, joined, recover)

    async def _readable_objects(self, objects: dict[str, frozenset[int]], errors: list[str]) -> set[str]:
        """The groups of the objects asked for that the user may read; an error for each other."""
        groups = set()
        for kind, ids in objects.items():
            allowed = await database_sync_to_async(readable_job_ids)(
                self.scope["user"], protocol.EVENT_KINDS[kind], ids
            )
            for object_id in sorted(ids):
                if object_id in allowed:
                    groups.add(f"{kind}-{object_id}")
                else:
                    errors.append(protocol.denied_object_error(kind, object_id))
        return groups

    def _recoverable(
        self, asked: dict[str, GroupPosition], wanted: set[str], errors: list[str]
    ) -> dict[str, GroupPosition]:
        """The recoveries asked for that can be made; an error for each other."""
        recover = {}
        for group, position in asked.items():
            if group not in wanted:
                errors.append(f"recover: {group} is not a group this request subscribes to")
            elif group in self.subscribed:
                errors.append(f"recover: already subscribed to {group}, nothing was missed")
            else:
                recover[group] = position
        return recover

    async def _subscribe_shared(self, left: set[str], joined: set[str]) -> None:
        """Leave and join on the shared prepared frame (no ids), then acknowledge."""
        for group in left:
            self.fanout.leave(group, self)
            self.subscribed.discard(group)
        # One group at a time, so a failure half-way leaves `subscribed` true to the fan-out
        # (a join that fails or is cancelled leaves nothing held).
        for group in sorted(joined):
            await self.fanout.join(group, self)
            self.subscribed.add(group)
        await self.send_json(protocol.groups_reply(self.subscribed, left, joined))

    async def _use_stream(self, kept: set[str]) -> None:
        """Switch to per-message delivery with ids; the groups kept go on without a gap."""
        stream = Stream(get_channel_layer(), self._send_message, viewer=self.viewer)
        try:
            # Join through the stream before leaving as ourselves: a message in between comes once.
            await stream.join(kept)
        except BaseException:
            stream.leave_all()  # still delivering as before, nothing twice
            raise
        self.stream = stream
        # Every group we held ourselves goes: those kept are the stream's now, the rest were left.
        self.fanout.release(self)

    async def _subscribe_stream(
        self, stream: Stream, left: set[str], joined: set[str], recover: dict[str, GroupPosition]
    ) -> None:
        for group in left:
            stream.leave(group)
        self.subscribed -= left
        try:
            try:
                await stream.join(joined, hold=frozenset(recover))
            except BaseException:
                for group in joined:  # a set-up that failed half-way holds none of them
                    stream.leave(group)
                raise
            self.subscribed |= joined
            reply: dict[str, Any] = protocol.groups_reply(self.subscribed, left, joined)
            reply["positions"] = {g: str(p) for g, p in sorted({**stream.positions, **recover}.items())}
            await self.send_json(reply)
            if recover:
                replays = await stream.fetch(recover)
                replayed = await stream.replay(recover, replays)
                resets = {g: r.reset for g, r in replays.items() if r.reset is not None}
                metrics.REPLAYED.labels("websocket").inc(sum(replayed.values()))
                metrics.RESETS.labels("websocket").inc(len(resets))
                await self.send_json(
                    {
                        "recovered": replayed,
                        "reset": resets,
                        # Where the reset groups go on from (live since this subscribe).
                        "positions": {g: str(stream.positions[g]) for g in sorted(resets)},
                    }
                )
        finally:
            await stream.release()

    async def _send_message(self, group: str, text: str, message_id: str | None, position: Any) -> None:
        """One message for a client that asked for ids: `{"group", "id", "data"}`."""
        if message_id is None:  # a kind without history: nothing to resume from
            frame = f'{{"group": {json.dumps(group)}, "data": {text}}}'
        else:
            frame = f'{{"group": {json.dumps(group)}, "id": {json.dumps(str(position))}, "data": {text}}}'
        await self.send(text_data=frame)

    async def send_json(self, content: Any) -> None:
        """Send one JSON frame."""
        await self.send(text_data=json.dumps(content))
