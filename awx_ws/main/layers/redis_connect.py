"""How the service reaches Redis: at an address (REDIS_URL) or as the master a set of Redis
Sentinels names (REDIS_SENTINELS, REDIS_SENTINEL_MASTER), with bounded pools either way.

A host is a dict in channels_redis's `hosts` format: `{"address": url, ...}`, or
`{"sentinels": [(host, port), ...], "master_name": name, "sentinel_kwargs": {...}, ...}` with
the master's own connection options beside them (password, db), or in a REDIS_URL-style "url"
whose host is ignored. Every Redis user of a process
builds its pool here (the layer's async pool, the sync emit's, the shared cache's), so each one
follows the master through a failover the same way: a new connection asks the sentinels where
the master is, and a connection to a master that was demoted is dropped at its first refused
write (redis-py's SentinelManagedConnection).

channels_redis builds an unbounded pool for sentinels; ours wait at the limit, as they do for
an address (layers/redis.py, create_pool).

A connection that cannot be made (Redis restarting, the sentinels still naming a master that
died) raises NotConnected: nothing of the command was sent, so it can be sent again. The sync
emit's pool waits for Redis that way (`reconnect_within`), re-asking the sentinels each time, so
an emit rides through a failover instead of failing while the replica is promoted.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from queue import Empty
from typing import Any

from redis import BlockingConnectionPool as SyncBlockingPool
from redis.asyncio import BlockingConnectionPool as AsyncBlockingPool
from redis.asyncio.sentinel import MasterNotFoundError as AsyncMasterNotFoundError
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.connection import parse_url
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import MasterNotFoundError
from redis.sentinel import Sentinel as SyncSentinel
from redis.sentinel import SentinelConnectionPool as SyncSentinelConnectionPool

from awx_ws.main.exceptions import redact_url
from awx_ws.main.retry import Backoff

# Pauses between attempts to reach Redis while a pool waits for it: short, since a failover ends
# at an instant nobody announces.
RECONNECT_BACKOFF = (0.05, 0.5)
# Refusals of the credentials: no wait mends them.
_FOR_GOOD = (AuthenticationError, AuthorizationError)
# False within at_once().
_WAITING: contextvars.ContextVar[bool] = contextvars.ContextVar("awx_ws_redis_waiting", default=True)


class NotConnected(RedisConnectionError):
    """No connection to Redis could be made for a command: nothing of it was sent."""


class SyncWaitingPool:
    """Mixed into a sync pool: get_connection raises NotConnected when Redis cannot be reached,
    after trying again for up to `reconnect_within` seconds (0, the default: once).

    Once a wait has run out, later calls try once, until Redis answers again: a long outage makes
    callers fail at once, as they did without the wait, instead of holding each for the window.
    """

    def __init__(self, *args: Any, reconnect_within: float = 0.0, **kwargs: Any) -> None:
        self.reconnect_within = reconnect_within
        self.unreachable = False  # a wait ran out, and no connection was made since
        super().__init__(*args, **kwargs)

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        """A connected connection, waiting (up to reconnect_within) for Redis to take one."""
        window = 0.0 if self.unreachable or not _WAITING.get() else self.reconnect_within
        deadline = time.monotonic() + window
        backoff = Backoff(*RECONNECT_BACKOFF)
        while True:
            try:
                connection = super().get_connection(*args, **kwargs)  # type: ignore[misc]
            except _FOR_GOOD as exc:  # refused credentials: no wait mends them
                raise NotConnected(str(exc)) from exc
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # Waiting for a free connection counts against the same deadline.
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    self.unreachable = self.unreachable or window > 0
                    raise NotConnected(str(exc)) from exc
            else:
                self.unreachable = False
                return connection
            time.sleep(delay)  # sync code only: the sync emit refuses to run on an event loop


@contextlib.contextmanager
def at_once() -> Iterator[None]:
    """Within it, a waiting pool tries once (a readiness probe answers now, not after a wait)."""
    token = _WAITING.set(False)
    try:
        yield
    finally:
        _WAITING.reset(token)


class SyncAddressPool(SyncWaitingPool, SyncBlockingPool):
    """redis-py's blocking pool for an address, raising NotConnected when Redis is unreachable."""


class AsyncSentinelPool(AsyncSentinelConnectionPool, AsyncBlockingPool):
    """redis.asyncio's pool for a Sentinel-managed master, bounded: at the limit callers wait."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Close the pool's connections; closing all of them (the layer's close_pools) closes
        those to the sentinels too, which redis-py's pool leaves open."""
        await super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.connection_pool.disconnect()


class SyncSentinelPool(SyncWaitingPool, SyncSentinelConnectionPool, SyncBlockingPool):
    """redis-py's blocking pool for a Sentinel-managed master, bounded: at the limit callers wait."""

    def release(self, connection: Any) -> None:
        """Take connection back; one the pool no longer owns (to a master that moved, or made
        while the sentinels named none) is forgotten, not only closed: redis-py's blocking pool
        keeps every connection it made in a list, and each such one would stay there for good."""
        owned = self.owns_connection(connection)  # type: ignore[no-untyped-call]
        super().release(connection)  # type: ignore[no-untyped-call]
        if not owned:
            with contextlib.suppress(ValueError):
                self._connections.remove(connection)

    def disconnect(self, inuse_connections: bool = True) -> None:
        """Close the pool's connections; only the idle ones when inuse_connections is False.

        redis-py's Sentinel pool asks for the idle ones when the master moves, and its blocking
        pool takes no argument (every connection, even one another thread is using): the idle
        ones are those in its queue, taken out, closed and put back.
        """
        if inuse_connections:
            super().disconnect()  # type: ignore[no-untyped-call]
            return
        taken = []
        try:
            while True:
                taken.append(self.pool.get_nowait())
        except Empty:
            pass
        for connection in taken:
            if connection is not None:
                connection.disconnect()
        for connection in reversed(taken):  # back in the order they came out (LIFO)
            self.pool.put_nowait(connection)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SyncSentinelPool:
        """The pool for Django's cache (OPTIONS["pool_class"]): url gives the master's password
        and database, kwargs the sentinels as in a host."""
        return sync_pool({**kwargs, "url": url})  # type: ignore[no-any-return]


def master_options(url: str) -> dict[str, Any]:
    """The connection options url gives beside its host (password, username, db, ...): with
    sentinels, the sentinels say where the master is, and REDIS_URL how to log in to it."""
    options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    options.pop("host", None)
    options.pop("port", None)
    options.pop("path", None)  # a unix socket: the sentinels give a TCP address
    # The Sentinel pool picks its own connection class (one that asks the sentinels); for
    # rediss:// it picks the TLS one when told ssl=True.
    connection_class = options.pop("connection_class", None)
    if connection_class is not None and "SSL" in connection_class.__name__:
        options["ssl"] = True
    return options


def is_sentinel(host: dict[str, Any]) -> bool:
    """True if host names a Sentinel-managed master rather than an address."""
    return "master_name" in host


def _sentinel_parts(host: dict[str, Any]) -> tuple[str, list[Any], Any, dict[str, Any]]:
    """(master name, sentinels, sentinel_kwargs, the master's connection options) of host."""
    options = dict(host)
    master = options.pop("master_name")
    sentinels = options.pop("sentinels")
    sentinel_kwargs = options.pop("sentinel_kwargs", None)
    url = options.pop("url", None)
    if url is not None:
        options = {**master_options(url), **options}
    return master, sentinels, sentinel_kwargs, options


def async_pool(host: dict[str, Any]) -> Any:
    """A bounded redis.asyncio pool for host (an address or a Sentinel-managed master)."""
    return _pool(host, AsyncBlockingPool, AsyncSentinelPool, AsyncSentinel)


def sync_pool(host: dict[str, Any]) -> Any:
    """A bounded blocking redis-py pool for host (an address or a Sentinel-managed master)."""
    return _pool(host, SyncAddressPool, SyncSentinelPool, SyncSentinel)


def _pool(host: dict[str, Any], by_address: Any, by_sentinels: Any, sentinel: Any) -> Any:
    if not is_sentinel(host):
        options = dict(host)
        return by_address.from_url(options.pop("address"), **options)
    master, sentinels, sentinel_kwargs, options = _sentinel_parts(host)
    return by_sentinels(master, sentinel(sentinels, sentinel_kwargs=sentinel_kwargs), **options)


def behind(exc: BaseException) -> BaseException:
    """The error that made a connection fail, for NotConnected; exc itself otherwise."""
    if isinstance(exc, NotConnected) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def explain(exc: BaseException) -> str:
    """exc's text for an error message, with the setting to check when it points at one."""
    exc = behind(exc)
    text = str(exc)
    if isinstance(exc, MasterNotFoundError | AsyncMasterNotFoundError):
        if "AuthenticationError" in text:
            return f"the sentinels refused the password (REDIS_SENTINEL_PASSWORD): {text}"
        return (
            "the sentinels name no usable master (a failover under way, or not the one "
            f"REDIS_SENTINEL_MASTER names): {text}"
        )
    return text


def describe(host: dict[str, Any]) -> str:
    """Where host is, for messages, naming the settings that say so (no passwords)."""
    if is_sentinel(host):
        sentinels = ",".join(f"{name}:{port}" for name, port in host["sentinels"])
        return f"REDIS_SENTINELS={sentinels} (REDIS_SENTINEL_MASTER={host['master_name']})"
    return "REDIS_URL=" + redact_url(str(host.get("address", host)))
