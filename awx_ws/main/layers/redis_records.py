"""The Redis layer's node records (base.NodeRecords): process figures, relay links, peer acks.

Every process writes its figures beside its liveness record (redis_presence.py) and its groups to
its interest set (redis_fanout.py); the relay writes each link's figures every second and the
groups each peer has confirmed it forwards. Operators' commands, the relay and resuming clients
read them here. Key formats are in redis_keys.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from awx_ws.main.layers import redis_keys as keys
from awx_ws.main.layers.base import ProcessFigures
from awx_ws.main.layers.redis_interest import watch_redis_interest
from awx_ws.main.layers.redis_presence import LivenessJudge

if TYPE_CHECKING:
    from awx_ws.main.interest import InterestSink
    from awx_ws.main.layers.redis_types import RedisLayer
    from awx_ws.main.retry import Round

# A link's figures outlive a stopped relay this long, so --status can say it is stale.
LINK_STATUS_TTL = 3600


def _text(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    return {key.decode(): value.decode() for key, value in raw.items()}


class RedisRecords:
    """NodeRecords in the node's Redis; redis-py's errors leave as RedisUnavailable."""

    def __init__(self, layer: RedisLayer) -> None:
        self.layer = layer

    async def processes(self) -> list[ProcessFigures]:
        """Every live process's figures (as of its last heartbeat) and the groups it holds."""
        try:
            return await self._processes()
        except (RedisError, OSError) as exc:
            raise self.layer.unavailable(exc) from exc

    async def _processes(self) -> list[ProcessFigures]:
        connection = self.layer.connection(0)
        judge = LivenessJudge(self.layer)
        prefix = keys.stats_key(self.layer.prefix, "")
        found = []
        async for raw_key in connection.scan_iter(match=prefix + "*", count=500):
            client_prefix = raw_key.decode()[len(prefix) :]
            if await judge.dead(client_prefix):
                continue
            figures = _text(await connection.hgetall(raw_key))
            if figures:
                members = await connection.smembers(keys.interest_key(self.layer.prefix, client_prefix))
                found.append(ProcessFigures(figures, {member.decode() for member in members}))
        return found

    async def live_nodes(self) -> set[str]:
        """The names (AWX_WS_NODE_NAME) of the nodes with a live process on this Redis."""
        connection = self.layer.connection(0)
        judge = LivenessJudge(self.layer)
        prefix = keys.alive_key(self.layer.prefix, "")
        names = set()
        try:
            async for raw_key in connection.scan_iter(match=prefix + "*", count=500):
                # None for a killed process whose record has not expired yet
                record = await judge.live_record(raw_key.decode()[len(prefix) :])
                if record is not None and record.name:
                    names.add(record.name)
        except (RedisError, OSError) as exc:
            raise self.layer.unavailable(exc) from exc
        return names

    async def write_link_status(self, peer: str, figures: Mapping[str, str]) -> None:
        """Store one relay link's figures."""
        key = keys.link_status_key(self.layer.prefix, peer)
        try:
            async with self.layer.connection(0).pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=dict(figures))
                pipe.expire(key, LINK_STATUS_TTL)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self.layer.unavailable(exc) from exc

    async def link_status(self, peer: str) -> dict[str, str]:
        """One relay link's last figures; empty when none were written."""
        try:
            raw = await self.layer.connection(0).hgetall(keys.link_status_key(self.layer.prefix, peer))
        except (RedisError, OSError) as exc:
            raise self.layer.unavailable(exc) from exc
        return _text(raw)

    async def write_peers(self, peers: Mapping[str, str]) -> None:
        """Store the relay's peers now (replacing the last list)."""
        key = keys.relay_peers_key(self.layer.prefix)
        try:
            async with self.layer.connection(0).pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if peers:
                    pipe.hset(key, mapping=dict(peers))
                    pipe.expire(key, LINK_STATUS_TTL)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self.layer.unavailable(exc) from exc

    async def peers(self) -> dict[str, str]:
        """The relay's peers as it last wrote them (kept an hour); empty when none."""
        try:
            raw = await self.layer.connection(0).hgetall(keys.relay_peers_key(self.layer.prefix))
        except (RedisError, OSError) as exc:
            raise self.layer.unavailable(exc) from exc
        return _text(raw)

    async def reset_forwarding(self, peer: str) -> None:
        """Forget which groups peer forwards here."""
        try:
            await self.layer.connection(0).delete(keys.forwarding_key(self.layer.prefix, peer))
        except (RedisError, OSError) as exc:
            raise self.layer.unavailable(exc) from exc

    async def record_forwarding(self, peer: str, forwarding: list[str], dropped: list[str]) -> None:
        """Record what peer now forwards here and what it stopped forwarding."""
        key = keys.forwarding_key(self.layer.prefix, peer)
        try:
            async with self.layer.connection(0).pipeline(transaction=True) as pipe:
                if dropped:
                    pipe.srem(key, *dropped)
                if forwarding:
                    pipe.sadd(key, *forwarding)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self.layer.unavailable(exc) from exc

    async def forwards(self, peer: str, groups: Iterable[str]) -> bool:
        """Whether peer has confirmed it forwards every one of groups here."""
        wanted = sorted(groups)
        if not wanted:
            return True
        key = keys.forwarding_key(self.layer.prefix, peer)
        try:
            return all(await self.layer.connection(0).smismember(key, wanted))
        except (RedisError, OSError) as exc:
            raise self.layer.unavailable(exc) from exc

    def watch_interest(self, sink: InterestSink) -> Round:
        """The node's interest from the processes' sets and their change notices (redis_interest.py)."""
        return watch_redis_interest(self.layer, sink)
