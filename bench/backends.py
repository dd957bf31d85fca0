"""`make bench`'s backend figures: the database behind a handshake, and TLS at nginx.

- Database: a token client connects (the token is read from the database) and subscribes to its
  job's events (the access check reads the job and the membership), one after another, against a
  daphne on SQLite and one on PostgreSQL. Delivery never touches the database.
- TLS: the same sequence through nginx's plain port and its TLS port, then one client receiving
  messages over each, with nginx's CPU per 1,000 messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect

from tests.servers import ROOT, DaphneNode, Nginx, PostgresServer, free_port

# Handshakes not counted: the first ones pay for imports, caches and the database's first connections.
WARM_UP = 10


def seed(database_url: str) -> tuple[str, int]:
    """Migrate database_url and create an organization member with one job: (token, job id)."""
    script = (
        "import django, json; django.setup()\n"
        "from django.core.management import call_command\n"
        "call_command('migrate', verbosity=0, interactive=False)\n"
        "from bench.harness import make_token_and_jobs\n"
        "token, jobs = make_token_and_jobs(1)\n"
        "print(json.dumps([token, jobs[0]]))\n"
    )
    env = {**os.environ, "DATABASE_URL": database_url}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    token, job = json.loads(result.stdout.strip().splitlines()[-1])
    return token, job


async def handshakes(
    url: str, token: str, job: int, count: int, tls: ssl.SSLContext | None
) -> dict[str, Any]:
    """count connect + subscribe sequences, one after another: medians and p99s in ms."""
    connects, subscribes = [], []
    frame = json.dumps({"groups": {"job_events": [job]}})
    for n in range(count + WARM_UP):
        t0 = time.perf_counter()
        async with connect(f"{url}/websocket/?token={token}", ssl=tls) as ws:
            await ws.recv()  # the greeting: authenticated
            t1 = time.perf_counter()
            await ws.send(frame)
            reply = json.loads(await ws.recv())
            t2 = time.perf_counter()
        if reply.get("groups_current") != [f"job_events-{job}"]:
            raise RuntimeError(f"subscribe refused: {reply}")
        if n >= WARM_UP:
            connects.append((t1 - t0) * 1000)
            subscribes.append((t2 - t1) * 1000)
    return {
        "connect_p50_ms": statistics.median(connects),
        "connect_p99_ms": sorted(connects)[int(0.99 * len(connects))],
        "subscribe_p50_ms": statistics.median(subscribes),
        "subscribe_p99_ms": sorted(subscribes)[int(0.99 * len(subscribes))],
    }


async def receive_many(url: str, token: str, count: int, tls: ssl.SSLContext | None) -> float:
    """One client takes count 1 KiB messages of one group; returns the seconds it took."""
    from bench.scenarios import emitter

    send = emitter("ours", os.environ["REDIS_URL"])
    async with connect(f"{url}/websocket/?token={token}", ssl=tls) as ws:
        await ws.recv()
        await ws.send(json.dumps({"groups": {"jobs": ["tlsbench"]}}))
        await ws.recv()
        started = time.perf_counter()
        pad = "x" * 1024

        async def feed() -> None:
            """Emit the messages as fast as the layer takes them."""
            for n in range(count):
                await send("jobs-tlsbench", {"n": n, "pad": pad})

        feeder = asyncio.create_task(feed())
        for _ in range(count):
            await ws.recv()
        await feeder
        return time.perf_counter() - started


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process and its children."""
    parent = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [parent, *parent.children(recursive=True)])


def database_figures(state: Path, count: int, token: str, job: int) -> list[dict[str, Any]]:
    """Handshake figures of a daphne on the bench's SQLite (token and job from it) and one on a
    throwaway PostgreSQL."""
    rows = []
    # Its own directory: PostgreSQL runs as the postgres user, who cannot enter the bench's 0700 one.
    workdir = Path(tempfile.mkdtemp(prefix="awx_ws-bench-pg-"))
    postgres = PostgresServer(free_port(), workdir).start()
    try:
        databases = (
            ("sqlite", os.environ["DATABASE_URL"], token, job),
            ("postgresql", postgres.url, *seed(postgres.url)),
        )
        for name, url, token, job in databases:
            node = DaphneNode(state / "logs", {"DATABASE_URL": url, "LOG_LEVEL": "WARNING"}).start()
            try:
                figures = asyncio.run(handshakes(node.url, token, job, count, None))
            finally:
                node.stop()
            rows.append({"kind": name, "scenario": f"{count} connect + subscribe, one by one", **figures})
    finally:
        postgres.stop(signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def tls_figures(state: Path, token: str, job: int, count: int, messages: int) -> list[dict[str, Any]]:
    """Handshakes and nginx's CPU per 1,000 messages, plain and TLS, in front of one daphne."""
    from awx_ws.main.management.commands.tls_cert import self_signed

    cert_pem, key_pem = self_signed(["127.0.0.1", "localhost"])
    certificate, key = state / "bench-cert.pem", state / "bench-key.pem"
    certificate.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    trust = ssl.create_default_context(cafile=str(certificate))
    node = DaphneNode(state / "logs", {"LOG_LEVEL": "WARNING"}).start()
    front = Nginx(state / f"nginx-tls-{free_port()}", node.port, free_port(), tls=(certificate, key)).start()
    rows = []
    try:
        for name, url, context in (
            ("nginx plain", f"ws://127.0.0.1:{front.port}", None),
            ("nginx TLS", f"wss://127.0.0.1:{front.tls_port}", trust),
        ):
            figures = asyncio.run(handshakes(url, token, job, count, context))
            cpu0 = cpu_of(front.pid)
            seconds = asyncio.run(receive_many(url, token, messages, context))
            nginx_cpu = cpu_of(front.pid) - cpu0
            rows.append(
                {
                    "kind": name,
                    "scenario": f"{count} handshakes; {messages} x 1 KiB to one client",
                    **figures,
                    "messages_per_s": messages / seconds,
                    "nginx_cpu_ms_per_1000": nginx_cpu * 1e6 / messages,
                }
            )
    finally:
        front.stop()
        node.stop()
    return rows


def describe(rows: list[dict[str, Any]]) -> str:
    """The figures as printed lines."""
    lines = []
    for r in rows:
        line = (
            f"{r['kind']:<12} {r['scenario']}: connect p50 {r['connect_p50_ms']:.1f} ms "
            f"(p99 {r['connect_p99_ms']:.1f}), subscribe p50 {r['subscribe_p50_ms']:.1f} ms "
            f"(p99 {r['subscribe_p99_ms']:.1f})"
        )
        if "nginx_cpu_ms_per_1000" in r:
            line += (
                f"; {r['messages_per_s']:.0f} msgs/s, nginx CPU {r['nginx_cpu_ms_per_1000']:.1f} ms per 1,000"
            )
        lines.append(line)
    return "\n".join(lines)
