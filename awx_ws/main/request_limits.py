"""Request bodies over AWX_WS_MAX_REQUEST_BYTES are refused with 413 before anything reads them.

DRF's parsers read the request stream themselves, so Django's DATA_UPLOAD_MAX_MEMORY_SIZE, which
guards `request.body` and form parsing, never applies to the API's JSON: a member could post
nine 1 MB events and fill Redis. nginx refuses larger bodies too (client_max_body_size), and
turns a chunked body into one with a Content-Length, which this middleware checks.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from awx_ws.main.conf import ws_settings

logger = logging.getLogger(__name__)


class RequestSizeLimitMiddleware:
    """413 for a body whose Content-Length is over AWX_WS_MAX_REQUEST_BYTES."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Refuse an oversized body; pass anything else on."""
        limit = ws_settings.MAX_REQUEST_BYTES
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return JsonResponse({"detail": "invalid Content-Length"}, status=400)
        if length > limit:
            logger.info(
                "refused a %d-byte body for %s (AWX_WS_MAX_REQUEST_BYTES=%d)", length, request.path, limit
            )
            detail = f"request body of {length} bytes is over the limit of {limit} (AWX_WS_MAX_REQUEST_BYTES)"
            return JsonResponse({"detail": detail}, status=413)
        response: HttpResponse = self.get_response(request)
        return response
