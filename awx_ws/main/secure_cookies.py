"""Cookies set over HTTPS are marked Secure, so a browser never sends them over plain HTTP.

The same API answers nginx's plain port and its TLS port. Django's SESSION_COOKIE_SECURE and
CSRF_COOKIE_SECURE are all or nothing: on, a login over the plain port would keep no session;
off, a session made over TLS would also travel over the plain port, in clear. So the cookies of
a response to an HTTPS request (nginx's X-Forwarded-Proto, SECURE_PROXY_SSL_HEADER) are marked
Secure, and Django's SecurityMiddleware adds Strict-Transport-Security to the same responses.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse


class SecureCookiesOverHttpsMiddleware:
    """Marks the session and CSRF cookies Secure on responses to HTTPS requests."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Pass the request on; mark the response's cookies when the request was HTTPS."""
        response: HttpResponse = self.get_response(request)
        if request.is_secure():
            for name in (settings.SESSION_COOKIE_NAME, settings.CSRF_COOKIE_NAME):
                if name in response.cookies:
                    response.cookies[name]["secure"] = True
        return response
