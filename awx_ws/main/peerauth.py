"""Peer authentication for the relay: `secret: HMAC-SHA256 <nonce>:<hexdigest>`, as AWX sends it.

The nonce is `<unix time>-<random hex>`; the digest is HMAC-SHA256 keyed by the shared
BROADCAST_WEBSOCKET_SECRET over the nonce. A nonce outside the time window is refused, and so is a
nonce seen before (the receiving side remembers them for the window: no replays).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

HEADER = "secret"
SCHEME = "HMAC-SHA256"


class PeerAuthError(Exception):
    """Why a peer's credentials were refused (for the log line; the peer only sees 403)."""


def _digest(secret: str, nonce: str) -> str:
    return hmac.new(secret.encode(), nonce.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, now: float | None = None) -> str:
    """The header value a relay sends to a peer."""
    if not secret:
        raise PeerAuthError("BROADCAST_WEBSOCKET_SECRET is empty")
    nonce = f"{int(time.time() if now is None else now)}-{secrets.token_hex(8)}"
    return f"{SCHEME} {nonce}:{_digest(secret, nonce)}"


def verify(value: str | None, secret: str, window: float, now: float | None = None) -> str:
    """Check a header value; return its nonce, or raise PeerAuthError saying why not."""
    if not secret:
        raise PeerAuthError("BROADCAST_WEBSOCKET_SECRET is empty on this node: every peer is refused")
    if not value:
        raise PeerAuthError(f"no {HEADER!r} header")
    scheme, _, credentials = value.partition(" ")
    nonce, _, digest = credentials.partition(":")
    if scheme != SCHEME or not nonce or not digest:
        raise PeerAuthError(f"malformed {HEADER!r} header")
    if not hmac.compare_digest(digest.encode(), _digest(secret, nonce).encode()):
        raise PeerAuthError("wrong HMAC digest (different secret?)")
    stamp, _, _ = nonce.partition("-")
    try:
        skew = abs((time.time() if now is None else now) - int(stamp))
    except ValueError as exc:
        raise PeerAuthError("nonce does not start with a unix time") from exc
    if skew > window:
        raise PeerAuthError(f"nonce {skew:.0f}s away from our clock (window {window:g}s)")
    return nonce


class NonceMemory:
    """Nonces seen in this process, each kept for its ttl (layers without a shared store)."""

    def __init__(self) -> None:
        self._expires: dict[str, float] = {}

    def add(self, nonce: str, ttl: float, now: float | None = None) -> bool:
        """Remember nonce; False when it was seen before and has not expired."""
        now = time.monotonic() if now is None else now
        # Forget expired ones first: at most one window's worth of peer connections is kept.
        for old in [old for old, expires in self._expires.items() if expires <= now]:
            del self._expires[old]
        if nonce in self._expires:
            return False
        self._expires[nonce] = now + ttl
        return True
