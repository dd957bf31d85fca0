"""Start-up under both runners: a bounded wait for Redis with one clear message, the purge and the
fan-out without lifespan under plain daphne, settings refused before anything runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from tests.client import open_ws, redis_at, refused_status
from tests.servers import ROOT, RedisServer, free_port
from tests.sse import refused

pytestmark = pytest.mark.both_runners


def wait_exit(server, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = server.proc.poll()
        if code is not None:
            return code
        time.sleep(0.1)
    raise AssertionError(f"daphne still running after {timeout}s:\n{server.output()}")


def lines(log: str, level: str) -> list[str]:
    return [line for line in log.splitlines() if f" {level} " in line]


@pytest.mark.parametrize("runner", ["awx_ws.server"], indirect=True)
def test_awx_ws_server_stops_with_one_clear_message_when_redis_stays_unreachable(daphne_factory):
    port = free_port()
    server = daphne_factory(
        {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "AWX_WS_STARTUP_LAYER_WAIT": "2"}, wait=False
    )
    assert wait_exit(server) == 1
    log = server.output()
    critical = lines(log, "CRITICAL")
    assert len(critical) == 1
    assert "cannot start: Redis unreachable for 2s (AWX_WS_STARTUP_LAYER_WAIT)" in critical[0]
    assert f"REDIS_URL=redis://127.0.0.1:{port}/0" in critical[0]
    # One warning when the wait starts, not one per attempt (AWX #7266 logged attempt 2644).
    assert len(lines(log, "WARNING")) == 1
    assert "Traceback" not in log


# hypercorn's worker too: its master would exit 0 if the worker failed, unnoticed by a supervisor.
@pytest.mark.parametrize("runner", ["daphne", "hypercorn"], indirect=True)
async def test_plain_daphne_refuses_clients_while_redis_is_unreachable_then_serves(
    daphne_factory, state_dir, token
):
    port = free_port()
    # The wait's former name, still honoured for one release (with a warning).
    env = {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "AWX_WS_STARTUP_REDIS_WAIT": "2"}
    server = daphne_factory(env, wait=False)
    await asyncio.to_thread(server.wait_for_port, server.port)
    headers = {"Authorization": f"Token {token}"}
    assert await asyncio.to_thread(server.wait_for_output, "cannot start", 30)
    # The process stays up (no crash loop) and says no to what needs the channel layer.
    assert server.proc.poll() is None
    assert await refused_status(server.url, headers=headers) == 403
    status, body = await refused(server.http_url, "jobs-status_changed", headers)
    assert status == 503 and "Redis unreachable for 2s" in body["detail"]
    error = lines(server.output(), "ERROR")
    assert len(error) == 1
    assert "cannot start: Redis unreachable for 2s (AWX_WS_STARTUP_LAYER_WAIT)" in error[0]
    assert f"REDIS_URL=redis://127.0.0.1:{port}/0" in error[0]
    deprecated = [line for line in lines(server.output(), "WARNING") if "is deprecated" in line]
    assert len(deprecated) == 1
    assert (
        "AWX_WS_STARTUP_REDIS_WAIT is deprecated and will be ignored in the next release: " in deprecated[0]
    )

    # Redis comes up: the same process completes its start-up and serves.
    late_redis = RedisServer(port, state_dir / f"late-redis-{port}").start()
    try:
        assert await asyncio.to_thread(server.wait_for_output, "start-up complete", 30)
        client = await open_ws(server.url, headers=headers)
        await client.subscribe({"jobs": ["status_changed"]})
        redis = redis_at(late_redis.url)
        try:
            assert await redis.zcard("asgi:group:jobs-status_changed") == 1
        finally:
            await redis.aclose()
        await client.close()
        assert "Traceback" not in server.output()
    finally:
        server.stop()
        late_redis.stop()


async def test_a_server_waits_for_a_redis_that_comes_up_late(daphne_factory, state_dir, token):
    port = free_port()
    env = {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "AWX_WS_STARTUP_REDIS_WAIT": "60"}
    server = daphne_factory(env, wait=False)
    assert await asyncio.to_thread(server.wait_for_output, "waiting up to 60s for Redis", 30)
    assert server.proc.poll() is None
    late_redis = RedisServer(port, state_dir / f"late-redis-{port}").start()
    try:
        await asyncio.to_thread(server.wait_for_port, server.port, 30)
        client = await open_ws(server.url, headers={"Authorization": f"Token {token}"})
        await client.subscribe({"jobs": ["status_changed"]})
        redis = redis_at(late_redis.url)
        try:
            assert await redis.zcard("asgi:group:jobs-status_changed") == 1
            alive = [key async for key in redis.scan_iter(match="asgi:alive:*")]
            assert len(alive) == 1  # marked live by its start-up, under either runner
        finally:
            await redis.aclose()
        await client.close()
    finally:
        server.stop()
        late_redis.stop()


async def test_graceful_stop_withdraws_memberships_and_the_liveness_record(daphne_factory, own_redis, token):
    server = daphne_factory({"REDIS_URL": own_redis.url})
    redis = redis_at(own_redis.url)
    client = await open_ws(server.url, headers={"Authorization": f"Token {token}"})
    await client.subscribe({"jobs": ["status_changed"]})
    assert await redis.zcard("asgi:group:jobs-status_changed") == 1
    assert len([key async for key in redis.scan_iter(match="asgi:alive:*")]) == 1
    assert await asyncio.to_thread(server.stop) == 0
    assert await redis.zcard("asgi:group:jobs-status_changed") == 0
    assert [key async for key in redis.scan_iter(match="asgi:alive:*")] == []
    assert [key async for key in redis.scan_iter(match="asgi:interest:*")] == []


async def test_start_up_runs_before_any_client_under_either_runner(daphne_factory, state_dir):
    """The purge and the fan-out start when the server does, not at a first connection."""
    redis_server = RedisServer(free_port(), state_dir / f"boot-redis-{time.monotonic_ns()}").start()
    try:
        daphne_factory({"REDIS_URL": redis_server.url})  # waits for "start-up complete"
        redis = redis_at(redis_server.url)
        try:
            keys = {key.decode() async for key in redis.scan_iter(match="asgi:*")}
            assert len([key for key in keys if key.startswith("asgi:alive:")]) == 1
            assert len([key for key in keys if key.startswith("asgi:process-stats:")]) == 1
        finally:
            await redis.aclose()
    finally:
        redis_server.stop()


def test_awx_ws_server_does_not_cut_websockets_after_a_day():
    from awx_ws.server import CommandLine

    # daphne's own default is 86400 s, which ended every live stream daily (AWX PR #3424).
    assert CommandLine().parser.parse_args(["config.asgi:application"]).websocket_timeout == -1


async def test_plain_daphnes_daily_websocket_cut_off_is_named_once(daphne_factory, token, runner):
    server = daphne_factory()
    for _ in range(2):
        client = await open_ws(server.url, headers={"Authorization": f"Token {token}"})
        await client.close()
    warnings = [line for line in lines(server.output(), "WARNING") if "--websocket_timeout" in line]
    if runner == "daphne":
        assert len(warnings) == 1
        assert "closes every websocket after 86400s" in warnings[0]
        assert "--websocket_timeout -1" in warnings[0]
    else:
        assert warnings == []


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("AWX_WS_HISTORY_KINDS", "{not json", "AWX_WS_HISTORY_KINDS='{not json' cannot be read"),
        ("AWX_WS_HISTORY_KINDS", '{"jobs": {"length": 0}}', "'jobs': length must be at least 1"),
        ("AWX_WS_SUBSCRIBE_RATE", "0", "AWX_WS_SUBSCRIBE_RATE=0: must be at least 1"),
        ("AWX_WS_EMIT_TIMEOUT", "soon", "AWX_WS_EMIT_TIMEOUT='soon' cannot be read"),
    ],
)
def test_a_bad_setting_stops_the_server_at_start_naming_the_variable(daphne_factory, variable, value, says):
    server = daphne_factory({variable: value}, wait=False)
    assert wait_exit(server, 30) != 0
    log = server.output()
    assert says in log
    assert "start-up complete" not in log


def test_a_bad_setting_stops_manage_py_and_the_api_too():
    # A malformed AWX_WS_HISTORY_KINDS once surfaced as HTTP 500 from POST /api/v2/emit/.
    bad = {"AWX_WS_HISTORY_KINDS": '{"jobs": {"age": "soon"}}'}
    for command in (["manage.py", "check"], ["-m", "gunicorn", "--check-config", "config.wsgi:application"]):
        result = subprocess.run(
            [sys.executable, *command],
            cwd=ROOT,
            env={**os.environ, **bad},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0, command
        assert "AWX_WS_HISTORY_KINDS=" in result.stderr and "'jobs': age must be a number" in result.stderr
