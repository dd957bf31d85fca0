"""daphne start-up: a bounded wait for Redis, then one clear message; lifespan around the server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

from redis.asyncio import Redis

from tests.client import open_ws
from tests.servers import ROOT, RedisServer, free_port


def wait_exit(server, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = server.proc.poll()
        if code is not None:
            return code
        time.sleep(0.1)
    raise AssertionError(f"daphne still running after {timeout}s:\n{server.output()}")


def test_unreachable_redis_stops_daphne_with_one_clear_message(daphne_factory):
    port = free_port()
    server = daphne_factory(
        {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "AWX_WS_STARTUP_REDIS_WAIT": "2"}, wait=False
    )
    assert wait_exit(server) == 1
    log = server.output()
    critical = [line for line in log.splitlines() if " CRITICAL " in line]
    assert len(critical) == 1
    assert "cannot start: Redis unreachable for 2s (AWX_WS_STARTUP_REDIS_WAIT)" in critical[0]
    assert f"REDIS_URL=redis://127.0.0.1:{port}/0" in critical[0]
    # One warning when the wait starts, not one per attempt (AWX #7266 logged attempt 2644).
    assert len([line for line in log.splitlines() if " WARNING " in line]) == 1
    assert "Traceback" not in log


async def test_daphne_waits_for_a_redis_that_comes_up_late(daphne_factory, state_dir, token):
    port = free_port()
    env = {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "AWX_WS_STARTUP_REDIS_WAIT": "60"}
    server = daphne_factory(env, wait=False)
    await asyncio.sleep(1.5)
    assert server.proc.poll() is None
    late_redis = RedisServer(port, state_dir / "late-redis").start()
    try:
        await asyncio.to_thread(server.wait_for_port, server.port, 30)
        assert "waiting up to 60s for Redis" in server.output()
        client = await open_ws(server.url, headers={"Authorization": f"Token {token}"})
        await client.subscribe({"jobs": ["status_changed"]})
        redis = Redis.from_url(late_redis.url)
        assert await redis.zcard("asgi:group:jobs-status_changed") == 1
        await redis.aclose()
        await client.close()
    finally:
        server.stop()
        late_redis.stop()


async def test_graceful_stop_withdraws_the_liveness_record(daphne_factory, redis_server):
    server = daphne_factory()
    redis = Redis.from_url(redis_server.url)
    keys = {key async for key in redis.scan_iter(match="asgi:alive:*")}
    assert server.stop() == 0
    after = {key async for key in redis.scan_iter(match="asgi:alive:*")}
    assert len(keys - after) == 1
    await redis.aclose()


def test_daphne_does_not_cut_websockets_after_a_day():
    from awx_ws.server import CommandLine

    # daphne's own default is 86400 s, which ended every live stream daily (AWX PR #3424).
    assert CommandLine().parser.parse_args(["config.asgi:application"]).websocket_timeout == -1


def test_a_liveness_interval_too_close_to_the_ttl_is_refused():
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**os.environ, "AWX_WS_LIVENESS_TTL": "30", "AWX_WS_LIVENESS_INTERVAL": "20"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "AWX_WS_LIVENESS_INTERVAL=20 must be at most half of AWX_WS_LIVENESS_TTL=30" in result.stderr
