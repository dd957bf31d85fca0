"""The relay's authentication rules, in-process: what a header is valid for, and the node's proof."""

from __future__ import annotations

import pytest

from awx_ws.main import peerauth

pytestmark = pytest.mark.unit

SECRET = "peerauth-tests-secret"
NODE_B = "10.0.0.2:8051"
B = peerauth.audience_of(NODE_B)


def verify(credentials: peerauth.Credentials, own: str = B, path: str = peerauth.BROADCAST_PATH) -> str:
    return peerauth.verify(credentials.header, credentials.audience, path, SECRET, own, 300)


def test_a_header_is_valid_for_the_node_and_path_it_was_signed_for():
    credentials = peerauth.sign(SECRET, NODE_B)
    assert credentials.audience == "ws://10.0.0.2:8051/websocket/broadcast/"
    assert verify(credentials) == credentials.nonce


def test_a_host_port_entry_and_its_url_name_the_same_node():
    assert peerauth.audience_of(NODE_B) == peerauth.audience_of("ws://10.0.0.2:8051/websocket/broadcast/")


def test_a_header_for_another_node_is_refused_naming_both():
    credentials = peerauth.sign(SECRET, "10.0.0.3:8051")
    with pytest.raises(peerauth.PeerAuthError, match="signed for ws://10.0.0.3:8051/.*not for this node"):
        verify(credentials)


def test_an_audience_rewritten_to_this_node_breaks_the_digest():
    credentials = peerauth.sign(SECRET, "10.0.0.3:8051")
    with pytest.raises(peerauth.PeerAuthError, match="wrong HMAC digest"):
        peerauth.verify(credentials.header, B, peerauth.BROADCAST_PATH, SECRET, B, 300)


def test_a_header_for_another_path_is_refused():
    credentials = peerauth.sign(SECRET, NODE_B)
    with pytest.raises(peerauth.PeerAuthError, match="wrong HMAC digest for /websocket/"):
        verify(credentials, path="/websocket/")


def test_an_old_or_foreign_header_is_refused():
    credentials = peerauth.sign(SECRET, NODE_B, now=1_000_000)
    with pytest.raises(peerauth.PeerAuthError, match="away from our clock"):
        verify(credentials)
    with pytest.raises(peerauth.PeerAuthError, match="wrong HMAC digest"):
        peerauth.verify(credentials.header, B, peerauth.BROADCAST_PATH, "other-secret", B, 300)
    with pytest.raises(peerauth.PeerAuthError, match="no 'x-awx-ws-audience' header"):
        peerauth.verify(credentials.header, None, peerauth.BROADCAST_PATH, SECRET, B, 300)


def test_only_a_holder_of_the_secret_can_answer_a_fresh_nonce():
    credentials = peerauth.sign(SECRET, NODE_B)
    peerauth.check_proof(SECRET, credentials, peerauth.proof(SECRET, credentials.nonce, B))
    earlier = peerauth.sign(SECRET, NODE_B)
    for offered in (
        peerauth.proof("other-secret", credentials.nonce, B),
        peerauth.proof(SECRET, earlier.nonce, B),  # a proof replayed from another handshake
        peerauth.proof(SECRET, credentials.nonce, peerauth.audience_of("10.0.0.3:8051")),
        credentials.header,  # the dialler's own digest sent back
        None,
        42,
    ):
        with pytest.raises(peerauth.PeerAuthError, match="did not prove"):
            peerauth.check_proof(SECRET, credentials, offered)


@pytest.mark.parametrize(
    ("peer", "exposed"),
    [
        ("node2:8051", True),
        ("10.0.0.2:8051", True),
        ("ws://node2:8013/websocket/broadcast/", True),
        ("ws://[2001:db8::2]:8051/websocket/broadcast/", True),
        ("wss://node2:8443/websocket/broadcast/", False),
        ("127.0.0.1:8051", False),
        ("127.0.0.2:8051", False),
        ("localhost:8051", False),
        ("ws://[::1]:8051/websocket/broadcast/", False),
    ],
)
def test_a_plain_hop_off_this_host_is_exposed(peer, exposed):
    assert peerauth.exposed_hop(peer) is exposed
