"""Websocket authentication: DRF token (header, query or cookie) or Django session plus Origin.

Sets scope["user"] and scope["auth"] ("token" or "session"). A connection without valid
credentials is refused at the handshake (HTTP 403), never accepted and then closed (AWX #12278).
"""

from __future__ import annotations

import asyncio
import logging
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs, urlsplit

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable
from channels.auth import get_user
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.db import DatabaseError
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain
from rest_framework.authtoken.models import Token

from awx_ws.main import connlimit, peerauth
from awx_ws.main.audience import viewer_now
from awx_ws.main.conf import ws_settings
from awx_ws.main.layers import service_layer
from awx_ws.main.numbers import parse_bounded

logger = logging.getLogger(__name__)

_TOKEN_SCHEMES = (b"token", b"bearer")


async def deny_websocket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Refuse a websocket handshake: daphne answers HTTP 403.

    Channels' WebsocketDenier is a consumer, and a consumer takes a channel from the default
    layer: every refused handshake would cost a Redis channel, or an error while Redis is down.
    """
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})


def header(scope: dict[str, Any], name: bytes) -> bytes | None:
    """The first value of an HTTP header in an ASGI scope (name in lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def presented_token(scope: dict[str, Any]) -> tuple[str, str] | None:
    """(key, where) of the API token a client presented: where is "header" (Authorization),
    "query" (?token=) or "cookie" (AWX's `token` cookie); None without one."""
    authorization = header(scope, b"authorization")
    if authorization:
        scheme, _, key = authorization.partition(b" ")
        if scheme.lower() in _TOKEN_SCHEMES and key.strip():
            return key.strip().decode("latin-1"), "header"
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0], "query"
    cookie = scope.get("cookies", {}).get("token")
    if cookie:
        # awxkit sends token="<key>"; Django's cookie parser usually unquotes, be sure.
        return cookie.strip('"'), "cookie"
    return None


def token_from_scope(scope: dict[str, Any]) -> str | None:
    """The API token a client presented: Authorization header, ?token=, or the token cookie."""
    presented = presented_token(scope)
    return presented[0] if presented is not None else None


_DEFAULT_PORTS = {"http": 80, "https": 443}


def request_scheme(scope: dict[str, Any]) -> str:
    """http or https: what the client used to reach us (X-Forwarded-Proto from our nginx)."""
    forwarded = header(scope, b"x-forwarded-proto")
    scheme = forwarded.decode("latin-1").strip().lower() if forwarded else str(scope.get("scheme", "http"))
    return "https" if scheme in {"https", "wss"} else "http"


def trusted_origin(origin: str) -> bool:
    """True if origin is one of CSRF_TRUSTED_ORIGINS (`https://*.example.com` covers subdomains),
    matched as Django's CsrfViewMiddleware matches it for a POST from another origin.

    An operator lists here too what a session websocket may come from, such as awxkit's
    `http://host:port` over wss. An origin without a scheme and host (`null`) never matches.
    """
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if not parts.scheme or not parts.netloc:
        return False
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        if "*" not in trusted:
            if origin == trusted:
                return True
            continue
        allowed = urlsplit(trusted)
        if allowed.scheme == parts.scheme and is_same_domain(parts.netloc, allowed.netloc.lstrip("*")):
            return True
    return False


def same_origin(scope: dict[str, Any], scheme_too: bool) -> bool:
    """True if the Origin header names the host and port the client connected to (the Host
    header, which must be one of ALLOWED_HOSTS), and with scheme_too the same scheme as well.

    awxkit sends `Origin: http://host:port` however it connects (even over wss): a token cookie
    is checked without the scheme. A port the URL leaves out is its scheme's default. An Origin
    listed in Django's CSRF_TRUSTED_ORIGINS is accepted as it is for a form post.
    """
    origin, host = header(scope, b"origin"), header(scope, b"host")
    if not origin or not host:
        return False
    if trusted_origin(origin.decode("latin-1")):
        return True
    parts = urlsplit(origin.decode("latin-1"))
    try:
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return False
    domain, port_text = split_domain_port(host.decode("latin-1"))
    if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
        return False
    host_port = parse_bounded(port_text, 65535)
    if domain.strip("[]") != parts.hostname:
        return False
    if scheme_too:
        scheme = request_scheme(scope)
        return parts.scheme == scheme and (origin_port or _DEFAULT_PORTS[scheme]) == (
            host_port or _DEFAULT_PORTS[scheme]
        )
    # Host and port only: a default port counts as none (awxkit omits 80 and 443 from both).
    defaults = set(_DEFAULT_PORTS.values())
    return (None if origin_port in defaults else origin_port) == (
        None if host_port in defaults else host_port
    )


@database_sync_to_async  # type: ignore[untyped-decorator]  # channels ships no types
def user_for_token(key: str) -> Any:
    """The active user owning a DRF token, or None; with its Viewer (audience.py) as
    `awx_viewer`, read on the same database connection: a handshake costs one, not two."""
    try:
        token = Token.objects.select_related("user").get(key=key)
    except (Token.DoesNotExist, ValueError):
        return None
    if not token.user.is_active:
        return None
    token.user.awx_viewer = viewer_now(token.user)
    return token.user


class WebsocketAuthMiddleware:
    """Resolves the connecting user; refuses the handshake when there is none."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(
        self, scope: dict[str, Any], receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Any:
        """Authenticate, then hand the connection to the inner application or deny it."""
        scope = dict(scope)
        user, method = await self.authenticate(scope)
        if user is None:
            return await deny_websocket(scope, receive, send)
        scope["user"] = user
        scope["auth"] = method
        layer = get_channel_layer()
        if not await connlimit.counter.acquire(layer, user.pk):
            logger.info(
                "websocket of user %s refused: AWX_WS_MAX_CONNECTIONS_PER_USER (%d) open already",
                user.pk,
                ws_settings.MAX_CONNECTIONS_PER_USER,
            )
            return await deny_websocket(scope, receive, send)
        try:
            return await self.inner(scope, receive, send)
        finally:
            # Shielded: daphne cancels a consumer whose client went away, and the count must go.
            await asyncio.shield(connlimit.counter.release(layer, user.pk))

    async def authenticate(self, scope: dict[str, Any]) -> tuple[Any, str | None]:
        """(user, "token" | "session") for valid credentials, else (None, None)."""
        return await authenticate_scope(scope, require_origin=True)


async def authenticate_scope(scope: dict[str, Any], require_origin: bool) -> tuple[Any, str | None]:
    """(user, "token" | "session") for a scope's credentials, else (None, None).

    A token in the Authorization header or the query is the client's own doing: no Origin rule.
    Cookies are sent by the browser by itself, so whoever opened the connection (another site
    may): a `token` cookie with an Origin needs the same host and port; a session needs a
    same-origin Origin (scheme, host and port): always for websockets, and for plain HTTP
    whenever the browser sends one (cross-site reads). ALLOWED_HOSTS=* widens neither.
    """
    client = scope.get("client")
    presented = presented_token(scope)
    if presented is not None:
        key, where = presented
        if (
            where == "cookie"
            and header(scope, b"origin") is not None
            and not same_origin(scope, scheme_too=False)
        ):
            logger.warning(
                "%s refused: token cookie with foreign Origin %r from %s",
                scope["type"],
                header(scope, b"origin"),
                client,
            )
            return None, None
        user = await user_for_token(key)
        if user is not None:
            return user, "token"
        if where != "cookie":
            # A presented but bad token is a refusal, never a fall-back to the session (as DRF).
            logger.info("%s refused: invalid or inactive token from %s", scope["type"], client)
            return None, None
        # A cookie planted from a sibling domain must not lock the user's session out.
        logger.info("%s: ignoring an invalid token cookie from %s", scope["type"], client)
    user = await get_user(scope)
    if isinstance(user, AnonymousUser) or not user.is_active:
        logger.info("%s refused: no credentials from %s", scope["type"], client)
        return None, None
    if (require_origin or header(scope, b"origin") is not None) and not same_origin(scope, scheme_too=True):
        logger.warning(
            "%s refused: session cookie with foreign or missing Origin %r from %s",
            scope["type"],
            header(scope, b"origin"),
            client,
        )
        return None, None
    return user, "session"


async def still_authenticated(scope: dict[str, Any]) -> Any:
    """The connection's user, read afresh, if the credential it connected with still holds;
    None when the token or session is gone, the user inactive, or the session now someone else's.
    A session that holds replaces scope["session"] (read afresh too)."""
    user: Any = None
    if scope.get("auth") == "token":
        key = token_from_scope(scope)
        user = await user_for_token(key) if key is not None else None
    elif scope.get("auth") == "session":
        # A fresh store: the connection's own cached the session as it was at connect.
        engine = import_module(settings.SESSION_ENGINE)
        fresh = engine.SessionStore(scope["session"].session_key)
        user = await get_user({"session": fresh})
        if isinstance(user, AnonymousUser) or not user.is_active:
            user = None
        else:
            scope["session"] = fresh  # its expiry date may have moved on since the connect
    if user is None or user.pk != scope["user"].pk:
        return None
    return user


async def session_expiry(scope: dict[str, Any]) -> float | None:
    """When a session-authenticated connection's session expires (epoch seconds); None for tokens."""
    if scope.get("auth") != "session":
        return None
    expires = await database_sync_to_async(scope["session"].get_expiry_date)()
    return float(expires.timestamp())


class PeerAuthMiddleware:
    """Admits a peer node's relay by its signed header (peerauth.py); anything else gets HTTP 403."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(
        self, scope: dict[str, Any], receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Any:
        """Verify the header for this node and path and the nonce's freshness, then hand over."""
        secret = header(scope, peerauth.HEADER.encode())
        audience = header(scope, peerauth.AUDIENCE_HEADER.encode())
        own_audience = peerauth.audience_of(ws_settings.BROADCAST_WEBSOCKET_SELF)
        try:
            nonce = peerauth.verify(
                secret.decode("latin-1") if secret else None,
                audience.decode("latin-1") if audience else None,
                scope["path"],
                ws_settings.BROADCAST_WEBSOCKET_SECRET,
                own_audience,
                ws_settings.BROADCAST_WEBSOCKET_NONCE_WINDOW,
            )
            await self._refuse_replay(nonce)
        except peerauth.PeerAuthError as exc:
            logger.warning("peer relay refused from %s: %s", scope.get("client"), exc)
            return await deny_websocket(scope, receive, send)
        peer = header(scope, b"x-awx-ws-node")
        scope = dict(
            scope,
            peer=peer.decode("latin-1") if peer else str(scope.get("client")),
            # The consumer's first frame proves this node holds the secret too (peerauth.proof).
            peer_proof=peerauth.proof(ws_settings.BROADCAST_WEBSOCKET_SECRET, nonce, own_audience),
        )
        return await self.inner(scope, receive, send)

    async def _refuse_replay(self, nonce: str) -> None:
        given = get_channel_layer()
        layer = service_layer(given)
        if layer is None:
            raise peerauth.PeerAuthError(f"{type(given).__name__} keeps no nonces: peers need our layers")
        # Past the window the header is refused for its time anyway.
        ttl = ws_settings.BROADCAST_WEBSOCKET_NONCE_WINDOW * 2 + 1
        try:
            fresh = await layer.remember_nonce(nonce, ttl)
        except (DatabaseError, OSError) as exc:  # LayerUnavailable is an OSError
            raise peerauth.PeerAuthError(f"cannot check the nonce: {exc}") from exc
        if not fresh:
            raise peerauth.PeerAuthError("nonce already used on this node (a replayed header)")


def WebsocketAuthStack(inner: Any) -> Any:  # noqa: N802 (named like Channels' AuthMiddlewareStack)
    """Cookies, session and our authentication around a websocket application."""
    return CookieMiddleware(SessionMiddleware(WebsocketAuthMiddleware(inner)))
