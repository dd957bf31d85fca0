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
from collections.abc import Callable
from typing import Any

from channels.db import database_sync_to_async
from django.db import DatabaseError, InterfaceError
from redis.exceptions import RedisError

from awx_ws.main import connlimit_database
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import DatabaseUnavailable
from awx_ws.main.layers import RedisChannelLayer
from awx_ws.main.rabbitmq import RabbitmqChannelLayer
from awx_ws.main.retry import spawn

logger = logging.getLogger(__name__)

# Seconds a stopping process waits to take its counts out of the database.
WITHDRAW_WAIT = 2.0

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
    node's count (in Redis, or in the database on RabbitMQ).

    The in-memory count is the truth; the node's share can miss a change while its store is away
    (or a write's outcome is unknown). Then it is written again whole: on Redis by `keep_counted`,
    told through `_missed`; on RabbitMQ by the next heartbeat. Until then the node may count too
    few, which lets a user past the limit for a while, or too many, refusing one early.
    """

    def __init__(self) -> None:
        self._local: Counter[int] = Counter()
        # This process's name in the database count (RabbitMQ); its row there says it is alive.
        self.process = f"{os.getpid()}-{secrets.token_hex(8)}"
        # Set when the node's share may be wrong: the database heartbeat reads it; on Redis the
        # listeners (keep_counted's wake-up) are called.
        self._unsynced = False
        self._missed: list[Callable[[], None]] = []
        # Releases of handshakes cancelled while their count was being written (kept referenced).
        self._pending: set[asyncio.Task[None]] = set()

    def _mark_missed(self) -> None:
        self._unsynced = True
        for listener in list(self._missed):
            listener()

    async def acquire(self, layer: Any, user_id: int) -> bool:
        """Count one more connection of user_id; False (nothing counted) at the limit."""
        # Shielded: daphne cancels a handshake whose client went away, and a count written by then
        # must be taken back, not left behind for good.
        work = asyncio.ensure_future(self._acquire(layer, user_id))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(lambda done: self._release_if_counted(done, layer, user_id))
            raise

    def _release_if_counted(self, done: asyncio.Future[bool], layer: Any, user_id: int) -> None:
        if done.cancelled() or done.exception() is not None or not done.result():
            return
        task = asyncio.ensure_future(self.release(layer, user_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _acquire(self, layer: Any, user_id: int) -> bool:
        limit = ws_settings.MAX_CONNECTIONS_PER_USER
        try:
            if isinstance(layer, RedisChannelLayer):
                keys = [totals_key(layer), process_key(layer, layer.client_prefix)]
                # The fan-out's set-up lock: one client's Redis work at a time, as for streams.
                # 500 clients arriving (or leaving) together would otherwise take as many pooled
                # Redis connections at once, and keep them. The memory count changes under it too,
                # so a restore never writes a count a script is about to change again.
                async with layer.fanout.lock:
                    if await layer.connection(0).eval(ACQUIRE_LUA, 2, *keys, user_id, limit):
                        self._local[user_id] += 1
                        return True
                    return False
            if isinstance(layer, RabbitmqChannelLayer):
                counted = await database_sync_to_async(connlimit_database.acquire)(
                    self.process, ws_settings.NODE_NAME, user_id, limit, ws_settings.LIVENESS_TTL
                )
            else:
                counted = self._local[user_id] < limit
        except (RedisError, OSError, DatabaseError, InterfaceError) as exc:
            # The connection cannot be served without its layer anyway; it is counted in memory,
            # and in the node's count again once the store is back.
            logger.warning("connection of user %s not counted on the node: %s", user_id, exc)
            self._mark_missed()
            counted = True
        if counted:
            self._local[user_id] += 1
        return counted

    def _forget_one(self, user_id: int) -> None:
        self._local[user_id] -= 1
        if not self._local[user_id]:
            del self._local[user_id]

    async def release(self, layer: Any, user_id: int) -> None:
        """Take back one connection of user_id (it closed)."""
        if self._local[user_id] <= 0:
            return
        try:
            if isinstance(layer, RedisChannelLayer):
                keys = [totals_key(layer), process_key(layer, layer.client_prefix)]
                async with layer.fanout.lock:
                    self._forget_one(user_id)
                    await layer.connection(0).eval(RELEASE_LUA, 2, *keys, user_id)
                return
            self._forget_one(user_id)
            if isinstance(layer, RabbitmqChannelLayer):
                await database_sync_to_async(connlimit_database.release)(self.process, user_id)
        except (RedisError, OSError, DatabaseError, InterfaceError) as exc:
            logger.warning("closed connection of user %s not uncounted on the node: %s", user_id, exc)
            self._mark_missed()

    async def restore(self, layer: RedisChannelLayer) -> int:
        """Write this process's open connections into the node's count again; the users counted."""
        keys = [totals_key(layer), process_key(layer, layer.client_prefix)]
        async with layer.fanout.lock:
            pairs = [str(value) for item in sorted(self._local.items()) for value in item]
            return int(await layer.connection(0).eval(RESTORE_LUA, 2, *keys, *pairs))

    async def beat(self) -> None:
        """Mark this process alive in the database count; its counts are written again whole when
        one was missed or its row was gone (a peer took it for dead during a long outage)."""
        unsynced, self._unsynced = self._unsynced, False
        try:
            await database_sync_to_async(connlimit_database.beat)(
                self.process, ws_settings.NODE_NAME, ws_settings.LIVENESS_TTL, dict(self._local), unsynced
            )
        except BaseException as exc:
            self._unsynced = True  # whatever reached the database, write it all next time
            if isinstance(exc, DatabaseError | InterfaceError):
                raise DatabaseUnavailable(f"cannot write connection counts (DATABASE_URL): {exc}") from exc
            raise

    async def withdraw(self) -> None:
        """Take this process out of the database count (it stops; best effort, bounded)."""
        try:
            async with asyncio.timeout(WITHDRAW_WAIT):
                await database_sync_to_async(connlimit_database.withdraw)(self.process)
        except (DatabaseError, InterfaceError, TimeoutError) as exc:
            # Its heartbeat goes stale within the TTL: its count stops counting then.
            logger.warning("process %s could not take back its connection counts: %r", self.process, exc)


counter = ConnectionCounter()


def keep_counted(layer: RedisChannelLayer) -> asyncio.Task[None]:
    """Start writing this process's count again whenever it may be wrong: after every resync of
    its fan-out (Redis may have restarted empty) and after a count it could not write."""
    lost = asyncio.Event()
    forget = layer.fanout.on_resync(lost.set)
    counter._missed.append(lost.set)

    async def restore(failures: int) -> float:
        if not failures:
            await lost.wait()
        lost.clear()  # before the write: a resync during it asks for another
        users = await counter.restore(layer)
        logger.info("connection counts of %d users written again on the node", users)
        return 0.0

    def stop(_: asyncio.Task[None]) -> None:
        forget()
        if lost.set in counter._missed:
            counter._missed.remove(lost.set)

    task = spawn("connection count restore", restore, metric="connection_count_restore")
    task.add_done_callback(stop)
    return task


def keep_alive_in_database() -> asyncio.Task[None]:
    """Start this process's heartbeat in the database count (RabbitMQ)."""

    async def heartbeat(failures: int) -> float:
        await counter.beat()
        return float(ws_settings.LIVENESS_INTERVAL)

    return spawn("connection count heartbeat", heartbeat, metric="connection_count_heartbeat")
