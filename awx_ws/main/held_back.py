"""Events the rate held back: the notice that tells a job's viewers what to fetch from REST.

AWX's flood policy (event_rate.py) stores every event but sends at most the rate of them. AWX's
classic UI never learns of the rest while the job runs: its page stays stale until reloaded
(ansible/awx#15420, #14662, #9747). Here every viewer of the job's event group is sent

    {"group_name": "events_held_back", "unified_job_id": 42, "type": "job",
     "held_back": 9, "ranges": [[31, 39]]}

meaning: the events with these counters are stored and were not sent; fetch them with
`GET /api/v2/jobs/42/job_events/?counter__gt=30&counter__lt=40`. Its `group_name` is one no AWX
client reads (AWX's UI and awxkit dispatch on `<kind>_events` and `jobs`), so they ignore it.

At most one notice a second per job, however many requests a flood comes in: a request that holds
events back sends the notice itself when none went out in the last second, and otherwise leaves
its ranges pending in the job's window row (models.WebsocketEventRate, locked by the request) and
asks this process's timer to send them when the second is over. The API's processes are
synchronous (gunicorn), so the timer is one daemon thread per process, started on first use. A
process killed before its timer fires leaves the ranges pending: the job's next request sends
them, and the job's summary says how many were held back in all.
"""

from __future__ import annotations

import atexit
import heapq
import logging
import os
import threading
import time
from typing import Any

from django.db import close_old_connections, transaction

from awx_ws.main import metrics
from awx_ws.main.emit import emit_on_commit
from awx_ws.main.event_rate import WINDOW, Ranges, merge_ranges, notice_due
from awx_ws.main.history import organization_share
from awx_ws.main.models import Job, WebsocketEventRate

logger = logging.getLogger(__name__)

GROUP_NAME = "events_held_back"


def notice_payload(job_id: int, kind: str, ranges: Ranges, count: int) -> dict[str, Any]:
    """The notice for a job's viewers: which counters to fetch, and how many events they hold."""
    return {
        "group_name": GROUP_NAME,
        "unified_job_id": job_id,
        "type": kind,
        "held_back": count,
        "ranges": ranges,
    }


def record(window: WebsocketEventRate, ranges: Ranges, count: int, now: float) -> tuple[Ranges, int] | None:
    """Add a request's held-back ranges to the job's locked window row (saved by the caller).

    Returns the ranges and count to announce now, or None when a notice went out less than a
    second ago (the timer is then asked to send it: `schedule`)."""
    window.pending = merge_ranges(window.pending, ranges)
    window.pending_count += count
    if not notice_due(window.pending, window.announced, now):
        return None
    return _take(window, now)


def _take(window: WebsocketEventRate, now: float) -> tuple[Ranges, int]:
    """The window's pending ranges and count, handed over to a notice sent now."""
    due = (window.pending, window.pending_count)
    window.pending, window.pending_count, window.announced = [], 0, now
    return due


class Timer:
    """Sends the notices a window delayed, when their second is over: one thread per process."""

    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._jobs: dict[int, tuple[float, str, str]] = {}  # job id -> (when, group, job kind)
        self._due: list[tuple[float, int]] = []  # (when, job id), a heap; stale entries skipped
        self._thread: threading.Thread | None = None
        self._pid = 0

    def schedule(self, job_id: int, group: str, kind: str, when: float) -> None:
        """Send job_id's pending notice at when (seconds since the epoch), or soon after; one
        entry per job, however many requests a flood comes in."""
        with self._wake:
            # A forked worker (gunicorn) inherits the object but not the thread.
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                if self._pid == 0:
                    # A worker that exits (gunicorn's max-requests, a HUP) sends what it holds.
                    atexit.register(self.flush_all)
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="held-back notices", daemon=True)
                self._thread.start()
            current = self._jobs.get(job_id)
            if current is None or when < current[0]:
                self._jobs[job_id] = (when, group, kind)
                heapq.heappush(self._due, (when, job_id))
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.time():
                    self._wake.wait(self._due[0][0] - time.time() if self._due else None)
                when, job_id = heapq.heappop(self._due)
                if self._jobs.get(job_id, (None,))[0] != when:
                    continue  # replaced by an earlier time, and sent then
                _, group, kind = self._jobs.pop(job_id)
            self._send(job_id, group, kind)

    def _send(self, job_id: int, group: str, kind: str, force: bool = False) -> None:
        try:
            self.flush(job_id, group, kind, force)
        except Exception:
            # A lost database: the ranges stay pending, for the job's next stored events; the
            # job's summary counts them in any case. The thread goes on with the next job.
            metrics.BACKGROUND_FAILURES.labels("held_back_notices").inc()
            logger.exception("could not send the held-back notice of job %s", job_id)
        finally:
            close_old_connections()  # a connection past CONN_MAX_AGE or broken is not kept

    def flush_all(self) -> None:
        """Send every pending notice now, due or not: this process is about to exit."""
        with self._wake:
            jobs, self._jobs, self._due = self._jobs, {}, []
        for job_id, (_, group, kind) in jobs.items():
            self._send(job_id, group, kind, force=True)

    def flush(self, job_id: int, group: str, kind: str, force: bool = False) -> None:
        """Send the job's pending notice if its second is over (or force); ask again later if not."""
        close_old_connections()  # this thread's connection may have outlived CONN_MAX_AGE
        with transaction.atomic():
            window = WebsocketEventRate.objects.select_for_update().filter(job_id=job_id).first()
            if window is None or not window.pending:
                return  # a request sent it, or the job is gone
            now = time.time()
            if not force and not notice_due(window.pending, window.announced, now):
                self.schedule(job_id, group, kind, window.announced + WINDOW)
                return
            notice = notice_payload(job_id, kind, *_take(window, now))
            window.save(update_fields=["pending", "pending_count", "announced"])
            transaction.on_commit(metrics.HELD_BACK_NOTICES.labels("timer").inc)  # counted, then sent
            organization = Job.objects.filter(pk=job_id).values_list("organization_id", flat=True).first()
            emit_on_commit([(group, notice)], share=organization_share(organization))


timer = Timer()
