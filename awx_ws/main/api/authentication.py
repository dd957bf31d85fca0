"""DRF token authentication accepting `Token <key>` and `Bearer <key>`, as the websocket does."""

from __future__ import annotations

from typing import Any

from rest_framework import authentication
from rest_framework.request import Request


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's TokenAuthentication, also under the Bearer keyword."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        """Try `Token`, then `Bearer`."""
        header = authentication.get_authorization_header(request).split()
        if header and header[0].lower() == b"bearer":
            if len(header) != 2:
                return super().authenticate(request)  # DRF's own error for a malformed header
            return self.authenticate_credentials(header[1].decode("latin-1"))
        return super().authenticate(request)
