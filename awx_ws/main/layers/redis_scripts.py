"""The Lua of the Redis layer's group_send (redis.py): one round trip for the common case."""

from __future__ import annotations

import hashlib

from awx_ws.main.layers.redis_history import APPEND_LUA

# channels_redis's group_send Lua, plus the expiry clean-up it runs as a separate round trip first.
GROUP_SEND_LUA = """
local over_capacity = 0
local current_time = ARGV[#ARGV - 1]
local expiry = ARGV[#ARGV]
local cutoff = math.floor(tonumber(current_time)) - tonumber(expiry)
for i = 1, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, cutoff)
    if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[i + #KEYS]) then
        redis.call('ZADD', KEYS[i], current_time, ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    else
        over_capacity = over_capacity + 1
    end
end
return over_capacity
"""


# One round trip for the common case: read the group and queue the message for every fan-out
# member (fanout.py reads `fanout.<prefix>` keys itself and needs no __asgi_channel__ list); other
# members (process-specific channels such as relay consumers) are returned for the standard path.
GROUP_SEND_FANOUT_LUA = (
    APPEND_LUA
    + """
local blob = ARGV[1]
local message_id = ''
if #KEYS >= 3 then
    -- History (redis_history.py): KEYS[2] the stream, KEYS[3] the origin tag, KEYS[4..6] the total.
    message_id, blob = append_history(KEYS[2], KEYS[3], blob, tonumber(ARGV[10]), tonumber(ARGV[7]),
        tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[11]), tonumber(ARGV[12]))
    if not message_id then return redis.error_reply('NOORIGIN history origin tag missing') end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[4])
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local cutoff = math.floor(tonumber(ARGV[2])) - tonumber(ARGV[3])
local others = {}
local over = 0
for _, member in ipairs(members) do
    if string.sub(member, 1, 7) == 'fanout.' then
        local key = ARGV[6] .. member
        redis.call('ZREMRANGEBYSCORE', key, 0, cutoff)
        if redis.call('ZCARD', key) < tonumber(ARGV[5]) then
            redis.call('ZADD', key, ARGV[2], blob)
            redis.call('EXPIRE', key, ARGV[3])
        else
            over = over + 1
        end
    else
        table.insert(others, member)
    end
end
return {over, others, message_id}
"""
)


FANOUT_SHA = hashlib.sha1(GROUP_SEND_FANOUT_LUA.encode()).hexdigest()
