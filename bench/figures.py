"""Issue 17's figures: emit throughput in batches, the emit to never-watched groups, a job's event
flood through the REST API and the cost of its catch-up (held_back.py's notices, then the reads
they name), and the cost of a subscribe and leave with many groups held.

Each is bounded in count and time and returns rows of the results; describe() prints them.
Groups named after jobs that do not exist (`job_events-<n>` from GROUP_BASE on) are fresh: no job,
no subscriber, no history before the figure that emits to them.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from bench.harness import STATE, Clients, Server, cpu_seconds, mark_left, percentile
from bench.scenarios import emit_cost
from tests.servers import Gunicorn, RedisServer

# Far above any job id the bench creates; each figure takes its own range above it.
GROUP_BASE = 100_000_000
BATCH_SIZE = 100
FLOOD_POSTS, FLOOD_EVENTS_PER_POST = 5, 1000
# Posted after the flood; AWX sends it whatever the rate (event_rate.ALWAYS_SENT).
FLOOD_FINAL = {
    "counter": FLOOD_POSTS * FLOOD_EVENTS_PER_POST + 1,
    "event": "playbook_on_stats",
    "stdout": "PLAY RECAP",
}
FLOOD_SCENARIO = "flood: 5,000 events of one job in 5 posts, 1 watcher"
SWEEP_SCENARIO = "access sweep: 10,000 websockets of 10,000 users"
# Seconds between sweeps during the figure (30 by default: AWX_WS_REVOCATION_SWEEP).
SWEEP_EVERY, SWEEP_WINDOW = 2.0, 20.0


def fresh_groups(start: int, count: int) -> list[str]:
    """count `job_events-<n>` groups nobody ever subscribed to or emitted to."""
    return [f"job_events-{GROUP_BASE + start + n}" for n in range(count)]


def unwatched_emit_cost(redis: RedisServer, calls: int = 2000) -> dict[str, Any]:
    """The sync emit (history on) to distinct groups nobody ever subscribed to, one call each."""
    groups = fresh_groups(0, calls + 1)
    return emit_cost(redis, groups[1:], "sync emit, never-watched groups", warm=groups[0])


def emit_rates(redis: RedisServer, batches: int = 200) -> list[dict[str, Any]]:
    """Messages/s from one thread: 100-message emit_channel_notifications batches, each message to
    a distinct job_events group (history on); then as many messages, one emit_channel_notification
    call each, also each to a distinct fresh group, so both emit the same kind of message. Fresh
    groups keep no history (nobody could resume them): the last row emits batches to groups marked
    as a leave marks them (harness.mark_left), so every message is appended to its group's stream."""
    from awx_ws.main.emit import emit_channel_notification, emit_channel_notifications

    count = batches * BATCH_SIZE
    batched = [(group, {"n": n}) for n, group in enumerate(fresh_groups(1_000_000, count))]
    single = [(group, {"n": n}) for n, group in enumerate(fresh_groups(2_000_000, count))]
    kept = [(group, {"n": n}) for n, group in enumerate(fresh_groups(3_000_000, count))]
    mark_left(redis, [group for group, _ in kept])
    emit_channel_notifications([(f"job_events-{GROUP_BASE - 1}", {"warm": True})])
    seconds = []
    for plan in (batched, kept):
        t0 = time.perf_counter()
        for start in range(0, count, BATCH_SIZE):
            emit_channel_notifications(plan[start : start + BATCH_SIZE])
        seconds.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for group, payload in single:
        emit_channel_notification(group, payload)
    single_s = time.perf_counter() - t0
    return [
        rate_row(f"emit, batches of {BATCH_SIZE}", count, seconds[0]),
        rate_row("emit, one call each", count, single_s),
        rate_row(f"emit, batches of {BATCH_SIZE}, history written", count, seconds[1]),
    ]


def rate_row(scenario: str, messages: int, seconds: float) -> dict[str, Any]:
    """A row of an emit-throughput figure."""
    return {
        "kind": "ours",
        "scenario": scenario,
        "messages": messages,
        "seconds": seconds,
        "messages_per_s": messages / seconds,
    }


def api_request(method: str, url: str, token: str, body: Any = None) -> Any:
    """One REST API call as the bench user; its JSON answer."""
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def api_event_count(api_url: str, token: str, job: int) -> int:
    """The job's events as the API lists them (cursor pages of 1,000, following `next`)."""
    url: str | None = f"{api_url}/api/v2/jobs/{job}/job_events/?page_size=1000"
    count = 0
    while url:
        page = api_request("GET", url, token)
        count += len(page["results"])
        url = page["next"]
    return count


async def subscribe(ws: ClientConnection, groups: dict[str, list[Any]]) -> dict[str, Any]:
    """Send one subscribe frame; its groups_current reply."""
    await ws.send(json.dumps({"groups": groups, "xrftoken": None}))
    while True:
        reply = json.loads(await ws.recv())
        if "groups_current" in reply:
            return reply


async def watch_events(ws: ClientConnection, job: int, seen: dict[str, Any]) -> None:
    """Count the job's events reaching ws, and keep its held-back notices, until the final
    playbook_on_stats has come and the notices name every event that did not."""
    async for frame in ws:
        message = json.loads(frame)
        if message.get("group_name") == "events_held_back" and message.get("unified_job_id") == job:
            seen["notices"].append(message)
        elif message.get("group_name") == "job_events" and message.get("job") == job:
            seen["received"] += 1
            seen["final"] = seen["final"] or int(message.get("event") == "playbook_on_stats")
        named = sum(notice["held_back"] for notice in seen["notices"])
        if seen["final"] and named >= FLOOD_FINAL["counter"] - seen["received"]:
            return


def catch_up(api: Gunicorn, token: str, job: int, notices: list[dict[str, Any]]) -> dict[str, Any]:
    """Read what the notices name from the API, as docs/api.md says a client catches up: the
    reads it takes, the API's CPU for them, and the counters they brought."""
    before = cpu_seconds(api)
    reads, counters = 0, []
    started = time.perf_counter()
    for notice in notices:
        for first, last in notice["ranges"]:
            url: str | None = (
                f"{api.http_url}/api/v2/jobs/{job}/job_events/"
                f"?counter__gt={first - 1}&counter__lt={last + 1}&page_size=1000"
            )
            while url:
                page = api_request("GET", url, token)
                reads += 1
                counters += [event["counter"] for event in page["results"]]
                url = page["next"]
    return {
        "catch_up_reads": reads,
        "catch_up_events": len(counters),
        "catch_up_distinct": len(set(counters)),
        "catch_up_s": time.perf_counter() - started,
        "catch_up_cpu_s": cpu_seconds(api) - before,
    }


async def post_flood(api_url: str, ws_url: str, token: str, job: int) -> dict[str, Any]:
    """Post the flood and the final event while a watcher of the job's events counts arrivals."""
    url = f"{api_url}/api/v2/jobs/{job}/job_events/"
    seen: dict[str, Any] = {"received": 0, "final": 0, "notices": []}
    async with connect(f"{ws_url}/websocket/?token={token}", max_queue=None) as ws:
        await ws.recv()  # {"accept": true, ...}
        await subscribe(ws, {"job_events": [job]})
        watcher = asyncio.create_task(watch_events(ws, job, seen))
        started = time.time()
        for post in range(FLOOD_POSTS):
            first = post * FLOOD_EVENTS_PER_POST + 1
            events = [
                {"counter": n, "event": "runner_on_ok", "stdout": "ok: [host]"}
                for n in range(first, first + FLOOD_EVENTS_PER_POST)
            ]
            await asyncio.to_thread(api_request, "POST", url, token, events)
        span = time.time() - started
        await asyncio.to_thread(api_request, "POST", url, token, [FLOOD_FINAL])
        try:
            await asyncio.wait_for(watcher, 60)
        except TimeoutError:  # the final event or a notice never came: report what did
            pass
    return {**seen, "span_s": span}


def flood(redis: RedisServer, token: str, job: int) -> dict[str, Any]:
    """One job's 5,000 events posted through the REST API (gunicorn) in 5 requests, then the final
    playbook_on_stats: what a websocket watcher of the job's events receives, what the API stores.

    The websocket gets at most MAX_WEBSOCKET_EVENT_RATE events per second per job plus the
    always-sent ones (event_rate.py): over a span of S seconds, RATE × (⌊S⌋ + 1) + 1 here.
    """
    from awx_ws.main.conf import ws_settings

    api = Gunicorn(STATE / "logs", {"LOG_LEVEL": "WARNING"}).start()
    server = Server("ours", redis)
    try:
        api_request("GET", f"{api.http_url}/api/v2/jobs/{job}/", token)  # its worker is up, the job visible
        seen = asyncio.run(post_flood(api.http_url, server.url, token, job))
        caught_up = catch_up(api, token, job, seen["notices"])
        stored = api_event_count(api.http_url, token, job)
    finally:
        server.stop()
        api.stop()
    rate = ws_settings.MAX_WEBSOCKET_EVENT_RATE
    seconds = math.floor(seen["span_s"]) + 1
    return {
        "kind": "ours",
        "scenario": FLOOD_SCENARIO,
        "posted": FLOOD_FINAL["counter"],
        "received": seen["received"],
        "final_received": bool(seen["final"]),
        "api_count": stored,
        "span_s": seen["span_s"],
        "rate_per_s": rate,
        "seconds_spanned": seconds,
        "always_sent": 1,
        "received_bound": rate * seconds + 1 if rate else FLOOD_FINAL["counter"],
        "notices": len(seen["notices"]),
        "held_back": sum(notice["held_back"] for notice in seen["notices"]),
        **caught_up,
    }


async def churn(server: Server, redis: RedisServer, token: str, jobs: list[int]) -> dict[str, Any]:
    """One socket subscribes to each job's events group (nobody else holds it) and then to none,
    in turn; the server's CPU (and Redis's) over all but the first, untimed, cycle."""
    async with connect(f"{server.url}/websocket/?token={token}", max_queue=None) as ws:
        await ws.recv()
        await subscribe(ws, {"job_events": [jobs[0]]})
        await subscribe(ws, {})
        cpu0, layer0, replies = server.cpu(), cpu_seconds(redis), []
        for job in jobs[1:]:
            t0 = time.perf_counter()
            reply = await subscribe(ws, {"job_events": [job]})
            replies.append((time.perf_counter() - t0) * 1000)
            if reply["groups_current"] != [f"job_events-{job}"]:
                raise RuntimeError(f"subscribe to job {job} refused: {reply}")
            await subscribe(ws, {})
        cpu, layer = server.cpu() - cpu0, cpu_seconds(redis) - layer0
    cycles = len(jobs) - 1
    return {
        "cycles": cycles,
        "cpu_ms_per_change": cpu * 1000 / cycles,
        "layer_cpu_ms_per_change": layer * 1000 / cycles,
        "subscribe_p50_ms": percentile(replies, 0.5),
    }


def subscribe_leave_cost(
    redis: RedisServer, token: str, held_jobs: list[int], new_jobs: list[int]
) -> dict[str, Any]:
    """Server CPU per subscribe + leave of one socket while other sockets of one "ours" node hold
    the events groups of held_jobs (100 per socket, the per-connection limit)."""
    # Its 2 × len(new_jobs) frames are past the per-socket subscribe rate (20 per 10 s).
    server = Server("ours", redis, env_extra={"AWX_WS_SUBSCRIBE_RATE": "1000000"})
    groups = [f"job_events-{job}" for job in held_jobs]
    per_socket = min(100, len(groups))
    try:
        holders = Clients(server, math.ceil(len(groups) / per_socket), groups, token, hold=True,
                          groups_per_socket=per_socket)  # fmt: skip
        holders.wait_ready()
        figures = asyncio.run(churn(server, redis, token, new_jobs))
        holders.release()
    finally:
        server.stop()
    return {
        "kind": "ours",
        "scenario": f"subscribe+leave, {len(groups)} groups held",
        "groups_held": len(groups),
        # One node runs no relay (run_wsbroadcast links nodes): the daphne process is all of it.
        "relay": "none (one node)",
        **figures,
    }


def sweep_users(count: int) -> list[str]:
    """count active users, members of the bench organization, and their API tokens (their keys)."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from awx_ws.main.models import AccessChange, Organization

    user_model = get_user_model()
    stamp = time.monotonic_ns()
    users = user_model.objects.bulk_create(
        [user_model(username=f"sweep{stamp}-{n}", password="!") for n in range(count)]
    )
    org = Organization.objects.get(name="bench")
    Organization.members.through.objects.bulk_create(
        [Organization.members.through(organization_id=org.pk, user_id=user.pk) for user in users]
    )
    tokens = Token.objects.bulk_create([Token(user=user, key=Token.generate_key()) for user in users])
    AccessChange.objects.all().delete()  # none is this figure's load (see make_token_and_jobs)
    return [token.key for token in tokens]


def sweep_histogram(metrics_dir: str) -> tuple[float, float]:
    """(seconds, count) of awx_ws_access_sweep_seconds as the server's processes wrote it."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)
    total = count = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "awx_ws_access_sweep_seconds_sum":
                total += sample.value
            elif sample.name == "awx_ws_access_sweep_seconds_count":
                count += sample.value
    return total, count


def access_sweep(redis: RedisServer, count: int = 10_000) -> dict[str, Any]:
    """What the periodic access sweep (revocation.py) costs a daphne holding count websockets,
    each of its own user and token: ms per sweep, and daphne's CPU with sweeps every SWEEP_EVERY s
    against the same window with none."""
    listing = STATE / f"sweep-tokens-{time.monotonic_ns()}.txt"
    listing.write_text("\n".join(sweep_users(count)) + "\n")
    cpu: dict[str, float] = {}
    sweeps = (0.0, 0.0)
    for label, every in (("off", "0"), ("on", str(SWEEP_EVERY))):
        metrics_dir = STATE / f"metrics-sweep-{time.monotonic_ns()}"
        env = {"AWX_WS_REVOCATION_SWEEP": every, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        server = Server("ours", redis, env_extra=env)
        clients = Clients(server, count, ["jobs-idle"], f"@{listing}", hold=True, timeout=300)
        try:
            clients.wait_ready()
            # Only the sweeps within the window count: others ran while the sockets were opening.
            first = sweep_histogram(str(metrics_dir)) if label == "on" else (0.0, 0.0)
            before = server.cpu()
            time.sleep(SWEEP_WINDOW)
            cpu[label] = server.cpu() - before
            if label == "on":
                last = sweep_histogram(str(metrics_dir))
                sweeps = (last[0] - first[0], last[1] - first[1])
            clients.release()
        finally:
            clients.stop()
            server.stop()
    seconds, done = sweeps
    return {
        "scenario": SWEEP_SCENARIO,
        "sockets": count,
        "sweeps": int(done),
        "ms_per_sweep": seconds * 1000 / done if done else float("nan"),
        "cpu_off_s": cpu["off"],
        "cpu_on_s": cpu["on"],
        "window_s": SWEEP_WINDOW,
        "sweep_every_s": SWEEP_EVERY,
    }


def describe(rows: list[dict[str, Any]]) -> str:
    """The figures of this module as printed lines."""
    lines = []
    for r in rows:
        if "messages_per_s" in r and r["scenario"].startswith("emit, "):
            lines.append(
                f"{r['scenario']}: {r['messages_per_s']:,.0f} msgs/s ({r['messages']} messages, one thread)"
            )
        elif r["scenario"] == FLOOD_SCENARIO:
            lines.append(
                f"{r['scenario']}: posted {r['posted']} over {r['span_s']:.2f} s, watcher received "
                f"{r['received']} (final event {'in' if r['final_received'] else 'MISSING'}), API lists "
                f"{r['api_count']}"
            )
            skipped = r["held_back"] / 1000 or float("nan")
            lines.append(
                f"catch-up after the flood: {r['notices']} notices named {r['held_back']} held-back events; "
                f"reading them took {r['catch_up_reads']} API requests ({r['catch_up_reads'] / skipped:.1f} "
                f"per 1,000 skipped), {r['catch_up_s']:.2f} s, API CPU "
                f"{r['catch_up_cpu_s'] * 1000 / skipped:.0f} ms per 1,000 skipped; received live + read = "
                f"{r['received'] + r['catch_up_distinct']}/{r['posted']} distinct"
            )
        elif r["scenario"] == SWEEP_SCENARIO:
            extra = (r["cpu_on_s"] - r["cpu_off_s"]) / max(r["sweeps"], 1) * 1000
            lines.append(
                f"{r['scenario']}: {r['ms_per_sweep']:.1f} ms per sweep, wall ({r['sweeps']} sweeps every "
                f"{r['sweep_every_s']:g} s); daphne CPU over {r['window_s']:g} s: {r['cpu_off_s']:.2f} s "
                f"without sweeps, {r['cpu_on_s']:.2f} s with them ({extra:.0f} ms each); at the default "
                f"30 s that is {extra / 30 / 10:.2f} % of one core"
            )
        elif "cpu_ms_per_change" in r:
            lines.append(
                f"{r['scenario']}: daphne CPU {r['cpu_ms_per_change']:.2f} ms per subscribe+leave "
                f"(Redis {r['layer_cpu_ms_per_change']:.2f} ms; relay: {r['relay']}), subscribe p50 "
                f"{r['subscribe_p50_ms']:.1f} ms over {r['cycles']} cycles"
            )
    return "\n".join(lines)
