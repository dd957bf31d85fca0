"""At most AWX_WS_MAX_CONNECTIONS_PER_USER open connections per user and node (websocket and SSE
together); past it the handshake is refused with 403.

On the Redis layer the count is the node's, shared by its daphne processes: a hash of totals per
user (`<prefix>:user-connections`) and one hash per process (`<prefix>:connections:<client
prefix>`), changed together in one script. A process killed with its connections open leaves its
hash behind; the start-up purge (liveness.py) takes its counts off the totals. Each process also
keeps its own count in memory, the truth for its open connections: should Redis restart empty
(or a count be missed while it was away), the fan-out's resync writes the process's hash again
from it (`keep_counted`), so the node's totals come back without anyone reconnecting. On
RabbitMQ, which has no shared store, each process counts its own (docs/channels.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections import Counter
from typing import Any

from channels.db import database_sync_to_async
from django.db import DatabaseError
from redis.exceptions import RedisError

from awx_ws.main import connlimit_database
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import DatabaseUnavailable
from awx_ws.main.layers import RedisChannelLayer
from awx_ws.main.rabbitmq import RabbitmqChannelLayer
from awx_ws.main.retry import spawn

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


def totals_key(layer: RedisChannelLayer) -> str:
    """The node's open connections per user."""
    return f"{layer.prefix}:user-connections"


def process_key(layer: RedisChannelLayer, client_prefix: str) -> str:
    """One process's open connections per user."""
    return f"{layer.prefix}:connections:{client_prefix}"


async def forget_process(layer: RedisChannelLayer, client_prefix: str) -> int:
    """Take a dead process's connections off the node's totals (the start-up purge)."""
    keys = [totals_key(layer), process_key(layer, client_prefix)]
    return int(await layer.connection(0).eval(FORGET_LUA, 2, *keys))


class ConnectionCounter:
    """This process's side of the count: its open connections per user, and their share of the
    node's count (in Redis, or in the database on RabbitMQ)."""

    def __init__(self) -> None:
        self._local: Counter[int] = Counter()
        # This process's name in the database count (RabbitMQ); its row there says it is alive.
        self.process = f"{os.getpid()}-{secrets.token_hex(8)}"
        # A database count was missed (it was unreachable): the next heartbeat writes them all.
        self._unsynced = False

    async def acquire(self, layer: Any, user_id: int) -> bool:
        """Count one more connection of user_id; False (nothing counted) at the limit."""
        limit = ws_settings.MAX_CONNECTIONS_PER_USER
        try:
            if isinstance(layer, RedisChannelLayer):
                counted = await self._acquire_in_redis(layer, user_id, limit)
            elif isinstance(layer, RabbitmqChannelLayer):
                counted = await database_sync_to_async(connlimit_database.acquire)(
                    self.process, ws_settings.NODE_NAME, user_id, limit, ws_settings.LIVENESS_TTL
                )
            else:
                counted = self._local[user_id] < limit
        except (RedisError, OSError, DatabaseError) as exc:
            # The connection cannot be served without its layer anyway; it is counted in memory,
            # and in the node's count again once the store is back (keep_counted, the heartbeat).
            logger.warning("connection of user %s not counted on the node: %s", user_id, exc)
            self._unsynced = True
            counted = True
        if counted:
            self._local[user_id] += 1
        return counted

    async def _acquire_in_redis(self, layer: RedisChannelLayer, user_id: int, limit: int) -> bool:
        keys = [totals_key(layer), process_key(layer, layer.client_prefix)]
        # The fan-out's set-up lock: one client's Redis work at a time, as for streams. 500
        # clients arriving (or leaving) together would otherwise take as many pooled Redis
        # connections at once, and keep them.
        async with layer.fanout.lock:
            return bool(await layer.connection(0).eval(ACQUIRE_LUA, 2, *keys, user_id, limit))

    async def release(self, layer: Any, user_id: int) -> None:
        """Take back one connection of user_id (it closed)."""
        if self._local[user_id] <= 0:
            return
        self._local[user_id] -= 1
        if not self._local[user_id]:
            del self._local[user_id]
        try:
            if isinstance(layer, RedisChannelLayer):
                keys = [totals_key(layer), process_key(layer, layer.client_prefix)]
                async with layer.fanout.lock:
                    await layer.connection(0).eval(RELEASE_LUA, 2, *keys, user_id)
            elif isinstance(layer, RabbitmqChannelLayer):
                await database_sync_to_async(connlimit_database.release)(self.process, user_id)
        except (RedisError, OSError, DatabaseError) as exc:
            # Put right by the restore after the fan-out's resync or the next heartbeat.
            logger.warning("closed connection of user %s not uncounted on the node: %s", user_id, exc)
            self._unsynced = True

    async def restore(self, layer: RedisChannelLayer) -> int:
        """Write this process's open connections into the node's count again; the users counted."""
        keys = [totals_key(layer), process_key(layer, layer.client_prefix)]
        async with layer.fanout.lock:
            pairs = [str(value) for item in sorted(self._local.items()) for value in item]
            return int(await layer.connection(0).eval(RESTORE_LUA, 2, *keys, *pairs))

    async def beat(self) -> None:
        """Mark this process alive in the database count (and rewrite its counts if one was missed)."""
        counts, unsynced = dict(self._local), self._unsynced
        self._unsynced = False
        try:
            await database_sync_to_async(connlimit_database.beat)(
                self.process, ws_settings.NODE_NAME, ws_settings.LIVENESS_TTL, counts if unsynced else None
            )
        except DatabaseError as exc:
            self._unsynced = self._unsynced or unsynced
            raise DatabaseUnavailable(f"cannot write connection counts (DATABASE_URL): {exc}") from exc
        except BaseException:
            self._unsynced = self._unsynced or unsynced
            raise

    async def withdraw(self) -> None:
        """Take this process out of the database count (it stops; best effort)."""
        try:
            await database_sync_to_async(connlimit_database.withdraw)(self.process)
        except DatabaseError as exc:  # its heartbeat goes stale within the TTL: the count follows
            logger.warning("process %s could not take back its connection counts: %s", self.process, exc)


counter = ConnectionCounter()


def keep_counted(layer: RedisChannelLayer) -> asyncio.Task[None]:
    """Start restoring this process's count after every resync of its fan-out (Redis restarted)."""
    lost = asyncio.Event()
    forget = layer.fanout.on_resync(lost.set)

    async def restore(failures: int) -> float:
        if not failures:
            await lost.wait()
        lost.clear()  # before the write: a resync during it asks for another
        users = await counter.restore(layer)
        logger.info("connection counts of %d users written again after the channel layer's resync", users)
        return 0.0

    task = spawn("connection count restore", restore, metric="connection_count_restore")
    task.add_done_callback(lambda _: forget())
    return task


def keep_alive_in_database() -> asyncio.Task[None]:
    """Start this process's heartbeat in the database count (RabbitMQ)."""

    async def heartbeat(failures: int) -> float:
        await counter.beat()
        return float(ws_settings.LIVENESS_INTERVAL)

    return spawn("connection count heartbeat", heartbeat, metric="connection_count_heartbeat")
