"""EventConsumer (one client's websocket, AWX's subscribe protocol) and BroadcastConsumer (one peer
node's relay connection).

Thin on purpose: parsing lives in protocol.py, access rules in access.py, authentication in
auth.py, the relay in relay.py. Consumers apply plans and pass `internal.message` events on.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from awx_ws.main import protocol
from awx_ws.main.access import readable_job_ids
from awx_ws.main.conf import ws_settings

logger = logging.getLogger(__name__)


class EventConsumer(AsyncWebsocketConsumer):
    """A browser or token client subscribed to groups of AWX notifications."""

    subscribed: set[str]

    async def connect(self) -> None:
        """Accept an authenticated client (auth.py refused the rest) and greet it as AWX does."""
        self.subscribed = set()
        await self.accept()
        await self.send_json({"accept": True, "user": self.scope["user"].pk})

    async def disconnect(self, code: int) -> None:
        """Leave every group the connection held."""
        held: set[str] = getattr(self, "subscribed", set())
        for group in held:
            await self.channel_layer.group_discard(group, self.channel_name)
        await self._interest_discard(held)
        self.subscribed = set()

    async def _interest_add(self, groups: set[str]) -> None:
        # Tell the relay (interest.py) which groups this node needs from its peers.
        interest = getattr(self.channel_layer, "interest", None)
        if interest is not None and groups:
            await interest.add(groups)

    async def _interest_discard(self, groups: set[str]) -> None:
        interest = getattr(self.channel_layer, "interest", None)
        if interest is not None and groups:
            await interest.discard(groups)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Handle one client frame: validate, check access, replace the subscription set."""
        try:
            message = protocol.decode_frame(text_data, bytes_data, ws_settings.MAX_FRAME_BYTES)
            if self.scope.get("auth") == "session" and not protocol.xrftoken_matches(
                message, self.scope.get("cookies", {}).get("csrftoken")
            ):
                logger.info("xrftoken mismatch for user %s", self.scope["user"].pk)
                raise protocol.ProtocolError(protocol.ACCESS_DENIED)
            request = protocol.parse_subscribe(
                message, self.scope["user"].pk, ws_settings.MAX_GROUPS_PER_CONNECTION
            )
        except protocol.ProtocolError as exc:
            logger.info("refused frame from user %s: %s", self.scope["user"].pk, exc)
            await self.send_json(exc.reply())
            return
        await self.subscribe(request)

    async def subscribe(self, request: protocol.SubscribeRequest) -> None:
        """Replace the connection's groups with what the request names and the user may read."""
        wanted = set(request.groups)
        errors = list(request.errors)
        for kind, ids in request.objects.items():
            allowed = await database_sync_to_async(readable_job_ids)(
                self.scope["user"], protocol.EVENT_KINDS[kind], ids
            )
            for object_id in sorted(ids):
                if object_id in allowed:
                    wanted.add(f"{kind}-{object_id}")
                else:
                    errors.append(protocol.denied_object_error(kind, object_id))
        for error in errors:
            await self.send_json({"error": error})
        left = self.subscribed - wanted
        joined = wanted - self.subscribed
        for group in left:
            await self.channel_layer.group_discard(group, self.channel_name)
            self.subscribed.discard(group)
        await self._interest_discard(left)
        for group in joined:
            await self.channel_layer.group_add(group, self.channel_name)
            self.subscribed.add(group)
        await self._interest_add(joined)
        await self.send_json(protocol.groups_reply(self.subscribed, left, joined))

    async def internal_message(self, event: dict[str, Any]) -> None:
        """Relay an emitted notification: its text is already the payload's JSON."""
        await self.send(text_data=event["text"])

    async def send_json(self, content: Any) -> None:
        """Send one JSON frame."""
        await self.send(text_data=json.dumps(content))


class BroadcastConsumer(AsyncWebsocketConsumer):
    """A peer node's relay: joins the groups it asks for here and forwards what this node emits.

    Messages that came from a peer (marked `relayed` by our relay) are never forwarded again: one
    hop, so no loops and no duplicates. auth.PeerAuthMiddleware admitted the peer.
    """

    joined: set[str]

    async def connect(self) -> None:
        """Accept the authenticated peer."""
        self.joined = set()
        await self.accept()
        logger.info("peer relay %s connected from %s", self.scope.get("peer"), self.scope.get("client"))

    async def disconnect(self, code: int) -> None:
        """Leave every group joined for the peer."""
        for group in getattr(self, "joined", ()):
            await self.channel_layer.group_discard(group, self.channel_name)
        self.joined = set()
        logger.info("peer relay %s disconnected (%s)", self.scope.get("peer"), code)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Apply a `{"join": [...], "leave": [...]}` update of the groups the peer's clients hold."""
        try:
            update = json.loads(text_data or "")
            join, leave = update.get("join", []), update.get("leave", [])
            groups = [protocol.validate_group_name(group) for group in [*join, *leave]]
        except (ValueError, AttributeError, TypeError) as exc:
            logger.warning("peer relay %s sent a bad update: %s", self.scope.get("peer"), exc)
            return
        for group in set(leave) & self.joined:
            await self.channel_layer.group_discard(group, self.channel_name)
            self.joined.discard(group)
        for group in set(join) - self.joined:
            await self.channel_layer.group_add(group, self.channel_name)
            self.joined.add(group)
        logger.debug(
            "peer relay %s now holds %d groups (%d named)",
            self.scope.get("peer"),
            len(self.joined),
            len(groups),
        )

    async def internal_message(self, event: dict[str, Any]) -> None:
        """Forward a message emitted on this node to the peer; drop ones that came from a peer."""
        if event.get("relayed") or "group" not in event:
            return
        await self.send(text_data=json.dumps({"group": event["group"], "text": event["text"]}))
