"""HTTP routes served by gunicorn (and by daphne for plain HTTP)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path


def api_root(request: HttpRequest) -> JsonResponse:
    """Where things are."""
    return JsonResponse({"v2": "/api/v2/", "websocket": "/websocket/", "admin": "/admin/"})


urlpatterns = [
    path("api/", api_root, name="api-root"),
    path("api/v2/", include("awx_ws.main.api.urls")),
    path("admin/", admin.site.urls),
]
