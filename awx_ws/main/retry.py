"""The one way background loops run: supervised rounds, capped back-off with jitter, quiet logs.

Every long-lived loop of the service (the fan-out's receive loop and its membership sync, the
liveness heartbeat, the interest announcer and watchers, the relay's links and status) is written
as *one round* of work and handed to `supervise`. A round that fails is retried after a back-off
that doubles up to a cap, with jitter so that processes which lost Redis together do not come back
in lock-step; a round that returns is followed by the next one after the pause it asked for.
Whatever a round raises, the loop goes on: an outage of any length ends in recovery, never in a
dead task (an earlier hand-written `0.1 * 2**failures` overflowed after ~1,024 failures).

Logs stay readable through an outage: one line when a loop starts failing, then one line per
RETRY_LOG_EVERY seconds with the count, and one when it recovers. An exception nobody expected (a
programming error, not a lost connection) is logged with its traceback, once per burst.
`asyncio.CancelledError` always ends the loop: that is how tasks are stopped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn

from awx_ws.main.exceptions import AwxWsError

logger = logging.getLogger(__name__)

# A round: called with the number of rounds that failed in a row before it (0 after a success);
# returns the seconds to pause before the next round (None or 0: at once).
Round = Callable[[int], Awaitable[float | None]]

# Failures that are part of life (the channel layer or a peer unreachable): logged in one line.
# Anything else is a bug and gets its traceback. A backend whose library has errors of its own
# (redis-py's are not OSErrors) declares them with `expect`.
EXPECTED: tuple[type[BaseException], ...] = (OSError, TimeoutError, AwxWsError)


def expect(*errors: type[BaseException]) -> None:
    """Count errors among the expected failures of background loops (a backend's library errors)."""
    global EXPECTED
    EXPECTED = (*EXPECTED, *(error for error in errors if error not in EXPECTED))


# The exponent stops growing here: 2.0**40 times any sane base is far past every cap, and float
# arithmetic on it cannot overflow however long an outage lasts.
_MAX_EXPONENT = 40


def raise_if_cancelled() -> None:
    """Raise CancelledError if this task was cancelled and the cancellation got lost on its way.

    Python 3.11's asyncio.wait_for, which redis-py awaits for every command it sends (its
    socket_timeout), returns the result of its inner task when that finished in the same instant
    as the cancellation arrived, and drops the cancellation (cpython#86296, fixed in 3.12): the
    task runs on, cancelling() for good, and every later asyncio.timeout in it ends as a plain
    timeout. Loops that talk to Redis call this once per pass, where no timeout is active.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@dataclass
class Backoff:
    """Exponential back-off from `base` seconds, capped at `cap`, with "equal jitter"."""

    base: float
    cap: float
    failures: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"back-off needs 0 < base <= cap, got base={self.base} cap={self.cap}")

    def next_delay(self) -> float:
        """Count one more failure; the seconds to wait before trying again."""
        self.failures += 1
        ceiling = min(self.cap, self.base * 2.0 ** min(self.failures - 1, _MAX_EXPONENT))
        # Half fixed, half random: never 0 (no busy loop), never in lock-step with other processes.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        """Back to the first step (after a success)."""
        self.failures = 0


@dataclass
class RetryPolicy:
    """How a supervised loop backs off and how often it may log while failing."""

    base: float
    cap: float
    log_every: float = 60.0

    def __post_init__(self) -> None:
        if not self.cap > 0:
            raise ValueError(f"a retry policy needs a cap above 0 seconds, got {self.cap}")
        # A first step above the cap (a relay back-off cap under 1 s) starts at the cap.
        self.base = min(self.base, self.cap)

    @classmethod
    def from_settings(cls) -> RetryPolicy:
        """The service-wide policy: AWX_WS_RETRY_DELAY, _RETRY_MAX_DELAY, _RETRY_LOG_EVERY."""
        from awx_ws.main.conf import ws_settings

        return cls(ws_settings.RETRY_DELAY, ws_settings.RETRY_MAX_DELAY, ws_settings.RETRY_LOG_EVERY)


@dataclass
class FailureLog:
    """One loop's failure reports: the first of a burst, then at most one per `every` seconds."""

    name: str
    every: float
    log: logging.Logger = field(default=logger)
    # False: expected failures are the caller's to report (on_failure); bugs are still logged here.
    report_expected: bool = True
    _last: float = field(default=-float("inf"))
    _since_last: int = 0
    _traceback_logged: bool = False
    _occurrences: int = 0

    def occurred(self, exc: BaseException) -> None:
        """Report one failure of work that is not retried (a message that could not be
        delivered): the first is logged, then at most one line per `every` seconds."""
        self._occurrences += 1
        self.failed(self._occurrences, exc, retrying=False)

    def failed(self, failures: int, exc: BaseException, retrying: bool = True) -> None:
        """Report failure number `failures` of the current burst (quietly after the first)."""
        self._since_last += 1
        now = time.monotonic()
        unexpected = not isinstance(exc, EXPECTED)
        if unexpected and not self._traceback_logged:
            # A bug, not an outage: the traceback is what someone needs, once per burst.
            self._traceback_logged = True
            self.log.error(
                "%s failed unexpectedly (%d time(s)%s)",
                self.name,
                failures,
                "; retrying" if retrying else "",
                exc_info=exc,
            )
        elif not unexpected and not self.report_expected:
            return
        elif failures == 1 or now - self._last >= self.every:
            self.log.warning(
                "%s failed %d time(s)%s (%d since the last report): %s: %s",
                self.name,
                failures,
                " in a row; retrying" if retrying else "",
                self._since_last,
                type(exc).__name__,
                exc,
            )
        else:
            return
        self._last = now
        self._since_last = 0

    def recovered(self, failures: int) -> None:
        """Report that the loop works again after `failures` failed rounds."""
        if self.report_expected:
            self.log.info("%s works again after %d failed round(s)", self.name, failures)
        self._last = -float("inf")
        self._since_last = 0
        self._traceback_logged = False


async def supervise(
    name: str,
    round_: Round,
    policy: RetryPolicy | None = None,
    *,
    on_failure: Callable[[BaseException], None] | None = None,
    healthy_after: float | None = None,
    log: logging.Logger | None = None,
    metric: str | None = None,
    report_expected: bool = True,
) -> NoReturn:
    """Run `round_` forever; see the module docstring. Ends only by cancellation.

    on_failure is told of each failed round (a state change). A round that ran for healthy_after
    seconds or more before it failed counts as a fresh start: the back-off begins again from its
    first step (a relay link that was up for a while and then dropped). Failed rounds are counted
    in awx_ws_background_failures_total{task=metric or name}. With report_expected=False the
    caller logs expected failures itself (in on_failure); unexpected ones are still logged here.
    """
    policy = policy or RetryPolicy.from_settings()
    backoff = Backoff(policy.base, policy.cap)
    reports = FailureLog(name, policy.log_every, log or logger, report_expected)
    from awx_ws.main import metrics  # prometheus_client must load after the settings

    failed_rounds = metrics.BACKGROUND_FAILURES.labels(metric or name)
    while True:
        raise_if_cancelled()
        started = time.monotonic()
        try:
            pause = await round_(backoff.failures)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if healthy_after is not None and time.monotonic() - started >= healthy_after:
                backoff.reset()
            failed_rounds.inc()
            delay = backoff.next_delay()
            reports.failed(backoff.failures, exc)
            _tell(on_failure, exc, name, log or logger)
            await asyncio.sleep(delay)
            continue
        if backoff.failures:
            reports.recovered(backoff.failures)
            backoff.reset()
        if pause:
            await asyncio.sleep(pause)
        else:
            # Yield even when a round needs no pause, so a round that never awaits cannot starve
            # the loop.
            await asyncio.sleep(0)


def _tell(
    on_failure: Callable[[BaseException], None] | None, exc: BaseException, name: str, log: logging.Logger
) -> None:
    """Tell on_failure of exc; its own bug is logged and must not end the loop it reports on."""
    if on_failure is None:
        return
    try:
        on_failure(exc)
    except Exception:
        log.exception("%s: reporting a failure failed", name)


def spawn(
    name: str,
    round_: Round,
    policy: RetryPolicy | None = None,
    *,
    on_failure: Callable[[BaseException], None] | None = None,
    metric: str | None = None,
) -> asyncio.Task[None]:
    """Start `supervise(...)` as a task named `name` on the running loop."""
    work = supervise(name, round_, policy, on_failure=on_failure, metric=metric)
    task = asyncio.get_running_loop().create_task(work, name=name)
    task.add_done_callback(_report_end)
    return task


def _report_end(task: asyncio.Task[None]) -> None:
    """A supervised loop ends only when cancelled; anything else is said, with its traceback."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("background loop %s ended", task.get_name(), exc_info=task.exception())
