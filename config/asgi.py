"""ASGI entry point: websockets through our auth stack, HTTP to Django."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.routing import URLRouter  # noqa: E402

from awx_ws.main.auth import WebsocketAuthStack  # noqa: E402
from awx_ws.main.routing import AWXProtocolTypeRouter, websocket_urlpatterns  # noqa: E402

application = AWXProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": WebsocketAuthStack(URLRouter(websocket_urlpatterns)),
    }
)
