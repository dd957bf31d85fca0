"""Which groups this node's clients hold: what the relay asks peers to forward.

Each daphne process's fan-out (fanout.py) mirrors the groups its client connections hold into a
Redis set `<prefix>:interest:<client prefix>`, announcing changes on the pub/sub channel
`<prefix>:interest-changed`. The relay takes the union over live processes
(liveness.py decides which are live), so peer subscriptions of BroadcastConsumers never count:
a node that merely forwards a group does not ask its other peers for it.
"""

from __future__ import annotations

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
