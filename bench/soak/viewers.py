"""The soak's viewers, as AWX's users watch jobs: live websockets that catch up over REST as
docs/api.md says, SSE streams that drop and resume with Last-Event-ID, and awxkit's WSClient.
Each writes what it saw into the Ledger; the checker judges it at the end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.soak.ledger import Ledger, Presence, Resumer, Watch
from bench.soak.workload import Api, Stop

# The close code of a client cut off for not reading (awx_ws.main.backlog).
SLOW_CLIENT = 4008


def created_at(payload: dict[str, Any]) -> float | None:
    """When the API stored an event (its `created`), as a timestamp."""
    text = payload.get("created")
    if not isinstance(text, str):
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    return None


class LiveViewer:
    """An AWX-protocol websocket following jobs-status_changed and one to three jobs, catching up
    over REST as docs/api.md says: on opening a job, on a held-back notice, on a counter jump, on
    a summary whose final_counter it does not hold, and after a reconnect."""

    def __init__(
        self,
        name: str,
        fronts: list[str],
        token: str,
        jobs: Callable[[], list[int]],
        api: Api,
        ledger: Ledger,
        rng: random.Random,
        stop: Stop,
    ) -> None:
        self.name, self.fronts, self.token, self.jobs = name, fronts, token, jobs
        self.api, self.ledger, self.rng, self.stop = api, ledger, rng, stop
        self.watches: dict[int, Watch] = {}
        self.front = rng.choice(fronts)
        self.stalled = asyncio.Event()
        self.stalled.set()  # set: reading; cleared while a nemesis stall lasts
        self.stalled_at = 0.0  # when the last stall began
        self.live_here: dict[int, set[int]] = {}
        self.first_missing: dict[int, int] = {}  # job -> lowest counter not held (it only grows)
        self.presence: Presence | None = None  # the open connection's, once subscribed

    async def run(self) -> None:
        """Connect, watch, switch jobs now and then, reconnect after any loss, until the end."""
        while not self.stop.due:
            try:
                await self._connection()
            except (OSError, ConnectionClosed, InvalidStatus, TimeoutError) as exc:
                self.ledger.client_errors[f"viewer {type(exc).__name__}"] += 1
            for watch in self.watches.values():
                watch.until = time.time()
            self.ledger.watches += self.watches.values()
            self.watches, self.first_missing = {}, {}
            if await self.stop.sleep(self.rng.uniform(0.5, 2.0)):
                return
            self.front = self.rng.choice(self.fronts)

    async def _connection(self) -> None:
        headers = {"Authorization": f"Token {self.token}"}
        url = self.front.replace("http://", "ws://") + "/websocket/"
        self.live_here: dict[int, set[int]] = {}  # job -> counters received live on this connection
        # No client keepalive, as a browser has none: a driver that falls behind under load would
        # otherwise close its own sockets (1011, its pongs queued behind unread frames) and count
        # what was in flight as lost. Whether a reader is too slow is the server's call (4008).
        async with websockets.connect(
            url, additional_headers=headers, open_timeout=20, max_size=None, ping_interval=None
        ) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if hello.get("accept") is not True:
                raise ConnectionError(f"not accepted: {hello}")
            presence: Presence | None = None
            try:
                while not self.stop.due:
                    jobs = self.jobs()
                    await self._subscribe(ws, jobs, presence)
                    if presence is None:
                        presence = self.presence = Presence(self.name, time.time(), front=self.front)
                    for job in jobs:
                        if job not in self.watches:
                            self.watches[job] = Watch(self.name, job, time.time())
                            await self._fetch(job)
                    switch_at = time.time() + self.rng.uniform(15, 45)
                    while time.time() < switch_at and not self.stop.due:
                        await self.stalled.wait()
                        try:
                            text = await asyncio.wait_for(ws.recv(), 1.0)
                        except TimeoutError:
                            continue
                        await self._on_message(json.loads(text), presence)
                        if self.watches and all(w.final is not None for w in self.watches.values()):
                            break  # every job it watches has ended: pick others
                    self._leave(set(self.watches) - set(self.jobs()))
            finally:
                self.presence = None
                if presence is not None:
                    presence.until = time.time()
                    if ws.close_code is not None and self.stalled_at > presence.since:
                        # Lost while it had stopped reading: cut off by the server as a slow reader
                        # (4008, docs/channels.md), or by its own keepalive, whose pongs wait behind
                        # the unread frames. From its stall on it was owed nothing live; like AWX's
                        # UI it refetches over REST.
                        presence.until = min(presence.until, self.stalled_at)
                        cause = (
                            "cut off as a slow reader"
                            if ws.close_code == SLOW_CLIENT
                            else "lost while stalled"
                        )
                        self.ledger.client_errors[f"viewer {cause}"] += 1
                    self.ledger.presences.append(presence)

    async def _subscribe(self, ws: Any, jobs: list[int], presence: Presence | None) -> None:
        frame = {"groups": {"jobs": ["status_changed", "summary"], "job_events": jobs}, "xrftoken": None}
        await ws.send(json.dumps(frame))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if "groups_current" in reply:
                return
            if "error" in reply:
                raise ConnectionError(f"subscribe refused: {reply}")
            # A message that came before the reply: counted like any other once subscribed
            # (presence None only before the first subscription is acknowledged).
            await self._on_message(reply, presence)

    def _leave(self, jobs: set[int]) -> None:
        for job in jobs:
            self.first_missing.pop(job, None)
            watch = self.watches.pop(job)
            watch.until = time.time()
            self.ledger.watches.append(watch)

    async def _on_message(self, payload: dict[str, Any], presence: Presence | None) -> None:
        group = payload.get("group_name")
        if group == "jobs":
            job = payload.get("unified_job_id")
            if "status" in payload and presence is not None and isinstance(job, int):
                presence.statuses[(job, payload["status"])] += 1
            elif "final_counter" in payload and job in self.watches:
                watch = self.watches[job]
                watch.final = int(payload["final_counter"])
                if self._first_missing(job) <= watch.final:
                    await self._fetch(job, watch.final)
        elif group == "job_events":
            job = payload.get("job")
            watch = self.watches.get(job) if isinstance(job, int) else None
            if watch is None:
                return
            counter = int(payload["counter"])
            watch.live += 1
            live_here = self.live_here.setdefault(job, set())
            if counter in live_here:
                watch.duplicates += 1
            elif live_here and counter < max(live_here):
                watch.out_of_order += 1
                watch.disorder.append((time.time(), counter, max(live_here), self.front))
            live_here.add(counter)
            jumped = counter > max(watch.held, default=0) + 1
            watch.held.add(counter)
            stored = created_at(payload)
            if stored is not None:
                self.ledger.latencies.append((time.time(), time.time() - stored))
            if jumped:
                await self._fetch(job, counter - 1)
        elif group == "events_held_back":
            job = payload.get("unified_job_id")
            if job in self.watches and payload.get("ranges"):
                self.watches[job].notices += 1
                await self._fetch(job, int(payload["ranges"][-1][1]))

    def _first_missing(self, job: int) -> int:
        """The lowest counter of the job this viewer does not hold."""
        held, first = self.watches[job].held, self.first_missing.get(job, 1)
        while first in held:
            first += 1
        self.first_missing[job] = first
        return first

    async def _fetch(self, job: int, upto: int | None = None) -> None:
        """The stored events of the job it does not hold, from the first missing to upto (all
        stored when None): one span, as the live page reads (docs/api.md, fewer reads)."""
        watch = self.watches[job]
        after = self._first_missing(job) - 1
        if upto is not None and upto <= after:
            return
        for item in await self.api.events_after(self.front, self.token, job, after, upto):
            if item["counter"] not in watch.held:
                watch.held.add(item["counter"])
                watch.fetched += 1


class SseResumer:
    """An SSE stream of jobs-status_changed and one job's events, dropped every 10-30 s and resumed
    with Last-Event-ID on a node chosen at random."""

    def __init__(
        self,
        name: str,
        fronts: list[str],
        token: str,
        jobs: Callable[[], list[int]],
        ledger: Ledger,
        rng: random.Random,
        stop: Stop,
    ) -> None:
        self.name, self.fronts, self.token, self.jobs = name, fronts, token, jobs
        self.ledger, self.rng, self.stop = ledger, rng, stop
        self.record = Resumer(name, time.time())
        self.last_id: str | None = None

    async def run(self) -> None:
        """Stream, drop, resume, until the end; the record goes to the ledger."""
        chosen = self.jobs()
        job = chosen[0] if chosen else 0
        groups = "jobs-status_changed"
        if chosen:
            self.record.jobs[job] = time.time()
            groups += f",job_events-{job}"
        async with httpx.AsyncClient(timeout=httpx.Timeout(20, read=30)) as http:
            while not self.stop.due:
                front = self.rng.choice(self.fronts)
                headers = {"Authorization": f"Token {self.token}"}
                if self.last_id is not None:
                    headers["Last-Event-ID"] = self.last_id
                    self.record.resumes += 1
                try:
                    await asyncio.wait_for(
                        self._stream(http, front, groups, headers, job), self.rng.uniform(10, 30)
                    )
                except (httpx.HTTPError, TimeoutError, ConnectionError) as exc:
                    if not isinstance(exc, TimeoutError):
                        self.ledger.client_errors[f"sse {type(exc).__name__}"] += 1
                if await self.stop.sleep(self.rng.uniform(0.2, 1.5)):
                    break
        self.record.until = time.time()
        if self.last_id is None:
            self.ledger.client_errors["sse stream never opened"] += 1
            return
        self.ledger.resumers.append(self.record)

    async def _stream(
        self, http: httpx.AsyncClient, front: str, groups: str, headers: dict[str, str], job: int
    ) -> None:
        async with http.stream(
            "GET", f"{front}/api/v2/stream/", params={"groups": groups}, headers=headers
        ) as response:
            if response.status_code != 200:
                raise ConnectionError(f"stream refused: {response.status_code}")
            block: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line:
                    key, _, value = line.partition(":")
                    block[key] = value.removeprefix(" ")
                    continue
                self._on_block(block, job)
                block = {}

    def _on_block(self, block: dict[str, str], job: int) -> None:
        if "id" in block:
            if self.last_id is None:
                self.record.since = time.time()  # subscribed: owed what is emitted from now on
            self.last_id = block["id"]
        if "data" not in block:
            return
        data = json.loads(block["data"])
        if block.get("event") == "stream-reset":
            self.record.resets.append((time.time(), json.dumps(data.get("groups"))))
            return
        self.record.ids.setdefault("stream", []).append(block.get("id", ""))
        group = data.get("group_name")
        if group == "job_events" and data.get("job") == job:
            self.record.counters.setdefault(job, []).append(int(data["counter"]))
        elif group == "events_held_back" and data.get("unified_job_id") == job:
            self.record.held_back.setdefault(job, []).extend((a, b) for a, b in data["ranges"])
        elif group == "jobs" and "status" in data and isinstance(data.get("unified_job_id"), int):
            self.record.statuses[(data["unified_job_id"], data["status"])] += 1


class AwxkitViewer:
    """awxkit's WSClient (its own thread, as awxkit runs it) following status changes; a new
    client when the connection is lost, as a user would start again."""

    def __init__(self, name: str, node_port: int, token: str, ledger: Ledger, stop: Stop) -> None:
        self.name, self.port, self.token, self.ledger, self.stop = name, node_port, token, ledger, stop
        self.presence: Presence | None = None  # the open client's, once subscribed (its thread's)

    async def run(self) -> None:
        """Keep one WSClient subscribed until the end."""
        while not self.stop.due:
            await asyncio.to_thread(self._one_client)
            await self.stop.sleep(1.0)

    def _one_client(self) -> None:
        from awxkit.ws import WSClient

        presence: Presence | None = None
        client = None
        try:
            client = WSClient(token=self.token, hostname="127.0.0.1", port=self.port, secure=False).connect()
            client.status_changes()
            while not self.stop.due and not client._ws_closed:
                message = client._recv(wait=True, timeout=1)
                if not isinstance(message, dict):
                    continue
                if "groups_current" in message and presence is None:
                    presence = self.presence = Presence(self.name, time.time())  # subscribed from here on
                job = message.get("unified_job_id")
                if (
                    presence
                    and message.get("group_name") == "jobs"
                    and "status" in message
                    and isinstance(job, int)
                ):
                    presence.statuses[(job, message["status"])] += 1
        except Exception as exc:  # awxkit raises what websocket-client raises
            self.ledger.client_errors[f"awxkit {type(exc).__name__}"] += 1
        finally:
            self.presence = None
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            if presence is not None:
                presence.until = time.time()
                self.ledger.presences.append(presence)


def owes(ledger: Ledger, since: float, got: Counter[tuple[int, str]]) -> bool:
    """True while a connection subscribed since `since` lacks a status change made after it."""
    return any(asked >= since and not got[(job, status)] for job, status, asked, _ in ledger.status_changes)


async def settle(
    ledger: Ledger,
    live: list[LiveViewer],
    streams: list[SseResumer],
    awxkit: list[AwxkitViewer],
    bound: float,
) -> float:
    """Wait until every open connection holds every status change made while it was subscribed,
    as the checker will judge it, for at most bound seconds; the seconds it took (deliveries lag
    under load by more than any fixed margin would allow)."""
    started = time.monotonic()
    while time.monotonic() - started < bound:
        open_now = [
            (v.presence.since, v.presence.statuses) for v in live if v.presence and v.stalled.is_set()
        ]
        open_now += [(a.presence.since, a.presence.statuses) for a in awxkit if a.presence]
        open_now += [
            (s.record.since, s.record.statuses)
            for s in streams
            if s.last_id is not None and not s.record.resets
        ]
        if not any(owes(ledger, since, got) for since, got in open_now):
            break
        await asyncio.sleep(0.5)  # polls what clients hold: nothing to wait on in one event
    return time.monotonic() - started
