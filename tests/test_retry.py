"""The supervised-retry helper every background loop runs on (retry.py): pure rules, in-process."""

from __future__ import annotations

import asyncio
import logging

import pytest

from awx_ws.main.exceptions import RedisUnavailable
from awx_ws.main.retry import Backoff, FailureLog, RetryPolicy, spawn
from tests.waiting import eventually

pytestmark = pytest.mark.unit

FAST = RetryPolicy(base=0.001, cap=0.002, log_every=60.0)


def test_backoff_doubles_up_to_its_cap_with_jitter():
    backoff = Backoff(base=0.1, cap=5.0)
    delays = [backoff.next_delay() for _ in range(12)]
    ceilings = [min(5.0, 0.1 * 2**n) for n in range(12)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert backoff.failures == 12


def test_backoff_survives_any_number_of_failures():
    """`0.1 * 2**failures` raised OverflowError after about 1,024 failures (85 minutes of outage)."""
    backoff = Backoff(base=0.1, cap=5.0, failures=10**9)
    assert 2.5 <= backoff.next_delay() <= 5.0
    backoff.reset()
    assert backoff.failures == 0 and backoff.next_delay() <= 0.1


def test_backoff_refuses_a_base_above_its_cap():
    with pytest.raises(ValueError, match="0 < base <= cap"):
        Backoff(base=2.0, cap=1.0)


async def test_a_failing_round_is_retried_until_it_works_and_logged_twice(caplog):
    caplog.set_level(logging.INFO, logger="awx_ws.main.retry")
    calls: list[int] = []
    done = asyncio.Event()

    async def round_(failures: int) -> float:
        calls.append(failures)
        if len(calls) <= 50:
            raise RedisUnavailable("REDIS_URL=redis://nowhere: connection refused")
        done.set()
        return 60.0

    task = spawn("test loop", round_, FAST)
    await asyncio.wait_for(done.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Each round is told how many failed before it.
    assert calls == list(range(51))
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("test loop failed 1 time(s) in a row; retrying")
    assert "REDIS_URL=redis://nowhere" in messages[0]
    assert messages[1] == "test loop works again after 50 failed round(s)"


async def test_a_bug_in_a_round_is_logged_with_its_traceback_once_and_the_loop_goes_on(caplog):
    caplog.set_level(logging.INFO, logger="awx_ws.main.retry")
    calls = 0
    done = asyncio.Event()

    async def round_(failures: int) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise KeyError("a programming error")
        done.set()
        await asyncio.Event().wait()

    task = spawn("buggy loop", round_, FAST)
    await asyncio.wait_for(done.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is KeyError
    assert calls == 4  # restarted after each failure


async def test_cancelling_a_loop_stops_it_whatever_it_was_doing():
    started = asyncio.Event()

    async def round_(failures: int) -> None:
        started.set()
        await asyncio.sleep(3600)

    task = spawn("sleepy loop", round_, FAST)
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_cancel_lost_inside_a_round_still_stops_the_loop():
    """Python 3.11's asyncio.wait_for, which redis-py awaits for every command it sends, drops a
    cancellation that arrives as its work finishes: the loop must end all the same, at once."""
    waiting = asyncio.Event()
    rounds = 0

    async def round_(failures: int) -> float:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            waiting.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # dropped, as that wait_for drops it (the task stays cancelling())
        return 0.01

    task = spawn("lossy loop", round_, FAST)
    await waiting.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    if not done:  # the loop ran on: stop it for good before failing
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task in done and task.cancelled()
    assert rounds == 1


async def test_a_round_sets_the_pause_before_the_next():
    times: list[float] = []
    loop = asyncio.get_running_loop()

    async def round_(failures: int) -> float:
        times.append(loop.time())
        return 0.05

    task = spawn("paced loop", round_, FAST)
    await eventually(lambda: len(times) >= 3, 5, "three rounds of the paced loop")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(later - earlier >= 0.05 for earlier, later in zip(times, times[1:], strict=False))


def test_failures_that_are_not_retried_are_logged_once_then_once_a_minute(caplog):
    caplog.set_level(logging.INFO, logger="awx_ws.main.retry")
    reports = FailureLog("fan-out delivery", 60.0)
    for _ in range(100):
        reports.occurred(RedisUnavailable("one message lost"))
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("fan-out delivery failed 1 time(s) (1 since")
    for _ in range(100):
        reports.occurred(KeyError("a bug"))  # a bug's traceback is shown, once
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_a_relay_back_off_cap_below_its_first_step_starts_at_the_cap():
    policy = RetryPolicy(base=1.0, cap=0.5)
    assert policy.base == 0.5
    with pytest.raises(ValueError, match="cap above 0"):
        RetryPolicy(base=0.1, cap=0)
