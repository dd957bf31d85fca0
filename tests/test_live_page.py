"""The live page in headless Chromium, through nginx: log in, watch statuses change, and keep every
event line exactly once while daphne is killed and restarted under it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import adb, create_job, create_org, create_token, set_login_password
from tests.servers import ROOT, DaphneNode, Gunicorn, Nginx, free_port

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.slow]

TEST_OUTPUT = Path(os.environ.get("AWX_WS_TEST_OUTPUT", ROOT / "test-output"))


@pytest.fixture
def daphne(state_dir: Path, redis_server: Any) -> Iterator[DaphneNode]:
    """A daphne of this test's own, on a port it keeps across a restart."""
    server = DaphneNode(state_dir / "logs", port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def front(daphne: DaphneNode, api: Gunicorn, state_dir: Path) -> Iterator[Nginx]:
    server = Nginx(state_dir / f"nginx-live-{time.monotonic_ns()}", daphne.port, api.port).start()
    yield server
    server.stop()


@pytest.fixture
async def job(user: Any) -> Any:
    return await adb(create_job, await adb(create_org, user))


@pytest.fixture
async def page(browser: Any, front: Nginx, user: Any) -> AsyncIterator[Any]:
    """The live page, logged in through the login form as a person would."""
    await adb(set_login_password, user, "a real password")
    context = await browser.new_context(viewport={"width": 1200, "height": 720})
    page = await context.new_page()
    await page.goto(f"{front.http_url}/")
    assert "/login/" in page.url  # the page wants a logged-in user
    await page.fill("input[name=username]", user.get_username())
    await page.fill("input[name=password]", "a real password")
    await page.click("button[type=submit]")
    await page.wait_for_selector("body[data-ready=true]")
    await page.wait_for_selector("#connection[data-state=open]")
    yield page
    await context.close()


async def api_call(front: Nginx, token: str, method: str, path: str, body: Any) -> Any:
    async with httpx.AsyncClient(base_url=front.http_url, timeout=10) as http:
        response = await http.request(method, path, json=body, headers={"Authorization": f"Token {token}"})
    assert response.status_code in (200, 201), response.text
    return response.json()


def line(n: int) -> str:
    """The stdout of event n, as a runner might report it."""
    return f"TASK [deploy : step {n}] ok: [web-{n % 3 + 1}]"


async def post_events(front: Nginx, token: str, job: Any, counters: range) -> None:
    events = [{"counter": n, "event": "runner_on_ok", "stdout": line(n)} for n in counters]
    await api_call(front, token, "POST", f"/api/v2/jobs/{job.pk}/job_events/", events)


async def lines(page: Any) -> list[str]:
    return await page.eval_on_selector_all("#events .line", "els => els.map(e => e.textContent)")


async def wait_lines(page: Any, count: int, timeout: float = 20.0) -> list[str]:
    """The page's lines once it shows count of them (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    # Counted, not read, while waiting: reading thousands of lines each time slows the page down.
    while await page.eval_on_selector_all("#events .line", "els => els.length") < count:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return await lines(page)


async def test_a_status_change_made_through_the_api_shows_within_a_second(job, page, front, user):
    token = await adb(create_token, user)
    status = page.locator(f'tr[data-job-id="{job.pk}"] td.status')
    assert await status.text_content() == "new"
    await api_call(front, token, "PATCH", f"/api/v2/jobs/{job.pk}/", {"status": "pending"})
    await page.wait_for_selector(f'tr[data-job-id="{job.pk}"] td.status[data-status="pending"]', timeout=1000)
    await api_call(front, token, "PATCH", f"/api/v2/jobs/{job.pk}/", {"status": "waiting"})
    await page.wait_for_selector(f'tr[data-job-id="{job.pk}"] td.status[data-status="waiting"]', timeout=1000)


async def test_the_job_view_keeps_every_line_once_across_a_daphne_restart(job, page, front, daphne, user):
    token = await adb(create_token, user)
    await api_call(front, token, "PATCH", f"/api/v2/jobs/{job.pk}/", {"status": "pending"})
    await post_events(front, token, job, range(1, 6))  # already there when the view opens
    await page.click(f'tr[data-job-id="{job.pk}"]')
    assert await wait_lines(page, 5) == [line(n) for n in range(1, 6)]
    await post_events(front, token, job, range(6, 21))  # streamed as they come
    assert await wait_lines(page, 20) == [line(n) for n in range(1, 21)]

    os.kill(daphne.pid, signal.SIGKILL)
    daphne.proc.wait(10)
    await page.wait_for_selector("#connection[data-state=reconnecting]", timeout=5000)
    await post_events(front, token, job, range(21, 41))  # emitted while the page is away
    daphne.start()
    await page.wait_for_selector("#connection[data-state=open]", timeout=30000)
    await post_events(front, token, job, range(41, 51))

    assert await wait_lines(page, 50) == [line(n) for n in range(1, 51)]
    # And nothing more: a last line, emitted after them to the same job's group (delivered in
    # order), comes next; a copy of an earlier one would have come before it.
    await post_events(front, token, job, range(51, 52))
    assert await wait_lines(page, 51) == [line(n) for n in range(1, 52)]
    live = await page.evaluate("window.awxLive")
    # Not exact: the page retries on its own back-off while daphne is down, as often as that takes.
    assert live["reconnects"] >= 1 and live["errors"] == []
    assert live["refetches"] == 0  # the missed lines came by recovery, not from the API
    TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=TEST_OUTPUT / "live-page.png")


async def test_the_job_view_fills_what_the_event_rate_held_back_from_the_api(job, page, front, user):
    token = await adb(create_token, user)
    await page.click(f'tr[data-job-id="{job.pk}"]')
    await page.wait_for_selector("#job-pane:not([hidden])")
    # 100 events in one request: 30 go to the websocket (the rate), 70 stay in the API.
    await post_events(front, token, job, range(1, 101))
    # The end of the play always goes; its counter shows the gap.
    end = {"counter": 101, "event": "playbook_on_stats", "stdout": line(101)}
    await api_call(front, token, "POST", f"/api/v2/jobs/{job.pk}/job_events/", end)
    assert await wait_lines(page, 101) == [line(n) for n in range(1, 102)]
    # A tail held back shows only in the job's summary (final_counter): the page reads it too.
    await post_events(front, token, job, range(102, 162))
    await api_call(front, token, "PATCH", f"/api/v2/jobs/{job.pk}/", {"status": "canceled"})
    assert await wait_lines(page, 161) == [line(n) for n in range(1, 162)]
    live = await page.evaluate("window.awxLive")
    # Merged reads, not one per event: how the notices, the jump at 101 and the summary fall
    # together depends on timing, but each read covers all that was wanted when it started.
    assert 1 <= live["gapFills"] <= 4 and live["eventReads"] <= 6, live
    assert live["refetches"] == 0 and live["errors"] == []


async def set_running(front: Nginx, token: str, job: Any) -> None:
    for status in ("pending", "waiting", "running"):
        await api_call(front, token, "PATCH", f"/api/v2/jobs/{job.pk}/", {"status": status})


def event_reads(page: Any) -> list[str]:
    """The URLs of the page's reads of job events from the API, as the browser sends them."""
    reads: list[str] = []
    page.on("request", lambda request: reads.append(request.url) if "/job_events/" in request.url else None)
    return reads


async def test_bursts_on_a_running_job_are_all_on_the_page_without_a_reload(job, page, front, user):
    """39, 500 and 5,000 events posted in single requests while the job runs: the rate sends 30 of
    each, the notice of the rest (held_back.py) brings them in; nothing else happens meanwhile."""
    token = await adb(create_token, user)
    await set_running(front, token, job)
    await page.click(f'tr[data-job-id="{job.pk}"]')
    await page.wait_for_selector("#job-pane:not([hidden])")
    reads = event_reads(page)
    shown = 0
    for size in (39, 500, 5000):
        before = len(reads)
        await post_events(front, token, job, range(shown + 1, shown + size + 1))
        posted = time.monotonic()
        shown += size
        assert await wait_lines(page, shown, timeout=30) == [line(n) for n in range(1, shown + 1)]
        took, count = time.monotonic() - posted, len(reads) - before
        print(f"burst of {size}: all lines shown {took:.2f}s after the POST's response; {count} API reads")
        # A few reads whatever the burst: pages of 1000, merged gaps.
        assert count <= 2 + size // 1000, reads[before:]
    assert (await api_call(front, token, "GET", f"/api/v2/jobs/{job.pk}/", None))["status"] == "running"
    assert (await page.evaluate("window.awxLive"))["errors"] == []


async def test_a_viewer_who_opens_a_job_in_the_middle_of_a_flood_sees_every_line(job, page, front, user):
    token = await adb(create_token, user)
    await set_running(front, token, job)
    batches = [range(first, first + 200) for first in range(1, 4001, 200)]  # 20 requests, 4,000 events
    for counters in batches[:10]:
        await post_events(front, token, job, counters)

    async def rest_of_the_flood() -> None:
        for counters in batches[10:]:
            await post_events(front, token, job, counters)

    # The page opens the job (subscribes, then reads what is stored) while the flood goes on.
    flooding = asyncio.create_task(rest_of_the_flood())
    await page.click(f'tr[data-job-id="{job.pk}"]')
    await flooding
    assert await wait_lines(page, 4000, timeout=30) == [line(n) for n in range(1, 4001)]
    live = await page.evaluate("window.awxLive")
    assert live["errors"] == [] and live["refetches"] == 0


async def test_the_bundled_client_with_a_token_keeps_it_out_of_urls_and_logs(browser, front, user):
    """`new AwxWsClient({ token })` in Chromium: delivered through nginx, the token sent as a
    cookie of the site, and nowhere in nginx's access log, even for a client that puts it in a URL."""
    token = await adb(create_token, user)
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"{front.http_url}/static/awx_ws/client.js")  # any page of the site
    await page.evaluate(
        """async (token) => {
            const { AwxWsClient } = await import("/static/awx_ws/client.js");
            window.received = [];
            window.client = new AwxWsClient({ token });
            window.client.on("jobs-status_changed", (data) => window.received.push(data));
            window.client.subscribe({ jobs: ["status_changed"] });
        }""",
        token,
    )
    from awx_ws.main.emit import aemit_channel_notification

    deadline = time.monotonic() + 20
    while not await page.evaluate("window.received.length") and time.monotonic() < deadline:
        await aemit_channel_notification("jobs-status_changed", {"browser": "token"})
        await asyncio.sleep(0.2)
    assert (await page.evaluate("window.received"))[0] == {"browser": "token"}
    cookies = {c["name"]: c for c in await context.cookies()}
    assert cookies["token"]["value"] == token and cookies["token"]["sameSite"] == "Strict"
    await context.close()
    # A client that still puts the token in the URL: nginx logs the path, not the query.
    async with httpx.AsyncClient(timeout=10) as http:
        await http.get(f"{front.http_url}/websocket/?token={token}")
    log = (front.prefix_dir / "access.log").read_text()
    assert '"GET /websocket/ HTTP/1.1"' in log
    assert token not in log


async def test_the_live_page_works_over_nginxs_tls_port(browser, daphne, api, job, user, state_dir):
    """Logged in over HTTPS: the session cookie is Secure, the page's wss:// socket passes the
    session's same-origin check (scheme https from nginx), and statuses arrive."""
    from tests.test_tls import write_pair

    certificate, key = write_pair(state_dir / "tls", f"live{time.monotonic_ns()}")
    front = Nginx(
        state_dir / f"nginx-live-tls-{time.monotonic_ns()}", daphne.port, api.port, tls=(certificate, key)
    )
    front.start()
    try:
        await adb(set_login_password, user, "a real password")
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()
        origin = f"https://127.0.0.1:{front.tls_port}"
        await page.goto(f"{origin}/")
        await page.fill("input[name=username]", user.get_username())
        await page.fill("input[name=password]", "a real password")
        await page.click("button[type=submit]")
        await page.wait_for_selector("#connection[data-state=open]")
        session = {c["name"]: c for c in await context.cookies()}["awx_sessionid"]
        assert session["secure"] is True
        token = await adb(create_token, user)
        await api_call(front, token, "PATCH", f"/api/v2/jobs/{job.pk}/", {"status": "pending"})
        await page.wait_for_selector(
            f'tr[data-job-id="{job.pk}"] .status[data-status=pending]', timeout=10000
        )
        await context.close()
    finally:
        front.stop()
