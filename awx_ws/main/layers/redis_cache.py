"""Django's Redis cache backend, kept answering while Redis is unreachable.

It lives with the other Redis backends: every module that speaks redis-py is in this package.

The API's throttles and the failed-login counts (logins.py) live in the node's Redis so that every
API worker shares them. A Redis outage must not turn every throttled request into a 500 (an emit
must still answer 503 naming REDIS_URL, a REST read must still work), nor lift the limits: while
Redis does not answer, counts are kept in the process (Django's local-memory cache), and Redis is
tried again after a few seconds. One WARNING a minute says so.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache
from redis.exceptions import RedisError

from awx_ws.main.layers import redis_connect
from awx_ws.main.retry import FailureLog

logger = logging.getLogger(__name__)

# Seconds the process counts on its own after a failure before it asks Redis again (each attempt
# may wait for a connect timeout: not on every request).
RETRY_AFTER = 5.0


class FallbackRedisCache(RedisCache):
    """RedisCache whose operations fall back to a per-process cache while Redis is down."""

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._local = LocMemCache(f"awx_ws-fallback-{id(self)}", params)
        self._down_until = 0.0
        options = params.get("OPTIONS", {})
        where = redis_connect.describe(options if redis_connect.is_sentinel(options) else {"address": server})
        self._failures = FailureLog(f"shared cache at {where} (counting per process)", 60.0, logger)

    def _either(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if time.monotonic() >= self._down_until:
            try:
                return getattr(super(), name)(*args, **kwargs)
            except RedisError as exc:
                self._down_until = time.monotonic() + RETRY_AFTER
                self._failures.occurred(exc)
        return getattr(self._local, name)(*args, **kwargs)

    def add(self, key: Any, value: Any, timeout: Any = None, version: int | None = None) -> bool:
        """Set key if it is not set."""
        return bool(self._either("add", key, value, timeout, version))

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        """The value of key, or default."""
        return self._either("get", key, default, version)

    def set(self, key: Any, value: Any, timeout: Any = None, version: int | None = None) -> None:
        """Set key."""
        self._either("set", key, value, timeout, version)

    def get_many(self, keys: Any, version: int | None = None) -> dict[Any, Any]:
        """The values of the keys that are set."""
        return dict(self._either("get_many", keys, version))

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Add delta to key's value."""
        return int(self._either("incr", key, delta, version))

    def delete(self, key: Any, version: int | None = None) -> bool:
        """Remove key."""
        return bool(self._either("delete", key, version))
