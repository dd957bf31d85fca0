"""HTTP routes served by gunicorn (and by daphne for plain HTTP)."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, JsonResponse
from django.urls import include, path

from awx_ws.main import views


def api_root(request: HttpRequest) -> JsonResponse:
    """Where things are."""
    return JsonResponse({"v2": "/api/v2/", "websocket": "/websocket/", "admin": "/admin/"})


urlpatterns = [
    path("", views.live, name="live"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("api/", api_root, name="api-root"),
    path("api/v2/", include("awx_ws.main.api.urls")),
    path("admin/", admin.site.urls),
]
