"""AWX's websocket protocol against a real daphne: what a client receives for each rule.

Every test that talks to `node` runs twice: on the Redis layer and on the RabbitMQ layer.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import time

import pytest
from redis.asyncio import Redis

from awx_ws.main.emit import aemit_channel_notification, build_message
from tests.client import WsClient, open_peer_socket, open_ws, redis_at, refused_status
from tests.factories import adb, create_job, create_org, create_token, create_user, session_cookie
from tests.waiting import eventually

pytestmark = [
    pytest.mark.usefixtures("shared_db"),
    pytest.mark.usefixtures("fresh_in_process_layer"),
    pytest.mark.every_server,
]


@pytest.fixture(scope="module")
def node(layer_node):
    """Both layers' nodes in turn (conftest.layer_backend)."""
    return layer_node


@pytest.fixture
async def browser_cookies(user) -> dict[str, str]:
    return {"session": await adb(session_cookie, user), "csrf": secrets.token_hex(16)}


async def browser_client(node, cookies: dict[str, str], origin: str | None = None) -> WsClient:
    client = await open_ws(
        node.url,
        headers={"Cookie": f"awx_sessionid={cookies['session']}; csrftoken={cookies['csrf']}"},
        origin=origin or f"http://127.0.0.1:{node.port}",
    )
    client.xrftoken = cookies["csrf"]
    return client


# --- authentication -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/websocket/", {"Authorization": "Token {key}"}),
        ("/websocket/", {"Authorization": "Bearer {key}"}),
        ("/websocket/?token={key}", {}),
        ("/websocket/", {"Cookie": 'token="{key}"'}),  # awxkit's WSClient, quotes included
        ("/websocket/", {"Cookie": "token={key}"}),
        ("/api/websocket/", {"Authorization": "Token {key}"}),
    ],
)
async def test_token_clients_are_greeted_with_their_user_id(node, user, token, path, headers):
    headers = {name: value.format(key=token) for name, value in headers.items()}
    client = await open_ws(node.url, path=path.format(key=token), headers=headers)
    assert client.hello == {"accept": True, "user": user.pk}
    await client.close()


async def test_no_credentials_is_refused_at_the_handshake(node):
    assert await refused_status(node.url) == 403


async def test_unknown_token_is_refused(node):
    assert await refused_status(node.url, headers={"Authorization": "Token " + "0" * 40}) == 403


async def test_token_of_a_deactivated_user_is_refused(node):
    inactive = await adb(create_user, active=False)
    key = await adb(create_token, inactive)
    assert await refused_status(node.url, headers={"Authorization": f"Token {key}"}) == 403


async def test_bad_token_does_not_fall_back_to_the_session(node, browser_cookies):
    headers = {
        "Authorization": "Token " + "1" * 40,
        "Cookie": f"awx_sessionid={browser_cookies['session']}",
    }
    assert await refused_status(node.url, headers=headers, origin=f"http://127.0.0.1:{node.port}") == 403


@pytest.mark.parametrize("path", ["/websocket", "/websocket/x/", "/xwebsocket/", "/api/websocket/y"])
async def test_routes_are_anchored(node, token, path):
    assert await refused_status(node.url, path=path, headers={"Authorization": f"Token {token}"}) == 403


async def test_session_with_allowed_origin_is_accepted(node, user, browser_cookies):
    client = await browser_client(node, browser_cookies)
    assert client.hello == {"accept": True, "user": user.pk}
    errors, reply = await client.subscribe({"jobs": ["status_changed"]})
    assert errors == []
    assert reply["groups_current"] == ["jobs-status_changed"]
    await client.close()


@pytest.mark.parametrize("origin", ["http://evil.example", "null", None])
async def test_session_from_a_foreign_or_missing_origin_is_refused(node, browser_cookies, origin):
    headers = {"Cookie": f"awx_sessionid={browser_cookies['session']}"}
    assert await refused_status(node.url, headers=headers, origin=origin) == 403


@pytest.mark.parametrize(
    "origin",
    [
        "http://127.0.0.1:{other_port}",  # the same host, another port (another service there)
        "https://127.0.0.1:{port}",  # the same host and port, another scheme
        "http://localhost:{port}",  # another name for it: not the origin the browser was on
    ],
)
async def test_a_session_needs_the_same_scheme_host_and_port(node, browser_cookies, origin):
    headers = {"Cookie": f"awx_sessionid={browser_cookies['session']}"}
    origin = origin.format(port=node.port, other_port=node.port + 1)
    assert await refused_status(node.url, headers=headers, origin=origin) == 403


async def test_allowed_hosts_star_does_not_admit_a_foreign_origin(daphne_factory, browser_cookies, token):
    server = daphne_factory({"ALLOWED_HOSTS": "*"})
    headers = {"Cookie": f"awx_sessionid={browser_cookies['session']}"}
    assert await refused_status(server.url, headers=headers, origin="http://evil.example") == 403
    cookie = {"Cookie": f'token="{token}"'}
    assert await refused_status(server.url, headers=cookie, origin="http://evil.example") == 403


async def test_a_session_may_come_from_an_origin_in_csrf_trusted_origins(
    daphne_factory, user, browser_cookies
):
    server = daphne_factory({"CSRF_TRUSTED_ORIGINS": "https://awx.example.com,https://*.example.org"})
    headers = {"Cookie": f"awx_sessionid={browser_cookies['session']}"}
    for origin in ("https://awx.example.com", "https://ui.example.org"):  # listed; a listed `*.`'s subdomain
        client = await open_ws(server.url, headers=headers, origin=origin)
        assert client.hello == {"accept": True, "user": user.pk}
        await client.close()
    # Listed for https only; a name that merely ends like a listed one; one not listed at all.
    for origin in ("http://awx.example.com", "https://example.org.evil.example", "https://evil.example"):
        assert await refused_status(server.url, headers=headers, origin=origin) == 403, origin


@pytest.mark.parametrize("origin", ["http://evil.example", "http://127.0.0.1:{other_port}", "null"])
async def test_a_token_cookie_from_a_foreign_origin_is_refused(node, token, origin):
    """A browser sends AWX's token cookie by itself: another site's page must not use it."""
    headers = {"Cookie": f'token="{token}"'}
    origin = origin.format(other_port=node.port + 1)
    assert await refused_status(node.url, headers=headers, origin=origin) == 403


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{port}", "https://127.0.0.1:{port}", None])
async def test_a_token_cookie_needs_only_the_same_host_and_port(node, user, token, origin):
    """awxkit sends `Origin: http://host:port` even over wss; clients without a browser send none."""
    origin = origin.format(port=node.port) if origin else None
    client = await open_ws(node.url, headers={"Cookie": f'token="{token}"'}, origin=origin)
    assert client.hello == {"accept": True, "user": user.pk}
    await client.close()


async def test_a_planted_garbage_token_cookie_does_not_lock_out_the_session(node, user, browser_cookies):
    cookies = f"token=planted-by-a-sibling-domain; awx_sessionid={browser_cookies['session']}"
    client = await open_ws(node.url, headers={"Cookie": cookies}, origin=f"http://127.0.0.1:{node.port}")
    assert client.hello == {"accept": True, "user": user.pk}
    await client.close()


@pytest.mark.parametrize("xrftoken", [None, "", "wrong", 12])
async def test_session_messages_need_the_csrf_token(node, browser_cookies, xrftoken):
    client = await browser_client(node, browser_cookies)
    frame = {"groups": {"jobs": ["status_changed"]}}
    if xrftoken != "":
        frame["xrftoken"] = xrftoken
    assert await client.request_error(json.dumps(frame)) == "access denied to channel"
    # The refused message changed nothing: the subscription is still empty.
    errors, reply = await client.subscribe({})
    assert reply == {"groups_current": [], "groups_left": [], "groups_joined": []}
    await client.close()


async def test_token_clients_need_no_xrftoken(client):
    await client.send_json({"groups": {"jobs": ["summary"]}})
    assert (await client.recv_json())["groups_current"] == ["jobs-summary"]


# --- subscribing ----------------------------------------------------------------------------


async def test_each_request_replaces_the_whole_set(client):
    errors, reply = await client.subscribe({"jobs": ["status_changed", "summary"]})
    assert errors == []
    assert reply == {
        "groups_current": ["jobs-status_changed", "jobs-summary"],
        "groups_left": [],
        "groups_joined": ["jobs-status_changed", "jobs-summary"],
    }
    errors, reply = await client.subscribe({"jobs": ["summary"], "schedules": ["changed"]})
    assert reply == {
        "groups_current": ["jobs-summary", "schedules-changed"],
        "groups_left": ["jobs-status_changed"],
        "groups_joined": ["schedules-changed"],
    }
    errors, reply = await client.subscribe({})
    assert reply == {
        "groups_current": [],
        "groups_left": ["jobs-summary", "schedules-changed"],
        "groups_joined": [],
    }


async def test_member_joins_own_organizations_job_and_is_denied_others(client, user):
    mine = await adb(create_job, await adb(create_org, user))
    theirs = await adb(create_job, await adb(create_org))
    errors, reply = await client.subscribe({"job_events": [theirs.pk, mine.pk]})
    assert errors == [f"access denied to channel job_events for resource id {theirs.pk}"]
    assert reply["groups_current"] == [f"job_events-{mine.pk}"]


@pytest.mark.parametrize(
    ("group_kind", "job_kind"),
    [
        ("job_events", "job"),
        ("workflow_events", "workflow_job"),
        ("ad_hoc_command_events", "ad_hoc_command"),
        ("project_update_events", "project_update"),
        ("inventory_update_events", "inventory_update"),
        ("system_job_events", "system_job"),
    ],
)
async def test_all_six_event_kinds_check_access(client, user, group_kind, job_kind):
    mine = await adb(create_job, await adb(create_org, user), kind=job_kind)
    theirs = await adb(create_job, await adb(create_org), kind=job_kind)
    errors, reply = await client.subscribe({group_kind: [mine.pk, theirs.pk]})
    assert errors == [f"access denied to channel {group_kind} for resource id {theirs.pk}"]
    assert reply["groups_current"] == [f"{group_kind}-{mine.pk}"]


async def test_an_id_of_another_job_kind_is_denied(client, user):
    workflow = await adb(create_job, await adb(create_org, user), kind="workflow_job")
    errors, reply = await client.subscribe({"job_events": [workflow.pk]})
    assert errors == [f"access denied to channel job_events for resource id {workflow.pk}"]
    assert reply["groups_current"] == []


async def test_superuser_joins_any_job(node):
    admin = await adb(create_user, superuser=True)
    job = await adb(create_job, await adb(create_org))
    orphan_system_job = await adb(create_job, None, kind="system_job")
    key = await adb(create_token, admin)
    client = await open_ws(node.url, headers={"Authorization": f"Token {key}"})
    errors, reply = await client.subscribe(
        {"job_events": [job.pk], "system_job_events": [orphan_system_job.pk]}
    )
    assert errors == []
    assert reply["groups_joined"] == sorted(
        [f"job_events-{job.pk}", f"system_job_events-{orphan_system_job.pk}"]
    )
    await client.close()


async def test_control_group_is_only_for_the_users_own_id(client, user):
    errors, reply = await client.subscribe(
        {"control": [f"limit_reached_{user.pk}", f"limit_reached_{user.pk + 1000}"]}
    )
    assert errors == [f"access denied to channel control-limit_reached_{user.pk + 1000}"]
    assert reply["groups_current"] == [f"control-limit_reached_{user.pk}"]


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        ('{"groups": {"nope": ["x"]}}', "unknown group kind 'nope'"),
        ('{"groups": {"broadcast": ["group_send"]}}', "group kind 'broadcast' is reserved"),
        ('{"groups": {"jobs": "status_changed"}}', "groups.jobs must be a list"),
        (
            '{"groups": {"jobs": ["a b"]}}',
            "invalid group name 'jobs-a b': use 1-99 characters of a-z, A-Z, 0-9, '_', '.', '-'",
        ),
        (
            '{"groups": {"job_events": [-1]}}',
            "invalid id -1 in groups.job_events: expected a positive integer",
        ),
        ('{"groups": []}', "groups must be an object of kind: [items]"),
        ('{"hello": 1}', 'unknown message: expected {"groups": {...}}'),
        ("not json", "invalid JSON: Expecting value: line 1 column 1 (char 0)"),
        ("[1]", "expected a JSON object"),
        (b"\x00binary", "binary frames are not supported: send JSON text"),
        ("[" * 20_000 + "]" * 20_000, "invalid JSON: nested too deeply"),
        ('{"x": "' + "y" * 70_000 + '"}', "frame too large: at most 65536 bytes"),
    ],
)
async def test_bad_frames_get_an_error_and_change_nothing(client, frame, error):
    await client.subscribe({"jobs": ["status_changed"]})
    assert await client.request_error(frame) == error
    # Still connected, still subscribed to exactly what it had.
    errors, reply = await client.subscribe({"jobs": ["status_changed"]})
    assert reply == {"groups_current": ["jobs-status_changed"], "groups_left": [], "groups_joined": []}


async def test_more_than_100_groups_is_refused(client):
    await client.send_json({"groups": {"jobs": [f"g{i}" for i in range(101)]}})
    assert await client.recv_json() == {"error": "too many groups: 101 requested, at most 100 per connection"}
    errors, reply = await client.subscribe({"jobs": [f"g{i}" for i in range(100)]})
    assert len(reply["groups_current"]) == 100


# --- delivery -------------------------------------------------------------------------------


async def test_emitted_payload_arrives_as_exactly_its_json_text(node, user, token):
    job = await adb(create_job, await adb(create_org, user))  # statuses reach the job's members
    client = await open_ws(node.url, headers={"Authorization": f"Token {token}"})
    await client.subscribe({"jobs": ["status_changed"]})
    payload = {"group_name": "jobs", "unified_job_id": job.pk, "status": "running", "type": "job"}
    await aemit_channel_notification("jobs-status_changed", payload)
    raw = await asyncio.wait_for(client.ws.recv(), 10)
    assert raw == json.dumps(payload)
    await client.close()


async def test_only_subscribers_of_the_group_receive(node):
    clients = []
    for _ in range(2):
        key = await adb(create_token, await adb(create_user))
        clients.append(await open_ws(node.url, headers={"Authorization": f"Token {key}"}))
    await clients[0].subscribe({"jobs": ["status_changed"]})
    await clients[1].subscribe({"jobs": ["summary"]})
    await aemit_channel_notification("jobs-status_changed", {"n": 1})
    assert await clients[0].recv_json() == {"n": 1}
    # Emitted after it from this process, both reach the node's fan-out on its one channel, in
    # order: had the first reached the other client, it would come before this marker.
    await aemit_channel_notification("jobs-summary", {"marker": True})
    assert await clients[1].recv_json() == {"marker": True}
    for c in clients:
        await c.close()


async def group_members(layer_backend: str, group: str, request) -> int:
    """Members of group as the layer's server sees them: Redis's sorted set, RabbitMQ's bindings."""
    if layer_backend == "redis":
        redis = redis_at(request.getfixturevalue("redis_server").url)
        try:
            return int(await redis.zcard(f"asgi:group:{group}"))
        finally:
            await redis.aclose()
    rabbitmq = request.getfixturevalue("rabbitmq_server")
    rows = await asyncio.to_thread(rabbitmq.rows, "list_bindings", "source_name", "routing_key")
    return sum(1 for source, key in rows if source == "groups" and key == group)


async def test_disconnect_leaves_every_group(node, token, layer_backend, request):
    client = await open_ws(node.url, headers={"Authorization": f"Token {token}"})
    group = f"schedules-gone{secrets.token_hex(4)}"
    await client.subscribe({"schedules": [group.split("-", 1)[1]]})
    assert await group_members(layer_backend, group, request) == 1
    await client.close()
    for _ in range(50):
        if await group_members(layer_backend, group, request) == 0:
            break
        await asyncio.sleep(0.1)
    assert await group_members(layer_backend, group, request) == 0


async def test_a_client_that_stops_reading_still_gets_everything_in_order(node, token):
    """Frames go straight to the socket while it takes them (awx_ws.server); once the kernel's
    buffer is full the rest queues in Twisted's buffer. Up to the slow-client limit (8 MiB by
    default; past it the connection is closed, tests/test_slow_clients.py) nothing may be lost or
    reordered."""
    from websockets.asyncio.client import connect

    url = f"{node.url}/websocket/?token={token}"
    # max_queue=1: the client stops reading from TCP until we consume, so buffers fill up.
    async with connect(url, max_queue=1, max_size=2**20) as ws:
        await ws.recv()
        await ws.send(json.dumps({"groups": {"jobs": ["backlog"]}}))
        assert "groups_current" in json.loads(await ws.recv())
        filler = "x" * 10_000
        for seq in range(600):  # ~6 MB: beyond socket buffers, within the slow-client limit
            await aemit_channel_notification("jobs-backlog", {"seq": seq, "filler": filler})
        received = [json.loads(await asyncio.wait_for(ws.recv(), 30))["seq"] for _ in range(600)]
    assert received == list(range(600))


async def member_since(redis: Redis, key: str) -> float:
    """When the group's one member last joined or refreshed (its score, epoch seconds)."""
    members = await redis.zrange(key, 0, -1, withscores=True)
    assert len(members) == 1, f"{key} has {len(members)} members, not 1"
    return float(members[0][1])


async def test_a_group_held_longer_than_group_expiry_keeps_delivering(daphne_factory, token):
    """channels_redis drops members older than group_expiry; the fan-out refreshes its own, on
    time even while other clients keep it busy."""

    from awx_ws.main.layers import RedisChannelLayer

    server = daphne_factory({"CHANNEL_LAYER_GROUP_EXPIRY": "4"})
    item = f"longlived{time.monotonic_ns()}"  # this test's own group
    group = f"schedules-{item}"
    client = await open_ws(server.url, headers={"Authorization": f"Token {token}"})
    await client.subscribe({"schedules": [item]})
    redis_url = os.environ["REDIS_URL"]
    # An emitter configured like that server: it drops members older than 4 s.
    layer = RedisChannelLayer(hosts=[{"address": redis_url}], group_expiry=4)
    redis = redis_at(redis_url)
    joined = await member_since(redis, f"asgi:group:{group}")
    # Until the fan-out has refreshed its membership more than 4 s past the join (without that,
    # the emitter below would drop it), with another client changing its groups four times a
    # second meanwhile: that pace is the point, the fan-out must refresh on time while busy.
    busy = await open_ws(server.url, headers={"Authorization": f"Token {token}"})
    for n in range(80):  # 20 s at most
        if await member_since(redis, f"asgi:group:{group}") > joined + 4:
            break
        await busy.subscribe({"schedules": [f"{item}busy{n % 2}"]})
        await asyncio.sleep(0.25)
    else:
        raise AssertionError(f"the fan-out did not refresh its membership of {group} in 20 s")
    await busy.close()
    await layer.group_send(group, build_message(group, {"still": "here"}))
    assert await client.recv_json() == {"still": "here"}
    assert await redis.zcard(f"asgi:group:{group}") == 1
    await redis.aclose()
    await layer.close_pools()
    await client.close()


async def test_a_peer_relay_keeps_its_groups_past_group_expiry(daphne_factory):
    """A relay link can outlive group_expiry too: the BroadcastConsumer refreshes its groups."""
    from awx_ws.main.layers import RedisChannelLayer

    server = daphne_factory({"CHANNEL_LAYER_GROUP_EXPIRY": "4"})
    secret = os.environ["BROADCAST_WEBSOCKET_SECRET"]
    layer = RedisChannelLayer(hosts=[{"address": os.environ["REDIS_URL"]}], group_expiry=4)
    url = f"{server.url}/websocket/broadcast/"
    group = f"jobs-peerlong{time.monotonic_ns()}"  # this test's own group
    async with await open_peer_socket(url, server.self_address, secret) as peer:
        await peer.send(json.dumps({"join": [group], "leave": []}))
        # The consumer confirms what it forwards from now on (resuming clients wait for it).
        assert json.loads(await peer.recv()) == {"forwarding": [group], "dropped": []}
        # Until the consumer has refreshed its membership more than group_expiry (4 s) past the
        # join: without that, the emitter below would drop it.
        redis = redis_at(os.environ["REDIS_URL"])
        joined = await member_since(redis, f"asgi:group:{group}")

        async def refreshed_past_expiry() -> bool:
            return await member_since(redis, f"asgi:group:{group}") > joined + 4

        await eventually(
            refreshed_past_expiry, 20, f"the relay consumer to refresh its membership of {group}"
        )
        await redis.aclose()
        await layer.group_send(group, build_message(group, {"n": 1}))
        forwarded = json.loads(await asyncio.wait_for(peer.recv(), 10))
    await layer.close_pools()
    message_id = forwarded.pop("id")  # the origin's history id travels with the message
    assert forwarded == {"group": group, "text": json.dumps({"n": 1})}
    assert re.fullmatch(r"[0-9a-f]{8}:\d+-\d+", message_id)
