"""AWX's websocket payloads for job state changes, emitted only once the change is committed."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from django.db import transaction

from awx_ws.main import held_back, metrics
from awx_ws.main.conf import ws_settings
from awx_ws.main.emit import emit_on_commit
from awx_ws.main.event_rate import WINDOW, Ranges, Verdict, admit, held_back_ranges
from awx_ws.main.history import organization_share
from awx_ws.main.models import Job, JobEvent, WebsocketEventRate
from awx_ws.main.protocol import EVENT_KINDS

logger = logging.getLogger(__name__)

# Job kind -> its event group kind: "job" -> "job_events", "ad_hoc_command" -> "ad_hoc_command_events".
EVENT_GROUP_KIND = {job_kind: group_kind for group_kind, job_kind in EVENT_KINDS.items()}


def status_payload(job: Job) -> dict[str, Any]:
    """The `jobs-status_changed` message AWX sends for a job's current status."""
    payload: dict[str, Any] = {
        "group_name": "jobs",
        "unified_job_id": job.pk,
        "status": job.status,
        "type": job.kind,
    }
    if job.is_terminal and job.finished is not None:
        payload["finished"] = job.finished
    return payload


def summary_payload(job: Job, final_counter: int, held_back: int = 0) -> dict[str, Any]:
    """The `jobs-summary` message AWX sends when a job finishes; `skipped_events` when some of
    its events were held back over the rate (REST has them)."""
    payload: dict[str, Any] = {"group_name": "jobs", "unified_job_id": job.pk, "final_counter": final_counter}
    if held_back:
        payload["skipped_events"] = held_back
    return payload


def event_group(job: Job) -> str:
    """The group a job's events go to: `job_events-<id>` for jobs, `<kind>_events-<id>` for the rest."""
    return f"{EVENT_GROUP_KIND[job.kind]}-{job.pk}"


# An ANSI SGR sequence (colour, bold, reset), as Ansible's coloured output carries them.
_ANSI_SGR = re.compile(r"\x1b\[[0-9;]*m")
_ANSI_RESET = "\x1b[0m"


def truncate_stdout(stdout: str, size: int) -> str:
    """stdout cut to size characters as AWX cuts it for the websocket: the last one replaced by an
    ellipsis, and a reset for every colour left open, so the line after it is not coloured."""
    if size <= 0 or len(stdout) <= size:
        return stdout
    cut = stdout[: size - 1] + "\u2026"
    codes = _ANSI_SGR.findall(cut)
    still_open = sum(1 for code in codes if code != _ANSI_RESET) - codes.count(_ANSI_RESET)
    return cut + _ANSI_RESET * max(still_open, 0)


def event_payload(job: Job, event: JobEvent) -> dict[str, Any]:
    """AWX's job event message: the event's fields, its job id under the kind's name, group_name.

    Its stdout is cut to AWX_WS_EVENT_STDOUT_MAX_BYTES_DISPLAY characters (AWX's
    EVENT_STDOUT_MAX_BYTES_DISPLAY, 1024), except for playbook_on_* events, as AWX does: the
    REST API keeps the whole of it, the websocket and its history carry a bounded message.
    """
    stdout = event.stdout
    if not event.event.startswith("playbook_on"):
        stdout = truncate_stdout(stdout, ws_settings.EVENT_STDOUT_MAX_BYTES_DISPLAY)
    return {
        "id": event.pk,
        job.kind: job.pk,
        "group_name": EVENT_GROUP_KIND[job.kind],
        "counter": event.counter,
        "event": event.event,
        "event_data": event.event_data,
        "stdout": stdout,
        "start_line": event.start_line,
        "end_line": event.end_line,
        "uuid": event.uuid,
        "parent_uuid": event.parent_uuid,
        "failed": event.failed,
        "changed": event.changed,
        "play": event.play,
        "role": event.role,
        "task": event.task,
        "created": event.created,
        "modified": event.modified,
    }


def job_status_changed(job: Job) -> None:
    """Schedule the status message, and the summary when the job has finished."""
    messages = [("jobs-status_changed", status_payload(job))]
    if job.is_terminal:
        final = job.events.order_by("-counter").values_list("counter", flat=True).first() or 0
        held_back = WebsocketEventRate.objects.filter(job=job).values_list("held_back", flat=True).first()
        messages.append(("jobs-summary", summary_payload(job, final, held_back or 0)))
    emit_on_commit(messages)


def job_events_created(job: Job, events: Iterable[JobEvent]) -> None:
    """Schedule the messages of the events the flood policy lets through (event_rate.py), in
    counter order, as one batch, for after the commit of the transaction that stores them; and
    the notice of those it held back (held_back.py), now or within the second."""
    group = event_group(job)
    ordered = sorted(events, key=lambda event: event.counter)
    verdict, notice, later = _admit(job, ordered)
    if verdict.reasons:
        reasons = Counter(verdict.reasons.values())
        transaction.on_commit(lambda: _count_not_sent(reasons))
    sent = [event for event, send in zip(ordered, verdict.send, strict=True) if send]
    messages = [(group, event_payload(job, event)) for event in sent]
    if notice is not None:
        messages.append((group, held_back.notice_payload(job.pk, job.kind, *notice)))
        transaction.on_commit(metrics.HELD_BACK_NOTICES.labels("request").inc)  # counted, then sent
    # The job's organization owns its events' history: a flood of one organization empties its
    # own history first when the node's total is reached (history.py).
    emit_on_commit(messages, share=organization_share(job.organization_id))
    if later is not None:
        transaction.on_commit(lambda: held_back.timer.schedule(job.pk, group, job.kind, later))


def _admit(job: Job, ordered: list[JobEvent]) -> tuple[Verdict, tuple[Ranges, int] | None, float | None]:
    """The verdict on a batch, the held-back notice to send with it, and when the timer should
    send one instead (seconds since the epoch)."""
    rate = ws_settings.MAX_WEBSOCKET_EVENT_RATE
    if rate == 0:  # no limit: no window to keep, nothing held back
        return admit(ordered, [], time.time(), rate), None, None
    # The job's window row stays locked until the outer transaction commits: API processes and
    # nodes storing the same job's events take turns, and a rollback leaves the window as it was.
    with transaction.atomic():
        window, _ = WebsocketEventRate.objects.select_for_update().get_or_create(job=job)
        now = time.time()
        verdict = admit(ordered, window.recent, now, rate)
        window.recent = verdict.recent
        window.held_back += verdict.held_back
        notice, later = None, None
        # Pending ranges go too: a process that delayed them may have died before its timer fired.
        if verdict.held_back or window.pending:
            ranges = held_back_ranges([event.counter for event in ordered], verdict)
            notice = held_back.record(window, ranges, verdict.held_back, now)
            if notice is None:
                later = window.announced + WINDOW
        window.save(update_fields=["recent", "held_back", "pending", "pending_count", "announced"])
    return verdict, notice, later


def _count_not_sent(reasons: Counter[str]) -> None:
    for reason, count in reasons.items():
        metrics.EVENTS_NOT_SENT.labels(reason).inc(count)
