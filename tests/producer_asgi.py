"""The service as a user's project runs it, with producer code of its own inside the same daphne.

`POST /produce/` with `{"group", "text", "via"}` sends `{"type": "internal.message", "text"}` to
the group with Channels' own API, from the daphne process: `via: "async"` awaits
`get_channel_layer().group_send` in the request's coroutine; `via: "sync"` calls
`async_to_sync(get_channel_layer().group_send)` from a worker thread, as a Django view would.
Everything else goes to the service's application unchanged (tests/test_channels_api.py).
"""

from __future__ import annotations

import json
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer

from config.asgi import application as service


def _send_from_sync_code(group: str, text: str) -> None:
    async_to_sync(get_channel_layer().group_send)(group, {"type": "internal.message", "text": text})


async def produce(receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(body)
    if request["via"] == "sync":
        await sync_to_async(_send_from_sync_code)(request["group"], request["text"])
    else:
        layer = get_channel_layer()
        await layer.group_send(request["group"], {"type": "internal.message", "text": request["text"]})
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] == "/produce/":
        return await produce(receive, send)
    return await service(scope, receive, send)
