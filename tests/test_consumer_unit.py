"""The websocket consumer and its handshake through Channels' WebsocketCommunicator: what they
answer without the channel layer delivering anything, so no server is started.

The handshake goes through the real application (routing.websocket_application: cookies,
session, our authentication); a refusal is decided before any channel layer is asked. The
consumer is EventConsumer itself, handed the scope the authentication middleware would hand it:
the accept path of that middleware counts the connection in the node's store (connlimit: Redis,
or the database on RabbitMQ), which is the e2e tier's to test. The user, token and session are
real rows (the consumer's revocation watcher rereads them), created as the e2e tests create
theirs: pytest-django's in-memory test database in a unit session, the shared one otherwise.

The consumer asks the default channel layer for its fan-out (ServiceLayer.fanout), which
Channels' InMemoryChannelLayer does not have: it gets the configured layer, our
RedisChannelLayer, which does no I/O until a group is joined. No test here joins one: in a
session of unit tests nothing listens at REDIS_URL, so a frame that reached Redis would fail.
The revocation watcher's loop, started by an accepted connection, is stopped after each test.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.backends.db import SessionStore

from awx_ws.main import revocation
from awx_ws.main.auth import user_for_token
from awx_ws.main.conf import ws_settings
from awx_ws.main.consumers import EventConsumer
from awx_ws.main.routing import websocket_application
from tests.factories import adb, create_token, create_user, session_cookie

pytestmark = pytest.mark.unit


@dataclass
class Credentials:
    """A user of this test with a token and a logged-in session, as a client would hold them."""

    user: Any
    token: str
    session: str


@pytest.fixture
async def credentials(django_db_setup: None, django_db_blocker: Any) -> AsyncIterator[Credentials]:
    """A user, token and session in the database (committed: read from the consumer's threads),
    and database access for the revocation watcher's loop, stopped in this test's event loop."""
    with django_db_blocker.unblock():
        user = await adb(create_user)
        yield Credentials(user, await adb(create_token, user), await adb(session_cookie, user))
        await revocation.watcher.stop()


@pytest.fixture
async def connect(credentials: Credentials) -> AsyncIterator[Callable[..., Awaitable[WebsocketCommunicator]]]:
    """Open EventConsumer connections with the scope WebsocketAuthMiddleware hands it; every one
    is disconnected at the end, whatever the test did."""
    opened: list[WebsocketCommunicator] = []

    async def connect(auth: str = "token", csrf: str | None = None) -> WebsocketCommunicator:
        communicator = WebsocketCommunicator(EventConsumer.as_asgi(), "/websocket/")
        cookies = {"csrftoken": csrf} if csrf is not None else {}
        if auth == "token":
            communicator.scope["headers"] = [(b"authorization", f"Token {credentials.token}".encode())]
            # What the middleware hands over: the token's user, with the jobs it may see attached.
            user = await user_for_token(credentials.token)
        else:
            cookies["awx_sessionid"] = credentials.session
            communicator.scope["session"] = SessionStore(session_key=credentials.session)
            user = credentials.user
        communicator.scope.update({"user": user, "auth": auth, "cookies": cookies})
        opened.append(communicator)
        accepted, _ = await communicator.connect()
        assert accepted
        assert await communicator.receive_json_from() == {"accept": True, "user": credentials.user.pk}
        return communicator

    yield connect
    for communicator in opened:
        if not communicator.future.done():
            await communicator.disconnect()


async def reply_to(communicator: WebsocketCommunicator, frame: Any) -> Any:
    """The consumer's answer to one frame (a str is sent as it is, anything else as JSON)."""
    if isinstance(frame, bytes):
        await communicator.send_to(bytes_data=frame)
    else:
        await communicator.send_to(text_data=frame if isinstance(frame, str) else json.dumps(frame))
    return await communicator.receive_json_from()


# The handshake: refused (HTTP 403 from daphne) before any consumer or layer is involved.


async def refused(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> bool:
    communicator = WebsocketCommunicator(websocket_application(), path, headers=headers or [])
    accepted, _ = await communicator.connect()
    await communicator.wait()
    return not accepted


@pytest.mark.parametrize("path", ["/websocket/", "/api/websocket/", "/websocket/foo", "/xwebsocket/"])
async def test_a_handshake_without_credentials_is_refused(path):
    assert await refused(path)


async def test_a_token_cookie_from_a_foreign_origin_is_refused_before_the_token_is_looked_up():
    headers = [(b"cookie", b"token=whatever"), (b"origin", b"http://evil.example"), (b"host", b"testserver")]
    assert await refused("/websocket/", headers)


@pytest.mark.parametrize(
    "headers",
    [
        [],  # no signed header at all
        [(b"secret", b"HMAC-SHA256 garbage")],
        [(b"secret", b"HMAC-SHA256 garbage"), (b"x-awx-ws-audience", b"127.0.0.1:1")],
        [(b"authorization", b"Token 0123456789abcdef")],  # a client's token opens no relay endpoint
    ],
)
async def test_the_relay_endpoint_refuses_a_handshake_without_a_valid_signature(headers):
    assert await refused("/websocket/broadcast/", headers)


@pytest.mark.parametrize(
    "header",
    [
        (b"authorization", b"Token not-a-token-of-anyone"),
        (b"authorization", b"Bearer not-a-token-of-anyone"),
    ],
)
async def test_a_token_nobody_holds_is_refused(header, credentials):
    assert await refused("/websocket/", [header])


async def test_a_token_in_the_query_nobody_holds_is_refused(credentials):
    assert await refused("/websocket/?token=not-a-token-of-anyone")


async def test_a_session_cookie_of_no_session_is_refused(credentials):
    headers = [(b"cookie", b"awx_sessionid=no-such-session"), (b"origin", b"http://testserver")]
    headers.append((b"host", b"testserver"))
    assert await refused("/websocket/", headers)


# The consumer: AWX's greeting, then the subscribe protocol's refusals, each a reply on a
# connection that stays open.


async def test_an_accepted_client_is_greeted_with_its_user_and_can_leave(connect):
    communicator = await connect()
    await communicator.disconnect()


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (
            "{not json",
            "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (" ", "invalid JSON: Expecting value: line 1 column 2 (char 1)"),
        ("[1, 2]", "expected a JSON object"),
        ('"groups"', "expected a JSON object"),
        ("[" * 5000 + "]" * 5000, "invalid JSON: nested too deeply"),
        ({}, 'unknown message: expected {"groups": {...}}'),
        ({"subscribe": ["jobs"]}, 'unknown message: expected {"groups": {...}}'),
        ({"groups": ["jobs"]}, "groups must be an object of kind: [items]"),
        ({"groups": {"nope": ["x"]}}, "unknown group kind 'nope'"),
        ({"groups": {"broadcast": ["x"]}}, "group kind 'broadcast' is reserved"),
        ({"groups": {"awx_ws": ["x"]}}, "group kind 'awx_ws' is reserved"),
        ({"groups": {"jobs": "status_changed"}}, "groups.jobs must be a list"),
        ({"groups": {"jobs": [7]}}, "invalid item 7 in groups.jobs: expected a string"),
        (
            {"groups": {"job_events": ["x"]}},
            "invalid id 'x' in groups.job_events: expected a positive integer",
        ),
        ({"groups": {"job_events": [0]}}, "invalid id 0 in groups.job_events: expected a positive integer"),
        (
            {"groups": {"job_events": [True]}},
            "invalid id True in groups.job_events: expected a positive integer",
        ),
        ({"groups": {}, "ids": "yes"}, "ids must be true or false"),
        ({"groups": {}, "recover": []}, 'recover must be an object of group: "<position>"'),
    ],
)
async def test_a_frame_the_protocol_refuses_gets_its_error_and_the_connection_stays(frame, error, connect):
    communicator = await connect()
    assert await reply_to(communicator, frame) == {"error": error}
    # Still open, and still answering.
    assert await reply_to(communicator, {"groups": {}}) == {
        "groups_current": [],
        "groups_left": [],
        "groups_joined": [],
    }
    await communicator.disconnect()


async def test_a_binary_frame_is_refused(connect):
    communicator = await connect()
    assert await reply_to(communicator, b'{"groups": {}}') == {
        "error": "binary frames are not supported: send JSON text"
    }
    await communicator.disconnect()


async def test_a_frame_over_the_size_limit_is_refused_naming_it(connect):
    communicator = await connect()
    frame = json.dumps({"groups": {"jobs": ["x" * ws_settings.MAX_FRAME_BYTES]}})
    assert await reply_to(communicator, frame) == {
        "error": f"frame too large: at most {ws_settings.MAX_FRAME_BYTES} bytes"
    }
    await communicator.disconnect()


async def test_too_many_groups_are_refused_as_a_whole(settings, connect):
    settings.AWX_WS = {**settings.AWX_WS, "MAX_GROUPS_PER_CONNECTION": 2}
    communicator = await connect()
    assert await reply_to(communicator, {"groups": {"jobs": ["a", "b"], "schedules": ["c"]}}) == {
        "error": "too many groups: 3 requested, at most 2 per connection"
    }
    await communicator.disconnect()


async def test_an_other_users_control_group_is_refused_by_name_and_nothing_is_joined(connect, credentials):
    communicator = await connect()
    await communicator.send_json_to({"groups": {"control": [f"limit_reached_{credentials.user.pk + 1}"]}})
    assert await communicator.receive_json_from() == {
        "error": f"access denied to channel control-limit_reached_{credentials.user.pk + 1}"
    }
    assert await communicator.receive_json_from() == {
        "groups_current": [],
        "groups_left": [],
        "groups_joined": [],
    }
    await communicator.disconnect()


@pytest.mark.parametrize(
    "frame",
    [
        {"groups": {}},  # no xrftoken
        {"groups": {}, "xrftoken": "not-the-cookie"},
        {"groups": {}, "xrftoken": 12345},
    ],
)
async def test_a_session_client_without_the_matching_xrftoken_is_denied(frame, connect):
    communicator = await connect("session", csrf="the-csrf-cookie")
    assert await reply_to(communicator, frame) == {"error": "access denied to channel"}
    await communicator.disconnect()


async def test_a_session_client_without_a_csrf_cookie_is_denied_whatever_it_sends(connect):
    communicator = await connect("session")
    assert await reply_to(communicator, {"groups": {}, "xrftoken": ""}) == {
        "error": "access denied to channel"
    }
    await communicator.disconnect()


async def test_a_session_client_with_the_matching_xrftoken_is_answered(connect):
    communicator = await connect("session", csrf="the-csrf-cookie")
    assert await reply_to(communicator, {"groups": {}, "xrftoken": "the-csrf-cookie"}) == {
        "groups_current": [],
        "groups_left": [],
        "groups_joined": [],
    }
    await communicator.disconnect()


async def test_a_token_client_needs_no_xrftoken(connect):
    communicator = await connect("token", csrf="the-csrf-cookie")
    assert await reply_to(communicator, {"groups": {}}) == {
        "groups_current": [],
        "groups_left": [],
        "groups_joined": [],
    }
    await communicator.disconnect()


async def test_frames_past_the_subscribe_rate_are_refused_and_counted_against_the_budget(settings, connect):
    settings.AWX_WS = {**settings.AWX_WS, "SUBSCRIBE_RATE": 3, "SUBSCRIBE_WINDOW": 3600}
    communicator = await connect()
    # Refused frames cost a token as well: a flood of bad frames is still a flood.
    assert [(await reply_to(communicator, "nonsense"))["error"][:12] for _ in range(3)] == [
        "invalid JSON"
    ] * 3
    refusal = {"error": "too many requests: at most 3 messages per 3600 s, try again later"}
    assert [await reply_to(communicator, {"groups": {}}) for _ in range(3)] == [refusal] * 3
    await communicator.disconnect()
