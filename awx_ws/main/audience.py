"""Job status messages reach only the subscribers who may see the job.

AWX sends `jobs-status_changed` (and `jobs-summary`) to every subscriber of the group, so any
user learns every job's id, status and kind. Here the fan-out reads the job id out of such a
message once, finds the job's organization (cached per process: a job never changes it), and
writes the same prepared frame only to the subscribers whose user may see that organization's
jobs: superusers, and members. Whatever the producer (our emit, Channels' group_send, a peer's
relay, a replay from history), the check is made where the message meets the client.

The id is read whatever its JSON type: `6` and `"6"` name the same job (a string once slipped
past a filter that only knew integers, and reached every subscriber). A message naming a job that
does not exist, or carrying a `unified_job_id` that names no job at all (`"six"`, `6.5`, `null`,
`[6]`), reaches superusers only: what cannot be placed fails closed, and is counted
(`awx_ws_unplaced_job_messages_total`). A message without the key (a producer's own payload)
reaches every subscriber, as in AWX.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async

from awx_ws.main import metrics
from awx_ws.main.numbers import parse_id

logger = logging.getLogger(__name__)

# The groups whose messages name one job (`unified_job_id`).
JOB_GROUPS = frozenset({"jobs-status_changed", "jobs-summary"})
# Jobs whose organization a process remembers.
CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Viewer:
    """What one connection's user may see of jobs."""

    superuser: bool
    organizations: frozenset[int]

    def may_see(self, organization: int | None) -> bool:
        """True for a superuser, or a member of the job's organization."""
        return self.superuser or (organization is not None and organization in self.organizations)


def viewer_now(user: Any) -> Viewer:
    """What user may see of jobs, read now (sync: the ORM)."""
    organizations = frozenset(user.awx_organizations.values_list("pk", flat=True))
    return Viewer(bool(user.is_superuser), organizations)


_viewer_of: Callable[[Any], Awaitable[Viewer]] = database_sync_to_async(viewer_now)


async def viewer_of(user: Any) -> Viewer:
    """What user may see of jobs: read with its credential when it came with one (auth.py
    attaches `awx_viewer` to a token's user), else from the database."""
    known = getattr(user, "awx_viewer", None)
    if isinstance(known, Viewer):
        return known
    return await _viewer_of(user)


@dataclass(frozen=True)
class JobReference:
    """What a message says of its job: whether it has a `unified_job_id`, and the job it names."""

    present: bool
    job_id: int | None = None


NO_JOB = JobReference(present=False)
UNPLACED = JobReference(present=True)


def job_reference(text: str) -> JobReference:
    """The job a message's `unified_job_id` names: an integer or its decimal string."""
    try:
        payload = json.loads(text)
    except ValueError:
        return NO_JOB  # not JSON: the fan-out only carries JSON, so nobody's job
    if not isinstance(payload, dict) or "unified_job_id" not in payload:
        return NO_JOB
    job_id = parse_id(payload["unified_job_id"])
    return UNPLACED if job_id is None else JobReference(present=True, job_id=job_id)


def _organization_of(job_id: int) -> int | None:
    from awx_ws.main.models import Job

    return Job.objects.filter(pk=job_id).values_list("organization_id", flat=True).first()


class JobOrganizations:
    """Job id -> organization id, remembered for the CACHE_SIZE most recent jobs."""

    def __init__(self) -> None:
        self._known: OrderedDict[int, int | None] = OrderedDict()

    async def of(self, job_id: int | None) -> int | None:
        """The job's organization (None: no such job)."""
        if job_id is None:
            return None
        if job_id in self._known:
            self._known.move_to_end(job_id)
            return self._known[job_id]
        organization: int | None = await database_sync_to_async(_organization_of)(job_id)
        if organization is not None:  # a job not there yet may be created: ask again next time
            self._known[job_id] = organization
            if len(self._known) > CACHE_SIZE:
                self._known.popitem(last=False)
        return organization


async def allowed(group: str, text: str, organizations: JobOrganizations) -> tuple[bool, int | None]:
    """(whether this message is filtered by job, the job's organization if so)."""
    if group not in JOB_GROUPS:
        return False, None
    reference = job_reference(text)
    if not reference.present:
        return False, None  # a producer's own message, sent as AWX sends it
    if reference.job_id is None:
        metrics.UNPLACED_JOB_MESSAGES.inc()  # superusers only: no organization
        return True, None
    return True, await organizations.of(reference.job_id)
