"""History is kept for groups someone could resume, and only those: a group with a member, or one
whose last member left within the history age. Resumes stay exact across the edges."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.client import emit_to, redis_at
from tests.sse import open_sse
from tests.waiting import eventually

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.both_runners]

# Schedules groups keep 5 s of history here: a left group's mark lasts 5 + 1 (HISTORY_CLOCK_SKEW)
# + 1 seconds (history.resumable_for). A resume must come within the age of its position, so the
# age leaves room for a loaded machine between a test's read and its resume.
SHORT = {"control": None, "schedules": {"age": 5}}
# For tests whose steps (a kill, a daphne's start) take seconds of their own on a loaded machine: a
# 2 s age would turn their resume into "older than the history age" before the purge is reached.
LONG = {"control": None, "schedules": {"age": 600}}


@pytest.fixture
def kinds():
    """The history settings of the test's daphnes and emits."""
    return SHORT


@pytest.fixture
def node(daphne_factory, own_redis, settings, kinds):
    """A daphne on a Redis of the test's own; the test's emits use the same history settings."""
    settings.AWX_WS = {**settings.AWX_WS, "HISTORY_KINDS": kinds}
    return daphne_factory({"REDIS_URL": own_redis.url, "AWX_WS_HISTORY_KINDS": json.dumps(kinds)})


@pytest.fixture
def auth_headers(token):
    return {"Authorization": f"Token {token}"}


@pytest.fixture
async def redis(own_redis):
    connection = redis_at(own_redis.url)
    yield connection
    await connection.aclose()


async def emit(own_redis, group: str, numbers: range) -> None:
    for n in numbers:
        await emit_to(own_redis.url, group, {"n": n})


async def test_a_group_nobody_watched_keeps_no_history_and_its_first_subscriber_resumes_exactly(
    node, own_redis, redis, auth_headers
):
    group = f"schedules-unwatched{time.monotonic_ns()}"
    await emit(own_redis, group, range(3))
    assert await redis.exists(f"asgi:history:{group}") == 0  # nobody could resume those

    async with open_sse(node.http_url, group, headers=auth_headers) as first:
        await first.wait_ready()
        start = first.last_id
        await emit(own_redis, group, range(3, 8))
        assert await first.payloads(5) == [{"n": n} for n in range(3, 8)]
    async with open_sse(node.http_url, group, headers=auth_headers, last_event_id=start) as resumed:
        assert await resumed.payloads(5) == [{"n": n} for n in range(3, 8)]
        await resumed.assert_silent()


async def test_a_group_left_lately_keeps_history_until_nobody_could_resume_it(
    node, own_redis, redis, auth_headers
):
    group = f"schedules-left{time.monotonic_ns()}"
    async with open_sse(node.http_url, group, headers=auth_headers) as watcher:
        await watcher.wait_ready()
        await emit(own_redis, group, range(2))
        assert await watcher.payloads(2) == [{"n": 0}, {"n": 1}]
        position = watcher.last_id
    await eventually(lambda: redis.exists(f"asgi:watched:{group}"), 10, "the leave to be marked")
    # Nobody watches now, but the client that left may come back within the history age.
    await emit(own_redis, group, range(2, 5))
    async with open_sse(node.http_url, group, headers=auth_headers, last_event_id=position) as back:
        assert await back.payloads(3) == [{"n": 2}, {"n": 3}, {"n": 4}]
        position = back.last_id
    # Once the mark is gone, no position can reach back that far: emits keep nothing again, and
    # a resume from before them says its history is gone instead of skipping them.
    await eventually(_gone(redis, f"asgi:watched:{group}"), 30, "the leave mark to expire")
    await emit(own_redis, group, range(5, 7))
    assert await redis.exists(f"asgi:history:{group}") == 0
    async with open_sse(node.http_url, group, headers=auth_headers, last_event_id=position) as late:
        reset = await late.next_event()
        assert reset.event == "stream-reset"
        assert json.loads(reset.data) == {"groups": {group: "older than the history age"}}


def _gone(redis, key: str):
    async def check() -> bool:
        return await redis.exists(key) == 0

    return check


@pytest.mark.parametrize("kinds", [LONG])
async def test_a_killed_daphnes_groups_keep_history_through_the_purge(
    daphne_factory, node, own_redis, redis, auth_headers, kinds
):
    group = f"schedules-killed{time.monotonic_ns()}"
    async with open_sse(node.http_url, group, headers=auth_headers) as watcher:
        await watcher.wait_ready()
        await emit(own_redis, group, range(1))
        assert await watcher.payloads(1) == [{"n": 0}]
        position = watcher.last_id
        os.kill(node.pid, signal.SIGKILL)
        node.proc.wait(10)
    await emit(own_redis, group, range(1, 3))  # its membership is still there: kept
    # The next daphne's start-up purge removes the dead membership and marks the leave.
    successor = daphne_factory({"REDIS_URL": own_redis.url, "AWX_WS_HISTORY_KINDS": json.dumps(kinds)})
    assert await redis.exists(f"asgi:watched:{group}") == 1
    await emit(own_redis, group, range(3, 5))
    async with open_sse(successor.http_url, group, headers=auth_headers, last_event_id=position) as back:
        assert await back.payloads(4) == [{"n": n} for n in range(1, 5)]
        await back.assert_silent()
