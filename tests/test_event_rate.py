"""AWX's flood policy for job events: at most AWX_WS_MAX_WEBSOCKET_EVENT_RATE a second per job go to
the websocket, the outline always goes, events with nothing to show never do; REST keeps them all
and the job's summary says how many were held back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from awx_ws.main.event_rate import admit
from tests.client import open_ws
from tests.factories import adb, create_job, create_org, create_token
from tests.servers import Gunicorn
from tests.sse import open_sse
from tests.test_api_notifications import api, member_client
from tests.test_metrics import moved, scrape

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.both_runners]

OUTLINE = ["playbook_on_start", "playbook_on_play_start", "playbook_on_task_start"]


def ok(counter: int) -> dict[str, Any]:
    return {"counter": counter, "event": "runner_on_ok", "stdout": f"ok: [host-{counter}]"}


# --- the rule (pure) --------------------------------------------------------------------------


class Event:
    def __init__(self, event: str = "runner_on_ok", stdout: str = "x", start: int = 0, end: int = 1):
        self.event, self.stdout, self.start_line, self.end_line = event, stdout, start, end


@pytest.mark.unit
def test_a_window_of_one_second_holds_the_rate_and_then_frees_it():
    first = admit([Event()] * 5, [], now=100.0, rate=3)
    assert first.send == [True, True, True, False, False]
    assert first.held_back == 2
    assert admit([Event()], first.recent, now=100.9, rate=3).send == [False]
    assert admit([Event()] * 4, first.recent, now=101.0, rate=3).send == [True, True, True, False]


@pytest.mark.unit
def test_the_outline_always_goes_and_nothing_to_show_never_does():
    events = [Event()] * 3 + [Event(name) for name in [*OUTLINE, "playbook_on_stats", "EOF"]]
    verdict = admit([*events, Event(stdout="", start=4, end=4)], [], now=1.0, rate=1)
    assert verdict.send == [True, False, False, True, True, True, True, True, False]
    assert (verdict.held_back, verdict.empty) == (2, 1)
    # With no limit, an event with nothing to show is still not sent (AWX's rule).
    assert admit([Event(stdout="", start=2, end=2), Event()], [], now=1.0, rate=0).send == [False, True]


# --- through the API, to a websocket watcher ----------------------------------------------------


async def test_over_the_rate_the_watcher_gets_the_outline_and_the_rate_and_rest_gets_all(node, user):
    job = await adb(create_job, await adb(create_org, user))
    headers = {"Authorization": f"Token {await adb(create_token, user)}"}
    watcher = await open_ws(node.url, headers=headers)
    await watcher.subscribe({"jobs": ["summary"], "job_events": [job.pk]})
    group = f"job_events-{job.pk}"
    async with open_sse(node.http_url, group, headers=headers) as live:
        await live.wait_ready()
        start = live.last_id
        # One request, so one instant for the policy: the default rate (30) is exact.
        batch = [{"counter": n + 1, "event": name, "stdout": name} for n, name in enumerate(OUTLINE)]
        batch += [ok(c) for c in range(4, 44)]  # 40 events: 30 go, 10 wait in REST
        batch += [{"counter": 44, "event": "runner_on_start"}]  # no stdout, no lines: never sent
        batch += [{"counter": 45, "event": "playbook_on_stats", "stdout": "PLAY RECAP"}]
        await api(user, "post", f"/api/v2/jobs/{job.pk}/job_events/", batch)

        sent = [*range(1, 34), 45]
        # Then the notice of what was held back (held_back.py): 34-43, and 44 beside them, which
        # had nothing to show and was not sent either.
        notice = {
            "group_name": "events_held_back",
            "unified_job_id": job.pk,
            "type": "job",
            "held_back": 10,
            "ranges": [[34, 44]],
        }
        assert [(await watcher.recv_json())["counter"] for _ in sent] == sent
        assert await watcher.recv_json() == notice
        received = await live.payloads(len(sent) + 1)
        assert [m["counter"] for m in received[:-1]] == sent and received[-1] == notice
        stored = await api(user, "get", f"/api/v2/jobs/{job.pk}/job_events/?page_size=100")
        assert [e["counter"] for e in stored["results"]] == list(range(1, 46))

        await api(user, "patch", f"/api/v2/jobs/{job.pk}/", {"status": "canceled"})
        assert await watcher.recv_json() == {
            "group_name": "jobs",
            "unified_job_id": job.pk,
            "final_counter": 45,
            "skipped_events": 10,
        }
    # History holds what went live, no more: a resume from before the batch replays the same.
    async with open_sse(node.http_url, group, headers=headers, last_event_id=start) as resumed:
        replayed = await resumed.payloads(len(sent) + 1)
        assert [m["counter"] for m in replayed[:-1]] == sent and replayed[-1] == notice
        await resumed.assert_silent()
    await watcher.close()


async def test_a_job_with_nothing_held_back_has_no_skipped_count(node, user):
    job, client = await member_client(node, user)
    await client.subscribe({"jobs": ["summary"]})
    await api(user, "post", f"/api/v2/jobs/{job.pk}/job_events/", [ok(1), ok(2)])
    await api(user, "patch", f"/api/v2/jobs/{job.pk}/", {"status": "canceled"})
    assert await client.recv_json() == {"group_name": "jobs", "unified_job_id": job.pk, "final_counter": 2}


@pytest.fixture
def two_api_processes(state_dir: Path) -> Iterator[list[Gunicorn]]:
    """Two API processes with a rate of 5, sharing a metrics directory of their own."""
    env = {
        "AWX_WS_MAX_WEBSOCKET_EVENT_RATE": "5",
        "PROMETHEUS_MULTIPROC_DIR": str(state_dir / f"metrics-rate-{time.monotonic_ns()}"),
    }
    servers = [Gunicorn(state_dir / "logs", env).start() for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


async def test_the_rate_holds_per_job_across_api_processes(node, user, two_api_processes):
    job = await adb(create_job, await adb(create_org, user))
    headers = {"Authorization": f"Token {await adb(create_token, user)}"}
    watcher = await open_ws(node.url, headers=headers)
    await watcher.subscribe({"job_events": [job.pk]})
    before = await scrape(two_api_processes[0].http_url)

    async def post(server: Gunicorn, counters: range) -> None:
        async with httpx.AsyncClient(base_url=server.http_url, headers=headers, timeout=30) as http:
            response = await http.post(f"/api/v2/jobs/{job.pk}/job_events/", json=[ok(c) for c in counters])
        assert response.status_code == 201, response.text

    began = time.monotonic()
    one, two = two_api_processes
    await asyncio.gather(post(one, range(1, 51)), post(two, range(51, 101)))
    seconds = time.monotonic() - began
    # Both processes decided within `seconds`: a limit per job allows 5 in each second started
    # in that time (a limit per process would allow twice that).
    allowed = 5 * (int(seconds) + 1)
    # The end of the play always goes, after whatever the two requests sent: read up to it.
    end = {"counter": 101, "event": "playbook_on_stats", "stdout": "PLAY RECAP"}
    async with httpx.AsyncClient(base_url=one.http_url, headers=headers, timeout=30) as http:
        assert (await http.post(f"/api/v2/jobs/{job.pk}/job_events/", json=end)).status_code == 201
    # Read up to it, and until notices (held_back.py) have named every event not sent.
    received: list[int] = []
    notices: list[dict[str, Any]] = []
    while 101 not in received or sum(n["held_back"] for n in notices) < 100 - (len(received) - 1):
        message = await watcher.recv_json(timeout=10)
        if message["group_name"] == "events_held_back":
            notices.append(message)
        else:
            received.append(message["counter"])
    received.remove(101)
    assert 5 <= len(received) <= allowed, (len(received), seconds)
    # The notices name exactly the counters the watcher was not sent.
    named = {c for notice in notices for first, last in notice["ranges"] for c in range(first, last + 1)}
    assert named == set(range(1, 101)) - set(received)
    after = await scrape(one.http_url)
    assert moved(before, after, "awx_ws_job_events_not_sent_total", reason="rate") == 100 - len(received)
    by_request = moved(before, after, "awx_ws_held_back_notices_total", sent_by="request")
    assert by_request >= 1 and by_request + moved(
        before, after, "awx_ws_held_back_notices_total", sent_by="timer"
    ) == len(notices)
    stored = await api(user, "get", f"/api/v2/jobs/{job.pk}/job_events/?page_size=200")
    assert len(stored["results"]) == 101
    await watcher.close()
