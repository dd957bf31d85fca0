"""Group memberships kept alive: channels_redis drops members older than group_expiry, and a
restarted Redis drops them all. A consumer holding groups longer (a peer relay's) re-joins them on
time, and at once after its process's fan-out resyncs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from awx_ws.main.retry import spawn


class ResyncSource(Protocol):
    """A process's fan-out as seen here (fanout.py imports this module, not the other way)."""

    def on_resync(self, listener: Callable[[], None]) -> Callable[[], None]: ...


def refresh_interval(layer: Any) -> float | None:
    """How often memberships are re-added so channels_redis's group_expiry never drops them.

    channels_redis drops group members older than group_expiry (a day by default) at the next
    group_send. A consumer re-joins when it reconnects, but a process's fan-out membership, or a
    peer relay's, lives as long as the group is held, which can be longer. None: no expiry (RabbitMQ).
    """
    group_expiry = getattr(layer, "group_expiry", None)
    return max(1.0, group_expiry / 4) if group_expiry else None


def keep_joined(layer: Any, channel: str, groups: Callable[[], Iterable[str]]) -> asyncio.Task[None] | None:
    """Start re-joining channel's groups every refresh_interval (None when the layer needs none)."""
    interval = refresh_interval(layer)
    if interval is None:
        return None

    # Also at once when the process's fan-out finds the layer may have restarted empty: only one
    # consumer of a process sees the failure (the one holding channels_redis's shared receive),
    # so the others would keep waiting on a channel whose groups are gone.
    lost = asyncio.Event()
    fanout: ResyncSource | None = getattr(layer, "fanout", None)
    forget = fanout.on_resync(lost.set) if fanout is not None else None

    async def refresh(failures: int) -> float:
        if not failures:
            try:
                async with asyncio.timeout(interval):
                    await lost.wait()
            except TimeoutError:
                pass
        lost.clear()
        # In bulk (ServiceLayer.group_add_many): a peer's link may hold 100,000 groups.
        await layer.group_add_many(sorted(groups()), channel)
        return 0.0

    task = spawn(f"membership refresh {channel}", refresh, metric="membership_refresh")
    if forget is not None:
        task.add_done_callback(lambda _: forget())
    return task
