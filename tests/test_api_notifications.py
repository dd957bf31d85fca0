"""What websocket subscribers receive when jobs change through the API, and that a rollback emits
nothing."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest
from django.db import transaction
from rest_framework.test import APIClient

from awx_ws.main.api.serializers import JobSerializer
from awx_ws.main.models import Job
from tests.client import WsClient, open_ws
from tests.factories import adb, create_job, create_org, create_token, create_user

# Its tests create users, tokens and jobs the servers read (conftest.shared_db).
pytestmark = pytest.mark.usefixtures("shared_db")

EVENT_FIELDS = [
    "id", "counter", "event", "event_data", "stdout", "start_line", "end_line", "uuid", "parent_uuid",
    "failed", "changed", "play", "role", "task",
]  # fmt: skip


def call_api(user: Any, method: str, path: str, body: Any = None) -> Any:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {create_token(user)}")
    response = getattr(client, method)(path, body, format="json")
    assert response.status_code < 300, response.json()
    return response.json()


async def api(user: Any, method: str, path: str, body: Any = None) -> Any:
    return await adb(call_api, user, method, path, body)


async def receive(client: WsClient, count: int) -> list[dict[str, Any]]:
    return [await client.recv_json(timeout=10) for _ in range(count)]


async def member_client(node: Any, user: Any) -> tuple[Any, WsClient]:
    """A job of the user's organization, and the user's websocket opened once they are a member
    (statuses reach members only; one who joins later gets them within seconds, test_audience.py)."""
    job = await adb(create_job, await adb(create_org, user))
    client = await open_ws(node.url, headers={"Authorization": f"Token {await adb(create_token, user)}"})
    return job, client


async def test_status_changes_carry_awxs_fields_and_end_with_a_summary(node, user):
    job, client = await member_client(node, user)
    await client.subscribe({"jobs": ["status_changed", "summary"]})
    statuses = ["pending", "waiting", "running", "successful"]
    for status in statuses:
        stored = await api(user, "patch", f"/api/v2/jobs/{job.pk}/", {"status": status})
    messages = await receive(client, 5)
    base = {"group_name": "jobs", "unified_job_id": job.pk, "type": "job"}
    assert messages[:3] == [{**base, "status": s} for s in statuses[:3]]
    finished = messages[3].pop("finished")
    assert messages[3] == {**base, "status": "successful"}
    assert finished[:19] == stored["finished"][:19]
    assert messages[4] == {"group_name": "jobs", "unified_job_id": job.pk, "final_counter": 0}


async def test_events_arrive_in_counter_order_with_awxs_fields(client, user):
    job = await adb(create_job, await adb(create_org, user))
    await client.subscribe({"job_events": [job.pk]})
    batch = [
        {"counter": c, "event": "runner_on_ok", "stdout": f"ok {c}", "event_data": {"host": f"h{c}"},
         "start_line": c, "end_line": c + 1, "uuid": f"u{c}", "parent_uuid": "p", "changed": c == 2}
        for c in (3, 1, 2)
    ]  # fmt: skip
    stored = {e["counter"]: e for e in await api(user, "post", f"/api/v2/jobs/{job.pk}/job_events/", batch)}
    messages = await receive(client, 3)
    assert [m["counter"] for m in messages] == [1, 2, 3]
    for message in messages:
        assert message["group_name"] == "job_events"
        assert message["job"] == job.pk
        assert {f: message[f] for f in EVENT_FIELDS} == {
            f: stored[message["counter"]][f] for f in EVENT_FIELDS
        }
        assert message["created"][:19] == stored[message["counter"]]["created"][:19]


async def test_long_stdout_is_cut_for_the_websocket_as_awx_cuts_it_and_kept_whole_in_the_api(client, user):
    job = await adb(create_job, await adb(create_org, user))
    await client.subscribe({"job_events": [job.pk]})
    long = "\x1b[0;32m" + " ".join(["ok: [web]"] * 500)  # 5,006 characters, green left open
    events = [
        {"counter": 1, "event": "playbook_on_start", "stdout": long},  # playbook_on_*: whole
        {"counter": 2, "event": "runner_on_ok", "stdout": long},
    ]
    await api(user, "post", f"/api/v2/jobs/{job.pk}/job_events/", events)
    whole, cut = await receive(client, 2)
    assert whole["stdout"] == long
    assert cut["stdout"] == long[:1023] + "\u2026" + "\x1b[0m"  # AWX's ellipsis, and the colour reset
    stored = await api(user, "get", f"/api/v2/jobs/{job.pk}/job_events/")
    assert [e["stdout"] for e in stored["results"]] == [long, long]


def test_truncation_closes_every_colour_left_open_and_leaves_short_output_alone():
    from awx_ws.main.notifications import truncate_stdout

    assert truncate_stdout("short", 1024) == "short"
    assert truncate_stdout("abcdef", 4) == "abc\u2026"
    assert truncate_stdout("\x1b[1m\x1b[31mred bold", 12) == "\x1b[1m\x1b[31mre\u2026\x1b[0m\x1b[0m"
    assert truncate_stdout("\x1b[31mred\x1b[0m plain text", 16) == "\x1b[31mred\x1b[0m pl\u2026"
    assert truncate_stdout("anything", 0) == "anything"  # 0: no limit


async def test_other_kinds_emit_to_their_own_event_group(client, user):
    command = await adb(create_job, await adb(create_org, user), kind="ad_hoc_command")
    await client.subscribe({"ad_hoc_command_events": [command.pk]})
    await api(
        user,
        "post",
        f"/api/v2/jobs/{command.pk}/job_events/",
        {"counter": 1, "event": "runner_on_ok", "stdout": "ok"},
    )
    message = await client.recv_json()
    assert message["group_name"] == "ad_hoc_command_events"
    assert message["ad_hoc_command"] == command.pk
    assert "job" not in message


async def test_summary_reports_the_last_counter(node, user):
    job, client = await member_client(node, user)
    await client.subscribe({"jobs": ["summary"]})
    await api(
        user,
        "post",
        f"/api/v2/jobs/{job.pk}/job_events/",
        [{"counter": c, "event": "e", "stdout": "."} for c in (1, 2, 7)],
    )
    await api(user, "patch", f"/api/v2/jobs/{job.pk}/", {"status": "canceled"})
    assert await client.recv_json() == {"group_name": "jobs", "unified_job_id": job.pk, "final_counter": 7}


def change_status_then_fail(job: Job, user: Any) -> None:
    request = type("Request", (), {"user": user})()
    try:
        with transaction.atomic():
            serializer = JobSerializer(
                job, data={"status": "pending"}, partial=True, context={"request": request}
            )
            serializer.is_valid(raise_exception=True)
            serializer.save()
            raise RuntimeError("something later in the transaction failed")
    except RuntimeError:
        pass


async def test_a_rolled_back_transaction_emits_nothing(node, user):
    job, client = await member_client(node, user)
    await client.subscribe({"jobs": ["status_changed"]})
    await adb(change_status_then_fail, job, user)
    await client.assert_silent(0.5)
    assert (await adb(Job.objects.get, pk=job.pk)).status == "new"
    # The same change, committed, does arrive: the silence above was the rollback's doing.
    await api(user, "patch", f"/api/v2/jobs/{job.pk}/", {"status": "pending"})
    assert (await client.recv_json())["status"] == "pending"


def http(nginx_port: int, token: str, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{nginx_port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


async def test_api_calls_through_nginx_reach_a_websocket_client_in_counter_order(nginx, user, token):
    org = await adb(create_org, user)
    ws = await open_ws(f"ws://127.0.0.1:{nginx.port}", headers={"Authorization": f"Token {token}"})
    job = await asyncio.to_thread(
        http, nginx.port, token, "POST", "/api/v2/jobs/", {"kind": "job", "organization": org.pk}
    )
    errors, reply = await ws.subscribe({"jobs": ["status_changed"], "job_events": [job["id"]]})
    assert errors == []
    path = f"/api/v2/jobs/{job['id']}/"
    steps = [
        ("PATCH", path, {"status": "pending"}),
        ("PATCH", path, {"status": "waiting"}),
        ("PATCH", path, {"status": "running"}),
        ("POST", path + "job_events/", {"counter": 1, "event": "playbook_on_start"}),
        (
            "POST",
            path + "job_events/",
            [{"counter": c, "event": "runner_on_ok", "stdout": "ok"} for c in (4, 2, 3)],
        ),
        ("POST", path + "job_events/", {"counter": 5, "event": "playbook_on_stats"}),
        ("PATCH", path, {"status": "successful"}),
    ]
    for method, url, body in steps:
        await asyncio.to_thread(http, nginx.port, token, method, url, body)
    messages = await receive(ws, 9)
    statuses = [m["status"] for m in messages if "status" in m]
    counters = [m["counter"] for m in messages if "counter" in m]
    assert statuses == ["pending", "waiting", "running", "successful"]
    assert counters == [1, 2, 3, 4, 5]
    assert [m.get("status", m.get("counter")) for m in messages] == [
        "pending",
        "waiting",
        "running",
        1,
        2,
        3,
        4,
        5,
        "successful",
    ]
    await ws.close()


@pytest.fixture
def api_on_own_redis(own_redis: Any, settings: Any) -> Any:
    """This process's API emits into the test's own Redis (a node of its own)."""
    from channels.layers import get_channel_layer

    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "awx_ws.main.layers.RedisChannelLayer", "CONFIG": {"hosts": [own_redis.url]}}
    }
    yield own_redis
    layer = get_channel_layer()
    if layer._blocking:  # the pooled sockets of the API's sync emits, closed before Redis stops
        layer.blocking_client(0, 1).connection_pool.disconnect()


async def test_one_organizations_flood_through_the_api_empties_its_own_history_not_anothers(
    api_on_own_redis, daphne_factory, settings
):
    """Issue 26 (7): with the node's history total reached, a member flooding their own
    organization's jobs with large events loses their own history; another organization's
    viewer, whose history is due to expire first, still resumes with nothing lost."""
    redis = api_on_own_redis
    bounds = {"HISTORY_MAX_BYTES": 6000, "HISTORY_TOTAL_BYTES": 12000}
    server = daphne_factory({"REDIS_URL": redis.url, **{f"AWX_WS_{k}": str(v) for k, v in bounds.items()}})
    settings.AWX_WS = {**settings.AWX_WS, **bounds, "MAX_WEBSOCKET_EVENT_RATE": 0}
    viewer, flooder = await adb(create_user), await adb(create_user)
    quiet_job = await adb(create_job, await adb(create_org, viewer))
    flood_org = await adb(create_org, flooder)
    flood_jobs = [await adb(create_job, flood_org) for _ in range(6)]

    def headers(user: Any) -> dict[str, str]:
        return {"Authorization": f"Token {create_token(user)}"}

    def events(count: int) -> list[dict[str, Any]]:
        return [{"counter": c, "event": "runner_on_ok", "stdout": "x" * 1000} for c in range(1, count + 1)]

    quiet = await open_ws(server.url, headers=await adb(headers, viewer))
    assert (await quiet.subscribe({"job_events": [quiet_job.pk]}, ids=True))[0] == []
    await api(viewer, "post", f"/api/v2/jobs/{quiet_job.pk}/job_events/", events(3))
    quiet_ids = [(await quiet.recv_json())["id"] for _ in range(3)]
    await quiet.close()

    loud = await open_ws(server.url, headers=await adb(headers, flooder))
    assert (await loud.subscribe({"job_events": [job.pk for job in flood_jobs]}, ids=True))[0] == []
    for job in flood_jobs:  # 6 x 4 events of about 1.3 KB: twice the node's total
        await api(flooder, "post", f"/api/v2/jobs/{job.pk}/job_events/", events(4))
    loud_ids = [(await loud.recv_json(timeout=10))["id"] for _ in range(24)]
    await loud.close()

    group = f"job_events-{quiet_job.pk}"
    quiet = await open_ws(server.url, headers=await adb(headers, viewer))
    errors, _ = await quiet.subscribe({"job_events": [quiet_job.pk]}, recover={group: quiet_ids[0]})
    assert errors == []
    frames = [await quiet.recv_json()]
    while "recovered" not in frames[-1]:  # the replayed events, then the summary
        frames.append(await quiet.recv_json())
    assert frames[-1]["reset"] == {} and frames[-1]["recovered"] == {group: 2}
    assert [frame["data"]["counter"] for frame in frames[:-1]] == [2, 3]
    await quiet.close()

    first = f"job_events-{flood_jobs[0].pk}"
    loud = await open_ws(server.url, headers=await adb(headers, flooder))
    errors, _ = await loud.subscribe({"job_events": [flood_jobs[0].pk]}, recover={first: loud_ids[0]})
    assert errors == []
    assert (await loud.recv_json())["reset"] == {first: "trimmed past the position"}
    await loud.close()
