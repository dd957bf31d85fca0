"""The measured scenarios of `make bench`: deliveries under load, the slow client, idle sockets,
the sync emit's cost. Each returns a row of the results."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from typing import Any

import psutil

from bench.harness import (
    RABBITMQ,
    RUNNER_KINDS,
    Clients,
    Server,
    connections_to,
    cpu_seconds,
    log,
    mark_left,
    percentile,
    wait_floor_subscribed,
)
from tests.servers import RedisServer


def emitter(kind: str, redis_url: str):
    """An async function emitting (group, payload) the way each server kind is fed."""
    if kind == "floor":
        from redis.asyncio import Redis

        redis = Redis.from_url(redis_url)

        async def publish(group: str, payload: dict) -> None:
            """PUBLISH the payload on the group's channel."""
            await redis.publish(group, json.dumps(payload))  # the floor relays channel <group> to it

        return publish
    from awx_ws.main.emit import build_message

    if kind == "ours-rabbitmq":
        # Made on first use: a RabbitMQ layer belongs to the loop that creates it.
        from awx_ws.main.layers.rabbitmq import RabbitmqChannelLayer
        from config.settings import channel_layer_config

        config = channel_layer_config("rabbitmq")["CONFIG"]
        made: list[RabbitmqChannelLayer] = []

        async def send_rabbitmq(group: str, payload: dict) -> None:
            """group_send on the RabbitMQ layer (made here on first use)."""
            if not made:
                made.append(RabbitmqChannelLayer(**{**config, "host": RABBITMQ[0].url()}))
            await made[0].group_send(group, build_message(group, payload))

        async def close() -> None:
            """Close the RabbitMQ layer, if one was made."""
            if made:
                await made[0].close()

        send_rabbitmq.close = close  # type: ignore[attr-defined]
        return send_rabbitmq
    if kind in RUNNER_KINDS:
        # Configured as our settings configure it (capacity and all), as the API would emit.
        from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

        layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    else:
        from channels_redis.core import RedisChannelLayer

        layer = RedisChannelLayer(hosts=[redis_url])  # the tutorial's stock configuration

    async def send(group: str, payload: dict) -> None:
        """group_send on the kind's layer."""
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
            """The stalled client, then the paced 64 KiB messages."""
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
        if kind == "floor":
            wait_floor_subscribed(redis, groups)
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


def timed_sync_emits(groups: list[str], warm: str) -> list[float]:
    """µs of an emit_channel_notification() to each of groups in turn, after one untimed to warm."""
    from awx_ws.main.emit import emit_channel_notification

    emit_channel_notification(warm, {"warm": True})
    samples = []
    for n, group in enumerate(groups):
        t0 = time.perf_counter_ns()
        emit_channel_notification(group, {"n": n})
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return samples


def emit_cost(redis: RedisServer, groups: list[str], scenario: str, warm: str = "") -> dict[str, Any]:
    """Median and p99 of the sync emit to each of groups, the Redis connections it opened, and
    what bounds it (warm: the warm-up call's group, groups[0] by default).

    A `jobs` or `job_events` group keeps history (one XADD and trim in the emit's script);
    `control` keeps none.
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
        """Connections this process holds to the layer's server."""
        return connections_to(redis.port)

    before = connections()
    samples = timed_sync_emits(groups, warm or groups[0])
    return {
        "kind": "ours",
        "scenario": scenario,
        "median_us": statistics.median(samples),
        "p99_us": percentile(samples, 0.99),
        "redis_connections_opened": connections() - before,
        "calls": len(groups),
        "redis_rtt_median_us": statistics.median(rtts),
    }


def watched_emit_cost(redis: RedisServer, token: str, calls: int = 2000) -> dict[str, Any]:
    """The sync emit to a `jobs` group whose history is written (history on)."""
    # A group keeps history while someone could resume it: it has a member, or one left lately
    # (`asgi:watched:<group>`, set by every leave). The mark is set here as a leave sets it, so the
    # figure is the emit's own cost with its history append, not shared with a server's delivery
    # work on the same 2 cores (a live subscriber made the Redis round trip itself 5x slower).
    group = "jobs-emitcost"
    mark_left(redis, [group])
    return emit_cost(redis, [group] * calls, "sync emit")


def emit_cost_rabbitmq(group: str, calls: int = 2000) -> dict[str, Any]:
    """The sync emit on the RabbitMQ layer: one publish, confirmed, through the emit loop thread."""
    import threading

    from django.test import override_settings

    from config.settings import channel_layer_config

    broker = RABBITMQ[0]

    def connections() -> int:
        """Connections this process holds to the layer's server."""
        return connections_to(broker.port)

    os.environ["RABBITMQ_URL"] = broker.url()
    with override_settings(CHANNEL_LAYERS={"default": channel_layer_config("rabbitmq")}):
        before, threads = connections(), threading.active_count()
        samples = timed_sync_emits([group] * calls, group)
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
