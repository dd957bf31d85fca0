"""The minimum of AWX's data model the access checks need: organizations, members, jobs."""

from __future__ import annotations

from typing import ClassVar

from django.conf import settings
from django.db import models
from django.db.models.functions import Now
from django.utils import timezone

from awx_ws.main.exceptions import InvalidTransition


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

    # new → pending → waiting → running → successful | failed | error | canceled, with cancel and
    # error possible before running too, as in AWX.
    TRANSITIONS: ClassVar[dict[str, frozenset[str]]] = {
        Status.NEW: frozenset({Status.PENDING, Status.CANCELED}),
        Status.PENDING: frozenset({Status.WAITING, Status.CANCELED, Status.ERROR}),
        Status.WAITING: frozenset({Status.RUNNING, Status.CANCELED, Status.ERROR}),
        Status.RUNNING: frozenset({Status.SUCCESSFUL, Status.FAILED, Status.ERROR, Status.CANCELED}),
    }
    TERMINAL: ClassVar[frozenset[str]] = frozenset(
        {Status.SUCCESSFUL, Status.FAILED, Status.ERROR, Status.CANCELED}
    )

    kind = models.CharField(max_length=32, choices=Kind.choices, default=Kind.JOB)
    name = models.CharField(max_length=512, blank=True)
    # System jobs belong to no organization in AWX: only superusers see those.
    organization = models.ForeignKey(
        Organization, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs"
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.NEW)
    created = models.DateTimeField(auto_now_add=True)
    modified = models.DateTimeField(auto_now=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["kind", "organization"])]
        permissions = [("emit_notification", "Can emit websocket notifications over HTTP")]

    def __str__(self) -> str:
        return f"{self.kind} {self.pk}"

    @property
    def is_terminal(self) -> bool:
        """True once the job has finished, whichever way."""
        return self.status in self.TERMINAL

    def allowed_transitions(self) -> frozenset[str]:
        """Statuses this job may move to next."""
        return self.TRANSITIONS.get(self.status, frozenset())

    def set_status(self, status: str) -> None:
        """Move to status (not saved), stamping started/finished; InvalidTransition if not allowed."""
        if status not in self.allowed_transitions():
            allowed = ", ".join(sorted(self.allowed_transitions())) or "none: the job has finished"
            raise InvalidTransition(f"cannot go from {self.status} to {status}; allowed: {allowed}")
        self.status = status
        if status == self.Status.RUNNING:
            self.started = timezone.now()
        if status in self.TERMINAL:
            self.finished = timezone.now()


# The largest counter a job event may have: PositiveIntegerField's bound on every database.
MAX_COUNTER = 2**31 - 1


class JobEvent(models.Model):
    """One event of a job's output, as a runner reports it; counters order a job's events."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    counter = models.PositiveIntegerField()
    event = models.CharField(max_length=100)
    event_data = models.JSONField(default=dict, blank=True)
    stdout = models.TextField(blank=True, default="")
    start_line = models.PositiveIntegerField(default=0)
    end_line = models.PositiveIntegerField(default=0)
    uuid = models.CharField(max_length=1024, blank=True, default="")
    parent_uuid = models.CharField(max_length=1024, blank=True, default="")
    failed = models.BooleanField(default=False)
    changed = models.BooleanField(default=False)
    play = models.CharField(max_length=1024, blank=True, default="")
    role = models.CharField(max_length=1024, blank=True, default="")
    task = models.CharField(max_length=1024, blank=True, default="")
    created = models.DateTimeField(auto_now_add=True)
    modified = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["counter"]
        constraints = [
            models.UniqueConstraint(fields=["job", "counter"], name="unique_counter_per_job"),
        ]

    def __str__(self) -> str:
        return f"{self.job_id}#{self.counter} {self.event}"


class WebsocketEventRate(models.Model):
    """A job's websocket event window (event_rate.py): when its last events went out, how many
    were held back over AWX_WS_MAX_WEBSOCKET_EVENT_RATE (its summary says so), and which of them
    its viewers have not yet been told of (held_back.py)."""

    job = models.OneToOneField(Job, on_delete=models.CASCADE, primary_key=True, related_name="websocket_rate")
    # Send times (seconds since the epoch) of the job's last events, at most the rate of them.
    recent = models.JSONField(default=list)
    held_back = models.PositiveIntegerField(default=0)
    # Counter ranges held back since the last notice ([[first, last], ...]), their event count,
    # and when the last notice went out (seconds since the epoch, 0: never).
    pending = models.JSONField(default=list)
    pending_count = models.PositiveIntegerField(default=0)
    announced = models.FloatField(default=0.0)

    def __str__(self) -> str:
        return f"job {self.job_id}: {self.held_back} held back"


class PeerNonce(models.Model):
    """A relay handshake nonce this node accepted, kept until it expires (no replays on the node).

    The Redis layer keeps these in Redis; a node on RabbitMQ keeps them here, in the database its
    daphne processes share, so a header accepted by one process is refused by the others.
    """

    nonce = models.CharField(max_length=64, primary_key=True)
    expires = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.nonce


class AccessChange(models.Model):
    """A change that may take access away from open connections (revocation.py): a token or
    session gone, a user changed, an organization membership removed. Written in the transaction
    of the change; every daphne process sharing the database reads it within seconds."""

    # Set by the database's clock, so processes on other machines compare like with like.
    created = models.DateTimeField(db_default=Now(), db_index=True)
    # Whose connections to check again; None: everyone's (an organization deleted).
    user_id = models.IntegerField(null=True)
    reason = models.CharField(max_length=100)

    def __str__(self) -> str:
        return f"{self.reason} (user {self.user_id})"


class ServingProcess(models.Model):
    """A daphne process of a node whose channel layer keeps no shared state (RabbitMQ), alive
    while its heartbeat is fresh (AWX_WS_LIVENESS_TTL); its open connections are counted below."""

    name = models.CharField(max_length=64, primary_key=True)
    node = models.CharField(max_length=255, db_index=True)
    heartbeat = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.node}/{self.name}"


class OpenConnections(models.Model):
    """How many connections one user holds open on one process (AWX_WS_MAX_CONNECTIONS_PER_USER:
    the node's count is the sum over its live processes)."""

    process = models.ForeignKey(ServingProcess, on_delete=models.CASCADE, related_name="connections")
    user_id = models.IntegerField()
    count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["process", "user_id"], name="one_count_per_process_and_user"),
        ]

    def __str__(self) -> str:
        return f"user {self.user_id}: {self.count} on {self.process_id}"
