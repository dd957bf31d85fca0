"""The private parts of pinned packages we read, each wrapped in one place: these fail loudly when
an upgrade moves one, before a server would misbehave (pure checks, no server)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_channels_redis_serializer_exposes_what_the_group_send_script_relies_on():
    """layers/redis.py hands the history append the serializer's random prefix length, and falls
    back to channels_redis's own group_send when messages are encrypted."""
    from channels_redis.serializers import MsgPackSerializer

    from awx_ws.main.layers import RedisChannelLayer

    layer = RedisChannelLayer(hosts=[{"address": "redis://127.0.0.1:1/0"}])
    assert isinstance(layer._serializer, MsgPackSerializer)
    assert layer._serializer.crypter is None
    assert (
        isinstance(layer._serializer.random_prefix_length, int) and layer._serializer.random_prefix_length > 0
    )


def test_channels_redis_group_key_is_wrapped_with_its_format():
    """layers/redis.py's group_key wraps channels_redis's private _group_key (and its bytes)."""
    from awx_ws.main.layers import RedisChannelLayer

    layer = RedisChannelLayer(hosts=[{"address": "redis://127.0.0.1:1/0"}], prefix="asgi")
    assert bytes(layer._group_key("jobs-x")) == b"asgi:group:jobs-x"
    assert layer.group_key("jobs-x") == "asgi:group:jobs-x"


def test_twisted_transports_keep_the_buffers_the_direct_write_checks():
    """awx_ws/server.py writes to a socket directly only when Twisted holds nothing unsent."""
    from twisted.internet.abstract import FileDescriptor

    transport = FileDescriptor()
    assert transport.dataBuffer == b"" and transport._tempDataBuffer == []


def test_channels_redis_maps_channels_to_their_keys_as_the_group_send_plan_expects():
    """layers/redis.py's group_send_plan unpacks channels_redis's private
    _map_channel_keys_to_connection: (connection map, {key: message}, {key: capacity})."""
    from awx_ws.main.layers import RedisChannelLayer

    layer = RedisChannelLayer(hosts=[{"address": "redis://127.0.0.1:1/0"}], prefix="asgi")
    _, messages, capacities = layer._map_channel_keys_to_connection(["specific.abc!x"], {"type": "t"})
    assert list(messages) == ["asgispecific.abc!"] and list(capacities) == ["asgispecific.abc!"]
    keys, args = layer.group_send_plan([b"specific.abc!x"], {"type": "t"})
    assert keys == ["asgispecific.abc!"] and len(args) == 4  # message, capacity, now, expiry


def test_channels_redis_capacities_are_read_as_the_fanout_script_expects():
    """layers/redis_scripts.py queues for process inboxes in the fan-out script only while every
    channel has the layer's `capacity`: channels_redis keeps per-channel patterns (compiled) in
    `channel_capacity`, and the inbox key of `specific.abc!x` is the prefix and `specific.abc!`."""
    from awx_ws.main.layers import RedisChannelLayer
    from awx_ws.main.layers.redis_scripts import inbox_capacity

    message = {"type": "internal.message", "text": "{}"}
    plain = RedisChannelLayer(hosts=[{"address": "redis://127.0.0.1:1/0"}], capacity=7)
    assert plain.capacity == 7 and not plain.channel_capacity and inbox_capacity(plain, message) == 7
    patterned = RedisChannelLayer(hosts=[{"address": "redis://127.0.0.1:1/0"}], channel_capacity={"x*": 3})
    assert patterned.channel_capacity and inbox_capacity(patterned, message) == 0
    assert plain.non_local_name("specific.abc!x") == "specific.abc!"


def test_channels_redis_receives_a_process_inbox_through_receive_single_under_its_lock():
    """layers/redis_receive.py overrides channels_redis's private receive_single(channel), which
    receive() calls for a process's inbox (`...!`) while it holds receive_lock, and which returns
    (channel or channels, message)."""
    import inspect

    from channels_redis import core

    assert list(inspect.signature(core.RedisChannelLayer.receive_single).parameters) == ["self", "channel"]
    receive = inspect.getsource(core.RedisChannelLayer.receive)
    assert "self.receive_lock" in receive and "await self.receive_single(" in receive
    assert "self.receive_buffer[message_channel]" in receive


def test_the_blocking_sentinel_pool_closes_only_its_idle_connections_when_the_master_moves():
    """redis-py's Sentinel pool calls disconnect(inuse_connections=False) when the master moves;
    its blocking pool takes no argument. Ours (layers/redis_connect.py) reads the blocking pool's
    queue of idle connections (`pool`) and must leave one in use alone."""
    from redis.sentinel import Sentinel

    from awx_ws.main.layers.redis_connect import SyncSentinelPool

    pool = SyncSentinelPool("m", Sentinel([("127.0.0.1", 1)]), max_connections=3)
    idle, busy = pool.make_connection(), pool.make_connection()
    for _ in range(3):
        pool.pool.get_nowait()  # the slots, taken as checkouts take them
    pool.pool.put_nowait(idle)
    closed = []
    idle.disconnect = lambda *args: closed.append("idle")  # type: ignore[method-assign]
    busy.disconnect = lambda *args: closed.append("busy")  # type: ignore[method-assign]
    pool.disconnect(inuse_connections=False)
    assert closed == ["idle"]
    assert pool.pool.get_nowait() is idle  # back in its place


def test_the_blocking_sentinel_pool_forgets_a_connection_it_no_longer_owns():
    """redis-py's blocking pool keeps every connection it made in `_connections` and, releasing
    one it does not own (a master that moved, none found), closes it and leaves it there. Ours
    (layers/redis_connect.py, SyncSentinelPool.release) takes it out of that list."""
    from redis.sentinel import Sentinel

    from awx_ws.main.layers.redis_connect import SyncSentinelPool

    pool = SyncSentinelPool("m", Sentinel([("127.0.0.1", 1)]), max_connections=2)
    pool.pool.get_nowait()  # a slot, as a checkout takes it
    orphan = pool.make_connection()  # made while the sentinels named no master
    assert orphan in pool._connections
    pool.release(orphan)
    assert orphan not in pool._connections
    assert pool.pool.get_nowait() is None  # its slot back, for a new connection


def test_django_logs_no_response_marked_as_logged(caplog):
    """api/errors.py marks its 503 for a database outage as logged (it reports once a minute):
    Django's request logger must then add no ERROR line per request."""
    from django.http import HttpResponse
    from django.test import RequestFactory
    from django.utils.log import log_response

    request = RequestFactory().get("/api/v2/jobs/")
    marked = HttpResponse(status=503)
    marked._has_been_logged = True
    with caplog.at_level("ERROR", logger="django.request"):
        log_response("Service Unavailable: %s", request.path, response=marked, request=request)
        assert caplog.records == []
        unmarked = HttpResponse(status=503)
        log_response("Service Unavailable: %s", request.path, response=unmarked, request=request)
        assert len(caplog.records) == 1  # unmarked, it is logged: the mark is what keeps it out
