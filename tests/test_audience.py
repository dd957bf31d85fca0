"""Job status messages reach only subscribers who may see the job (AWX sends them to everyone):
members of the job's organization and superusers, live, through Channels' group_send, over SSE
and in replays."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from channels.layers import get_channel_layer

from awx_ws.main.emit import aemit_channel_notification
from tests.client import WsClient, open_ws
from tests.factories import adb, create_job, create_org, create_token, create_user
from tests.sse import open_sse
from tests.test_metrics import Node, moved

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.both_runners]


async def watcher(node: Any, user: Any, **extra: Any) -> WsClient:
    client = await open_ws(node.url, headers={"Authorization": f"Token {await adb(create_token, user)}"})
    errors, _ = await client.subscribe({"jobs": ["status_changed"]}, **extra)
    assert errors == []
    return client


@pytest.fixture
async def people() -> dict[str, Any]:
    member, outsider = await adb(create_user), await adb(create_user)
    admin = await adb(create_user, superuser=True)
    org = await adb(create_org, member)
    return {
        "member": member,
        "outsider": outsider,
        "admin": admin,
        "org": org,
        "job": await adb(create_job, org),
    }


def status(job: Any, value: str) -> dict[str, Any]:
    return {"group_name": "jobs", "unified_job_id": job.pk, "status": value, "type": "job"}


async def test_a_jobs_status_reaches_its_organization_and_superusers_only(node, people):
    member, outsider, admin = [await watcher(node, people[k]) for k in ("member", "outsider", "admin")]
    await aemit_channel_notification("jobs-status_changed", status(people["job"], "running"))
    # Channels' own API, as AWX's producers send: filtered the same way.
    text = json.dumps(status(people["job"], "successful"))
    await get_channel_layer().group_send("jobs-status_changed", {"type": "internal.message", "text": text})
    for client in (member, admin):
        assert [await client.recv_json() for _ in range(2)] == [
            status(people["job"], "running"),
            status(people["job"], "successful"),
        ]
    # A producer's own payload naming no job still reaches everyone, as in AWX.
    await aemit_channel_notification("jobs-status_changed", {"note": "for all"})
    # The statuses were sent before it, on the same group: the outsider's first message is this.
    assert await outsider.recv_json() == {"note": "for all"}
    await aemit_channel_notification("jobs-status_changed", {"note": "last"})
    assert await outsider.recv_json() == {"note": "last"}  # and nothing came in between
    for client in (member, admin, outsider):
        await client.close()


async def test_joining_the_organization_opens_its_statuses_within_seconds(node, people):
    outsider = await watcher(node, people["outsider"])
    await adb(people["org"].members.add, people["outsider"])  # recorded: revocation.py rechecks
    for attempt in range(60):  # bounded: the recheck comes within AWX_WS_REVOCATION_POLL (1 s)
        await aemit_channel_notification("jobs-status_changed", status(people["job"], f"probe {attempt}"))
        try:
            assert (await outsider.recv_json(0.2))["unified_job_id"] == people["job"].pk
            break
        except TimeoutError:
            continue
    else:
        raise AssertionError("the new member never got the organization's statuses")
    await outsider.close()


async def test_sse_streams_and_replays_are_filtered_too(node, people):
    outsider_token = await adb(create_token, people["outsider"])
    headers = {"Authorization": f"Token {outsider_token}"}
    async with open_sse(node.http_url, "jobs-status_changed", headers=headers) as stream:
        await stream.wait_ready()
        last_id = stream.last_id
        await aemit_channel_notification("jobs-status_changed", status(people["job"], "running"))
        await aemit_channel_notification("jobs-status_changed", {"note": "after"})
        assert await stream.payloads(1) == [{"note": "after"}]  # the job's status was passed over
    # A resume from before both replays only what the outsider may see.
    async with open_sse(
        node.http_url, "jobs-status_changed", headers=headers, last_event_id=last_id
    ) as stream:
        assert await stream.payloads(1) == [{"note": "after"}]
        await stream.assert_silent(0.3)


async def emit_through_the_api(api: Any, payload: dict[str, Any]) -> None:
    """POST /api/v2/emit/ as a superuser, to the API process (gunicorn)."""
    admin_token = await adb(create_token, await adb(create_user, superuser=True))
    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Token {admin_token}"}) as http:
        response = await http.post(
            f"{api.http_url}/api/v2/emit/", json={"group": "jobs-status_changed", "payload": payload}
        )
    assert response.status_code == 202, response.text


async def test_a_job_id_sent_as_a_string_is_filtered_like_a_number(node, api, people):
    member, outsider, admin = [await watcher(node, people[k]) for k in ("member", "outsider", "admin")]
    as_text = {**status(people["job"], "running"), "unified_job_id": str(people["job"].pk)}
    await emit_through_the_api(api, as_text)
    await emit_through_the_api(api, {"note": "marker"})  # names no job: everyone gets it
    for client in (member, admin):
        assert [await client.recv_json() for _ in range(2)] == [as_text, {"note": "marker"}]
    assert await outsider.recv_json() == {"note": "marker"}  # the job's status passed it by
    for client in (member, admin, outsider):
        await client.close()


# What a `unified_job_id` may carry that names no job.
ODD_IDS = ["six", "6.0", " 6", "٦", 6.0, 6.5, -6, 0, None, True, [6], {"id": 6}, 2**70]


async def test_a_job_id_that_names_no_job_reaches_superusers_only(daphne_factory, state_dir, people):
    own = Node(daphne_factory, state_dir)  # its own metrics: the count moves only with this test
    try:
        server = own.daphne()
        member, outsider, admin = [await watcher(server, people[k]) for k in ("member", "outsider", "admin")]
        before = await own.scrape()
        for odd_id in ODD_IDS:
            unplaced = {**status(people["job"], "running"), "unified_job_id": odd_id}
            await emit_through_the_api(own.api, unplaced)
            await emit_through_the_api(own.api, {"note": "marker"})
            assert [await admin.recv_json() for _ in range(2)] == [unplaced, {"note": "marker"}]
            for client in (member, outsider):  # fail closed: not even the organization's members
                assert await client.recv_json() == {"note": "marker"}, odd_id
        after = await own.scrape()
        assert moved(before, after, "awx_ws_unplaced_job_messages_total") == len(ODD_IDS)
        for client in (member, admin, outsider):
            await client.close()
    finally:
        own.api.stop()
