"""Endpoints for operators and load balancers: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from django.db import DatabaseError, connection
from django.http import HttpResponse
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from awx_ws.main import metrics
from awx_ws.main.api.permissions import IsSuperuserOrLoopback
from awx_ws.main.conf import ws_settings
from awx_ws.main.emit import layer_class
from awx_ws.main.exceptions import LayerUnavailable

logger = logging.getLogger(__name__)


class PingView(APIView):
    """Liveness: the API process answers. Nothing else is checked (that is readiness)."""

    permission_classes = [AllowAny]
    authentication_classes: list[type] = []

    def get(self, request: Request) -> Response:
        """Always 200 while the process serves requests."""
        return Response({"ping": "pong", "node": ws_settings.NODE_NAME})


def _layer_problem() -> str | None:
    backend = layer_class()
    if backend is None:
        return None
    try:
        backend.ping_blocking(ws_settings.EMIT_TIMEOUT)
    except LayerUnavailable as exc:
        return f"unreachable at {exc.where}: {exc}"
    return None


def _database_problem() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return f"unreachable ({connection.vendor}, DATABASE_URL): {exc}"
    return None


class ReadyView(APIView):
    """Readiness: the channel layer (Redis or RabbitMQ) and the database answer; 503 naming what does not."""

    permission_classes = [AllowAny]
    authentication_classes: list[type] = []

    def get(self, request: Request) -> Response:
        """200 when both answer, else 503 with the reason for each."""
        backend = layer_class()
        layer = backend.service.lower() if backend is not None else "channel layer"
        problems = {layer: _layer_problem(), "database": _database_problem()}
        body = {name: problem or "ok" for name, problem in problems.items()}
        if any(problems.values()):
            logger.warning("not ready: %s", body)
            return Response(body, status=503)
        return Response(body)


class MetricsView(APIView):
    """Prometheus text for every process of this node (metrics.py)."""

    permission_classes = [IsSuperuserOrLoopback]

    def get(self, request: Request) -> HttpResponse:
        """The scrape."""
        body, content_type = metrics.render()
        return HttpResponse(body, content_type=content_type)
