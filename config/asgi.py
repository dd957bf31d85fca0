"""ASGI entry point: websockets (clients and peer relays) and HTTP to Django."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from config import var

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
var.prepare()
# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from awx_ws.main.routing import AWXProtocolTypeRouter, http_application, websocket_application  # noqa: E402

application = AWXProtocolTypeRouter(
    {"http": http_application(django_asgi_app), "websocket": websocket_application()}
)
# Start-up work (liveness, the purge of dead processes' state, the fan-out) when the server starts,
# also under plain `daphne`, which sends no ASGI lifespan; nothing runs until then.
application.start_with_server()
