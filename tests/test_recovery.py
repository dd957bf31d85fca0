"""Websocket recovery: ids on request, replay of missed messages, then live; AWX clients unchanged."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from awx_ws.main.emit import aemit_channel_notification, build_message
from awx_ws.main.history import GroupPosition
from tests.client import WsClient, open_ws

pytestmark = pytest.mark.every_server


def topic(label: str) -> str:
    return f"{label}{time.monotonic_ns()}"


async def emit_all(group: str, payloads: list[Any]) -> None:
    for payload in payloads:
        await aemit_channel_notification(group, payload)


async def subscribe(client: WsClient, item: str, **extra: Any) -> dict[str, Any]:
    errors, reply = await client.subscribe({"schedules": [item]}, **extra)
    assert errors == []
    return reply


async def recovery(client: WsClient, count: int) -> tuple[list[Any], dict[str, Any]]:
    """The payloads of count replayed frames, then the recovery summary."""
    frames = [await client.recv_json() for _ in range(count)]
    summary = await client.recv_json()
    assert "recovered" in summary, summary
    return [frame["data"] for frame in frames], summary


async def test_a_client_asking_for_ids_gets_each_message_with_its_group_and_position(node, auth_headers):
    item = topic("ids")
    group = f"schedules-{item}"
    client = await open_ws(node.url, headers=auth_headers)
    reply = await subscribe(client, item, ids=True)
    start = GroupPosition.parse(reply["positions"][group])
    await aemit_channel_notification(group, {"n": 1})
    frame = await client.recv_json()
    assert (frame["group"], frame["data"]) == (group, {"n": 1})
    position = GroupPosition.parse(frame["id"])
    assert position.floor == start.floor and len(position.seen) == 1
    await client.close()


async def test_awx_clients_beside_an_ids_client_still_get_bare_payloads(node, auth_headers):
    item = topic("plain")
    group = f"schedules-{item}"
    plain, with_ids = (
        await open_ws(node.url, headers=auth_headers),
        await open_ws(node.url, headers=auth_headers),
    )
    reply = await subscribe(plain, item)
    assert set(reply) == {"groups_current", "groups_left", "groups_joined"}  # AWX's reply, as it was
    await subscribe(with_ids, item, ids=True)
    await aemit_channel_notification(group, {"n": 1})
    assert await plain.recv_json() == {"n": 1}
    assert (await with_ids.recv_json())["data"] == {"n": 1}
    await plain.close()
    await with_ids.close()


async def test_recover_replays_exactly_the_missed_messages_then_goes_live(node, auth_headers):
    item = topic("recover")
    group = f"schedules-{item}"
    client = await open_ws(node.url, headers=auth_headers)
    await subscribe(client, item, ids=True)
    await aemit_channel_notification(group, {"n": 0})
    last_id = (await client.recv_json())["id"]
    await client.close()

    await emit_all(group, [{"n": n} for n in range(1, 21)])
    client = await open_ws(node.url, headers=auth_headers)
    reply = await subscribe(client, item, recover={group: last_id})
    assert reply["groups_joined"] == [group]
    replayed, summary = await recovery(client, 20)
    assert replayed == [{"n": n} for n in range(1, 21)]
    assert summary == {"recovered": {group: 20}, "reset": {}, "positions": {}}
    await aemit_channel_notification(group, {"n": "live"})
    assert (await client.recv_json())["data"] == {"n": "live"}
    await client.assert_silent()
    await client.close()


async def test_recover_while_messages_keep_coming_sees_each_once_in_order(node, auth_headers):
    item = topic("burst")
    group = f"schedules-{item}"
    client = await open_ws(node.url, headers=auth_headers)
    reply = await subscribe(client, item, ids=True)
    position = reply["positions"][group]
    await client.close()
    burst = asyncio.create_task(emit_all(group, [{"n": n} for n in range(300)]))
    await asyncio.sleep(0.02)  # resume in the middle of the burst
    client = await open_ws(node.url, headers=auth_headers)
    await subscribe(client, item, recover={group: position})
    await burst
    frames = []
    while len([f for f in frames if "data" in f]) < 300:
        frames.append(await client.recv_json())
    assert [f["data"] for f in frames if "data" in f] == [{"n": n} for n in range(300)]
    assert sum("recovered" in f for f in frames) == 1  # the summary sits between replay and live
    await client.assert_silent()
    await client.close()


HISTORY_KINDS = {"control": None, "schedules": {"length": 5, "age": 60}}


async def test_recover_past_the_history_says_reset_and_goes_live(daphne_factory, auth_headers, settings):
    server = daphne_factory({"AWX_WS_HISTORY_KINDS": json.dumps(HISTORY_KINDS)})
    item = topic("reset")
    group = f"schedules-{item}"
    client = await open_ws(server.url, headers=auth_headers)
    position = (await subscribe(client, item, ids=True))["positions"][group]
    await client.close()
    settings.AWX_WS = {**settings.AWX_WS, "HISTORY_KINDS": HISTORY_KINDS}
    await emit_all(group, [{"n": n} for n in range(8)])  # 0..2 trimmed away
    client = await open_ws(server.url, headers=auth_headers)
    await subscribe(client, item, recover={group: position})
    summary = await client.recv_json()
    assert summary["recovered"] == {} and summary["reset"] == {group: "trimmed past the position"}
    assert group in summary["positions"]  # where the client goes on from
    await aemit_channel_notification(group, {"n": "live"})
    assert (await client.recv_json())["data"] == {"n": "live"}
    await client.close()


async def test_bad_recover_requests_get_clear_errors(client):
    item = topic("bad")
    group = f"schedules-{item}"
    error = await client.request_error(json.dumps({"groups": {"schedules": [item]}, "recover": {group: "x"}}))
    assert error.startswith(f"invalid recover entry for '{group}': invalid position 'x'")
    error = await client.request_error(json.dumps({"groups": {"schedules": [item]}, "recover": []}))
    assert error == 'recover must be an object of group: "<position>"'
    errors, reply = await client.subscribe({"schedules": [item]}, recover={"schedules-other": "1"})
    assert errors == ["recover: schedules-other is not a group this request subscribes to"]
    errors, reply = await client.subscribe({"schedules": [item]}, recover={group: "1"})
    assert errors == [f"recover: already subscribed to {group}, nothing was missed"]
    assert reply["groups_current"] == [group]


async def test_switching_to_ids_keeps_the_groups_held(client):
    item = topic("switch")
    group = f"schedules-{item}"
    await subscribe(client, item)
    await aemit_channel_notification(group, {"n": 1})
    assert await client.recv_json() == {"n": 1}
    reply = await subscribe(client, item, ids=True)
    assert reply["groups_current"] == [group] and reply["groups_joined"] == []
    await aemit_channel_notification(group, {"n": 2})
    assert (await client.recv_json())["data"] == {"n": 2}
    await client.assert_silent()


async def test_switching_to_ids_while_leaving_a_group_leaves_it(client):
    kept, dropped = topic("kept"), topic("dropped")
    errors, reply = await client.subscribe({"schedules": [kept, dropped]})
    assert errors == [] and len(reply["groups_current"]) == 2
    errors, reply = await client.subscribe({"schedules": [kept]}, ids=True)
    assert reply["groups_current"] == [f"schedules-{kept}"]
    assert reply["groups_left"] == [f"schedules-{dropped}"]
    await aemit_channel_notification(f"schedules-{dropped}", {"n": "not for this client"})
    await aemit_channel_notification(f"schedules-{kept}", {"n": "kept"})
    # In order: had the dropped group's message reached the client, it would come first.
    frame = await client.recv_json()
    assert (frame["group"], frame["data"]) == (f"schedules-{kept}", {"n": "kept"})


@pytest.fixture
def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


async def test_a_redis_error_during_a_resume_is_reset_in_our_words_not_redis(caplog, settings):
    """Redis's error text (addresses, script hashes, key types) stays in the server's log."""
    from awx_ws.main.layers import RedisChannelLayer
    from awx_ws.main.streams import collect_replays
    from tests.servers import free_port

    dead = RedisChannelLayer(
        hosts=[{"address": f"redis://127.0.0.1:{free_port()}/0", "socket_connect_timeout": 1}]
    )
    group = f"schedules-{topic('unreadable')}"
    settings.AWX_WS = {**settings.AWX_WS, "BROADCAST_WEBSOCKET_PEERS": []}
    replays = await collect_replays(dead, {group: GroupPosition.parse(f"{int(time.time() * 1000)}")})
    await dead.close_pools()
    assert replays[group].reset == "history unavailable on this node"
    assert f"history of {group} unreadable for a resume" in caplog.text  # the details, for operators


async def test_history_keeps_at_most_its_bytes_per_group_newest_first(
    daphne_factory, own_redis, auth_headers, settings
):
    """AWX_WS_HISTORY_MAX_BYTES: big messages push the oldest out of a group's history, counted in
    bytes; a resume within what is kept replays it exactly, one from before says reset."""
    from tests.client import emit_to, redis_at

    server = daphne_factory(
        {"REDIS_URL": own_redis.url, "AWX_WS_HISTORY_MAX_BYTES": "3000"}
    )  # reads trim too
    item = topic("bytes")
    group = f"schedules-{item}"
    client = await open_ws(server.url, headers=auth_headers)
    await subscribe(client, item, ids=True)
    payloads = [{"n": n, "stdout": "x" * 1000} for n in range(10)]
    # The emitter keeps the history (its settings decide): this process, like an API worker.
    settings.AWX_WS = {**settings.AWX_WS, "HISTORY_MAX_BYTES": 3000}
    for payload in payloads:
        await emit_to(own_redis.url, group, payload)
    ids = [(await client.recv_json())["id"] for _ in payloads]
    await client.close()

    size = len(json.dumps(payloads[0]))  # the text of one entry, as emit serialises it
    kept = 3000 // size
    redis = redis_at(own_redis.url)
    assert await redis.xlen(f"asgi:history:{group}") == kept
    assert int(await redis.get(f"asgi:history:{group}:bytes")) == kept * size

    client = await open_ws(server.url, headers=auth_headers)
    await subscribe(client, item, recover={group: ids[-kept - 1]})
    replayed, summary = await recovery(client, kept)
    assert replayed == payloads[-kept:] and summary["reset"] == {}
    await client.close()
    client = await open_ws(server.url, headers=auth_headers)
    await subscribe(client, item, recover={group: ids[-kept - 2]})
    summary = await client.recv_json()
    assert summary["recovered"] == {} and summary["reset"] == {group: "trimmed past the position"}
    await client.close()


async def test_history_keeps_at_most_its_total_bytes_per_node_emptying_the_soonest_to_expire(
    daphne_factory, own_redis, auth_headers, settings
):
    """AWX_WS_HISTORY_TOTAL_BYTES: past the node's total, the group whose history expires soonest
    is emptied; a client that had all of it resumes with nothing lost, one that had not is told."""
    from tests.client import emit_to, redis_at

    bounds = {"HISTORY_MAX_BYTES": 3000, "HISTORY_TOTAL_BYTES": 5000}
    server = daphne_factory(
        {"REDIS_URL": own_redis.url, **{f"AWX_WS_{k}": str(v) for k, v in bounds.items()}}
    )
    older, newer = topic("total-older"), topic("total-newer")
    client = await open_ws(server.url, headers=auth_headers)
    errors, _ = await client.subscribe({"schedules": [older, newer]}, ids=True)
    assert errors == []
    payloads = [{"n": n, "stdout": "x" * 900} for n in range(3)]
    size = len(json.dumps(payloads[0]))
    settings.AWX_WS = {**settings.AWX_WS, **bounds}
    for group in (f"schedules-{older}", f"schedules-{newer}"):
        for payload in payloads:
            await emit_to(own_redis.url, group, payload)
    ids = [(await client.recv_json())["id"] for _ in range(6)]
    await client.close()

    redis = redis_at(own_redis.url)
    # Both groups together would hold 6 entries, over 5,000 bytes: the older one was emptied.
    assert await redis.xlen(f"asgi:history:schedules-{older}") == 0
    assert await redis.xlen(f"asgi:history:schedules-{newer}") == 3
    sizes = {k.decode(): int(v) for k, v in (await redis.hgetall("asgi:history-sizes")).items()}
    assert sizes == {f"asgi:history:schedules-{newer}": 3 * size}
    assert int(await redis.get("asgi:history-total")) == 3 * size
    await redis.aclose()

    client = await open_ws(server.url, headers=auth_headers)
    await subscribe(client, older, recover={f"schedules-{older}": ids[2]})  # had all of it
    summary = await client.recv_json()
    assert summary["recovered"] == {f"schedules-{older}": 0} and summary["reset"] == {}
    await client.close()
    client = await open_ws(server.url, headers=auth_headers)
    await subscribe(client, older, recover={f"schedules-{older}": ids[0]})
    summary = await client.recv_json()
    assert summary["recovered"] == {} and summary["reset"] == {
        f"schedules-{older}": "trimmed past the position"
    }
    await client.close()


async def test_the_node_total_forgets_history_that_expired(own_redis, settings):
    from tests.client import emit_to, redis_at, watch

    redis = redis_at(own_redis.url)
    short = {"HISTORY_TOTAL_BYTES": 1 << 20, "HISTORY_KINDS": {"control": None, "schedules": {"age": 1}}}
    settings.AWX_WS = {**settings.AWX_WS, **short}
    await watch(own_redis.url, "schedules-expiring", "schedules-kept")
    await emit_to(own_redis.url, "schedules-expiring", {"stdout": "x" * 100})
    deadline = time.monotonic() + 10
    while await redis.exists("asgi:history:schedules-expiring"):  # Redis expires it after 1 s
        assert time.monotonic() < deadline, "the stream never expired"
        await asyncio.sleep(0.1)
    # Still counted, to the byte: nothing looked yet (this test's own Redis: its entry alone).
    assert int(await redis.get("asgi:history-total")) == len(json.dumps({"stdout": "x" * 100}))
    await emit_to(own_redis.url, "schedules-kept", {"stdout": "y"})
    sizes = {k.decode(): int(v) for k, v in (await redis.hgetall("asgi:history-sizes")).items()}
    assert sizes == {"asgi:history:schedules-kept": len(json.dumps({"stdout": "y"}))}
    assert int(await redis.get("asgi:history-total")) == sizes["asgi:history:schedules-kept"]
    assert await redis.zrange("asgi:history-expiry", 0, -1) == [b"asgi:history:schedules-kept"]
    # Its share forgot it too: only what is held is counted, by whom it is held.
    assert await redis.hgetall("asgi:history-owners") == {b"asgi:history:schedules-kept": b"schedules"}
    assert await shares_of(redis) == {"schedules": sizes["asgi:history:schedules-kept"]}
    await redis.aclose()


async def test_within_a_share_the_node_total_empties_the_group_due_to_expire_soonest(own_redis, settings):
    """Not the oldest written: the one whose history would go first anyway."""
    from tests.client import emit_to, redis_at, watch

    bounds = {
        "HISTORY_MAX_BYTES": 3000,
        "HISTORY_TOTAL_BYTES": 4000,
        "HISTORY_KINDS": {"control": None, "schedules": {"age": 3600}, "inventory_updates": {"age": 60}},
    }
    payload = {"stdout": "x" * 900}
    settings.AWX_WS = {**settings.AWX_WS, **bounds}
    await watch(own_redis.url, "schedules-long", "inventory_updates-short", "schedules-newest")
    await emit_to(own_redis.url, "schedules-long", payload, "org-1")  # written first, kept an hour
    await emit_to(own_redis.url, "inventory_updates-short", payload, "org-1")  # kept a minute
    for _ in range(3):  # 5 x 915 bytes of one share: past 4,000 on the node
        await emit_to(own_redis.url, "schedules-newest", payload, "org-1")
    redis = redis_at(own_redis.url)
    lengths = [await redis.xlen(f"asgi:history:{g}") for g in ("schedules-long", "inventory_updates-short")]
    assert lengths == [1, 0]
    await redis.aclose()


async def shares_of(redis: Any) -> dict[str, int]:
    """Each history share's bytes, as the node's total counts them."""
    scores = await redis.zrange("asgi:history-shares", 0, -1, withscores=True)
    return {share.decode(): int(score) for share, score in scores}


async def test_a_share_that_floods_the_node_total_empties_its_own_streams_first(own_redis, settings):
    """Issue 26 (7): the one that floods evicts its own history, not another organization's, even
    where its streams are the newest and the other's are due to expire first."""
    from tests.client import emit_to, redis_at, watch

    settings.AWX_WS = {**settings.AWX_WS, "HISTORY_MAX_BYTES": 3000, "HISTORY_TOTAL_BYTES": 6000}
    payload = {"stdout": "x" * 900}
    size = len(json.dumps(payload))
    quiet = [f"job_events-{n}" for n in (1, 2)]
    flood = [f"job_events-{n}" for n in range(10, 20)]
    await watch(own_redis.url, *quiet, *flood)
    for group in quiet:  # written first: due to expire before any of the flood's
        await emit_to(own_redis.url, group, payload, "org-1")
    for group in flood:
        await emit_to(own_redis.url, group, payload, "org-2")
    redis = redis_at(own_redis.url)
    assert [await redis.xlen(f"asgi:history:{g}") for g in quiet] == [1, 1]
    kept = [await redis.xlen(f"asgi:history:{g}") for g in flood]
    assert kept == [0] * 6 + [1] * 4  # 2 + 4 streams of 915 bytes fit in 6,000: its oldest went
    assert await shares_of(redis) == {"org-1": 2 * size, "org-2": 4 * size}
    assert int(await redis.get("asgi:history-total")) == 6 * size
    await redis.aclose()


async def test_a_share_whose_only_stream_floods_sheds_that_streams_oldest_entries(own_redis, settings):
    """One job flooding: its own stream's oldest entries go, not the other organization's history."""
    from tests.client import emit_to, redis_at, watch

    settings.AWX_WS = {**settings.AWX_WS, "HISTORY_MAX_BYTES": 3000, "HISTORY_TOTAL_BYTES": 4000}
    payload = {"stdout": "x" * 900}
    size = len(json.dumps(payload))
    await watch(own_redis.url, "job_events-1", "job_events-2", "job_events-3")
    await emit_to(own_redis.url, "job_events-1", payload, "org-1")
    await emit_to(own_redis.url, "job_events-2", payload, "org-1")
    for _ in range(3):  # 2,745 bytes of one stream: under its 3,000, past the node's 4,000
        await emit_to(own_redis.url, "job_events-3", payload, "org-2")
    redis = redis_at(own_redis.url)
    lengths = [await redis.xlen(f"asgi:history:job_events-{n}") for n in (1, 2, 3)]
    assert lengths == [1, 1, 2]
    assert await shares_of(redis) == {"org-1": 2 * size, "org-2": 2 * size}
    assert int(await redis.get("asgi:history-total")) == 4 * size
    # The shed entry's id is the stream's max-deleted id: a resume from before it is told.
    info = await redis.xinfo_stream("asgi:history:job_events-3")
    first = (await redis.xrange("asgi:history:job_events-3", count=1))[0][0]
    assert info["max-deleted-entry-id"] < first
    assert info["max-deleted-entry-id"] != b"0-0"
    await redis.aclose()


async def test_a_batch_run_again_after_its_script_was_lost_keeps_its_share(layer, own_redis, settings):
    """The first batch on a Redis runs twice (no origin tag yet, then the script flushed): each
    time its messages count against the share the emitter named, and no member receives it."""
    from tests.client import redis_at

    settings.AWX_WS = {**settings.AWX_WS, "HISTORY_TOTAL_BYTES": 1 << 20}
    redis = redis_at(own_redis.url)
    channel = await layer.new_channel()  # a plain Channels consumer: the layer's second round trip
    await layer.group_add("job_events-5", channel)
    for _ in range(2):
        await redis.script_flush()
        await layer.group_send_many([("job_events-5", build_message("job_events-5", {"n": 1}, "org-3"))])
        received = await layer.receive(channel)
        assert "history_share" not in received and json.loads(received["text"]) == {"n": 1}
    assert await redis.hgetall("asgi:history-owners") == {b"asgi:history:job_events-5": b"org-3"}
    assert list(await shares_of(redis)) == ["org-3"]
    await redis.aclose()


async def test_a_single_emit_with_a_share_reaches_a_plain_consumer_without_it(layer, own_redis, settings):
    from tests.client import redis_at

    settings.AWX_WS = {**settings.AWX_WS, "HISTORY_TOTAL_BYTES": 1 << 20}
    channel = await layer.new_channel()
    await layer.group_add("job_events-6", channel)
    await layer.group_send("job_events-6", build_message("job_events-6", {"n": 2}, "org-4"))
    received = await layer.receive(channel)
    assert "history_share" not in received and received["group"] == "job_events-6"
    redis = redis_at(own_redis.url)
    assert await redis.hget("asgi:history-owners", "asgi:history:job_events-6") == b"org-4"
    await redis.aclose()


async def test_streams_counted_before_shares_were_kept_give_first(own_redis, settings):
    """After an upgrade, streams an older release counted belong to no share: past the total they
    are emptied before any share's, the soonest to expire first."""
    from tests.client import emit_to, redis_at, watch

    settings.AWX_WS = {**settings.AWX_WS, "HISTORY_MAX_BYTES": 3000, "HISTORY_TOTAL_BYTES": 4000}
    payload = {"stdout": "x" * 900}
    size = len(json.dumps(payload))
    await watch(own_redis.url, "job_events-1", "job_events-2", "job_events-3")
    await emit_to(own_redis.url, "job_events-1", payload, "org-1")
    redis = redis_at(own_redis.url)
    # What an older release leaves: the stream in the sizes, the total and the expiry set only.
    await redis.hdel("asgi:history-owners", "asgi:history:job_events-1")
    await redis.zrem("asgi:history-shares", "org-1")
    await redis.delete("asgi:history-expiry:org-1")
    await emit_to(own_redis.url, "job_events-2", payload, "org-1")
    for _ in range(3):  # org-2 becomes the largest share, but the ownerless stream goes first
        await emit_to(own_redis.url, "job_events-3", payload, "org-2")
    lengths = [await redis.xlen(f"asgi:history:job_events-{n}") for n in (1, 2, 3)]
    assert lengths == [0, 1, 3]
    assert await shares_of(redis) == {"org-1": size, "org-2": 3 * size}
    assert int(await redis.get("asgi:history-total")) == 4 * size
    await redis.aclose()


async def test_a_stream_first_counted_by_a_read_leaves_the_total_when_it_expires(own_redis, settings):
    """A stream written while no total was kept (an emitter of an older release, or the total
    off) is counted by the first read that trims it; it must leave the total when it expires."""
    from awx_ws.main.layers import RedisChannelLayer
    from awx_ws.main.layers.redis_history import read_local
    from tests.client import emit_to, redis_at, watch

    kinds = {"control": None, "schedules": {"age": 1}}
    settings.AWX_WS = {**settings.AWX_WS, "HISTORY_TOTAL_BYTES": 0, "HISTORY_KINDS": kinds}
    await watch(own_redis.url, "schedules-uncounted", "schedules-next")
    await emit_to(own_redis.url, "schedules-uncounted", {"stdout": "x" * 100})
    redis = redis_at(own_redis.url)
    assert await redis.exists("asgi:history-total") == 0
    layer = RedisChannelLayer(hosts=[{"address": own_redis.url}])
    on = {"HISTORY_TOTAL_BYTES": 1 << 20, "HISTORY_KINDS": kinds}
    settings.AWX_WS = {**settings.AWX_WS, **on}
    await read_local(layer, "schedules-uncounted", GroupPosition(0))
    # Counted by the read, to the byte (this test's own Redis: that entry alone).
    assert int(await redis.get("asgi:history-total")) == len(json.dumps({"stdout": "x" * 100}))
    assert await redis.zrange("asgi:history-expiry", 0, -1) == [b"asgi:history:schedules-uncounted"]
    deadline = time.monotonic() + 10
    while await redis.exists("asgi:history:schedules-uncounted"):
        assert time.monotonic() < deadline, "the stream never expired"
        await asyncio.sleep(0.1)
    await emit_to(own_redis.url, "schedules-next", {"stdout": "y"})
    assert int(await redis.get("asgi:history-total")) == len(json.dumps({"stdout": "y"}))
    await layer.close_pools()
    await redis.aclose()


async def test_a_position_older_than_the_age_is_reset_whatever_the_stream_holds_now(own_redis, settings):
    """History is recorded only while someone could resume the group: a stream holding newer
    entries says nothing of what came between an old position and them."""
    from awx_ws.main.layers import RedisChannelLayer
    from awx_ws.main.layers.redis_history import read_local
    from tests.client import emit_to, redis_at, watch

    settings.AWX_WS = {**settings.AWX_WS, "HISTORY_KINDS": {"control": None, "schedules": {"age": 60}}}
    await watch(own_redis.url, "schedules-other")
    await emit_to(own_redis.url, "schedules-other", {"n": 0})  # this Redis's origin tag exists
    # A stream whose one entry was recorded 30 s ago (watched then), nothing since or before.
    redis = redis_at(own_redis.url)
    now_ms = int(time.time() * 1000)
    await redis.xadd("asgi:history:schedules-aged", {"t": json.dumps({"n": 1})}, id=f"{now_ms - 30_000}-0")
    await redis.expire("asgi:history:schedules-aged", 60)
    await redis.aclose()
    layer = RedisChannelLayer(hosts=[{"address": own_redis.url}])
    try:
        # 70 s back: between it and the entry, messages may have gone unrecorded.
        _, old = await read_local(layer, "schedules-aged", GroupPosition(now_ms - 70_000))
        assert old.reset == "older than the history age"
        _, recent = await read_local(layer, "schedules-aged", GroupPosition(now_ms - 40_000))
        assert recent.reset is None
        assert [json.loads(text) for _, text in recent.entries] == [{"n": 1}]
    finally:
        await layer.close_pools()
