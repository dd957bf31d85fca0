"""The soak's jobs, modelled on AWX: each goes through AWX's lifecycle on one node and posts its
events through the REST API in batches (quiet jobs a few lines a second, floods hundreds at once);
the ledger keeps when each event was stored and each status answered. The viewers are viewers.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import httpx

from bench.soak.ledger import Ledger

TERMINAL = ("successful", "failed", "canceled")
# AWX's lifecycle, and the pause a runner takes between steps.
LIFECYCLE = ("pending", "waiting", "running")


class Stop:
    """The workload's end, shared by its loops."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.event = asyncio.Event()

    @property
    def due(self) -> bool:
        """True once the workload should wind down."""
        return self.event.is_set() or time.time() >= self.deadline

    async def sleep(self, seconds: float) -> bool:
        """Sleep, waking early at the end; True if the end came."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), max(0.0, min(seconds, self.deadline - time.time())))
        return self.due


class Api:
    """REST calls through one node's nginx, retried while a fault lasts (bounded)."""

    def __init__(self, http: httpx.AsyncClient, ledger: Ledger) -> None:
        self.http = http
        self.ledger = ledger

    async def call(
        self, method: str, url: str, token: str, body: Any = None, tries: int = 60
    ) -> httpx.Response:
        """The response, retrying connection errors and 5xx for up to `tries` half-seconds."""
        headers = {"Authorization": f"Token {token}"}
        for attempt in range(tries):
            try:
                response = await self.http.request(method, url, headers=headers, json=body)
            except httpx.HTTPError as exc:
                self.ledger.client_errors[f"api {type(exc).__name__}"] += 1
            else:
                if response.status_code < 500:
                    return response
                self.ledger.client_errors[f"api {response.status_code}"] += 1
            await asyncio.sleep(0.5 + random.random() * 0.2 * attempt)
        raise RuntimeError(f"{method} {url}: no answer after {tries} tries")

    async def events_after(
        self, front: str, token: str, job: int, after: int, upto: int | None = None
    ) -> list[dict[str, Any]]:
        """The job's stored events past counter `after` (up to `upto` included), every page."""
        url: str | None = f"{front}/api/v2/jobs/{job}/job_events/?counter__gt={after}&page_size=1000"
        if upto is not None:
            url += f"&counter__lt={upto + 1}"
        found: list[dict[str, Any]] = []
        while url:
            response = await self.call("GET", url, token)
            response.raise_for_status()
            page = response.json()
            found += page["results"]
            url = page.get("next")
        return found


async def run_job(
    api: Api,
    fronts: list[str],
    token: str,
    org: int,
    ledger: Ledger,
    rng: random.Random,
    flood: bool,
    stop: Stop,
) -> None:
    """One job through AWX's lifecycle on one node, posting its events in batches."""
    front = rng.choice(fronts)
    created = await api.call(
        "POST", f"{front}/api/v2/jobs/", token, {"name": "soak", "kind": "job", "organization": org}
    )
    created.raise_for_status()
    job = int(created.json()["id"])
    ledger.stored[job] = {}
    ledger.job_fronts[job] = front
    for status in LIFECYCLE:
        await set_status(api, front, token, job, status, ledger)
        await asyncio.sleep(rng.uniform(0.2, 1.0))
    counter = 0
    # A quiet job prints a few lines a second for 20-60 s; a flood prints hundreds at once for a few.
    batches = rng.randint(5, 15) if flood else rng.randint(15, 45)
    for _ in range(batches):
        size = rng.randint(100, 300) if flood else rng.randint(1, 6)
        batch = [event(counter + n + 1, rng) for n in range(size)]
        response = await api.call("POST", f"{front}/api/v2/jobs/{job}/job_events/", token, batch)
        if response.status_code == 400 and "already has events with counter" in response.text:
            pass  # a retried batch the API had stored before its answer was lost (a batch is atomic)
        elif response.status_code != 201:
            raise RuntimeError(f"job {job}: events refused ({response.status_code}): {response.text[:300]}")
        now = time.time()
        for item in batch:
            ledger.stored[job][item["counter"]] = now
        counter += size
        if stop.due:
            break
        await asyncio.sleep(rng.uniform(0.05, 0.3) if flood else rng.uniform(0.5, 1.5))
    ledger.finals[job] = counter
    await set_status(api, front, token, job, rng.choice(TERMINAL), ledger)


def event(counter: int, rng: random.Random) -> dict[str, Any]:
    """A runner's event: every one has something to show, so the rate alone decides what is sent."""
    kind = "playbook_on_task_start" if counter % 50 == 1 else "runner_on_ok"
    return {
        "counter": counter,
        "event": kind,
        "stdout": f"ok: [host{rng.randint(1, 500)}] => line {counter} " + "=" * rng.randint(0, 120),
        "start_line": counter,
        "end_line": counter + 1,
    }


async def set_status(api: Api, front: str, token: str, job: int, status: str, ledger: Ledger) -> None:
    """PATCH the job's status; the ledger keeps when it was asked and answered."""
    asked = time.time()
    response = await api.call("PATCH", f"{front}/api/v2/jobs/{job}/", token, {"status": status})
    if response.status_code == 400 and "cannot go from" in response.text:
        # A retried PATCH whose first try was committed: the job already has this status.
        current = await api.call("GET", f"{front}/api/v2/jobs/{job}/", token)
        if current.json().get("status") == status:
            ledger.status_changes.append((job, status, asked, time.time()))
            return
    if response.status_code != 200:
        raise RuntimeError(
            f"job {job}: status {status} refused ({response.status_code}): {response.text[:300]}"
        )
    ledger.status_changes.append((job, status, asked, time.time()))
