"""The minimum of AWX's data model the access checks need: organizations, members, jobs."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Organization(models.Model):
    """A tenant: its members may read its jobs."""

    name = models.CharField(max_length=512, unique=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="awx_organizations", blank=True)

    def __str__(self) -> str:
        return self.name


class Job(models.Model):
    """A unified job of one of AWX's six kinds; ids are shared across kinds, as in AWX."""

    class Kind(models.TextChoices):
        JOB = "job", "Playbook run"
        WORKFLOW_JOB = "workflow_job", "Workflow job"
        AD_HOC_COMMAND = "ad_hoc_command", "Ad hoc command"
        PROJECT_UPDATE = "project_update", "Project update"
        INVENTORY_UPDATE = "inventory_update", "Inventory update"
        SYSTEM_JOB = "system_job", "System job"

    class Status(models.TextChoices):
        NEW = "new"
        PENDING = "pending"
        WAITING = "waiting"
        RUNNING = "running"
        SUCCESSFUL = "successful"
        FAILED = "failed"
        ERROR = "error"
        CANCELED = "canceled"

    kind = models.CharField(max_length=32, choices=Kind.choices, default=Kind.JOB)
    name = models.CharField(max_length=512, blank=True)
    # System jobs belong to no organization in AWX: only superusers see those.
    organization = models.ForeignKey(
        Organization, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs"
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.NEW)
    created = models.DateTimeField(auto_now_add=True)
    modified = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["kind", "organization"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.pk}"
