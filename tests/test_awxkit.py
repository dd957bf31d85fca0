"""AWX's own client, awxkit's WSClient, works against us unchanged (through nginx)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from awxkit.ws import WSClient

from awx_ws.main.emit import aemit_channel_notification
from tests.factories import adb, create_job, create_org, session_cookie

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.both_runners]


def collect(ws: WSClient, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 10) -> list:
    """Messages the client queued, polled until `until(messages)` holds."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages.extend(ws)  # WSClient iterates what it has queued so far
        if until(messages):
            return messages
        time.sleep(0.05)
    raise AssertionError(f"awxkit did not receive what was expected; got {messages}")


def has(predicate: Callable[[dict[str, Any]], bool]) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda messages: any(predicate(m) for m in messages)


async def assert_follows_status_changes(ws: WSClient) -> None:
    ws.status_changes()
    reply = await asyncio.to_thread(collect, ws, has(lambda m: "groups_current" in m))
    assert {
        "groups_current": ["jobs-status_changed"],
        "groups_left": [],
        "groups_joined": ["jobs-status_changed"],
    } in reply


async def connect(**kwargs: Any) -> WSClient:
    return await asyncio.to_thread(lambda: WSClient(hostname="127.0.0.1", secure=False, **kwargs).connect())


async def test_token_wsclient_follows_a_job(nginx, user, token):
    job = await adb(create_job, await adb(create_org, user))
    ws = await connect(token=token, port=nginx.port)
    try:
        hello = await asyncio.to_thread(collect, ws, has(lambda m: m.get("accept") is True))
        assert {"accept": True, "user": user.pk} in hello
        ws.job_details(job.pk)
        await asyncio.to_thread(collect, ws, has(lambda m: "groups_current" in m))
        status = {"group_name": "jobs", "unified_job_id": job.pk, "status": "running", "type": "job"}
        event = {"group_name": "job_events", "job": job.pk, "counter": 1, "event": "playbook_on_start"}
        await aemit_channel_notification("jobs-status_changed", status)
        await aemit_channel_notification(f"job_events-{job.pk}", event)
        got = await asyncio.to_thread(collect, ws, has(lambda m: m.get("counter") == 1))
        assert status in got
        assert event in got
        await asyncio.to_thread(ws.unsubscribe)  # waits for the groups_current acknowledgement
    finally:
        ws.close()


async def test_wsclient_subscribes_to_a_pending_jobs_events_by_itself(nginx, user, token):
    job = await adb(create_job, await adb(create_org, user))
    ws = await connect(token=token, port=nginx.port)
    try:
        ws.pending_job_details()
        await asyncio.to_thread(collect, ws, has(lambda m: "groups_current" in m))
        pending = {"group_name": "jobs", "unified_job_id": job.pk, "status": "pending", "type": "job"}
        await aemit_channel_notification("jobs-status_changed", pending)
        # awxkit answers a pending job by subscribing to its events.
        joined = await asyncio.to_thread(
            collect, ws, has(lambda m: f"job_events-{job.pk}" in m.get("groups_joined", []))
        )
        assert pending in joined
        event = {"group_name": "job_events", "job": job.pk, "counter": 5}
        await aemit_channel_notification(f"job_events-{job.pk}", event)
        assert event in await asyncio.to_thread(collect, ws, has(lambda m: m.get("counter") == 5))
    finally:
        ws.close()


async def test_wsclient_following_a_job_through_a_burst_ignores_the_held_back_notice(nginx, user, token):
    """Over the event rate the job's group carries a notice (held_back.py) that awxkit queues like
    any message and acts on in no way: no re-subscription, its job's events and status go on."""
    from tests.test_api_notifications import api

    job = await adb(create_job, await adb(create_org, user))
    ws = await connect(token=token, port=nginx.port)
    try:
        ws.job_details(job.pk)
        await asyncio.to_thread(collect, ws, has(lambda m: "groups_current" in m))
        burst = [{"counter": n, "event": "runner_on_ok", "stdout": f"ok {n}"} for n in range(1, 41)]
        await api(user, "post", f"/api/v2/jobs/{job.pk}/job_events/", burst)
        got = await asyncio.to_thread(collect, ws, has(lambda m: m.get("group_name") == "events_held_back"))
        assert [m["counter"] for m in got if m.get("group_name") == "job_events"] == list(range(1, 31))
        assert got[-1]["ranges"] == [[31, 40]]
        await api(user, "patch", f"/api/v2/jobs/{job.pk}/", {"status": "pending"})
        later = await asyncio.to_thread(collect, ws, has(lambda m: m.get("status") == "pending"))
        assert not [m for m in got + later if "groups_current" in m]  # it never subscribed again
    finally:
        ws.close()


async def test_session_wsclient_with_csrftoken(nginx, user):
    ws = await connect(session_id=await adb(session_cookie, user), csrftoken="c" * 32, port=nginx.port)
    try:
        await assert_follows_status_changes(ws)
    finally:
        ws.close()


# awxkit's websocket-client (0.57, AWX's pin) builds its TLS context with ssl.PROTOCOL_TLS, which
# Python 3.10+ deprecates; the suite turns warnings into errors, which would kill its thread.
@pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")
async def test_token_wsclient_over_nginxs_tls_port(node, api, user, token, state_dir):
    """awxkit over wss:// (it sends `Origin: http://host:port` there too, and AWX's token cookie):
    the token cookie's Origin check compares host and port only, so it works unchanged."""
    from tests.servers import Nginx
    from tests.test_tls import write_pair

    certificate, key = write_pair(state_dir / "tls", f"awxkit{time.monotonic_ns()}")
    front = Nginx(
        state_dir / f"nginx-awxkit-tls-{time.monotonic_ns()}", node.port, api.port, tls=(certificate, key)
    )
    front.start()
    ws = None
    try:
        job = await adb(create_job, await adb(create_org, user))
        ws = await asyncio.to_thread(
            lambda: WSClient(token=token, hostname="127.0.0.1", port=front.tls_port, secure=True).connect()
        )
        hello = await asyncio.to_thread(collect, ws, has(lambda m: m.get("accept") is True))
        assert {"accept": True, "user": user.pk} in hello
        ws.job_details(job.pk)
        await asyncio.to_thread(collect, ws, has(lambda m: "groups_current" in m))
        status = {"group_name": "jobs", "unified_job_id": job.pk, "status": "running", "type": "job"}
        await aemit_channel_notification("jobs-status_changed", status)
        assert status in await asyncio.to_thread(collect, ws, has(lambda m: m == status))
    finally:
        if ws is not None:
            ws.close()
        front.stop()


@pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")
async def test_session_wsclient_over_nginxs_tls_port_with_its_origin_trusted(api, user, state_dir, runner):
    """awxkit's session mode over wss sends `Origin: http://host:port`: not the page's scheme, so
    refused unless the operator lists that origin in CSRF_TRUSTED_ORIGINS (docs/channels.md)."""
    from tests.servers import DaphneNode, Nginx, free_port
    from tests.test_tls import write_pair

    certificate, key = write_pair(state_dir / "tls", f"awxkit-session{time.monotonic_ns()}")
    daphne_port = free_port()
    front = Nginx(
        state_dir / f"nginx-awxkit-session-{time.monotonic_ns()}",
        daphne_port,
        api.port,
        tls=(certificate, key),
    )
    trusted = {"CSRF_TRUSTED_ORIGINS": f"http://127.0.0.1:{front.tls_port}"}
    node = DaphneNode(state_dir / "logs", trusted, port=daphne_port, runner=runner)
    ws = None
    try:
        node.start()
        front.start()
        session = await adb(session_cookie, user)
        ws = await asyncio.to_thread(
            lambda: WSClient(
                session_id=session, csrftoken="c" * 32, hostname="127.0.0.1", port=front.tls_port, secure=True
            ).connect()
        )
        await assert_follows_status_changes(ws)
    finally:
        if ws is not None:
            ws.close()
        front.stop()
        node.stop()
