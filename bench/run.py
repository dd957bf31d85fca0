"""`make bench`: awx_ws against the Channels tutorial baseline and a no-Django floor, same load.

Every server runs in its own process; load clients run in other processes (bench.loadclient) on
the same 2 cores, so absolute rates are shared-CPU figures. The fair figure is the server's own
CPU time per 1,000 deliveries (psutil: user + system of the server processes only); the channel
layer's server (redis-server or RabbitMQ's beam) is reported beside it as `layer CPU`.
"ours" runs on the Redis layer under `python -m awx_ws.server` (direct writes), "ours-daphne" the
same under plain `daphne` (the ASGI send path), "ours-rabbitmq" on the RabbitMQ layer.
Prints a table with ratios to the baseline and writes bench/results/<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(tempfile.mkdtemp(prefix="awx_ws-bench-"))
sys.path.insert(0, str(ROOT))

from bench.backends import database_figures, describe, tls_figures  # noqa: E402
from tests.servers import DaphneNode, Nginx, Process, RabbitMQServer, RedisServer, free_port  # noqa: E402

# The RabbitMQ broker of the "ours-rabbitmq" kind (started by main()).
RABBITMQ: list[RabbitMQServer] = []


def rabbitmq_env() -> dict[str, str]:
    return {"CHANNEL_LAYER_BACKEND": "rabbitmq", "RABBITMQ_URL": RABBITMQ[0].url()}


def cpu_seconds(process: Process) -> float:
    """User + system CPU of a process and its children (RabbitMQ's beam runs under a shell)."""
    parent = psutil.Process(process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [parent, *parent.children(recursive=True)])


def setup_django(redis_port: int) -> None:
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "AWX_WS_VAR": str(STATE / "var"),
            "DATABASE_URL": f"sqlite:///{STATE / 'db.sqlite3'}",
            "SECRET_KEY": "bench-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "LOG_LEVEL": "WARNING",
        }
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def make_token_and_jobs(count: int) -> tuple[str, list[int]]:
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from awx_ws.main.models import AccessChange, Job, Organization

    user = get_user_model().objects.create_user("bench", "", "bench")
    org = Organization.objects.create(name="bench")
    org.members.add(user)
    jobs = Job.objects.bulk_create([Job(organization=org, kind="job") for _ in range(count)])
    key = Token.objects.create(user=user).key
    # Creating the bench user recorded access changes for it (revocation.py). A server reads the
    # changes of the last 30 s when it starts: whichever scenario began within 30 s of this set-up
    # paid for rechecking all its connections (+30 ms per 1,000 in the first one). Not a load of
    # any scenario: forget them.
    AccessChange.objects.all().delete()
    return key, [job.pk for job in jobs]


def log(line: str) -> None:
    print(line, flush=True)


class Server:
    """One server kind: its processes (for CPU and RSS) and its client URL."""

    def __init__(self, kind: str, redis: RedisServer, daphnes: int = 1, front: bool = False):
        self.kind = kind
        self.processes: list[Process] = []
        logs = STATE / "logs"
        if kind in ("ours", "ours-daphne", "ours-rabbitmq"):
            # Every load client is the one bench user: its 1,000 sockets are past the per-user limit.
            env = {"LOG_LEVEL": "WARNING", "AWX_WS_MAX_CONNECTIONS_PER_USER": "100000"}
            env.update(rabbitmq_env() if kind == "ours-rabbitmq" else {})
            runner = "daphne" if kind == "ours-daphne" else "awx_ws.server"
            nodes = [DaphneNode(logs, env, runner=runner).start() for _ in range(daphnes)]
            self.processes += nodes
            if front:
                nginx = Nginx(STATE / f"nginx-{free_port()}", [n.port for n in nodes], free_port()).start()
                self.front: Process = nginx
                self.processes.append(nginx)  # its CPU is part of serving
                self.url = f"ws://127.0.0.1:{nginx.port}"
            else:
                self.url = nodes[0].url
        elif kind == "baseline":
            port = free_port()
            env = {**os.environ, "DJANGO_SETTINGS_MODULE": "bench.baseline_settings"}
            argv = [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "bench.baseline_asgi:application",
            ]
            proc = Process(f"baseline:{port}", argv, logs / f"baseline-{port}.log", env).start()
            proc.wait_for_port(port)
            self.processes.append(proc)
            self.url = f"ws://127.0.0.1:{port}"
        else:
            port = free_port()
            argv = [sys.executable, "-m", "bench.floor_server", str(port), redis.url]
            proc = Process(f"floor:{port}", argv, logs / f"floor-{port}.log", dict(os.environ)).start()
            proc.wait_for_port(port)
            self.processes.append(proc)
            self.url = f"ws://127.0.0.1:{port}"

    def cpu_parts(self) -> dict[str, float]:
        """CPU seconds (user + system) of each server program, its child processes included."""
        parts: dict[str, float] = {}
        for process in self.processes:
            name = process.name.split(":")[0]
            parent = psutil.Process(process.pid)
            for member in [parent, *parent.children(recursive=True)]:  # nginx works in a child
                times = member.cpu_times()
                parts[name] = parts.get(name, 0.0) + times.user + times.system
        return parts

    def cpu(self) -> float:
        return sum(self.cpu_parts().values())

    def rss(self) -> int:
        return sum(psutil.Process(p.pid).memory_info().rss for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


class Clients:
    """A bench.loadclient process."""

    def __init__(
        self,
        server: Server,
        count: int,
        groups: list[str],
        token: str,
        expect: int = 0,
        hold: bool = False,
        timeout: float = 90,
    ):
        # Every "ours" kind speaks the same protocol.
        client_kind = "ours" if server.kind.startswith("ours") else server.kind
        argv = [
            sys.executable, "-m", "bench.loadclient", "--kind", client_kind, "--url", server.url,
            "--count", str(count), "--groups", ",".join(groups), "--token", token,
            "--expect", str(expect), "--timeout", str(timeout),
        ]  # fmt: skip
        if hold:
            argv.append("--hold")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.progress = 0
        self._said = time.monotonic()

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "ready":
                return
        raise RuntimeError("load client died before it was ready")

    def result(self, label: str, total: int) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("progress "):
                self.progress = int(line.split()[1])
                if sys.stdout.isatty():
                    sys.stdout.write(f"\r  {label}: {self.progress}/{total} delivered   ")
                elif time.monotonic() - self._said >= 5:
                    sys.stdout.write(f"  {label}: {self.progress}/{total} delivered\n")
                    self._said = time.monotonic()
                sys.stdout.flush()
            elif line.startswith("result "):
                sys.stdout.write("\n")
                self.proc.wait(30)
                return json.loads(line[len("result ") :])
        raise RuntimeError("load client died without a result")

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


def emitter(kind: str, redis_url: str):
    """An async function emitting (group, payload) the way each server kind is fed."""
    if kind == "floor":
        from redis.asyncio import Redis

        redis = Redis.from_url(redis_url)

        async def publish(group: str, payload: dict) -> None:
            await redis.publish("bench", json.dumps(payload))

        return publish
    from awx_ws.main.emit import build_message

    if kind == "ours-rabbitmq":
        # Made on first use: a RabbitMQ layer belongs to the loop that creates it.
        from awx_ws.main.layers.rabbitmq import RabbitmqChannelLayer
        from config.settings import channel_layer_config

        config = channel_layer_config("rabbitmq")["CONFIG"]
        made: list[RabbitmqChannelLayer] = []

        async def send_rabbitmq(group: str, payload: dict) -> None:
            if not made:
                made.append(RabbitmqChannelLayer(**{**config, "host": RABBITMQ[0].url()}))
            await made[0].group_send(group, build_message(group, payload))

        async def close() -> None:
            if made:
                await made[0].close()

        send_rabbitmq.close = close  # type: ignore[attr-defined]
        return send_rabbitmq
    if kind in ("ours", "ours-daphne"):
        # Configured as our settings configure it (capacity and all), as the API would emit.
        from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

        layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    else:
        from channels_redis.core import RedisChannelLayer

        layer = RedisChannelLayer(hosts=[redis_url])  # the tutorial's stock configuration

    async def send(group: str, payload: dict) -> None:
        await layer.group_send(group, build_message(group, payload))

    return send


async def emit_paced(
    send, plan: list[str], rate: float, pad: str = "", extra: dict[str, Any] | None = None
) -> float:
    """Emit one message per group in plan at `rate` per second; returns the start time."""
    start = time.time()
    for index, group in enumerate(plan):
        due = start + index / rate
        delay = due - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        payload: dict[str, Any] = {"t": time.time(), "seq": index, **(extra or {})}
        if pad:
            payload["pad"] = pad
        await send(group, payload)
    close = getattr(send, "close", None)
    if close is not None:  # a RabbitMQ layer: its connection and tasks end with this loop
        await close()
    return start


async def stalled_client(url: str, token: str, group: str) -> Any:
    """A websocket that subscribes to group and then reads nothing (tiny receive buffer)."""
    import socket

    from websockets.asyncio.client import connect

    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ws = await connect(f"{url}/websocket/?token={token}", sock=sock, max_queue=1)
    await ws.recv()
    await ws.send(json.dumps({"groups": {"jobs": [group.split("-", 1)[1]]}}))
    await ws.recv()
    return ws


def slow_client_latency(redis: RedisServer, token: str, messages: int) -> dict[str, Any]:
    """100 readers and one client that stopped reading, 64 KiB messages at 40/s: what the
    readers' latency is while the stalled one is cut off (AWX_WS_SLOW_CLIENT_MAX_BYTES)."""
    group, pad = "jobs-slowbench", "x" * 64 * 1024
    server = Server("ours", redis)
    try:
        load = Clients(server, 100, [group], token, expect=messages, timeout=120)
        load.wait_ready()
        cpu0 = server.cpu()
        rss0 = server.rss()

        async def run() -> None:
            stalled = await stalled_client(server.url, token, group)
            await emit_paced(emitter("ours", redis.url), [group] * messages, 40.0, pad)
            stalled.transport.abort()

        started = time.time()
        asyncio.run(run())
        result = load.result("slow client", 100 * messages)
        wall = time.time() - started
        cpu, rss_growth = server.cpu() - cpu0, server.rss() - rss0
        closed = server.processes[0].output().count("closing slow client")
    finally:
        server.stop()
    lat = result["latencies_ms"]
    return {
        "kind": "ours",
        "scenario": "100 readers + 1 stalled, 64 KiB x 40/s",
        "expected": 100 * messages,
        "received": result["received"],
        "deliveries_per_s": result["received"] / wall,
        "cpu_ms_per_1000": cpu * 1e6 / result["received"] if result["received"] else float("nan"),
        "p50_ms": percentile(lat, 0.50),
        "p99_ms": percentile(lat, 0.99),
        "stalled_closed": closed,
        "rss_growth_mib": rss_growth / 2**20,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def deliveries(
    kind: str,
    redis: RedisServer,
    token: str,
    clients: int,
    groups: list[str],
    plan: list[str],
    rate: float,
    label: str,
    daphnes: int = 1,
    front: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Connect clients, emit plan at rate, measure what arrives and the server's CPU."""
    server = Server(kind, redis, daphnes, front)
    try:
        per_client = sum(1 for g in plan if g == groups[0]) if len(groups) == 1 else len(plan) // len(groups)
        expected = clients * per_client if len(groups) == 1 else len(plan)
        load = Clients(
            server, clients, groups, token, expect=per_client, timeout=max(60.0, len(plan) / rate * 6)
        )
        load.wait_ready()
        broker = RABBITMQ[0] if kind == "ours-rabbitmq" else redis
        cpu0, parts0, layer_cpu0 = server.cpu(), server.cpu_parts(), cpu_seconds(broker)
        client_cpu0 = sum(psutil.Process(load.proc.pid).cpu_times()[:2])
        started = time.time()
        asyncio.run(emit_paced(emitter(kind, redis.url), plan, rate, extra=extra))
        result = load.result(label, expected)
        wall = time.time() - started
        cpu = server.cpu() - cpu0
        parts = {name: value - parts0[name] for name, value in server.cpu_parts().items()}
        layer_cpu = cpu_seconds(broker) - layer_cpu0
    finally:
        server.stop()
    received = result["received"]
    lat = result["latencies_ms"]
    return {
        "kind": kind,
        "scenario": label,
        "expected": expected,
        "received": received,
        "deliveries_per_s": received / wall if wall else 0.0,
        "cpu_ms_per_1000": cpu * 1000 / received * 1000 if received else float("nan"),
        "p50_ms": percentile(lat, 0.50),
        "p99_ms": percentile(lat, 0.99),
        "wall_s": wall,
        "server_cpu_s": cpu,
        "layer_cpu_ms_per_1000": layer_cpu * 1e6 / received if received else float("nan"),
        "server_cpu_by_process_s": parts,
        # the load client's CPU over the same window (it reports its own total at the end)
        "client_cpu_s": result["cpu_s"] - client_cpu0,
    }


def idle_rss(kind: str, redis: RedisServer, token: str, counts: list[int]) -> dict[str, Any]:
    """RSS growth of one server process per idle connection, at each count."""
    figures = {}
    for count in counts:
        server = Server(kind, redis)
        try:
            warm = Clients(server, 10, ["jobs-idle"], token, hold=True)
            warm.wait_ready()
            base = server.rss()
            load = Clients(server, count, ["jobs-idle"], token, hold=True)
            load.wait_ready()
            time.sleep(1.0)
            grown = server.rss() - base
            load.release()
            warm.release()
        finally:
            server.stop()
        figures[count] = grown / count
        log(f"  idle {kind} {count}: {grown / count / 1024:.1f} KB per socket")
    return {
        "kind": kind,
        "scenario": "idle sockets",
        "kb_per_socket": {str(k): v / 1024 for k, v in figures.items()},
    }


def connections_to(port: int) -> int:
    """TCP connections this process holds to a server on port."""
    return sum(1 for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port)


def timed_sync_emits(group: str, calls: int) -> list[float]:
    """µs of each of calls emit_channel_notification()s, after one untimed warm-up call."""
    from awx_ws.main.emit import emit_channel_notification

    emit_channel_notification(group, {"warm": True})
    samples = []
    for n in range(calls):
        t0 = time.perf_counter_ns()
        emit_channel_notification(group, {"n": n})
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return samples


def emit_cost(redis: RedisServer, group: str, scenario: str, calls: int = 2000) -> dict[str, Any]:
    """Median and p99 of the sync emit, the Redis connections it opened, and what bounds it.

    A `jobs` group keeps history (one XADD and trim in the emit's script); `control` keeps none.
    """
    from redis import Redis

    # What one loopback Redis round trip costs from a sync client: the floor of any confirmed emit.
    ping = Redis.from_url(redis.url)
    ping.ping()
    rtts = []
    for _ in range(500):
        t0 = time.perf_counter_ns()
        ping.ping()
        rtts.append((time.perf_counter_ns() - t0) / 1000)
    ping.close()

    def connections() -> int:
        return connections_to(redis.port)

    before = connections()
    samples = timed_sync_emits(group, calls)
    return {
        "kind": "ours",
        "scenario": scenario,
        "median_us": statistics.median(samples),
        "p99_us": percentile(samples, 0.99),
        "redis_connections_opened": connections() - before,
        "calls": calls,
        "redis_rtt_median_us": statistics.median(rtts),
    }


def emit_cost_rabbitmq(group: str, calls: int = 2000) -> dict[str, Any]:
    """The sync emit on the RabbitMQ layer: one publish, confirmed, through the emit loop thread."""
    import threading

    from django.test import override_settings

    from config.settings import channel_layer_config

    broker = RABBITMQ[0]

    def connections() -> int:
        return connections_to(broker.port)

    os.environ["RABBITMQ_URL"] = broker.url()
    with override_settings(CHANNEL_LAYERS={"default": channel_layer_config("rabbitmq")}):
        before, threads = connections(), threading.active_count()
        samples = timed_sync_emits(group, calls)
        opened, new_threads = connections() - before, threading.active_count() - threads
    return {
        "kind": "ours-rabbitmq",
        "scenario": "sync emit (RabbitMQ)",
        "median_us": statistics.median(samples),
        "p99_us": percentile(samples, 0.99),
        "connections_opened": opened,
        "threads_started": new_threads,
        "calls": calls,
    }


@contextmanager
def rabbitmq_server():
    server = RabbitMQServer(free_port(), STATE / "rabbitmq", ["/"]).start()
    RABBITMQ.append(server)
    try:
        yield server
    finally:
        RABBITMQ.clear()
        server.stop()


@contextmanager
def redis_server():
    server = RedisServer(free_port(), STATE / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["scenario"]: r for r in rows if r["kind"] == "baseline" and "cpu_ms_per_1000" in r}
    out = [
        f"{'scenario':<34} {'server':<13} {'deliv/s':>9} {'CPU ms/1k':>10} {'x base':>7} "
        f"{'p50 ms':>8} {'p99 ms':>9} {'got/expected':>14} {'layer CPU ms/1k':>16}"
    ]
    for r in rows:
        if "cpu_ms_per_1000" not in r:
            continue
        ref = base.get(r["scenario"])
        ratio = (
            ref["cpu_ms_per_1000"] / r["cpu_ms_per_1000"] if ref and r["cpu_ms_per_1000"] else float("nan")
        )
        out.append(
            f"{r['scenario']:<34} {r['kind']:<13} {r['deliveries_per_s']:>9.0f} "
            f"{r['cpu_ms_per_1000']:>10.1f} "
            f"{ratio:>7.2f} {r['p50_ms']:>8.1f} {r['p99_ms']:>9.1f} {r['received']:>7}/{r['expected']:<6} "
            f"{r.get('layer_cpu_ms_per_1000', float('nan')):>16.1f}"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    log(
        f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        "load clients share the cores"
    )
    with redis_server() as redis, rabbitmq_server():
        setup_django(redis.port)
        token, jobs = make_token_and_jobs(1000)

        for subscribers, messages, rate in [(100, 50, 50.0), (1000, int(50 * scale) or 5, 20.0)]:
            label = f"fan-out 1 group x {subscribers}"
            for kind in ("baseline", "floor", "ours", "ours-daphne", "ours-rabbitmq"):
                log(f"{label}: {kind}")
                rows.append(
                    deliveries(
                        kind,
                        redis,
                        token,
                        subscribers,
                        ["jobs-bench"],
                        ["jobs-bench"] * messages,
                        rate,
                        label,
                    )
                )

        # Job statuses go only to subscribers who may see the job (audience.py): the same fan-out
        # with that check, beside the unfiltered one above.
        label = "job status 1 group x 1000 (filtered)"
        for kind in ("ours", "ours-daphne"):
            log(f"{label}: {kind}")
            plan = ["jobs-status_changed"] * (int(50 * scale) or 5)
            status = {"group_name": "jobs", "unified_job_id": jobs[0], "status": "running"}
            rows.append(
                deliveries(kind, redis, token, 1000, ["jobs-status_changed"], plan, 20.0, label, extra=status)
            )

        count = int(1000 * scale) or 100
        groups = [f"job_events-{job}" for job in jobs[:count]]
        label = f"{count} clients, own group each"
        for kind in ("baseline", "ours", "ours-daphne", "ours-rabbitmq"):
            log(f"{label}: {kind}")
            rows.append(deliveries(kind, redis, token, count, groups, groups * 5, 1000.0, label))

        label = "1000 subs x 10 msg/s (latency)"
        for kind in ("baseline", "floor", "ours", "ours-daphne", "ours-rabbitmq"):
            log(f"{label}: {kind}")
            rows.append(
                deliveries(
                    kind,
                    redis,
                    token,
                    1000,
                    ["jobs-latency"],
                    ["jobs-latency"] * int(100 * scale or 20),
                    10.0,
                    label,
                )
            )

        log("emit cost")
        rows.append(emit_cost(redis, "jobs-emitcost", "sync emit"))
        rows.append(emit_cost(redis, "control-emitcost", "sync emit, no history"))
        rows.append(emit_cost_rabbitmq("jobs-emitcost"))

        label = "1000 subs via nginx, 1 vs 2 daphne"
        for daphnes in (1, 2):
            log(f"{label}: {daphnes} daphne")
            row = deliveries(
                "ours",
                redis,
                token,
                1000,
                ["jobs-multi"],
                ["jobs-multi"] * int(100 * scale or 20),
                100.0,
                f"{label} ({daphnes})",
                daphnes,
                front=True,  # both behind nginx, so only the process count differs
            )
            rows.append(row)

        log("slow client")
        rows.append(slow_client_latency(redis, token, int(400 * scale) or 80))

        log("idle sockets")
        counts = [1000, 5000] if args.quick else [1000, 5000, 10000]
        rows.append(idle_rss("ours", redis, token, counts))
        rows.append(idle_rss("baseline", redis, token, [1000]))

        log("backends: the database behind a handshake, TLS at nginx")
        handshakes = int(300 * scale) or 50
        backend_rows = database_figures(STATE, handshakes, token, jobs[0])
        backend_rows += tls_figures(STATE, token, jobs[0], handshakes, int(5000 * scale) or 500)
        rows += backend_rows

    print()
    print(table(rows))
    for r in rows:
        if r["scenario"] == "sync emit (RabbitMQ)":
            print(
                f"{r['scenario']}: median {r['median_us']:.0f} µs, p99 {r['p99_us']:.0f} µs, "
                f"connections opened {r['connections_opened']}, threads started {r['threads_started']} "
                f"over {r['calls']} calls (one emit loop thread and connection per process)"
            )
        elif r["scenario"].startswith("sync emit"):
            print(
                f"{r['scenario']}: median {r['median_us']:.0f} µs, p99 {r['p99_us']:.0f} µs, "
                f"Redis connections opened {max(0, r['redis_connections_opened'])} over {r['calls']} calls "
                f"(one sync Redis round trip: {r['redis_rtt_median_us']:.0f} µs)"
            )
        if "stalled_closed" in r:
            print(
                f"{r['scenario']}: readers' p99 {r['p99_ms']:.1f} ms, stalled client closed "
                f"{r['stalled_closed']} time(s), daphne RSS +{r['rss_growth_mib']:.1f} MiB"
            )
        if r["scenario"] == "idle sockets":
            print(
                f"idle sockets, {r['kind']}: "
                + ", ".join(f"{k}: {v:.1f} KB" for k, v in r["kb_per_socket"].items())
            )
    print(describe(backend_rows))
    multi = [r for r in rows if r["scenario"].startswith("1000 subs via nginx")]
    for r in multi:
        busy = (r["server_cpu_s"] + r["client_cpu_s"]) / (r["wall_s"] * (os.cpu_count() or 1))
        print(
            f"{r['scenario']}: server {r['server_cpu_by_process_s']} s CPU, load client "
            f"{r['client_cpu_s']:.1f} s CPU in {r['wall_s']:.1f} s: {busy:.0%} of all cores busy"
        )
    if len(multi) == 2 and multi[0]["deliveries_per_s"]:
        print(
            "2 daphne / 1 daphne deliveries per second: "
            f"{multi[1]['deliveries_per_s'] / multi[0]['deliveries_per_s']:.2f}x"
        )
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    target = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps({"rows": rows, "seconds": time.monotonic() - started}, indent=2))
    print(f"\n{time.monotonic() - started:.0f} s; results in {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
