"""REST API views under /api/v2/: tokens, me, organizations, jobs, job events and HTTP publish."""

from __future__ import annotations

import logging
from typing import Any, cast

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from rest_framework import mixins, status, viewsets
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.throttling import ScopedRateThrottle, UserRateThrottle
from rest_framework.views import APIView

from awx_ws.main.access import jobs_visible_to
from awx_ws.main.api.permissions import CanEmit, IsSuperuserOrReadOnly
from awx_ws.main.api.serializers import (
    EmitSerializer,
    JobEventBatchSerializer,
    JobEventSerializer,
    JobSerializer,
    MembershipSerializer,
    OrganizationSerializer,
    UserSerializer,
)
from awx_ws.main.conf import ws_settings
from awx_ws.main.emit import emit_channel_notification
from awx_ws.main.exceptions import EmitError
from awx_ws.main.models import MAX_COUNTER, Job, Organization
from awx_ws.main.numbers import parse_bounded

logger = logging.getLogger(__name__)


class ServiceUnavailable(APIException):
    """The channel layer could not take the message."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "the notification service is unavailable"
    default_code = "service_unavailable"


class ApiRootView(APIView):
    """What the API offers."""

    permission_classes = [AllowAny]

    def get(self, request: Request) -> Response:
        """List the endpoints."""
        names = {
            "tokens": "api-tokens",
            "me": "api-me",
            "organizations": "organization-list",
            "jobs": "job-list",
            "emit": "api-emit",
            "ping": "api-ping",
            "ready": "api-ready",
            "metrics": "api-metrics",
        }
        body = {key: reverse(name, request=request) for key, name in names.items()}
        body["websocket"] = request.build_absolute_uri("/websocket/")
        # Served by daphne (awx_ws.main.sse), not by this API: nginx routes it there.
        body["stream"] = request.build_absolute_uri("/api/v2/stream/")
        return Response(body)


class TokenView(ObtainAuthToken):
    """POST username and password, get the user's API token (DRF authtoken)."""

    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "tokens"


class MeView(APIView):
    """The authenticated user and the organizations they belong to."""

    def get(self, request: Request) -> Response:
        """Who am I."""
        user = cast(User, request.user)  # IsAuthenticated (the default permission) let it in
        body = dict(UserSerializer(user).data)
        body["organizations"] = list(user.awx_organizations.values_list("pk", flat=True))
        return Response(body)


class OrganizationViewSet(viewsets.ModelViewSet[Organization]):
    """Organizations: members read their own, superusers manage all."""

    serializer_class = OrganizationSerializer
    permission_classes = [IsAuthenticated, IsSuperuserOrReadOnly]

    def get_queryset(self) -> QuerySet[Organization]:
        """Superusers see every organization, members their own."""
        queryset = Organization.objects.prefetch_related("members").order_by("pk")
        if self.request.user.is_superuser:
            return queryset
        return queryset.filter(members=cast(User, self.request.user))  # IsAuthenticated let it in

    @action(detail=True, methods=["get", "post"])
    def members(self, request: Request, pk: str | None = None) -> Response:
        """List members, or add one (superusers)."""
        organization = self.get_object()
        if request.method == "POST":
            serializer = MembershipSerializer(data=request.data)
            serializer.is_valid(raise_exception=True)
            organization.members.add(serializer.validated_data["user"])
            return Response(UserSerializer(serializer.validated_data["user"]).data, status=201)
        users = organization.members.order_by("pk")
        return Response(UserSerializer(users, many=True).data)

    @action(detail=True, methods=["delete"], url_path=r"members/(?P<user_id>\d+)")
    def remove_member(self, request: Request, pk: str | None = None, user_id: str | None = None) -> Response:
        """Remove a member (superusers)."""
        organization = self.get_object()
        user = get_object_or_404(organization.members.all(), pk=user_id)
        organization.members.remove(user)
        return Response(status=204)


class EventCursorPagination(CursorPagination):
    """Events page by counter: stable while new events arrive."""

    ordering = "counter"
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000


class JobViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet[Job],
):
    """Jobs of the six kinds; status changes emit AWX's websocket messages after commit."""

    serializer_class = JobSerializer
    permission_classes = [IsAuthenticated]
    filterset_fields = ["status", "kind", "organization"]

    def get_queryset(self) -> QuerySet[Job]:
        """The jobs this user may read (access.py, as for websocket subscriptions)."""
        return jobs_visible_to(self.request.user).order_by("pk")

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Change a job in one transaction, so its messages go out only once it is committed."""
        with transaction.atomic():
            return super().update(request, *args, **kwargs)

    @action(
        detail=True, methods=["get", "post"], url_path="job_events", pagination_class=EventCursorPagination
    )
    def job_events(self, request: Request, pk: str | None = None) -> Response:
        """GET the job's events by counter (`?counter__gt=N` to catch up, `&counter__lt=M` to fill a
        gap); POST one event or a list."""
        job = self.get_object()
        if request.method == "POST":
            return self._create_events(request, job)
        events = job.events.all()
        for lookup in ("counter__gt", "counter__lt"):  # AWX's filters of the same names
            text = request.query_params.get(lookup)
            if text is not None:
                bound = parse_bounded(text, MAX_COUNTER)
                if bound is None:
                    raise ValidationError({lookup: [f"must be an integer from 0 to {MAX_COUNTER}"]})
                events = events.filter(**{lookup: bound})
        # The stubs tie paginate_queryset to the view's model (Job); DRF pages any queryset.
        page = self.paginate_queryset(events)  # type: ignore[arg-type]
        return self.get_paginated_response(JobEventSerializer(page, many=True).data)

    def _create_events(self, request: Request, job: Job) -> Response:
        many = isinstance(request.data, list)
        items = request.data if many else [request.data]
        serializer = JobEventBatchSerializer(data=items, context={"job": job, "request": request})
        if not serializer.is_valid():
            errors: Any = serializer.errors
            # One event posted alone gets its errors as an object, not a list of one.
            raise ValidationError(errors[0] if not many and isinstance(errors, list) else errors)
        try:
            with transaction.atomic():
                events = serializer.save()
        except IntegrityError as exc:
            # Another request stored one of these counters after our check.
            raise ValidationError({"counter": ["an event with this counter already exists"]}) from exc
        data = JobEventSerializer(events, many=True).data
        return Response(data if many else data[0], status=201)


class EmitRateThrottle(UserRateThrottle):
    """Per-user rate limit of HTTP publishing, from the AWX_WS EMIT_RATE setting."""

    scope = "emit"

    def get_rate(self) -> str | None:
        """The configured rate, e.g. '1200/min'."""
        rate: str | None = ws_settings.EMIT_RATE
        return rate


class EmitView(APIView):
    """POST {"group", "payload"}: publish to a group's websocket subscribers (service accounts)."""

    permission_classes = [IsAuthenticated, CanEmit]
    throttle_classes = [EmitRateThrottle]

    def post(self, request: Request) -> Response:
        """Validate the group, emit, answer 202."""
        serializer = EmitSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        group = serializer.validated_data["group"]
        try:
            emit_channel_notification(group, serializer.validated_data["payload"])
        except EmitError as exc:
            logger.error("HTTP emit to %s by user %s failed: %s", group, request.user.pk, exc)
            raise ServiceUnavailable(str(exc)) from exc
        return Response({"group": group, "emitted": True}, status=status.HTTP_202_ACCEPTED)
