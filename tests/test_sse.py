"""GET /api/v2/stream/: Server-Sent Events with resume by Last-Event-ID, on real daphne and Redis."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from awx_ws.main.emit import (
    aemit_channel_notification,
    aemit_channel_notifications,
    emit_channel_notifications,
)
from awx_ws.main.history import parse_stream_position
from tests.client import redis_at
from tests.factories import adb, create_job, create_org, create_token, create_user, session_cookie
from tests.sse import open_sse, refused
from tests.waiting import eventually

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.every_server]


def unique(label: str) -> str:
    return f"{label}{time.monotonic_ns()}"


@pytest.fixture
def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


async def emit_all(group: str, payloads: list[Any]) -> None:
    for payload in payloads:
        await aemit_channel_notification(group, payload)


async def test_stream_sends_each_message_with_a_position_over_all_its_groups(node, user, auth):
    job = await adb(create_job, await adb(create_org, user))
    events, status = f"job_events-{job.pk}", "jobs-status_changed"
    async with open_sse(node.http_url, f"{status},{events}", headers=auth) as stream:
        await stream.wait_ready()
        assert set(parse_stream_position(stream.last_id)) == {status, events}
        await aemit_channel_notification(events, {"counter": 1})
        await aemit_channel_notification(status, {"status": "running"})
        assert await stream.payloads(2) == [{"counter": 1}, {"status": "running"}]
        positions = parse_stream_position(stream.last_id)
        assert all(position.seen for position in positions.values())  # both groups advanced


async def test_resume_through_nginx_replays_exactly_the_missed_messages_then_live_ones(nginx, auth):
    group = f"schedules-{unique('resume')}"
    async with open_sse(nginx.http_url, group, headers=auth) as stream:
        await stream.wait_ready()
        await aemit_channel_notification(group, {"n": 0})
        assert await stream.payloads(1) == [{"n": 0}]
        last_id = stream.last_id
    await emit_all(group, [{"n": n} for n in range(1, 51)])
    async with open_sse(nginx.http_url, group, headers=auth, last_event_id=last_id) as stream:
        assert await stream.payloads(50) == [{"n": n} for n in range(1, 51)]
        await aemit_channel_notification(group, {"n": "live"})
        assert await stream.payloads(1) == [{"n": "live"}]
        await stream.assert_silent()


async def test_last_event_id_may_come_as_a_query_parameter(node, auth):
    group = f"schedules-{unique('query')}"
    async with open_sse(node.http_url, group, headers=auth) as stream:
        await stream.wait_ready()
        last_id = stream.last_id
    await emit_all(group, [{"n": 1}, {"n": 2}])
    url = f"{node.http_url}/api/v2/stream/"
    async with httpx.AsyncClient(timeout=10) as http:
        params = {"groups": group, "last_event_id": last_id}
        async with http.stream("GET", url, params=params, headers=auth) as response:
            lines = []
            async for line in response.aiter_lines():
                lines.append(line)
                if sum(line.startswith("data:") for line in lines) == 2:
                    break
    assert [line for line in lines if line.startswith("data:")] == ['data: {"n": 1}', 'data: {"n": 2}']


async def test_a_reconnect_during_a_burst_sees_every_message_once(node, auth):
    group = f"schedules-{unique('burst')}"
    async with open_sse(node.http_url, group, headers=auth) as stream:
        await stream.wait_ready()
        last_id = stream.last_id
    burst = asyncio.create_task(emit_all(group, [{"n": n} for n in range(300)]))
    await asyncio.sleep(0.02)  # reconnect while the burst is under way
    async with open_sse(node.http_url, group, headers=auth, last_event_id=last_id) as stream:
        await burst
        assert await stream.payloads(300) == [{"n": n} for n in range(300)]
        await stream.assert_silent()


HISTORY_KINDS = {"control": None, "schedules": {"length": 5, "age": 2}}
# The length test's resumes must not meet the age: its steps may take seconds on a loaded machine.
LENGTH_ONLY = {"control": None, "schedules": {"length": 5, "age": 600}}


@pytest.fixture
def history_kinds():
    """The history settings of short_history."""
    return HISTORY_KINDS


@pytest.fixture
def short_history(daphne_factory, settings, history_kinds):
    """A server and this emitter keeping few schedules messages for a short time (the emitter trims)."""
    server = daphne_factory({"AWX_WS_HISTORY_KINDS": json.dumps(history_kinds)})
    settings.AWX_WS = {**settings.AWX_WS, "HISTORY_KINDS": history_kinds}
    return server


@pytest.mark.parametrize("history_kinds", [LENGTH_ONLY])
async def test_history_keeps_at_most_its_length_and_says_reset_past_it(short_history, auth, redis_server):
    group = f"schedules-{unique('length')}"
    async with open_sse(short_history.http_url, group, headers=auth) as stream:
        await stream.wait_ready()
        before_all = stream.last_id
        await emit_all(group, [{"n": n} for n in range(3)])
        await stream.payloads(3)
        after_three = stream.last_id
    await emit_all(group, [{"n": n} for n in range(3, 8)])
    redis = redis_at(redis_server.url)
    assert await redis.xlen(f"asgi:history:{group}") == 5
    await redis.aclose()
    # Messages 3..7 are all still kept: a client that saw 0..2 misses nothing.
    async with open_sse(short_history.http_url, group, headers=auth, last_event_id=after_three) as stream:
        assert await stream.payloads(5) == [{"n": n} for n in range(3, 8)]
    # 0..2 were trimmed: the stream starts with a reset, then goes on live.
    async with open_sse(short_history.http_url, group, headers=auth, last_event_id=before_all) as stream:
        reset = await stream.next_event()
        assert reset.event == "stream-reset"
        assert json.loads(reset.data) == {"groups": {group: "trimmed past the position"}}
        await aemit_channel_notification(group, {"n": "live"})
        assert await stream.payloads(1) == [{"n": "live"}]


async def _gone(redis: Any, key: str) -> bool:
    return await redis.exists(key) == 0


async def test_history_forgets_messages_older_than_its_age(short_history, auth, redis_server):
    group = f"schedules-{unique('age')}"
    async with open_sse(short_history.http_url, group, headers=auth) as stream:
        await stream.wait_ready()
        last_id = stream.last_id
    await emit_all(group, [{"n": 1}])
    emitted = time.monotonic()
    redis = redis_at(redis_server.url)
    assert await redis.exists(f"asgi:history:{group}") == 1
    # Expired with its age (2 s), by Redis: within moments of it.
    await eventually(
        lambda: _gone(redis, f"asgi:history:{group}"), 5, f"the history of {group} to expire with its age"
    )
    assert time.monotonic() - emitted > 1  # by its age, not at once
    await redis.aclose()
    async with open_sse(short_history.http_url, group, headers=auth, last_event_id=last_id) as stream:
        reset = await stream.next_event()
        assert reset.event == "stream-reset"
        assert json.loads(reset.data) == {"groups": {group: "older than the history age"}}
        await stream.assert_silent()


async def test_a_group_without_history_resets_on_resume(node, user, token):
    group = f"control-limit_reached_{user.pk}"
    headers = {"Authorization": f"Token {token}"}
    async with open_sse(node.http_url, group, headers=headers) as stream:
        await stream.wait_ready()
        last_id = stream.last_id
    async with open_sse(node.http_url, group, headers=headers, last_event_id=last_id) as stream:
        reset = await stream.next_event()
        assert reset.event == "stream-reset"
        assert "no history is kept for control groups" in json.loads(reset.data)["groups"][group]


async def test_the_stream_sends_keep_alive_comments_while_idle(daphne_factory, auth):
    server = daphne_factory({"AWX_WS_SSE_KEEPALIVE": "0.3"})
    url = f"{server.http_url}/api/v2/stream/"
    async with httpx.AsyncClient(timeout=10) as http:
        async with http.stream(
            "GET", url, params={"groups": "jobs-status_changed"}, headers=auth
        ) as response:
            lines = []
            async with asyncio.timeout(5):
                async for line in response.aiter_lines():
                    lines.append(line)
                    if lines.count(": keep-alive") == 2:
                        break
    assert lines[0] == "retry: 1000"


async def refused_with(base_url: str, groups: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    status, body = await refused(base_url, groups, headers)
    return status, body["detail"]


async def test_the_stream_admits_whom_the_websocket_admits(node, user, auth):
    other_job = await adb(create_job, await adb(create_org))
    assert (await refused_with(node.http_url, "jobs-status_changed"))[0] == 401
    assert (await refused_with(node.http_url, "jobs-status_changed", {"Authorization": "Token nope"}))[
        0
    ] == 401
    inactive = await adb(create_token, await adb(create_user, active=False))
    assert (await refused_with(node.http_url, "jobs-status_changed", {"Authorization": f"Token {inactive}"}))[
        0
    ] == 401
    assert await refused_with(node.http_url, f"job_events-{other_job.pk}", auth) == (
        403,
        f"access denied to channel job_events for resource id {other_job.pk}",
    )
    assert await refused_with(node.http_url, "broadcast-all", auth) == (
        400,
        "groups: group kind 'broadcast' is reserved",
    )
    assert (await refused_with(node.http_url, "", auth))[0] == 400
    assert (await refused_with(node.http_url, "jobs-status_changed", {**auth, "Last-Event-ID": "garbage"}))[
        0
    ] == 400


async def test_a_browser_session_may_stream_but_not_for_a_foreign_origin(node, user):
    cookie = {"Cookie": f"awx_sessionid={await adb(session_cookie, user)}"}
    async with open_sse(node.http_url, "jobs-status_changed", headers=cookie) as stream:
        await stream.wait_ready()
    for origin in ("https://evil.example", f"http://127.0.0.1:{node.port + 1}"):  # another site, another port
        foreign = {**cookie, "Origin": origin}
        assert (await refused_with(node.http_url, "jobs-status_changed", foreign))[0] == 401
    own = {**cookie, "Origin": f"http://127.0.0.1:{node.port}"}
    async with open_sse(node.http_url, "jobs-status_changed", headers=own) as stream:
        await stream.wait_ready()


async def test_a_client_going_away_through_nginx_is_released_within_a_second(nginx, auth, redis_server):
    group = f"schedules-{unique('gone')}"
    redis = redis_at(redis_server.url)
    async with open_sse(nginx.http_url, group, headers=auth) as stream:
        await stream.wait_ready()
        assert await redis.zcard(f"asgi:group:{group}") == 1
    # Nothing is being sent: nginx passes the disconnect on, daphne reports it, the stream lets go.
    deadline = time.monotonic() + 1.0
    while await redis.zcard(f"asgi:group:{group}") and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await redis.zcard(f"asgi:group:{group}") == 0
    await redis.aclose()


async def test_a_resume_replays_batched_messages_exactly_as_single_ones(node, auth):
    group = f"schedules-batch{time.monotonic_ns()}"
    async with open_sse(node.http_url, group, headers=auth) as stream:
        await stream.wait_ready()
        start = stream.last_id
    await aemit_channel_notification(group, {"n": 0})
    await aemit_channel_notifications([(group, {"n": n}) for n in (1, 2, 3)])
    await asyncio.to_thread(emit_channel_notifications, [(group, {"n": n}) for n in (4, 5)])
    await aemit_channel_notification(group, {"n": 6})
    async with open_sse(node.http_url, group, headers=auth, last_event_id=start) as stream:
        assert await stream.payloads(7) == [{"n": n} for n in range(7)]
    # From inside the first batch (after its first message): exactly what came after it.
    async with open_sse(node.http_url, group, headers=auth, last_event_id=start) as stream:
        assert await stream.payloads(2) == [{"n": 0}, {"n": 1}]
        middle = stream.last_id
    async with open_sse(node.http_url, group, headers=auth, last_event_id=middle) as stream:
        assert await stream.payloads(5) == [{"n": n} for n in range(2, 7)]
        await aemit_channel_notifications([(group, {"n": "live"})])
        assert await stream.payloads(1) == [{"n": "live"}]
