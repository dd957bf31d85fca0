"""The Redis layer's history store (history.py has the rules): the per-group streams, the node's
origin tag and byte total, the Lua that trims, appends and reads them, and Redis's errors raised as
RedisUnavailable.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from awx_ws.main.conf import ws_settings
from awx_ws.main.history import GroupPosition, Replay, history_policy, history_share, parse_stream_id
from awx_ws.main.layers import redis_keys as keys

if TYPE_CHECKING:
    from awx_ws.main.layers.redis_types import RedisLayer


async def ensure_origin(layer: RedisLayer) -> str:
    """This Redis's origin tag, created on first use (SET NX: every process agrees on one)."""
    connection = layer.connection(0)
    await connection.set(keys.origin_key(layer.prefix), secrets.token_hex(4), nx=True)
    origin: bytes = await connection.get(keys.origin_key(layer.prefix))
    return origin.decode()


def total_keys(layer: RedisLayer) -> list[str]:
    """The keys of the node's history total (HISTORY_TOTAL_BYTES): each stream's bytes, their sum,
    when each stream expires, each stream's share and each share's bytes; none when no total is
    kept."""
    if not ws_settings.HISTORY_TOTAL_BYTES:
        return []
    return keys.history_total_keys(layer.prefix)


# Trims a stream from its head by age and length and records (an upper bound of) the last removed
# id as the stream's max-deleted-entry-id: Redis sets that for XDEL but leaves it at 0-0 when
# trimming, and reads need it to tell "nothing was missed" from "the missed part is gone". Cheap on
# purpose (it runs in every emit): one XRANGE of the head, no reverse scan.
TRIM_LUA = """
local function id_before(a, b)
    local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
    local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
    a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
    return a_ms < b_ms or (a_ms == b_ms and tonumber(a_seq) < tonumber(b_seq))
end
local function stream_field(key, name)
    local info = redis.call('XINFO', 'STREAM', key)
    for i = 1, #info, 2 do
        if info[i] == name then return info[i + 1] end
    end
end
-- Bytes of payload text an entry holds (its field values).
local function size_of(entry)
    local n = 0
    for i = 2, #entry[2], 2 do n = n + #entry[2][i] end
    return n
end
local function sum_sizes(entries)
    local n = 0
    for _, entry in ipairs(entries) do n = n + size_of(entry) end
    return n
end
-- The node's total (HISTORY_TOTAL_BYTES): acct names a hash of each stream's bytes, their sum, a
-- sorted set of when each stream expires, a hash of each stream's share (an organization or a
-- group kind) and a sorted set of each share's bytes; `<expiry>:<share>` orders a share's streams
-- by expiry. `max` is the bound; `share` the writer's share (nil for a read, which keeps the
-- stream's own) and `default` the share of a stream counted by a read (nil acct: not kept).
local function accounts(first, max, now_ms, share, default)
    if not KEYS[first] then return nil end
    return {sizes = KEYS[first], total = KEYS[first + 1], expiry = KEYS[first + 2], owners = KEYS[first + 3],
            shares = KEYS[first + 4], max = max, now = now_ms, share = share, default = default}
end
-- Record that key holds bytes; a stream counted is always in the expiry sets too (at its real
-- expiry), so its bytes leave the total and its share when it goes, whoever wrote or read it last.
-- The last writer's share owns a stream (a group's messages normally come from one, so the owner
-- is rewritten only when it changes: this runs in every emit).
local function account(acct, key, bytes)
    if not acct then return end
    local old = tonumber(redis.call('HGET', acct.sizes, key) or '0')
    local owner = redis.call('HGET', acct.owners, key)
    local ttl = redis.call('PTTL', key)
    local share = false
    if bytes > 0 and ttl > 0 then share = acct.share or owner or acct.default else bytes = 0 end
    if owner and owner ~= share then
        if tonumber(redis.call('ZINCRBY', acct.shares, -old, owner)) <= 0 then
            redis.call('ZREM', acct.shares, owner)
        end
        redis.call('ZREM', acct.expiry .. ':' .. owner, key)
    end
    if share then
        redis.call('HSET', acct.sizes, key, bytes)
        redis.call('ZADD', acct.expiry, acct.now + ttl, key)
        if owner ~= share then
            redis.call('HSET', acct.owners, key, share)
            redis.call('ZINCRBY', acct.shares, bytes, share)
        elseif bytes ~= old then
            redis.call('ZINCRBY', acct.shares, bytes - old, share)
        end
        redis.call('ZADD', acct.expiry .. ':' .. share, acct.now + ttl, key)
    else
        redis.call('HDEL', acct.sizes, key)
        if owner then redis.call('HDEL', acct.owners, key) end
    end
    redis.call('INCRBY', acct.total, bytes - old)
end
-- Trim a group's stream to maxlen entries, none older than min_ms, and at most max_bytes of text
-- (the newest entry always stays); `<key>:bytes` counts the text held, and expires with the key.
local function trim(key, maxlen, min_ms, last_id, max_bytes, acct)
    local removed = nil
    local freed = 0
    local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
    if first and tonumber(string.match(first[1], '^(%d+)')) < min_ms then
        local bound = string.format('%d-18446744073709551615', min_ms - 1)
        freed = freed + sum_sizes(redis.call('XRANGE', key, '-', bound))
        redis.call('XTRIM', key, 'MINID', min_ms)
        -- Everything before min_ms is gone: that bound is exact enough for positions.
        removed = bound
        first = nil
    end
    local excess = redis.call('XLEN', key) - maxlen
    if excess > 0 then
        local gone = redis.call('XRANGE', key, '-', '+', 'COUNT', excess)
        freed = freed + sum_sizes(gone)
        removed = gone[#gone][1]
        redis.call('XTRIM', key, 'MAXLEN', maxlen)
    end
    local bytes_key = key .. ':bytes'
    local bytes = tonumber(redis.call('GET', bytes_key) or '0') - freed
    while max_bytes > 0 and bytes > max_bytes do
        local oldest = redis.call('XRANGE', key, '-', '+', 'COUNT', 2)
        if #oldest < 2 then break end
        redis.call('XDEL', key, oldest[1][1])
        bytes = bytes - size_of(oldest[1])
        removed = oldest[1][1]
    end
    if bytes < 0 or redis.call('EXISTS', key) == 0 then bytes = 0 end
    local ttl = redis.call('PTTL', key)
    if ttl > 0 then
        redis.call('SET', bytes_key, bytes, 'PX', ttl)
    else
        redis.call('DEL', bytes_key)
    end
    account(acct, key, bytes)
    if removed then
        if id_before(last_id, removed) then removed = last_id end
        redis.call('XSETID', key, last_id, 'MAXDELETEDID', removed)
    end
end
-- Streams whose time is up are gone (the key expired): take them off the total, a few per call.
local function forget_expired(acct, now_ms)
    for _, key in ipairs(redis.call('ZRANGEBYSCORE', acct.expiry, '-inf', now_ms, 'LIMIT', 0, 16)) do
        local ttl = redis.call('PTTL', key)
        if ttl > 0 then
            redis.call('ZADD', acct.expiry, now_ms + ttl, key)
        else
            account(acct, key, 0)
            redis.call('ZREM', acct.expiry, key)
        end
    end
end
-- The oldest entry of key (not its newest) deleted and accounted; the bytes freed, 0 if none.
local function shed_oldest(acct, key)
    local oldest = redis.call('XRANGE', key, '-', '+', 'COUNT', 2)
    if #oldest < 2 then return 0 end
    redis.call('XDEL', key, oldest[1][1])  -- XDEL moves the max-deleted id itself
    local size = size_of(oldest[1])
    local bytes = tonumber(redis.call('GET', key .. ':bytes') or '0') - size
    redis.call('SET', key .. ':bytes', math.max(bytes, 0), 'KEEPTTL')
    account(acct, key, math.max(bytes, 0))
    return size
end
-- Empty a whole stream (found in the expiry set `from`); it keeps its ids: its last one becomes
-- its max-deleted id, so a resume from before it is told what it missed is gone.
local function empty(acct, victim, from)
    if redis.call('EXISTS', victim) == 1 and redis.call('XLEN', victim) > 0 then
        local last = stream_field(victim, 'last-generated-id')
        redis.call('XTRIM', victim, 'MAXLEN', 0)
        redis.call('XSETID', victim, last, 'MAXDELETEDID', last)
    end
    redis.call('DEL', victim .. ':bytes')
    account(acct, victim, 0)
    redis.call('ZREM', acct.expiry, victim)
    redis.call('ZREM', from, victim)
end
-- Past the node's total, streams counted before shares were kept (an upgrade) go first, soonest
-- to expire first: they are nobody's share. Then the share holding the most bytes gives, so one
-- that floods loses its own history before anybody else's: its stream due to expire soonest is
-- emptied, or, when its only stream is `keep` (the one just written to), that stream's oldest
-- entries go. Whatever the shares cannot give, the soonest to expire of all gives.
local function evict(acct, keep)
    local total = tonumber(redis.call('GET', acct.total) or '0')
    while total > acct.max do
        local victim, from, freed = nil, acct.expiry, 0
        for _, key in ipairs(redis.call('ZRANGE', acct.expiry, 0, 1)) do
            if key ~= keep and not redis.call('HGET', acct.owners, key) then victim = key break end
        end
        for _, share in ipairs(victim and {} or redis.call('ZREVRANGE', acct.shares, 0, 1)) do
            from = acct.expiry .. ':' .. share
            for _, key in ipairs(redis.call('ZRANGE', from, 0, 1)) do
                if key ~= keep then victim = key break end
            end
            if victim then break end
            if redis.call('HGET', acct.owners, keep) == share then
                freed = shed_oldest(acct, keep)
                if freed > 0 then break end
            end
        end
        if not victim and freed == 0 then
            from = acct.expiry
            local soonest = redis.call('ZRANGE', acct.expiry, 0, 1)
            victim = soonest[1]
            if victim == keep then victim = soonest[2] end
            if not victim then break end
        end
        if victim then
            freed = tonumber(redis.call('HGET', acct.sizes, victim) or '0')
            empty(acct, victim, from)
        end
        total = total - freed
    end
end
"""


# Appends a client message to its group's stream in the emit's own script (so stream order is
# delivery order), trims it and the node's total, and puts the message id into the message:
# returns (message id, the message packed again), or nil when the origin tag is missing.
APPEND_LUA = (
    TRIM_LUA
    + """
local function append_history(stream, origin_key, blob, plen, maxlen, age_s, ttl, max_bytes, total_max,
                               total_first, share)
    local origin = redis.call('GET', origin_key)
    if not origin then return nil end
    local message = cmsgpack.unpack(string.sub(blob, plen + 1))
    local t = redis.call('TIME')
    local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local fresh = redis.call('EXISTS', stream) == 0
    local stream_id = redis.call('XADD', stream, '*', 't', message['text'])
    redis.call('EXPIRE', stream, ttl)
    if fresh then redis.call('DEL', stream .. ':bytes') end
    redis.call('INCRBY', stream .. ':bytes', #message['text'])
    local min_ms = math.max(now_ms - age_s * 1000, 0)
    local acct = accounts(total_first, total_max, now_ms, share, share)
    trim(stream, maxlen, min_ms, stream_id, max_bytes, acct)
    if acct then
        -- The node's total (HISTORY_TOTAL_BYTES): past it, the streams to expire soonest go.
        forget_expired(acct, now_ms)
        evict(acct, stream)
    end
    local message_id = origin .. ':' .. stream_id
    message['id'] = message_id
    return message_id, string.sub(blob, 1, plen) .. cmsgpack.pack(message)
end
"""
)


# Reads one group's history after a position, or says it no longer reaches back. A position older
# than the age cannot be resumed. Otherwise a missing key means nothing was recorded within the age
# (the key expires `age` after its last entry, and recording goes on for the age after the last
# member left: layers/redis_scripts.py), and entries are gone when the largest deleted id (trimmed
# by length, age or bytes) is past the position.
READ_HISTORY_LUA = (
    TRIM_LUA
    + """
local origin = redis.call('GET', KEYS[2])
if origin ~= ARGV[1] then return {'origin', origin or ''} end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local age_ms = tonumber(ARGV[4]) * 1000
local after_ms, after_seq = tonumber(ARGV[2]), tonumber(ARGV[3])
local function before(ms, seq) return after_ms < ms or (after_ms == ms and after_seq < seq) end
if redis.call('EXISTS', KEYS[1]) == 0 then
    if after_ms < now_ms - age_ms then return {'reset', 'older than the history age'} end
    return {'ok', {}}
end
local function field(name) return stream_field(KEYS[1], name) end
local last_id = field('last-generated-id')
local min_ms = math.max(now_ms - age_ms, 0)
trim(KEYS[1], tonumber(ARGV[5]), min_ms, last_id, tonumber(ARGV[6]), accounts(3, 0, now_ms, nil, ARGV[7]))
local deleted = field('max-deleted-entry-id')
local d_ms, d_seq = string.match(deleted, '(%d+)-(%d+)')
if deleted ~= '0-0' and before(tonumber(d_ms), tonumber(d_seq)) then
    return {'reset', 'trimmed past the position'}
end
-- History is kept for the age, and only while someone could resume the group: what was emitted
-- more than the age ago may never have been recorded, whatever the stream holds now.
if after_ms < now_ms - age_ms then return {'reset', 'older than the history age'} end
return {'ok', redis.call('XRANGE', KEYS[1], '(' .. ARGV[2] .. '-' .. ARGV[3], '+', 'COUNT', ARGV[5])}
"""
)


async def read_local(
    layer: RedisLayer, group: str, position: GroupPosition, margin_ms: int = 0
) -> tuple[str | None, Replay]:
    """(this Redis's origin tag or None, what it holds of group after position); RedisUnavailable
    when Redis fails."""
    try:
        return await _read_local(layer, group, position, margin_ms)
    except RedisError as exc:
        raise layer.unavailable(exc) from exc


async def _read_local(
    layer: RedisLayer, group: str, position: GroupPosition, margin_ms: int
) -> tuple[str | None, Replay]:
    """(this Redis's origin tag or None, what it holds of group after position).

    margin_ms moves the floor back for origins the client has seen nothing of: their clocks may
    lag the clock that set the floor (HISTORY_CLOCK_SKEW). Used for peers' requests.
    """
    policy = history_policy(group)
    if policy is None:
        kind = group.split("-", 1)[0]
        return None, Replay(reset=f"no history is kept for {kind} groups (AWX_WS['HISTORY_KINDS'])")
    connection = layer.connection(0)
    raw_origin = await connection.get(keys.origin_key(layer.prefix))
    if raw_origin is None:
        return None, Replay()  # this Redis never recorded a message
    origin = raw_origin.decode()
    after_ms, after_seq = position.after(origin)
    if origin not in position.seen:
        after_ms = max(after_ms - margin_ms, 0)
    totals = total_keys(layer)
    reply = await connection.eval(
        READ_HISTORY_LUA,
        2 + len(totals),
        keys.stream_key(layer.prefix, group),
        keys.origin_key(layer.prefix),
        *totals,
        origin,
        after_ms,
        after_seq,
        policy.age,
        policy.length,
        policy.max_bytes,
        history_share(group),  # the share of a stream no writer counted yet
    )
    status = reply[0].decode()
    if status == "origin":  # the tag changed under us (Redis flushed): the old ids are gone
        return None, Replay(reset="this node's history was reset")
    if status == "reset":
        return origin, Replay(reset=reply[1].decode())
    entries = []
    for stream_id, fields in reply[1]:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        entries.append((f"{origin}:{stream_id.decode()}", values[b"t"].decode()))
    return origin, Replay(entries)


async def open_position(layer: RedisLayer, group: str) -> GroupPosition:
    """The position of a client subscribing to group now; RedisUnavailable when Redis fails."""
    try:
        return await _open_position(layer, group)
    except RedisError as exc:
        raise layer.unavailable(exc) from exc


async def _open_position(layer: RedisLayer, group: str) -> GroupPosition:
    """The position of a client subscribing to group now: Redis's clock, this origin's last id.

    Call it after joining the group, so nothing between the two is lost to the client.
    """
    async with layer.connection(0).pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.get(keys.origin_key(layer.prefix))
        pipe.xrevrange(keys.stream_key(layer.prefix, group), count=1)
        (seconds, micros), raw_origin, last = await pipe.execute()
    floor = seconds * 1000 + micros // 1000
    if raw_origin is None or not last or history_policy(group) is None:
        return GroupPosition(floor)
    return GroupPosition(floor, {raw_origin.decode(): parse_stream_id(last[0][0].decode())})
