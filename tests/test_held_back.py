"""Events the rate held back reach every viewer: a notice names their counters within a second, at
most one a second per job, and a client that fetches those from REST has every event once."""

from __future__ import annotations

import time
from typing import Any

import pytest

from awx_ws.main.event_rate import MAX_RANGES, admit, held_back_ranges, merge_ranges, notice_due
from awx_ws.main.models import WebsocketEventRate
from tests.client import WsClient, open_ws
from tests.factories import adb, create_job, create_org, create_token
from tests.sse import open_sse
from tests.test_api_notifications import api
from tests.test_event_rate import Event

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.both_runners]


# --- the rules (pure) ---------------------------------------------------------------------------


@pytest.mark.unit
def test_the_ranges_are_the_runs_of_counters_not_sent_that_hold_a_held_back_one():
    events = [Event("playbook_on_task_start"), *[Event()] * 4, Event(stdout="", start=1, end=1), Event()]
    events += [Event("playbook_on_task_start"), Event(stdout="", start=1, end=1), Event()]
    counters = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    verdict = admit(events, [], now=5.0, rate=2)
    assert verdict.send == [True, True, True, False, False, False, False, True, False, False]
    # 4-7: held back, held back, nothing to show (bridged: never sent), held back; 9 alone would
    # name no held-back event, but 10 is held back.
    assert held_back_ranges(counters, verdict) == [[4, 7], [9, 10]]


@pytest.mark.unit
def test_a_counter_missing_from_the_batch_ends_a_run_and_an_empty_run_names_nothing():
    verdict = admit([Event()] * 4 + [Event(stdout="", start=1, end=1)], [], now=5.0, rate=1)
    # 3 and 4 are in another request (which may have sent them): never inside a range here.
    assert held_back_ranges([1, 2, 5, 6, 9], verdict) == [[2, 2], [5, 6]]
    only_empty = admit([Event(stdout="", start=1, end=1)], [], now=5.0, rate=1)
    assert held_back_ranges([1], only_empty) == []


@pytest.mark.unit
def test_ranges_of_several_requests_merge_and_stay_bounded():
    assert merge_ranges([[1, 3], [10, 12]], [[4, 6], [20, 20]]) == [[1, 6], [10, 12], [20, 20]]
    many = [[n * 10, n * 10 + 1] for n in range(MAX_RANGES + 50)]
    merged = merge_ranges(many, [])
    assert len(merged) == MAX_RANGES
    assert merged[: MAX_RANGES - 1] == many[: MAX_RANGES - 1]
    assert merged[-1] == [many[MAX_RANGES - 1][0], many[-1][1]]  # the rest, as one span


@pytest.mark.unit
def test_a_notice_waits_for_a_second_after_the_last_one():
    assert not notice_due([], announced=0.0, now=100.0)
    assert notice_due([[1, 2]], announced=0.0, now=100.0)
    assert not notice_due([[1, 2]], announced=99.5, now=100.0)
    assert notice_due([[1, 2]], announced=99.0, now=100.0)


# --- through the API, to the clients ------------------------------------------------------------


def ok(counter: int) -> dict[str, Any]:
    return {"counter": counter, "event": "runner_on_ok", "stdout": f"ok: [host-{counter}]"}


def burst(first: int, last: int) -> list[dict[str, Any]]:
    """Events first..last of a run: a task starts every 100th (always sent), the rest are output."""
    return [
        {"counter": n, "event": "playbook_on_task_start", "stdout": f"TASK [{n}]"} if n % 100 == 0 else ok(n)
        for n in range(first, last + 1)
    ]


async def fetch_ranges(user: Any, job_id: int, ranges: list[list[int]]) -> list[dict[str, Any]]:
    """The catch-up of docs/api.md: each range from REST, page after page."""
    fetched = []
    for first, last in ranges:
        url = (
            f"/api/v2/jobs/{job_id}/job_events/?counter__gt={first - 1}&counter__lt={last + 1}&page_size=1000"
        )
        while url:
            page = await api(user, "get", url)
            fetched += page["results"]
            url = page["next"]
    return fetched


async def until_notice(client: WsClient, live: list[int]) -> dict[str, Any]:
    """Read the job's group until the next held-back notice; the events before it go to live."""
    while (message := await client.recv_json(timeout=10)).get("group_name") != "events_held_back":
        live.append(message["counter"])
    return message


@pytest.fixture
async def watched(node: Any, user: Any) -> tuple[Any, WsClient]:
    job = await adb(create_job, await adb(create_org, user))
    client = await open_ws(node.url, headers={"Authorization": f"Token {await adb(create_token, user)}"})
    await client.subscribe({"job_events": [job.pk]})
    return job, client


async def test_a_client_following_the_catch_up_has_every_event_of_a_5000_burst_once_in_order(user, watched):
    job, client = watched
    await api(user, "post", f"/api/v2/jobs/{job.pk}/job_events/", burst(1, 5000))
    live: list[int] = []
    notice = await until_notice(client, live)
    # The rate (30) and the 50 task starts went live; the notice names every other counter.
    assert live == [*range(1, 31), *range(100, 5001, 100)]
    assert notice == {
        "group_name": "events_held_back",
        "unified_job_id": job.pk,
        "type": "job",
        "held_back": 5000 - 30 - 50,
        "ranges": [[31, 99], *[[n + 1, n + 99] for n in range(100, 5000, 100)]],
    }
    fetched = [event["counter"] for event in await fetch_ranges(user, job.pk, notice["ranges"])]
    assert sorted(live + fetched) == list(range(1, 5001))  # each once: no counter came both ways
    assert len(fetched) == notice["held_back"]
    await client.assert_silent()
    await client.close()


async def test_a_flood_in_many_requests_has_every_held_back_event_named_the_last_by_the_timer(user, watched):
    """Ten requests back to back: the notices (one a second at most: the rule's unit test) name
    every event not sent, those of the last requests by the API process's timer, with no request
    after them."""
    job, client = watched
    for first in range(1, 1000, 100):
        await api(
            user, "post", f"/api/v2/jobs/{job.pk}/job_events/", [ok(n) for n in range(first, first + 100)]
        )
    live: list[int] = []
    notices = [await until_notice(client, live)]
    while sum(notice["held_back"] for notice in notices) < 1000 - len(live):
        notices.append(await until_notice(client, live))
    ranges = merge_ranges([], [r for notice in notices for r in notice["ranges"]])
    fetched = [event["counter"] for event in await fetch_ranges(user, job.pk, ranges)]
    assert sorted(live + fetched) == list(range(1, 1001))
    await client.assert_silent(1.5)
    await client.close()


async def test_the_notice_reaches_sse_streams_and_their_history(node, user):
    job = await adb(create_job, await adb(create_org, user))
    headers = {"Authorization": f"Token {await adb(create_token, user)}"}
    group = f"job_events-{job.pk}"
    async with open_sse(node.http_url, group, headers=headers) as stream:
        await stream.wait_ready()
        start = stream.last_id
        await api(user, "post", f"/api/v2/jobs/{job.pk}/job_events/", [ok(n) for n in range(1, 40)])
        received = await stream.payloads(31)
        assert [m["counter"] for m in received[:30]] == list(range(1, 31))
        assert received[30] == {
            "group_name": "events_held_back",
            "unified_job_id": job.pk,
            "type": "job",
            "held_back": 9,
            "ranges": [[31, 39]],
        }
    async with open_sse(node.http_url, group, headers=headers, last_event_id=start) as resumed:
        assert (await resumed.payloads(31))[30]["ranges"] == [[31, 39]]  # a resume replays it too


async def test_ranges_a_dead_process_left_pending_go_out_with_the_jobs_next_events(user, watched):
    job, client = watched
    # The job's window as an API process killed within the second leaves it: ranges pending, no
    # timer left to send them.
    await adb(
        WebsocketEventRate.objects.create,
        job=job,
        pending=[[1, 5]],
        pending_count=5,
        announced=time.time() - 5,
    )
    await api(user, "post", f"/api/v2/jobs/{job.pk}/job_events/", [ok(6)])
    assert (await client.recv_json())["counter"] == 6
    assert await client.recv_json() == {
        "group_name": "events_held_back",
        "unified_job_id": job.pk,
        "type": "job",
        "held_back": 5,
        "ranges": [[1, 5]],
    }
    await client.close()
