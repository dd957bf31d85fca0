"""The baseline a Channels user would write: the tutorial's consumer, served by stock daphne.

`group_add` on connect, `self.send` on `internal.message`, the stock core layer (no auth, so the
comparison flatters the baseline if anything).
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.baseline_settings")
django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402


class TutorialConsumer(AsyncWebsocketConsumer):
    """Joins the group named in ?group= and relays its messages."""

    async def connect(self) -> None:
        """Join, accept."""
        self.group = parse_qs(self.scope["query_string"].decode())["group"][0]
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        """Leave."""
        await self.channel_layer.group_discard(self.group, self.channel_name)

    async def internal_message(self, event: dict) -> None:
        """Send the payload text."""
        await self.send(text_data=event["text"])


application = ProtocolTypeRouter({"websocket": URLRouter([re_path(r"^ws/$", TutorialConsumer.as_asgi())])})
