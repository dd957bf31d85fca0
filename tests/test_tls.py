"""TLS: nginx serves WSS on a second port; relays dial peers over verified wss://."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from websockets.asyncio.client import connect

from awx_ws.main.emit import aemit_channel_notification
from awx_ws.main.management.commands.tls_cert import self_signed
from tests.client import open_ws
from tests.servers import Nginx, Relay
from tests.test_cluster import make_nodes

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.slow]


def write_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as files."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = self_signed(["127.0.0.1", "localhost"])
    certificate, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    certificate.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return certificate, key


async def test_a_client_connects_over_wss_through_nginx(node, api, token, state_dir):
    certificate, key = write_pair(state_dir / "tls", "front")
    front = Nginx(
        state_dir / f"nginx-tls-{time.monotonic_ns()}", node.port, api.port, tls=(certificate, key)
    ).start()
    try:
        url = f"wss://127.0.0.1:{front.tls_port}"
        trusting = ssl.create_default_context(cafile=str(certificate))
        async with connect(
            f"{url}/websocket/", ssl=trusting, additional_headers={"Authorization": f"Token {token}"}
        ) as ws:
            assert json.loads(await ws.recv())["accept"] is True
            await ws.send(json.dumps({"groups": {"jobs": ["over_tls"]}}))
            assert json.loads(await ws.recv())["groups_current"] == ["jobs-over_tls"]
            await aemit_channel_notification("jobs-over_tls", {"secure": True})
            assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"secure": True}
        # A client that does not trust the certificate gets no further than the TLS handshake.
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(f"{url}/websocket/", ssl=ssl.create_default_context())
    finally:
        front.stop()


def wait_state(node_redis_url: str, peer: str, state: str, timeout: float = 30.0) -> None:
    redis = SyncRedis.from_url(node_redis_url)
    deadline = time.monotonic() + timeout
    while redis.hget(f"asgi:relay-status:{peer}", "state") != state.encode():
        assert time.monotonic() < deadline, f"relay link to {peer} not {state}"
        time.sleep(0.1)
    redis.close()


async def test_relays_talk_over_verified_wss_and_refuse_a_wrong_certificate(api, token, state_dir):
    a, b = make_nodes(state_dir, [f"tlsA{time.monotonic_ns()}", f"tlsB{time.monotonic_ns()}"])
    certificate, key = write_pair(state_dir / "tls", f"cluster{time.monotonic_ns()}")
    fronts = [
        Nginx(state_dir / f"nginx-{node.name}", node.daphne_port, api.port, tls=(certificate, key)).start()
        for node in (a, b)
    ]
    peers = [f"wss://127.0.0.1:{front.tls_port}/websocket/broadcast/" for front in fronts]
    for node, own in zip((a, b), peers, strict=True):
        node.env.update(
            {
                "BROADCAST_WEBSOCKET_PEERS": ",".join(peers),
                "BROADCAST_WEBSOCKET_SELF": own,
                "BROADCAST_WEBSOCKET_CA_BUNDLE": str(certificate),
            }
        )
    stranger = None
    try:
        for node in (a, b):
            node.start()
        wait_state(a.redis.url, peers[1], "connected")
        wait_state(b.redis.url, peers[0], "connected")
        item = f"tls{time.monotonic_ns()}"
        on_a = await open_ws(a.url, headers={"Authorization": f"Token {token}"})
        await on_a.subscribe({"schedules": [item]})
        for probe in range(100):  # until A's interest has reached B over wss
            await b.emit(f"schedules-{item}", {"n": probe})
            try:
                assert (await on_a.recv_json(0.2))["n"] == probe
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("nothing crossed from B to A over wss")
        await on_a.close()

        # A relay that trusts another CA refuses B's certificate and says which setting to fix.
        other_ca, _ = write_pair(state_dir / "tls", "other")
        # A second relay of node A (under another name on A's Redis it would be a node sharing A's
        # layer, which topology.py refuses), trusting another CA.
        env = {**a.env, "BROADCAST_WEBSOCKET_CA_BUNDLE": str(other_ca)}
        env["BROADCAST_WEBSOCKET_PEERS"] = peers[1]
        stranger = Relay(a.workdir, "stranger", env).start()
        assert stranger.wait_for_output("TLS certificate not trusted", 30)
        assert "BROADCAST_WEBSOCKET_CA_BUNDLE" in stranger.output()
        assert "certificate verify failed" in stranger.output() or "self-signed" in stranger.output()
    finally:
        if stranger is not None:
            stranger.stop()
        for node in (a, b):
            node.stop()
            node.redis.stop()
        for front in fronts:
            front.stop()


def test_cookies_set_over_https_are_secure_and_https_answers_carry_hsts(node, api, state_dir, shared_db):
    """Over nginx's TLS port the session and CSRF cookies are Secure and HSTS is sent; over its
    plain port neither (a login there still works)."""
    import re

    import httpx

    from tests.factories import create_user, set_login_password

    user = create_user()
    set_login_password(user, "tls-login")
    certificate, key = write_pair(state_dir / "tls", "cookies")
    front = Nginx(
        state_dir / f"nginx-cookies-{time.monotonic_ns()}", node.port, api.port, tls=(certificate, key)
    ).start()
    try:
        for base, secure in ((f"https://127.0.0.1:{front.tls_port}", True), (front.http_url, False)):
            trusting = ssl.create_default_context(cafile=str(certificate))
            with httpx.Client(base_url=base, verify=trusting, timeout=30) as browser:
                form = browser.get("/login/")
                csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
                assert csrf
                response = browser.post(
                    "/login/",
                    data={
                        "username": user.username,
                        "password": "tls-login",
                        "csrfmiddlewaretoken": csrf.group(1),
                    },
                    headers={"Referer": f"{base}/login/"},
                )
                assert response.status_code == 302
                cookies = form.headers.get_list("set-cookie") + response.headers.get_list("set-cookie")
                named = {c.split("=", 1)[0]: c for c in cookies}
                assert set(named) >= {"csrftoken", "awx_sessionid"}
                assert all(("; Secure" in c) is secure for c in named.values()), named
                assert ("strict-transport-security" in response.headers) is secure
    finally:
        front.stop()
