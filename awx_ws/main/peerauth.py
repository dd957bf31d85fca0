"""Peer authentication for the relay, both ways, bound to the node dialled and the path.

The dialling side sends `secret: HMAC-SHA256 <nonce>:<hexdigest>` (AWX's header shape) and
`x-awx-ws-audience: <the node it dials>`. The nonce is `<unix time>-<random hex>`; the digest is
HMAC-SHA256 keyed by the shared BROADCAST_WEBSOCKET_SECRET over the nonce, the audience and the
request path. The receiving node refuses a header signed for another node (its audience is this
node's own BROADCAST_WEBSOCKET_SELF) or another path, a nonce outside the time window and a nonce
seen before on this node. So a header captured on one link opens nothing anywhere else.

The dialled node proves itself in turn: its first frame is `{"proof": <hexdigest>}`, HMAC-SHA256
over the dialler's nonce and audience with a different label, which only a holder of the secret
can compute for that fresh nonce. A dialler drops a peer whose first frame is anything else.

What this cannot stop on a plain `ws://` hop: an active man-in-the-middle can hold a fresh header
back from the node it was meant for and present it there once, within the window, as if it were
the dialler; it is then a peer of that node (it may ask for the node's messages). Between
machines, dial `wss://` (`exposed_hop` says which peers do not; the relay warns of each at start).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

HEADER = "secret"
AUDIENCE_HEADER = "x-awx-ws-audience"
SCHEME = "HMAC-SHA256"
BROADCAST_PATH = "/websocket/broadcast/"


class PeerAuthError(Exception):
    """Why a peer's credentials (or a dialled peer's proof) were refused."""


def peer_url(peer: str) -> str:
    """ws://host:port/websocket/broadcast/ for a `host:port` entry; URLs are taken as they are."""
    if "://" in peer:
        return peer
    return f"ws://{peer}{BROADCAST_PATH}"


def exposed_hop(peer: str) -> bool:
    """True when peer is dialled over plain ws:// at an address that is not this host's loopback."""
    parts = urlsplit(peer_url(peer))
    if parts.scheme != "ws":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: another machine, as far as this node can tell


def audience_of(peer: str) -> str:
    """The name a node is signed for: its BROADCAST_WEBSOCKET_PEERS entry, as a URL."""
    return peer_url(peer)


def announcement_mac(secret: str, fields: list[str]) -> str:
    """HMAC-SHA256 of a discovery announcement's fields (discovery.py), keyed by the secret.

    The fields are any text (a cluster id may hold anything), so they are joined as a JSON list:
    no two different lists encode the same."""
    message = json.dumps(["announce", *fields]).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _digest(secret: str, *parts: str) -> str:
    # Newlines cannot occur in a nonce, a URL or a path (header values), so the join is unambiguous.
    return hmac.new(secret.encode(), "\n".join(parts).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Credentials:
    """What a dialler presents to one peer, and what it expects back."""

    nonce: str
    audience: str
    path: str
    header: str

    def headers(self, node: str) -> dict[str, str]:
        """The handshake headers: the signed secret, its audience and our node name (for logs)."""
        return {HEADER: self.header, AUDIENCE_HEADER: self.audience, "x-awx-ws-node": node}


def sign(secret: str, peer: str, now: float | None = None) -> Credentials:
    """Credentials for dialling peer (a BROADCAST_WEBSOCKET_PEERS entry) once."""
    if not secret:
        raise PeerAuthError("BROADCAST_WEBSOCKET_SECRET is empty")
    url = peer_url(peer)
    audience, path = audience_of(peer), urlsplit(url).path or "/"
    nonce = f"{int(time.time() if now is None else now)}-{secrets.token_hex(8)}"
    header = f"{SCHEME} {nonce}:{_digest(secret, 'dial', nonce, audience, path)}"
    return Credentials(nonce, audience, path, header)


def verify(
    value: str | None,
    audience: str | None,
    path: str,
    secret: str,
    own_audience: str,
    window: float,
    now: float | None = None,
) -> str:
    """Check a dialler's header on this node (own_audience) at path; return its nonce, or raise
    PeerAuthError saying why not."""
    if not secret:
        raise PeerAuthError("BROADCAST_WEBSOCKET_SECRET is empty on this node: every peer is refused")
    if not value:
        raise PeerAuthError(f"no {HEADER!r} header")
    if not audience:
        raise PeerAuthError(f"no {AUDIENCE_HEADER!r} header (a relay of an older version?)")
    if audience != own_audience:
        raise PeerAuthError(
            f"signed for {audience}, not for this node ({own_audience}, BROADCAST_WEBSOCKET_SELF)"
        )
    scheme, _, credentials = value.partition(" ")
    nonce, _, digest = credentials.partition(":")
    if scheme != SCHEME or not nonce or not digest:
        raise PeerAuthError(f"malformed {HEADER!r} header")
    if not hmac.compare_digest(digest.encode(), _digest(secret, "dial", nonce, audience, path).encode()):
        raise PeerAuthError(f"wrong HMAC digest for {path} (a different secret?)")
    stamp, _, _ = nonce.partition("-")
    try:
        skew = abs((time.time() if now is None else now) - int(stamp))
    except ValueError as exc:
        raise PeerAuthError("nonce does not start with a unix time") from exc
    if skew > window:
        raise PeerAuthError(f"nonce {skew:.0f}s away from our clock (window {window:g}s)")
    return nonce


def proof(secret: str, nonce: str, audience: str) -> str:
    """What the dialled node answers first: it knows the secret, for this very handshake."""
    return _digest(secret, "answer", nonce, audience)


def check_proof(secret: str, credentials: Credentials, offered: object) -> None:
    """Raise PeerAuthError unless offered is the dialled node's proof for credentials."""
    if not isinstance(offered, str) or not hmac.compare_digest(
        offered.encode(), proof(secret, credentials.nonce, credentials.audience).encode()
    ):
        raise PeerAuthError(
            f"{credentials.audience} did not prove it holds BROADCAST_WEBSOCKET_SECRET (an impostor, "
            "or a node of an older version)"
        )
