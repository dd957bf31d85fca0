"""Which groups this node's clients hold, on Redis: what the relay asks peers to forward.

Each daphne process's fan-out (redis_fanout.py) mirrors the groups its client connections hold
into a Redis set `<prefix>:interest:<client prefix>`, announcing changes on the pub/sub channel
`<prefix>:interest-changed`. The relay takes the union over live processes (redis_presence.py
decides which are live).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from awx_ws.main.layers.redis_keys import interest_changed, interest_key
from awx_ws.main.layers.redis_presence import LivenessJudge
from awx_ws.main.retry import Round

if TYPE_CHECKING:
    from awx_ws.main.layers.redis_types import RedisLayer

# The relay recomputes interest at every change notice, and at least this often (missed notices).
INTEREST_RESYNC = 5.0


async def node_interest(layer: RedisLayer) -> set[str]:
    """Every group some live process of this node's Redis holds for a client."""
    judge = LivenessJudge(layer)
    connection = layer.connection(0)
    groups: set[str] = set()
    prefix = interest_key(layer.prefix, "")
    async for key in connection.scan_iter(match=prefix + "*", count=500):
        owner = key.decode()[len(prefix) :]
        if await judge.dead(owner):
            continue
        groups.update(member.decode() for member in await connection.smembers(key))
    return groups


def watch_redis_interest(layer: RedisLayer, publish: Callable[[frozenset[str]], None]) -> Round:
    """A round (retry.supervise) that publishes the node's interest from Redis at every change
    notice and every INTEREST_RESYNC, until its pub/sub connection fails."""

    async def watch(failures: int) -> None:
        pubsub = layer.connection(0).pubsub()
        try:
            await pubsub.subscribe(interest_changed(layer.prefix))
            while True:
                publish(frozenset(await node_interest(layer)))
                # Wait for a change notice (or the periodic resync), then drain the burst.
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=INTEREST_RESYNC)
                while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.01):
                    pass
        finally:
            await pubsub.aclose()

    return watch
