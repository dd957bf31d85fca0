"""Group memberships on Redis in bulk: one channel joining or leaving many groups at once.

channels_redis's group_add takes two round trips per group (ZADD, EXPIRE) and our group_discard
one more for the leave's mark: a peer's relay link asking for 100,000 groups would cost its
BroadcastConsumer 200,000 round trips, and as many again at each membership refresh and when
the link ends. Even pipelined, redis-py spends some 10 s of CPU packing 200,000 commands. Here a
Lua script writes MEMBERSHIP_BATCH groups per call, exactly what the single calls would write:
the member with the join time as score and the group's expiry; on a leave, the group's mark
(RedisChannelLayer.mark_left) before the member goes. The start-up purge reads and clears its
pages of group keys the same way (redis_presence.py): a process that died holding a peer link's
100,000 groups cost its successor 300,000 pipelined commands, some 20 s, before it could listen.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from awx_ws.main.history import history_policy, resumable_for
from awx_ws.main.layers.redis_keys import watched_key

if TYPE_CHECKING:
    from awx_ws.main.layers.redis_types import RedisLayer

# Groups per script call: a call of a few milliseconds, during which Redis serves nobody else.
MEMBERSHIP_BATCH = 1000

# KEYS: group keys; ARGV: channel, join time, group expiry.
ADD_LUA = """
for _, key in ipairs(KEYS) do
    redis.call('ZADD', key, ARGV[2], ARGV[1])
    redis.call('EXPIRE', key, ARGV[3])
end
"""

# KEYS: group keys; each one's members, in one reply.
READ_LUA = """
local members = {}
for i, key in ipairs(KEYS) do members[i] = redis.call('ZRANGE', key, 0, -1) end
return members
"""

# KEYS: (group key, its mark's key) per group; ARGV: per group how long its mark keeps the
# history (0: none), how many members go, then those members. The mark is written before the
# members go (a refused write stops the script with them in place); ZREM takes 1,000 at a time,
# well within Lua's stack. Returns how many ZREM removed.
REMOVE_LUA = """
local removed, at = 0, 1
for i = 1, #KEYS, 2 do
    local keep, last = tonumber(ARGV[at]), at + 1 + tonumber(ARGV[at + 1])
    if keep > 0 then redis.call('SET', KEYS[i + 1], 1, 'EX', keep) end
    for first = at + 2, last, 1000 do
        removed = removed + redis.call('ZREM', KEYS[i], unpack(ARGV, first, math.min(first + 999, last)))
    end
    at = last + 1
end
return removed
"""


async def add_many(layer: RedisLayer, channel: str, groups: Sequence[str]) -> None:
    """channel joins every group (one shard: the caller checks ring_size); RedisUnavailable when
    Redis fails (the batches written before stay written)."""
    script = layer.connection(0).register_script(ADD_LUA)
    for batch in _batches(layer, groups):
        keys = [layer.group_key(group) for group in batch]
        await _run(layer, script, keys, [channel, time.time(), layer.group_expiry])


async def discard_many(layer: RedisLayer, channel: str, groups: Sequence[str]) -> None:
    """channel leaves every group, each marked first as group_discard does (one shard: the caller
    checks ring_size); RedisUnavailable when Redis fails."""
    for batch in _batches(layer, groups):
        try:
            await remove_members(layer, layer.connection(0), {group: [channel] for group in batch}, mark=True)
        except RedisError as exc:
            raise layer.unavailable(exc) from exc


def mark_keep(group: str) -> int:
    """How long a leave's mark keeps group's history (RedisChannelLayer.mark_left); 0: no mark."""
    policy = history_policy(group)
    return resumable_for(policy) if policy is not None else 0


async def read_members(connection: Any, keys: list[bytes]) -> list[list[bytes]]:
    """The members of each group key, in one round trip (the start-up purge's page)."""
    if not keys:
        return []
    members: list[list[bytes]] = await connection.register_script(READ_LUA)(keys=keys)
    return members


async def remove_members(
    layer: RedisLayer, connection: Any, stale: Mapping[str, Sequence[str | bytes]], mark: bool
) -> int:
    """Remove members from groups ({group: members}) in one round trip on connection, marking
    each group first when mark is True (its mark's key on the same Redis); how many went."""
    keys: list[str] = []
    args: list[Any] = []
    for group, members in stale.items():
        keys += [layer.group_key(group), watched_key(layer.prefix, group)]
        args += [mark_keep(group) if mark else 0, len(members), *members]
    return int(await connection.register_script(REMOVE_LUA)(keys=keys, args=args)) if keys else 0


def _batches(layer: RedisLayer, groups: Sequence[str]) -> list[Sequence[str]]:
    for group in groups:
        layer.require_valid_group_name(group)
    return [groups[start : start + MEMBERSHIP_BATCH] for start in range(0, len(groups), MEMBERSHIP_BATCH)]


async def _run(layer: RedisLayer, script: Any, keys: list[str], args: list[Any]) -> None:
    try:
        await script(keys=keys, args=args)
    except RedisError as exc:
        raise layer.unavailable(exc) from exc
