"""Credentials out of every access log the stack writes.

Clients that cannot set a header (a browser's EventSource, a websocket from a page) send their
API token as `?token=`, as AWX's clients do. An access log that keeps the query string, or the
Referer of a page opened with one, would keep the token for anyone who reads the log: daphne's
logs the URI with its query, gunicorn's the request line and the Referer, nginx's the Referer.
Each is redacted here or in its own configuration (nginx/nginx.conf.template), and
tests/test_stack.py greps every log a `make run` stack wrote for the token it used.
"""

from __future__ import annotations

import re
from typing import Any

from gunicorn.glogging import Logger

REDACTED = "[redacted]"

# A credential's query parameter (`token=`, `access_token=`), at the start of a query string or
# after `?`, `&` or `;`, also percent-encoded inside another URL (a login page's `next=`).
_CREDENTIAL_PARAM = re.compile(
    r"(^|[?&;]|%3F|%26|%3B)((?:access_)?token(?:=|%3D))[^&#;\s\"'%]*(?:%(?!26|3B)[0-9A-F]{2}[^&#;\s\"'%]*)*",
    re.IGNORECASE,
)
# Request headers a custom log format could print: never their values.
_SECRET_HEADERS = frozenset({"{authorization}i", "{cookie}i", "{x-csrftoken}i"})


def redact_credentials(text: str) -> str:
    """text with the value of every credential query parameter replaced by [redacted]."""
    return _CREDENTIAL_PARAM.sub(rf"\1\2{REDACTED}", text)


class GunicornLogger(Logger):  # type: ignore[misc]  # gunicorn ships no types
    """gunicorn's logger whose access log lines carry no credential (`--logger-class`)."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        """gunicorn's log atoms, redacted: the request line, query string, Referer and headers."""
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        for key, value in atoms.items():
            if key in _SECRET_HEADERS:
                atoms[key] = REDACTED
            elif isinstance(value, str):
                atoms[key] = redact_credentials(value)
        return atoms
