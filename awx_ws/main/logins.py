"""Failed logins limited per client address and per username, on every password login path.

Django's `authenticate()` is where every password login goes: the API's token endpoint (DRF
authtoken), `/login/` and `/admin/login/`. `ThrottledModelBackend` counts each attempt against
the client address and the username before it checks the password, and takes the count back
when the login succeeds; past AWX_WS_LOGIN_FAILURE_RATE failures in the rate's period for either,
it checks no password and raises `LoginThrottled` (DRF's `Throttled`: 429 with Retry-After from
DRF views, and from Django's views through `LoginThrottleMiddleware`). Counting first means
guesses sent in parallel cannot all pass the check. Counts live in Django's default cache, which
settings point at the node's Redis (or its database on RabbitMQ), so every API worker and node
process shares them.

The client address is DRF's throttle identity: with NUM_PROXIES = 1, the last X-Forwarded-For
entry, which our nginx sets to the peer address it saw (the client cannot add to it).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.core.cache import cache
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
    # Set by Throttled.__init__ (seconds, rounded up), which the DRF stubs leave undeclared.
    wait: int | None


def parse_rate(rate: str) -> tuple[int, int]:
    """(count, seconds) of a DRF rate such as 10/min (validated at start by conf)."""
    count, _, period = rate.partition("/")
    return int(count), _UNITS[period[0]]


def client_address(request: Any) -> str:
    """The client's address as DRF's throttles see it (NUM_PROXIES: our nginx's entry)."""
    return str(BaseThrottle().get_ident(request))


# Each subject's attempts are counted in BUCKETS buckets spanning the rate's period: a window that
# slides by a sixtieth of it, and counters Redis increments atomically.
BUCKETS = 60


def _buckets(kind: str, value: str, period: int, now: float) -> tuple[list[str], float]:
    """(the keys of the buckets within the period ending now, oldest first; a bucket's width)."""
    digest = hashlib.sha256(value.encode()).hexdigest()[:32]
    width = period / BUCKETS
    current = int(now // width)
    return [f"login-attempts:{kind}:{digest}:{i}" for i in range(current - BUCKETS + 1, current + 1)], width


def subjects(request: Any, username: str | None) -> list[tuple[str, str]]:
    """What attempts are counted against: the client address, and the username if given."""
    found = [("address", client_address(request))] if request is not None else []
    if username:
        found.append(("username", username.casefold()))
    return found


def reserve(request: Any, username: str | None) -> list[str]:
    """Count one login attempt against the address and the username, before the password is
    checked (so concurrent guesses cannot all pass the check); LoginThrottled, counting nothing,
    when either is over its budget. Returns the keys to release if the login succeeds."""
    limit, period = parse_rate(ws_settings.LOGIN_FAILURE_RATE)
    now = time.time()
    taken: list[str] = []
    try:
        for kind, value in subjects(request, username):
            keys, width = _buckets(kind, value, period, now)
            cache.add(keys[-1], 0, timeout=period + math.ceil(width) + 1)
            try:
                cache.incr(keys[-1])
            except ValueError:  # gone in between (expired, or the cache fell back to this process)
                cache.set(keys[-1], 1, timeout=period + math.ceil(width) + 1)
            taken.append(keys[-1])
            counts = cache.get_many(keys)
            if sum(int(counts.get(key, 0)) for key in keys) > limit:
                oldest = next(i for i, key in enumerate(keys) if counts.get(key))
                wait = max(1, math.ceil((oldest + 1) * width - (now % width)))
                logger.warning("login refused: too many failures for this %s (%s)", kind, _shown(kind, value))
                raise LoginThrottled(wait=wait)
    except LoginThrottled:
        release(taken)  # a refused attempt checked no password: it does not count
        raise
    return taken


def release(keys: list[str]) -> None:
    """Take back attempts that were not failures (the login succeeded, or was refused)."""
    for key in keys:
        try:
            cache.decr(key)
        except ValueError:
            pass  # expired meanwhile


def _shown(kind: str, value: str) -> str:
    return value if kind == "address" else "username given"


class ThrottledModelBackend(ModelBackend):
    """Django's ModelBackend, counting each password check against the address and username."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """LoginThrottled past the budget; otherwise ModelBackend's answer (a success is not counted)."""
        if username is None:
            username = kwargs.get(get_user_model().USERNAME_FIELD)
        attempts = reserve(request, username)
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is not None:
            release(attempts)
        return user


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
