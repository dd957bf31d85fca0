"""Who may see which job: the one access rule shared by the websocket and the REST API."""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.models import AnonymousUser, User
from django.db.models import QuerySet

from awx_ws.main.models import Job


def jobs_visible_to(user: User | AnonymousUser) -> QuerySet[Job]:
    """Jobs the user may read: all for superusers, their organizations' for members."""
    if not user.is_authenticated or not user.is_active:
        return Job.objects.none()
    if user.is_superuser:
        return Job.objects.all()
    return Job.objects.filter(organization__members=user).distinct()


def readable_job_ids(user: User | AnonymousUser, kind: str, ids: Iterable[int]) -> set[int]:
    """The subset of ids that name jobs of this kind the user may read (one query)."""
    wanted = set(ids)
    if not wanted:
        return set()
    found = jobs_visible_to(user).filter(kind=kind, pk__in=wanted).values_list("pk", flat=True)
    return set(found)
