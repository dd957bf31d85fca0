"""EventConsumer: one client's websocket, speaking AWX's subscribe protocol.

Thin on purpose: parsing lives in protocol.py, access rules in access.py, authentication in
auth.py. The consumer applies the plan and relays `internal.message` events as they are.
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
        for group in getattr(self, "subscribed", ()):
            await self.channel_layer.group_discard(group, self.channel_name)
        self.subscribed = set()

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
        for group in joined:
            await self.channel_layer.group_add(group, self.channel_name)
            self.subscribed.add(group)
        await self.send_json(protocol.groups_reply(self.subscribed, left, joined))

    async def internal_message(self, event: dict[str, Any]) -> None:
        """Relay an emitted notification: its text is already the payload's JSON."""
        await self.send(text_data=event["text"])

    async def send_json(self, content: Any) -> None:
        """Send one JSON frame."""
        await self.send(text_data=json.dumps(content))
