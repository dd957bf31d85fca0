"""Which groups this node's clients hold: what the relay asks peers to forward.

Each daphne process counts the client connections per group and mirrors the groups with at
least one connection into a Redis set `<prefix>:interest:<client prefix>`, announcing changes
on the pub/sub channel `<prefix>:interest-changed`. The relay takes the union over live processes
(liveness.py decides which are live), so peer subscriptions of BroadcastConsumers never count:
a node that merely forwards a group does not ask its other peers for it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from awx_ws.main.liveness import LivenessJudge

if TYPE_CHECKING:
    from awx_ws.main.layers import RedisChannelLayer


def interest_key(layer_prefix: str, client_prefix: str) -> str:
    """Redis set of one process's client-held groups."""
    return f"{layer_prefix}:interest:{client_prefix}"


def changes_channel(layer_prefix: str) -> str:
    """Pub/sub channel announcing that some process's interest set changed."""
    return f"{layer_prefix}:interest-changed"


class LocalInterest:
    """Reference counts of the groups this process's client connections hold, kept in Redis."""

    def __init__(self, layer: RedisChannelLayer) -> None:
        self.layer = layer
        self.key = interest_key(layer.prefix, layer.client_prefix)
        self.counts: Counter[str] = Counter()
        # Writes go out one at a time: a SREM overtaking a later SADD would drop a live group.
        self._lock = asyncio.Lock()

    async def add(self, groups: Iterable[str]) -> None:
        """Count one more connection in each group."""
        async with self._lock:
            fresh = [group for group in groups if self.counts[group] == 0]
            self.counts.update(groups)
            if fresh:
                connection = self.layer.connection(0)
                await connection.sadd(self.key, *fresh)
                await connection.publish(changes_channel(self.layer.prefix), self.layer.client_prefix)

    async def discard(self, groups: Iterable[str]) -> None:
        """Count one connection fewer in each group."""
        async with self._lock:
            gone = []
            for group in groups:
                self.counts[group] -= 1
                if self.counts[group] <= 0:
                    del self.counts[group]
                    gone.append(group)
            if gone:
                connection = self.layer.connection(0)
                await connection.srem(self.key, *gone)
                await connection.publish(changes_channel(self.layer.prefix), self.layer.client_prefix)


async def node_interest(layer: RedisChannelLayer) -> set[str]:
    """Every group some live process of this node's Redis holds for a client."""
    judge = LivenessJudge(layer)
    connection = layer.connection(0)
    groups: set[str] = set()
    prefix = f"{layer.prefix}:interest:"
    async for key in connection.scan_iter(match=prefix + "*", count=500):
        owner = key.decode()[len(prefix) :]
        if await judge.dead(owner):
            continue
        groups.update(member.decode() for member in await connection.smembers(key))
    return groups
