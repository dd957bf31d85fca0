"""The API's answer when its database cannot serve a request: 503 with Retry-After, not a 500
with a traceback.

A restart of PostgreSQL (or SQLite's lock held past its busy timeout) makes every request of that
moment fail with Django's OperationalError or InterfaceError. Those are not bugs: the client is
told to retry (job runners do), and the log gets one WARNING per minute naming DATABASE_URL, not
one traceback per request (the soak's database restarts showed both).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.db import InterfaceError, OperationalError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)

# Seconds between two warnings of one outage.
WARN_EVERY = 60.0


class _Quiet:
    """The first failure of a burst logged, then one line per WARN_EVERY seconds with a count."""

    def __init__(self) -> None:
        self.last = -WARN_EVERY
        self.unlogged = 0

    def report(self, path: str, exc: BaseException) -> None:
        """Log this failure, or count it for the next line."""
        now = time.monotonic()
        if now - self.last < WARN_EVERY:
            self.unlogged += 1
            return
        more = f" ({self.unlogged} more since the last report)" if self.unlogged else ""
        logger.warning("database unavailable (DATABASE_URL) for %s: %s%s; answered 503", path, exc, more)
        self.last, self.unlogged = now, 0


_quiet = _Quiet()


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus 503 for a database that cannot serve the request now."""
    if isinstance(exc, OperationalError | InterfaceError):
        request = context.get("request")
        _quiet.report(getattr(request, "path", "?"), exc)
        detail = {"detail": "the database is unavailable; retry shortly"}
        response = Response(detail, status=503, headers={"Retry-After": "1"})
        # Reported above, once a minute: Django's request logger would add an ERROR per request
        # (django.utils.log.log_response skips a response marked so; tests/test_api_outage.py
        # fails if that changes).
        response._has_been_logged = True  # type: ignore[attr-defined]
        return response
    return drf_exception_handler(exc, context)
