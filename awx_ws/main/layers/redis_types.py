"""What the Redis backend's helper modules use of RedisChannelLayer (redis.py), as protocols.

redis.py imports its helpers (fan-out, presence, history, counts, records); they take the layer
typed by `RedisLayer` instead of importing redis.py back, so there is no import cycle, not even
in type hints. RedisChannelLayer satisfies it (mypy checks each place one is passed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from awx_ws.main.exceptions import RedisUnavailable


class LivenessRecord(Protocol):
    """The process's liveness record keeper (redis_presence.Liveness)."""

    async def start(self) -> None: ...

    def write_into(self, pipe: Any) -> None: ...


class FanoutHooks(Protocol):
    """What helpers ask of the process's fan-out (fanout.Fanout)."""

    @property
    def lock(self) -> asyncio.Lock: ...

    @property
    def groups(self) -> Mapping[str, Any]: ...

    def on_resync(self, listener: Callable[[], None]) -> Callable[[], None]: ...


class RedisLayer(Protocol):
    """The Redis channel layer as its helpers see it."""

    prefix: str
    client_prefix: str
    ring_size: int
    group_expiry: int

    @property
    def liveness(self) -> LivenessRecord: ...

    @property
    def fanout(self) -> FanoutHooks: ...

    # redis.asyncio.Redis; typed Any as channels_redis's own (redis-py annotates its commands with
    # a sync-or-async union that every await would have to narrow).
    def connection(self, index: int) -> Any: ...

    def consistent_hash(self, value: str) -> int: ...

    def deserialize(self, message: bytes) -> dict[str, Any]: ...

    def group_key(self, group: str) -> str: ...

    def describe_hosts(self) -> str: ...

    def unavailable(self, exc: BaseException) -> RedisUnavailable: ...

    def require_valid_group_name(self, name: str) -> bool: ...

    # The group_send script's plan and the reading of its reply (redis_batch.py sends many).
    def fanout_call(
        self, group: str, message: dict[str, Any], share: str | None = None
    ) -> tuple[list[str], list[Any]]: ...

    def mark_left(self, pipe: Any, group: str) -> None: ...

    def after_fanout(self, group: str, message: dict[str, Any], reply: Any) -> list[bytes]: ...

    def group_send_plan(self, others: list[bytes], message: dict[str, Any]) -> Any: ...

    def report_over_capacity(self, over: int, group: str) -> None: ...

    def blocking_client(self, index: int, timeout: float) -> Any: ...
