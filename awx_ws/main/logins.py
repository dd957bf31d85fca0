"""Failed logins limited per client address and per username, on every password login path.

Django's `authenticate()` is where every password login goes: the API's token endpoint (DRF
authtoken), `/login/` and `/admin/login/`. `ThrottledModelBackend` refuses to check a password
once the client address or the username has failed AWX_WS_LOGIN_FAILURE_RATE times within its
window, raising `LoginThrottled` (DRF's `Throttled`: 429 with Retry-After from DRF views, and
from Django's views through `LoginThrottleMiddleware`). Failures are counted from Django's
`user_login_failed` signal. Counts live in Django's default cache, which settings point at the
node's Redis (or its database on RabbitMQ), so every API worker and node process shares them.

The client address is DRF's throttle identity: with NUM_PROXIES = 1, the last X-Forwarded-For
entry, which our nginx sets to the peer address it saw (the client cannot add to it).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any

from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.signals import user_login_failed
from django.core.cache import cache
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse
from rest_framework.exceptions import Throttled
from rest_framework.throttling import BaseThrottle

from awx_ws.main.conf import ws_settings

logger = logging.getLogger(__name__)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class LoginThrottled(Throttled):
    """Too many failed logins from this address or for this username: try again later."""

    default_detail = "Too many failed logins; try again later."
    default_code = "login_throttled"


def parse_rate(rate: str) -> tuple[int, int]:
    """(count, seconds) of a DRF rate such as 10/min (validated at start by conf)."""
    count, _, period = rate.partition("/")
    return int(count), _UNITS[period[0]]


def client_address(request: Any) -> str:
    """The client's address as DRF's throttles see it (NUM_PROXIES: our nginx's entry)."""
    return str(BaseThrottle().get_ident(request))


def _keys(kind: str, value: str, window: int, now: float) -> tuple[str, str, float]:
    """(this window's key, the previous window's, how far into this window we are, 0..1)."""
    digest = hashlib.sha256(value.encode()).hexdigest()[:32]
    index = int(now // window)
    return (
        f"login-failures:{kind}:{digest}:{index}",
        f"login-failures:{kind}:{digest}:{index - 1}",
        (now - index * window) / window,
    )


def _failures(kind: str, value: str, window: int, now: float) -> float:
    # A sliding window from two fixed ones: this window's count plus the share of the previous
    # window's that still falls within the last `window` seconds.
    current, previous, elapsed = _keys(kind, value, window, now)
    counts = cache.get_many([current, previous])
    return float(counts.get(current, 0)) + float(counts.get(previous, 0)) * (1.0 - elapsed)


def subjects(request: Any, username: str | None) -> list[tuple[str, str]]:
    """What failures are counted against: the client address, and the username if given."""
    found = [("address", client_address(request))] if request is not None else []
    if username:
        found.append(("username", username.casefold()))
    return found


def check(request: Any, username: str | None) -> None:
    """Raise LoginThrottled when the address or the username is over its failure budget."""
    limit, window = parse_rate(ws_settings.LOGIN_FAILURE_RATE)
    now = time.time()
    for kind, value in subjects(request, username):
        if _failures(kind, value, window, now) >= limit:
            logger.warning("login refused: too many failures for this %s (%s)", kind, _shown(kind, value))
            wait = math.ceil(window - (now % window)) or 1
            raise LoginThrottled(wait=wait)


def record_failure(request: Any, username: str | None) -> None:
    """Count one failed login against the address and the username."""
    _, window = parse_rate(ws_settings.LOGIN_FAILURE_RATE)
    now = time.time()
    for kind, value in subjects(request, username):
        current, _, _ = _keys(kind, value, window, now)
        # Two windows: the sliding count reads the previous one.
        cache.add(current, 0, timeout=2 * window)
        cache.incr(current)


def _shown(kind: str, value: str) -> str:
    return value if kind == "address" else "username given"


class ThrottledModelBackend(ModelBackend):
    """Django's ModelBackend, refusing to check a password past the failure budget."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """LoginThrottled when over budget; otherwise ModelBackend's answer."""
        if username is None:
            username = kwargs.get("username")
        check(request, username)
        return super().authenticate(request, username=username, password=password, **kwargs)


@receiver(user_login_failed, dispatch_uid="awx_ws.logins.count_failure")
def count_failure(sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any) -> None:
    """Django's signal for every failed authenticate(): count it."""
    record_failure(request, credentials.get("username"))


class LoginThrottleMiddleware:
    """Answers LoginThrottled from Django's own login views (/login/, /admin/login/) with 429."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Pass the request on."""
        response: HttpResponse = self.get_response(request)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """429 with Retry-After for LoginThrottled; anything else is not ours."""
        if not isinstance(exception, LoginThrottled):
            return None
        response = HttpResponse(str(exception.detail), status=429, content_type="text/plain; charset=utf-8")
        if exception.wait is not None:
            response["Retry-After"] = str(math.ceil(exception.wait))
        return response
