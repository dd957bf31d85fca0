"""HTTP routes served by gunicorn (and by daphne for plain HTTP)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import path


def api_root(request: HttpRequest) -> JsonResponse:
    """Where things are."""
    return JsonResponse({"websocket": "/websocket/", "admin": "/admin/"})


urlpatterns = [
    path("api/", api_root, name="api-root"),
    path("admin/", admin.site.urls),
]
