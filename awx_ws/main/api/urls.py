"""URL routes of the REST API, mounted at /api/v2/."""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from awx_ws.main.api import operations, views

router = SimpleRouter()
router.register("organizations", views.OrganizationViewSet, basename="organization")
router.register("jobs", views.JobViewSet, basename="job")

urlpatterns = [
    path("", views.ApiRootView.as_view(), name="api-root-v2"),
    path("tokens/", views.TokenView.as_view(), name="api-tokens"),
    path("me/", views.MeView.as_view(), name="api-me"),
    path("emit/", views.EmitView.as_view(), name="api-emit"),
    path("ping/", operations.PingView.as_view(), name="api-ping"),
    path("ready/", operations.ReadyView.as_view(), name="api-ready"),
    path("metrics", operations.MetricsView.as_view(), name="api-metrics"),
    *router.urls,
]
