"""The node's open connections per user in its Redis (AWX_WS_MAX_CONNECTIONS_PER_USER), shared by
its daphne processes: the Redis layer's ConnectionStore.

A hash of totals per user (`<prefix>:user-connections`) and one hash per process (`<prefix>:
connections:<client prefix>`), changed together in one script. A process killed with its
connections open leaves its hash behind; the start-up purge (redis_presence.py) takes its counts off the
totals (`forget_process`). Should Redis restart empty, or a write fail, the process's share is
written again whole from its memory count after the fan-out's resync (`keep_synced`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from awx_ws.main.exceptions import RedisUnavailable
from awx_ws.main.layers.redis_keys import process_counts_key, user_counts_key
from awx_ws.main.retry import spawn

if TYPE_CHECKING:
    from awx_ws.main.layers.base import CountKeeper
    from awx_ws.main.layers.redis_types import RedisLayer

logger = logging.getLogger(__name__)

# KEYS: totals, this process's hash; ARGV: user id, limit. 1 when counted, 0 when at the limit.
ACQUIRE_LUA = """
local total = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
return 1
"""

# KEYS: totals, this process's hash; ARGV: user id. Takes back one connection, if still counted.
RELEASE_LUA = """
local own = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if own <= 0 then return 0 end
if own == 1 then redis.call('HDEL', KEYS[2], ARGV[1]) else redis.call('HINCRBY', KEYS[2], ARGV[1], -1) end
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

# Takes every connection in a process's hash (KEYS[2]) off the totals (KEYS[1]) and empties it;
# `removed` says how many.
_TAKE_BACK_LUA = """
local counts = redis.call('HGETALL', KEYS[2])
local removed = 0
for i = 1, #counts, 2 do
    local n = tonumber(counts[i + 1])
    removed = removed + n
    if redis.call('HINCRBY', KEYS[1], counts[i], -n) <= 0 then redis.call('HDEL', KEYS[1], counts[i]) end
end
redis.call('DEL', KEYS[2])
"""

# KEYS: totals, a dead process's hash. Takes all its connections off the totals; returns how many.
FORGET_LUA = _TAKE_BACK_LUA + "return removed\n"

# KEYS: totals, this process's hash; ARGV: user id, count pairs of its open connections. Makes the
# node's count of this process what it is, whatever Redis held (nothing, after a restart).
RESTORE_LUA = (
    _TAKE_BACK_LUA
    + """
for i = 1, #ARGV, 2 do
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    redis.call('HINCRBY', KEYS[1], ARGV[i], tonumber(ARGV[i + 1]))
end
return #ARGV / 2
"""
)


async def forget_process(layer: RedisLayer, client_prefix: str) -> int:
    """Take a dead process's connections off the node's totals (the start-up purge)."""
    keys = [user_counts_key(layer.prefix), process_counts_key(layer.prefix, client_prefix)]
    return int(await layer.connection(0).eval(FORGET_LUA, 2, *keys))


class RedisConnectionStore:
    """This process's share of the node's count, in Redis."""

    def __init__(self, layer: RedisLayer) -> None:
        self.layer = layer

    @property
    def lock(self) -> asyncio.Lock:
        """The fan-out's set-up lock: one client's Redis work at a time, as for streams. 500 clients
        arriving (or leaving) together would otherwise take as many pooled Redis connections at
        once, and keep them."""
        return self.layer.fanout.lock

    async def _eval(self, script: str, *args: Any) -> int:
        keys = [
            user_counts_key(self.layer.prefix),
            process_counts_key(self.layer.prefix, self.layer.client_prefix),
        ]
        try:
            return int(await self.layer.connection(0).eval(script, 2, *keys, *args))
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(
                f"connection counts not written, {self.layer.describe_hosts()}: {exc}"
            ) from exc

    async def acquire(self, user_id: int, limit: int) -> bool:
        """Count one more connection of user_id; False at the node's limit."""
        return bool(await self._eval(ACQUIRE_LUA, user_id, limit))

    async def release(self, user_id: int) -> None:
        """Take back one connection of user_id, if this process still has one counted."""
        await self._eval(RELEASE_LUA, user_id)

    async def restore(self, counts: dict[int, int]) -> int:
        """Make this process's share exactly counts; the users written."""
        return await self._eval(
            RESTORE_LUA, *[str(value) for item in sorted(counts.items()) for value in item]
        )

    def keep_synced(self, counter: CountKeeper) -> asyncio.Task[None]:
        """Write the process's share again after every resync of its fan-out (Redis may have
        restarted empty) and after a count the counter could not write."""
        lost = asyncio.Event()
        forget_resync = self.layer.fanout.on_resync(lost.set)
        forget_missed = counter.on_missed(lost.set)

        async def restore(failures: int) -> float:
            if not failures:
                await lost.wait()
            lost.clear()  # before the write: a resync during it asks for another
            users = await counter.restore(self)
            logger.info("connection counts of %d users written again on the node", users)
            return 0.0

        def stop(_: asyncio.Task[None]) -> None:
            forget_resync()
            forget_missed()

        task = spawn("connection count restore", restore, metric="connection_count_restore")
        task.add_done_callback(stop)
        return task
