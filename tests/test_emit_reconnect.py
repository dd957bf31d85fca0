"""A sync emit rides through Redis being unreachable for a while (a restart, a Sentinel failover):
it tries again until AWX_WS_EMIT_TIMEOUT, and what it could not send is reported as not sent.

Redis is reached through a TCP proxy the test cuts (tests/link_proxy.py): while cut, every
connection is reset on arrival, as a dead master's port refuses them, and Redis keeps its state.
The emitter is a process of its own (its settings read the environment given); the failover
itself is test_sentinel.py's.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.link_proxy import LinkProxy
from tests.servers import ROOT, free_port
from tests.waiting import eventually

STATUS = "jobs-status_changed"

EMIT_SCRIPT = """
import json, sys, time
import django
django.setup()
from awx_ws.main.emit import emit_channel_notification, emit_channel_notifications
from awx_ws.main.exceptions import BatchEmitError, EmitError
started = time.monotonic()
try:
    if sys.argv[1] == "single":
        emit_channel_notification("jobs-status_changed", {"n": 0})
    else:
        emit_channel_notifications([("jobs-status_changed", {"n": n}) for n in range(6)])
except BatchEmitError as exc:
    print(json.dumps({"error": str(exc), "where": exc.cause.where,
                      "sent": exc.sent, "unsent": exc.unsent, "unknown": exc.unknown}))
except EmitError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"error": None, "seconds": time.monotonic() - started}))
"""


@pytest.fixture
async def proxy(own_redis) -> AsyncIterator[LinkProxy]:
    """The test's own Redis behind a proxy the test cuts and heals."""
    link = await LinkProxy(free_port(), own_redis.port).start()
    yield link
    link.close()


async def start_emitter(how: str, redis_port: int, emit_timeout: float) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "AWX_WS_EMIT_TIMEOUT": str(emit_timeout),
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", EMIT_SCRIPT, how, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def outcome(emitter: asyncio.subprocess.Process) -> dict[str, Any]:
    out, err = await asyncio.wait_for(emitter.communicate(), timeout=60)
    assert emitter.returncode == 0, err.decode()
    assert b"Traceback" not in err, err.decode()
    return dict(json.loads(out))


@pytest.mark.parametrize("how", ["single", "batch"])
async def test_an_emit_made_while_redis_is_unreachable_is_delivered_once_it_answers(layer, proxy, how):
    channel = await layer.new_channel()
    await layer.group_add(STATUS, channel)
    proxy.cut()
    emitter = await start_emitter(how, proxy.port, emit_timeout=60)
    try:
        # The emit was turned away, and tried again: it waits for Redis rather than failing.
        await eventually(lambda: proxy.turned_away >= 2, timeout=30)
        assert emitter.returncode is None
        proxy.heal()
        result = await outcome(emitter)
    finally:
        if emitter.returncode is None:
            emitter.kill()
            await emitter.wait()
    assert result["error"] is None
    count = 1 if how == "single" else 6
    received = [await asyncio.wait_for(layer.receive(channel), 10) for _ in range(count)]
    assert [json.loads(message["text"])["n"] for message in received] == list(range(count))
    # Once each: a marker sent after the emit returned comes next.
    await layer.group_send(STATUS, {"type": "internal.message", "text": '{"n": "marker"}'})
    assert json.loads((await asyncio.wait_for(layer.receive(channel), 10))["text"]) == {"n": "marker"}


async def test_a_batch_redis_stays_unreachable_for_fails_at_the_timeout_as_not_sent(layer, proxy):
    proxy.cut()
    result = await outcome(await start_emitter("batch", proxy.port, emit_timeout=1))
    assert (result["sent"], result["unsent"], result["unknown"]) == ([], list(range(6)), [])
    assert result["error"].startswith("batch of 6 notifications failed: 0 sent, 6 not sent, 0 may have")
    assert result["where"] == f"REDIS_URL=redis://127.0.0.1:{proxy.port}/0"
    assert proxy.turned_away >= 2  # it tried again before giving up


async def test_a_single_emit_redis_stays_unreachable_for_fails_at_the_timeout_naming_redis_url(layer, proxy):
    proxy.cut()
    result = await outcome(await start_emitter("single", proxy.port, emit_timeout=1))
    assert result["error"].startswith("emit to 'jobs-status_changed' failed, ")
    assert f"REDIS_URL=redis://127.0.0.1:{proxy.port}/0" in result["error"]
    assert proxy.turned_away >= 2
