"""Numbers and names a client sends are read strictly: ASCII digits within bounds, names matched
in full. A bad one gets the documented error (websocket error frame, HTTP 400), never a crash, a
close with 1011 or an HTTP 500, and never a group that carries a line break into a stream."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from awx_ws.main.emit import aemit_channel_notification
from tests.client import WsClient
from tests.factories import adb, create_job, create_org, create_token, create_user
from tests.sse import open_sse, refused

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.both_runners]

# Numbers `str.isdigit()` or `int()` accept and a client must not get past us with.
BAD_NUMBERS = [
    "1²",  # superscript two: isdigit() is true, int() raises
    "²",
    "١٢٣",  # Arabic-Indic digits: int() reads them as 123
    "１２",  # full-width digits
    "𝟠",  # mathematical bold eight
    "+5",
    "-5",
    " 5",
    "5 ",
    "5\n",
    "0x10",
    "1_000",
    "9" * 400,  # far past any bound (and past int()'s 4,300-digit limit's cheap side)
    "",
]


@pytest.fixture
def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


def topic(label: str) -> str:
    return f"{label}{time.monotonic_ns()}"


async def still_serves(client: WsClient) -> None:
    """The connection is open and delivers: no crash closed it."""
    item = topic("after")
    errors, reply = await client.subscribe({"schedules": [item]})
    assert errors == [] and reply["groups_current"] == [f"schedules-{item}"]
    await aemit_channel_notification(f"schedules-{item}", {"still": "here"})
    assert await client.recv_json() == {"still": "here"}


@pytest.mark.parametrize("number", BAD_NUMBERS)
async def test_a_recover_position_with_a_bad_number_gets_an_error_frame(client, number):
    item = topic("recover")
    group = f"schedules-{item}"
    positions = [
        number,  # the floor
        f"1,abc:{number}-0",  # an origin's ms
        f"1,abc:1-{number}",  # an origin's sequence
    ]
    for position in positions:
        frame = {"groups": {"schedules": [item]}, "recover": {group: position}}
        error = await client.request_error(json.dumps(frame))
        assert error.startswith(f"invalid recover entry for '{group}': invalid "), error
    await still_serves(client)


@pytest.mark.parametrize("origin", ["é", "١", "ab\n", "a" * 17, ""])
async def test_a_recover_position_with_a_bad_origin_gets_an_error_frame(client, origin):
    group = f"schedules-{topic('origin')}"
    frame = {
        "groups": {"schedules": [group.removeprefix("schedules-")]},
        "recover": {group: f"1,{origin}:1-0"},
    }
    error = await client.request_error(json.dumps(frame))
    assert error.startswith(f"invalid recover entry for '{group}': invalid message id"), error
    await still_serves(client)


async def test_job_ids_must_be_ascii_numbers_within_bounds(client, user):
    job = await adb(create_job, await adb(create_org, user))
    errors, reply = await client.subscribe({"job_events": [str(job.pk)]})  # AWX UI's decimal string
    assert errors == [] and reply["groups_current"] == [f"job_events-{job.pk}"]
    for number in [*BAD_NUMBERS, "0", str(2**63)]:
        error = await client.request_error(json.dumps({"groups": {"job_events": [number]}}))
        assert error == f"invalid id {number!r} in groups.job_events: expected a positive integer"
    await still_serves(client)


@pytest.mark.parametrize("number", BAD_NUMBERS)
async def test_an_sse_last_event_id_with_a_bad_number_is_400(node, auth, number):
    group = "jobs-status_changed"
    for position in [number, f"1,abc:{number}-0", f"1,abc:1-{number}"]:
        last_event_id = f"{group}@{position}"
        requests = [{"params": {"groups": group, "last_event_id": last_event_id}, "headers": auth}]
        if last_event_id == last_event_id.strip() and "\n" not in last_event_id:
            # As a header too, in UTF-8 (HTTP strips a header's outer spaces; httpx refuses a break).
            requests.append(
                {"params": {"groups": group}, "headers": {**auth, "Last-Event-ID": last_event_id.encode()}}
            )
        async with httpx.AsyncClient(timeout=10) as http:
            for request in requests:
                response = await http.get(f"{node.http_url}/api/v2/stream/", **request)
                assert response.status_code == 400, (position, response.text)
                assert response.json()["detail"].startswith("Last-Event-ID: invalid"), response.text


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\r", "\x00", " "])
async def test_a_group_name_with_a_trailing_break_is_refused(client, node, auth, suffix):
    # The websocket refuses the request...
    error = await client.request_error(json.dumps({"groups": {"jobs": [f"status_changed{suffix}"]}}))
    assert error.startswith("invalid group name"), error
    # ...and so is the stream: HTTP 400, no `id:` line carrying the break.
    status, body = await refused(node.http_url, f"jobs-status_changed{suffix}", auth)
    assert status == 400 and "invalid group name" in body["detail"], body
    await still_serves(client)


async def test_a_stream_of_a_valid_group_still_opens(node, auth):
    async with open_sse(node.http_url, "jobs-status_changed", headers=auth) as stream:
        await stream.wait_ready()
        assert "\n" not in stream.last_id


async def test_the_api_reads_event_counters_as_ascii_numbers_within_bounds(api, user, auth):
    job = await adb(create_job, await adb(create_org, user))
    url = f"{api.http_url}/api/v2/jobs/{job.pk}/job_events/"
    async with httpx.AsyncClient(timeout=10, headers=auth) as http:
        created = await http.post(url, json=[{"counter": c, "event": "runner_on_ok"} for c in (1, 2, 3)])
        assert created.status_code == 201, created.text
        for lookup in ("counter__gt", "counter__lt"):
            for number in [*BAD_NUMBERS, str(2**31)]:
                response = await http.get(url, params={lookup: number})
                assert response.status_code == 400, (lookup, number, response.text)
                assert response.json() == {lookup: ["must be an integer from 0 to 2147483647"]}
        largest = await http.get(url, params={"counter__lt": str(2**31 - 1)})
        assert [e["counter"] for e in largest.json()["results"]] == [1, 2, 3]


@pytest.mark.parametrize("suffix", ["\n", "\r\n", " "])
async def test_the_api_refuses_to_emit_to_a_group_name_with_a_trailing_break(api, suffix):
    admin = await adb(create_token, await adb(create_user, superuser=True))
    body = {"group": f"jobs-status_changed{suffix}", "payload": {"x": 1}}
    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Token {admin}"}) as http:
        response = await http.post(f"{api.http_url}/api/v2/emit/", json=body)
    assert response.status_code == 400, response.text
    assert "invalid group name" in response.text
