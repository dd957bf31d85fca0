"""Credentials in URLs are redacted wherever an access log would write them (pure rules; the
whole stack's logs are grepped in tests/test_stack.py)."""

from __future__ import annotations

import datetime

import pytest
from gunicorn.config import Config

from awx_ws.main.log_redaction import GunicornLogger, redact_credentials

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("GET /s/?groups=a&token=abc HTTP/1.1", "GET /s/?groups=a&token=[redacted] HTTP/1.1"),
        ("token=abc&x=1", "token=[redacted]&x=1"),  # a bare query string
        ("http://h/live/?x=1&TOKEN=abc#top", "http://h/live/?x=1&TOKEN=[redacted]#top"),
        ("/p?access_token=abc;y=2", "/p?access_token=[redacted];y=2"),
        ("/in/?next=%2Flive%2F%3Ftoken%3Dabc%26x%3D1", "/in/?next=%2Flive%2F%3Ftoken%3D[redacted]%26x%3D1"),
        ("/p?token=", "/p?token=[redacted]"),
        ("/p?xrftoken=abc&tokens=2", "/p?xrftoken=abc&tokens=2"),  # other names are left alone
        ("/p?groups=token=x", "/p?groups=token=x"),
    ],
)
def test_credential_parameters_are_redacted(text, redacted):
    assert redact_credentials(text) == redacted


class Response:
    status = "401 Unauthorized"
    sent = 10
    headers = [("Content-Type", "application/json")]


def test_gunicorns_access_log_atoms_carry_no_credential():
    environ = {
        "REQUEST_METHOD": "GET",
        "RAW_URI": "/api/v2/me/?token=s3cret",
        "PATH_INFO": "/api/v2/me/",
        "QUERY_STRING": "token=s3cret",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_REFERER": "http://h/live/?token=s3cret",
    }
    headers = [
        ("AUTHORIZATION", "Token s3cret"),
        ("COOKIE", "token=s3cret"),
        ("REFERER", environ["HTTP_REFERER"]),
    ]
    request = type("Request", (), {"headers": headers})()
    atoms = GunicornLogger(Config()).atoms(Response(), request, environ, datetime.timedelta(seconds=1))
    assert atoms["r"] == "GET /api/v2/me/?token=[redacted] HTTP/1.1"
    assert atoms["q"] == "token=[redacted]"
    assert atoms["f"] == atoms["{referer}i"] == "http://h/live/?token=[redacted]"
    assert atoms["{authorization}i"] == atoms["{cookie}i"] == "[redacted]"
    assert not [key for key, value in atoms.items() if "s3cret" in str(value)]
