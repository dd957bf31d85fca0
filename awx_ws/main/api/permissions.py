"""Who may do what through the REST API beyond access.py's read rule.

Jobs need no class here: whoever may read a job (access.py) may also change it, as members of
its organization or superusers.
"""

from __future__ import annotations

import ipaddress

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


def from_loopback(request: Request) -> bool:
    """True for a request made on this machine, directly or through our nginx.

    nginx connects from 127.0.0.1 and appends the client's address to X-Forwarded-For, so behind
    it the last entry of that header is the client; a direct request has no header.
    """
    addresses = [request.META.get("REMOTE_ADDR", "")]
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if forwarded:
        addresses.append(forwarded.split(",")[-1].strip())
    try:
        return all(ipaddress.ip_address(address).is_loopback for address in addresses)
    except ValueError:
        return False


class IsSuperuserOrLoopback(BasePermission):
    """Operators' endpoints: superusers from anywhere, anyone from this machine."""

    message = "metrics are for superusers, or for requests from this machine"

    def has_permission(self, request: Request, view: APIView) -> bool:
        """Superusers, or loopback requests."""
        return bool(request.user and request.user.is_superuser) or from_loopback(request)
