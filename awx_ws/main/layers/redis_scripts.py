"""The Lua of the Redis layer's group_send (redis.py): one round trip for the common case."""

from __future__ import annotations

import hashlib

from awx_ws.main.layers.redis_history import APPEND_LUA

# channels_redis's group_send Lua, plus the expiry clean-up it runs as a separate round trip first.
# The clean-up comes after the ZADD: with maxmemory, Redis refuses a script's memory-growing writes
# (OOM) only until it has written once, and a clean-up first would count as that write.
GROUP_SEND_LUA = """
local over_capacity = 0
local current_time = ARGV[#ARGV - 1]
local expiry = ARGV[#ARGV]
local cutoff = math.floor(tonumber(current_time)) - tonumber(expiry)
local stale = {}
for i = 1, #KEYS do
    local expired = redis.call('ZCOUNT', KEYS[i], 0, cutoff)
    if redis.call('ZCARD', KEYS[i]) - expired < tonumber(ARGV[i + #KEYS]) then
        redis.call('ZADD', KEYS[i], current_time, ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    else
        over_capacity = over_capacity + 1
    end
    if expired > 0 then table.insert(stale, KEYS[i]) end
end
for _, key in ipairs(stale) do redis.call('ZREMRANGEBYSCORE', key, 0, cutoff) end
return over_capacity
"""


# One round trip for the common case: read the group and queue the message for every fan-out
# member (fanout.py reads `fanout.<prefix>` keys itself and needs no __asgi_channel__ list); other
# members (process-specific channels such as relay consumers) are returned for the standard path.
# History is appended only while someone could resume the group: it has members, or its last one
# left lately (KEYS[2], set on every leave: RedisLayer.mark_left). Members channels_redis's
# group_expiry drops here leave too.
GROUP_SEND_FANOUT_LUA = (
    APPEND_LUA
    + """
local blob = ARGV[1]
local message_id = ''
-- Reads first: with maxmemory, Redis refuses a script's memory-growing writes (OOM) only until
-- it has written once, and the clean-up below would count as that write.
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[4], '+inf')
local expired = redis.call('ZCOUNT', KEYS[1], 0, ARGV[4])
if #KEYS >= 4 then
    -- KEYS[2] the left-lately mark, KEYS[3] the stream, KEYS[4] the origin tag, KEYS[5..9] the total.
    if #members > 0 or expired > 0 or redis.call('EXISTS', KEYS[2]) == 1 then
        message_id, blob = append_history(KEYS[3], KEYS[4], blob, tonumber(ARGV[10]), tonumber(ARGV[7]),
            tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[11]), tonumber(ARGV[12]), 5, ARGV[14])
        if not message_id then return redis.error_reply('NOORIGIN history origin tag missing') end
    end
    if expired > 0 then redis.call('SET', KEYS[2], 1, 'EX', ARGV[13]) end
end
local cutoff = math.floor(tonumber(ARGV[2])) - tonumber(ARGV[3])
local others = {}
local over = 0
local stale = {}
for _, member in ipairs(members) do
    if string.sub(member, 1, 7) == 'fanout.' then
        local key = ARGV[6] .. member
        local old = redis.call('ZCOUNT', key, 0, cutoff)
        if redis.call('ZCARD', key) - old < tonumber(ARGV[5]) then
            redis.call('ZADD', key, ARGV[2], blob)
            redis.call('EXPIRE', key, ARGV[3])
        else
            over = over + 1
        end
        if old > 0 then table.insert(stale, key) end
    else
        table.insert(others, member)
    end
end
-- Clean-ups last, once every write that could be refused at maxmemory has been tried.
for _, key in ipairs(stale) do redis.call('ZREMRANGEBYSCORE', key, 0, cutoff) end
if expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[4]) end
return {over, others, message_id}
"""
)


FANOUT_SHA = hashlib.sha1(GROUP_SEND_FANOUT_LUA.encode()).hexdigest()
