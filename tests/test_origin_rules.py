"""Which Origin a cookie connection may come from besides its own: CSRF_TRUSTED_ORIGINS, matched
as Django matches it for a form post (pure rules; the handshakes are in test_websocket.py)."""

from __future__ import annotations

import pytest

from awx_ws.main.auth import trusted_origin

pytestmark = pytest.mark.unit

TRUSTED = ["https://awx.example.com", "http://[::1]:8443", "https://*.example.org"]


@pytest.mark.parametrize(
    ("origin", "trusted"),
    [
        ("https://awx.example.com", True),
        ("http://[::1]:8443", True),  # IPv6, as the browser writes it
        ("https://ui.example.org", True),  # a subdomain of a `*.` entry
        ("https://example.org", True),  # and the domain itself, as in Django
        ("http://awx.example.com", False),  # another scheme
        ("https://awx.example.com:8443", False),  # another port
        ("https://ui.example.org:8443", False),
        ("http://ui.example.org", False),
        ("https://example.org.evil.example", False),
        ("https://evil.example", False),
        ("null", False),
        ("", False),
    ],
)
def test_an_origin_is_trusted_only_as_listed(origin, trusted, settings):
    settings.CSRF_TRUSTED_ORIGINS = TRUSTED
    assert trusted_origin(origin) is trusted


def test_a_scheme_less_entry_never_trusts_a_null_origin(settings):
    """`null` (sandboxed frames, file: pages) parses to no scheme and no host, like a Django-3
    style entry without a scheme: the two must not match."""
    settings.CSRF_TRUSTED_ORIGINS = ["awx.example.com"]
    assert trusted_origin("null") is False
    assert trusted_origin("awx.example.com") is False
