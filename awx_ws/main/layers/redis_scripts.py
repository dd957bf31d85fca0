"""The Lua of the Redis layer's group_send (redis.py): one round trip for the common case."""

from __future__ import annotations

import hashlib
from typing import Any

from channels_redis.core import RedisChannelLayer
from channels_redis.serializers import MsgPackSerializer
from redis import Redis as BlockingRedis
from redis.exceptions import NoScriptError

from awx_ws.main.layers.redis_history import APPEND_LUA
from awx_ws.main.messages import survives_lua

# Queues blob on key behind everything already queued there. The score is the sender's clock, as
# channels_redis's, raised past the key's highest: a member then pops messages in the order the
# scripts ran, which is the order of the history ids they gave. Scored by the clock alone, a
# message from an emitter whose clock was read earlier (another host, or a thread that waited
# before its script ran) went in front of a newer one, and a client's position, the newest id per
# origin (history.GroupPosition), then took the older one for already seen. The clean-up of
# expired entries is left to the caller, after every write (see GROUP_SEND_LUA).
ENQUEUE_LUA = """
local function enqueue(key, blob, capacity, now, cutoff, expiry, stale)
    local old = redis.call('ZCOUNT', key, 0, cutoff)
    if old > 0 then table.insert(stale, key) end
    if redis.call('ZCARD', key) - old >= capacity then return 1 end
    local score = now
    local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    if top[2] then score = math.max(now, tonumber(top[2]) + 0.000001) end
    -- As text: Lua would pass the number with 14 digits, 0.1 ms at today's epoch.
    redis.call('ZADD', key, string.format('%.17g', score), blob)
    redis.call('EXPIRE', key, expiry)
    return 0
end
"""

# channels_redis's group_send Lua, plus the expiry clean-up it runs as a separate round trip first.
# The clean-up comes after the ZADD: with maxmemory, Redis refuses a script's memory-growing writes
# (OOM) only until it has written once, and a clean-up first would count as that write.
GROUP_SEND_LUA = (
    ENQUEUE_LUA
    + """
local over_capacity = 0
local now = tonumber(ARGV[#ARGV - 1])
local expiry = ARGV[#ARGV]
local cutoff = math.floor(now) - tonumber(expiry)
local stale = {}
for i = 1, #KEYS do
    local capacity = tonumber(ARGV[i + #KEYS])
    over_capacity = over_capacity + enqueue(KEYS[i], ARGV[i], capacity, now, cutoff, expiry, stale)
end
for _, key in ipairs(stale) do redis.call('ZREMRANGEBYSCORE', key, 0, cutoff) end
return over_capacity
"""
)


# One round trip for the common case: read the group and queue the message for every member.
# Fan-out members (`fanout.<name>`: fanout.py reads those keys itself) get the message as it is.
# Other members (process-specific channels such as a peer's relay link) get channels_redis's form
# of it, one copy per inbox naming its channels in `__asgi_channel__`, when ARGV[7] gives their
# capacity; the script can only rebuild a message it can unpack and pack again unchanged
# (RedisLayer.fanout_call decides). Otherwise they are returned for the standard path, a second
# round trip that another emitter's scripts may run before: the queues would then hold ids out
# of order.
# History is appended only while someone could resume the group: it has members, or its last one
# left lately (KEYS[2], set on every leave: RedisLayer.mark_left). Members channels_redis's
# group_expiry drops here leave too.
# ARGV: 1 message, 2 sender's time, 3 expiry, 4 the members' cutoff, 5 a fan-out's capacity,
# 6 prefix, 7 other members' capacity or 0, 8 the serializer's random prefix length, and with
# history 9 length, 10 age, 11 ttl, 12 bytes per group, 13 bytes in all, 14 kept after the last
# member left, 15 share.
GROUP_SEND_FANOUT_LUA = (
    APPEND_LUA
    + ENQUEUE_LUA
    + """
local blob = ARGV[1]
local message_id = ''
-- Reads first: with maxmemory, Redis refuses a script's memory-growing writes (OOM) only until
-- it has written once, and the clean-up below would count as that write.
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[4], '+inf')
local expired = redis.call('ZCOUNT', KEYS[1], 0, ARGV[4])
local plen = tonumber(ARGV[8])
if #KEYS >= 4 then
    -- KEYS[2] the left-lately mark, KEYS[3] the stream, KEYS[4] the origin tag, KEYS[5..9] the total.
    if #members > 0 or expired > 0 or redis.call('EXISTS', KEYS[2]) == 1 then
        message_id, blob = append_history(KEYS[3], KEYS[4], blob, plen, tonumber(ARGV[9]), tonumber(ARGV[10]),
            ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13]), 5, ARGV[15])
        if not message_id then return redis.error_reply('NOORIGIN history origin tag missing') end
    end
    if expired > 0 then redis.call('SET', KEYS[2], 1, 'EX', ARGV[14]) end
end
local now = tonumber(ARGV[2])
local cutoff = math.floor(now) - tonumber(ARGV[3])
local others_capacity = tonumber(ARGV[7])
local others = {}
local inboxes, channels_of = {}, {}
local over = 0
local stale = {}
for _, member in ipairs(members) do
    if string.sub(member, 1, 7) == 'fanout.' then
        over = over + enqueue(ARGV[6] .. member, blob, tonumber(ARGV[5]), now, cutoff, ARGV[3], stale)
    elseif others_capacity > 0 then
        -- channels_redis's inbox of the channel: a process's channels share `specific.<id>!`.
        local bang = string.find(member, '!', 1, true)
        local key = ARGV[6] .. (bang and string.sub(member, 1, bang) or member)
        if not channels_of[key] then
            channels_of[key] = {}
            table.insert(inboxes, key)
        end
        table.insert(channels_of[key], member)
    else
        table.insert(others, member)
    end
end
if #inboxes > 0 then
    local message = cmsgpack.unpack(string.sub(blob, plen + 1))
    for _, key in ipairs(inboxes) do
        message['__asgi_channel__'] = channels_of[key]
        local copy = string.sub(blob, 1, plen) .. cmsgpack.pack(message)
        over = over + enqueue(key, copy, others_capacity, now, cutoff, ARGV[3], stale)
    end
end
-- Clean-ups last, once every write that could be refused at maxmemory has been tried.
for _, key in ipairs(stale) do redis.call('ZREMRANGEBYSCORE', key, 0, cutoff) end
if expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[4]) end
return {over, others, message_id}
"""
)


FANOUT_SHA = hashlib.sha1(GROUP_SEND_FANOUT_LUA.encode()).hexdigest()


def lua_packs_messages(layer: RedisChannelLayer) -> bool:
    """True if our Lua can unpack and pack layer's messages: msgpack, not encrypted."""
    serializer = layer._serializer  # channels_redis's; tests/test_private_apis.py guards it
    return isinstance(serializer, MsgPackSerializer) and serializer.crypter is None


def inbox_capacity(layer: RedisChannelLayer, message: dict[str, Any]) -> int:
    """The capacity of every member that is not a fan-out, if GROUP_SEND_FANOUT_LUA may queue
    message for it itself: one capacity for all, a message Lua packs again unchanged. 0 leaves
    them to the second round trip (GROUP_SEND_LUA)."""
    if layer.channel_capacity or not lua_packs_messages(layer) or not survives_lua(message):
        return 0
    return int(layer.capacity)


def eval_fanout_blocking(connection: BlockingRedis, keys: list[str], args: list[Any]) -> Any:
    """Run GROUP_SEND_FANOUT_LUA on a blocking connection: by its 40-byte digest (EVALSHA), not
    its text on every emit, unless Redis lost it."""
    try:
        return connection.evalsha(FANOUT_SHA, len(keys), *keys, *args)
    except NoScriptError:  # Redis restarted or flushed its script cache
        return connection.eval(GROUP_SEND_FANOUT_LUA, len(keys), *keys, *args)
