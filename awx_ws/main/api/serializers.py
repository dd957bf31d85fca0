"""DRF serializers of the REST API: organizations, jobs with validated transitions, events, emit."""

from __future__ import annotations

from collections import Counter
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from rest_framework import serializers

from awx_ws.main import notifications
from awx_ws.main.exceptions import InvalidGroupName, InvalidTransition
from awx_ws.main.models import MAX_COUNTER, Job, JobEvent, Organization
from awx_ws.main.protocol import RESERVED_KINDS, validate_group_name

# A runner's burst goes in one request (AWX's callback receiver saves in bulk too); the body's
# byte bound (AWX_WS_MAX_REQUEST_BYTES, and nginx's client_max_body_size) is the other limit.
MAX_EVENTS_PER_REQUEST = 10_000


class UserSerializer(serializers.ModelSerializer[User]):
    """A user as /me/ and member lists show it."""

    class Meta:
        model = get_user_model()
        fields = ["id", "username", "is_superuser", "is_staff"]
        read_only_fields = fields


class OrganizationSerializer(serializers.ModelSerializer[Organization]):
    """An organization; membership is changed through its members endpoint."""

    members: serializers.PrimaryKeyRelatedField[User] = serializers.PrimaryKeyRelatedField(
        many=True, read_only=True
    )

    class Meta:
        model = Organization
        fields = ["id", "name", "members"]


class MembershipSerializer(serializers.Serializer[None]):
    """A user to add to an organization."""

    user = serializers.PrimaryKeyRelatedField(queryset=get_user_model().objects.filter(is_active=True))


class JobSerializer(serializers.ModelSerializer[Job]):
    """A unified job. Status starts at `new` and changes only along Job.TRANSITIONS."""

    class Meta:
        model = Job
        fields = [
            "id",
            "kind",
            "name",
            "organization",
            "status",
            "created",
            "modified",
            "started",
            "finished",
        ]
        read_only_fields = ["created", "modified", "started", "finished"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Creation rules, and immutable kind and organization after it."""
        user = self.context["request"].user
        if self.instance is None:
            if attrs.get("status", Job.Status.NEW) != Job.Status.NEW:
                raise serializers.ValidationError({"status": ["a new job starts as 'new'"]})
            organization = attrs.get("organization")
            if organization is None and not user.is_superuser:
                raise serializers.ValidationError({"organization": ["this field is required"]})
            if organization is not None and not user.is_superuser:
                if not organization.members.filter(pk=user.pk).exists():
                    raise serializers.ValidationError(
                        {"organization": ["you may only create jobs in your own organizations"]}
                    )
            return attrs
        for field in ("kind", "organization"):
            if field in attrs and attrs[field] != getattr(self.instance, field):
                raise serializers.ValidationError({field: ["cannot be changed after creation"]})
        return attrs

    def update(self, instance: Job, validated_data: dict[str, Any]) -> Job:
        """Apply a status transition (emitting AWX's messages on commit) and plain field changes."""
        status = validated_data.pop("status", None)
        for field, value in validated_data.items():
            setattr(instance, field, value)
        if status is not None:
            try:
                instance.set_status(status)
            except InvalidTransition as exc:
                raise serializers.ValidationError({"status": [str(exc)]}) from exc
        instance.save()
        if status is not None:
            notifications.job_status_changed(instance)
        return instance


class JobEventSerializer(serializers.ModelSerializer[JobEvent]):
    """One job event; `counter` orders a job's events and is unique within the job."""

    counter = serializers.IntegerField(min_value=1, max_value=MAX_COUNTER)

    class Meta:
        model = JobEvent
        fields = [
            "id", "job", "counter", "event", "event_data", "stdout", "start_line", "end_line",
            "uuid", "parent_uuid", "failed", "changed", "play", "role", "task", "created", "modified",
        ]  # fmt: skip
        read_only_fields = ["id", "job", "created", "modified"]

    def validate_event_data(self, value: Any) -> Any:
        """event_data is an object, as in AWX."""
        if not isinstance(value, dict):
            raise serializers.ValidationError("must be a JSON object")
        return value


class JobEventBatchSerializer(serializers.ListSerializer[list[JobEvent]]):
    """A list of events for one job: counters distinct within the batch and new to the job."""

    child = JobEventSerializer()

    def validate(self, attrs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Refuse the whole batch on any clash, so nothing is half-stored."""
        if not attrs:
            raise serializers.ValidationError("send at least one event")
        if len(attrs) > MAX_EVENTS_PER_REQUEST:
            raise serializers.ValidationError(f"at most {MAX_EVENTS_PER_REQUEST} events per request")
        counters = [item["counter"] for item in attrs]
        repeated = sorted(c for c, times in Counter(counters).items() if times > 1)
        if repeated:
            raise serializers.ValidationError(f"counter repeated in this request: {repeated}")
        job: Job = self.context["job"]
        existing = sorted(job.events.filter(counter__in=counters).values_list("counter", flat=True))
        if existing:
            raise serializers.ValidationError(f"job {job.pk} already has events with counter {existing}")
        return attrs

    def create(self, validated_data: list[dict[str, Any]]) -> list[JobEvent]:
        """Store the events and schedule their messages for after the commit."""
        job: Job = self.context["job"]
        # One INSERT for the batch (ids come back on PostgreSQL and SQLite >= 3.35).
        events = JobEvent.objects.bulk_create([JobEvent(job=job, **item) for item in validated_data])
        notifications.job_events_created(job, events)
        return events


class EmitSerializer(serializers.Serializer[None]):
    """An HTTP publish: a valid, non-reserved group and any JSON payload."""

    # Not trimmed: a name with a space or line break around it is refused, not quietly changed.
    group = serializers.CharField(trim_whitespace=False)
    payload = serializers.JSONField()

    def validate_group(self, value: str) -> str:
        """Channels' group-name rules, and no internal groups."""
        try:
            validate_group_name(value)
        except InvalidGroupName as exc:
            raise serializers.ValidationError(str(exc)) from exc
        if value.split("-", 1)[0] in RESERVED_KINDS:
            raise serializers.ValidationError(f"group {value!r} is reserved for internal use")
        return value
