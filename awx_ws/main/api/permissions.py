"""Who may do what through the REST API beyond access.py's read rule.

Jobs need no class here: whoever may read a job (access.py) may also change it, as members of
its organization or superusers.
"""

from __future__ import annotations

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView


class IsSuperuserOrReadOnly(BasePermission):
    """Anyone authenticated reads (what the queryset shows them); only superusers write."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        """Writes need a superuser."""
        return request.method in SAFE_METHODS or bool(request.user.is_superuser)


class CanEmit(BasePermission):
    """HTTP publishing is for service accounts: staff, or the main.emit_notification permission."""

    message = "emitting needs staff status or the main.emit_notification permission"

    def has_permission(self, request: Request, view: APIView) -> bool:
        """Staff or holders of the permission."""
        user = request.user
        return bool(user.is_staff or user.has_perm("main.emit_notification"))
