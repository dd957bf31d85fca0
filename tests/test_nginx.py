"""End to end through real nginx: websockets to daphne, plain HTTP to the API (gunicorn)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from awx_ws.main import peerauth
from awx_ws.main.emit import aemit_channel_notification
from tests.client import open_peer_socket, open_ws
from tests.factories import adb, create_job, create_org, session_cookie
from tests.servers import ROOT

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.both_runners]


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@pytest.mark.parametrize("path", ["/websocket/", "/api/websocket/"])
async def test_token_client_through_nginx_receives_what_manage_py_emit_sends(nginx, token, user, path):
    job = await adb(create_job, await adb(create_org, user))  # statuses reach the job's members
    client = await open_ws(
        f"ws://127.0.0.1:{nginx.port}", path=path, headers={"Authorization": f"Token {token}"}
    )
    assert client.hello == {"accept": True, "user": user.pk}
    errors, reply = await client.subscribe({"jobs": ["status_changed"]})
    assert reply["groups_current"] == ["jobs-status_changed"]
    payload = {
        "group_name": "jobs",
        "unified_job_id": job.pk,
        "status": "successful",
        "finished": "2026-11-23T10:00:00Z",
    }
    emit = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "manage.py", "emit", "jobs-status_changed", json.dumps(payload)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert emit.returncode == 0, emit.stderr
    assert await client.recv_json(timeout=10) == payload
    await client.close()


async def test_browser_session_through_nginx_with_its_own_origin(nginx, user):
    csrf = secrets.token_hex(16)
    client = await open_ws(
        f"ws://127.0.0.1:{nginx.port}",
        headers={"Cookie": f"awx_sessionid={await adb(session_cookie, user)}; csrftoken={csrf}"},
        origin=f"http://127.0.0.1:{nginx.port}",
    )
    client.xrftoken = csrf
    errors, reply = await client.subscribe({"jobs": ["summary"]})
    assert reply["groups_current"] == ["jobs-summary"]
    await client.close()


def test_plain_http_goes_to_the_api(nginx, api):
    status, body = http_get(f"http://127.0.0.1:{nginx.port}/api/")
    assert status == 200
    assert json.loads(body)["websocket"] == "/websocket/"
    assert api.wait_for_output('"GET /api/ HTTP/1.')


def test_websocket_path_without_upgrade_is_the_apis_to_answer(nginx, api):
    status, _ = http_get(f"http://127.0.0.1:{nginx.port}/websocket/")
    assert status == 404
    assert api.wait_for_output('"GET /websocket/ HTTP/1.')


async def test_peer_relays_reach_the_broadcast_endpoint_through_nginx(nginx, node):
    url = f"ws://127.0.0.1:{nginx.port}/websocket/broadcast/"
    secret = os.environ["BROADCAST_WEBSOCKET_SECRET"]
    # Signed for the node behind nginx (its BROADCAST_WEBSOCKET_SELF), which proves itself back.
    async with await open_peer_socket(url, node.self_address, secret) as ws:
        await ws.send(json.dumps({"join": ["jobs-through_nginx"], "leave": []}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {
            "forwarding": ["jobs-through_nginx"],
            "dropped": [],
        }
        await aemit_channel_notification("jobs-through_nginx", {"via": "nginx"})
        forwarded = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert forwarded.pop("id")  # the origin's history id
        assert forwarded == {"group": "jobs-through_nginx", "text": json.dumps({"via": "nginx"})}
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, additional_headers=peerauth.sign("wrong", node.self_address).headers("tests"))
    assert refused.value.response.status_code == 403


async def test_nginx_limits_what_one_address_may_open(node, api, token, state_dir):
    """Per client address (this machine's too, for the test): open sockets, and handshakes per
    second; past either nginx answers 429 and daphne never sees the request."""
    from awx_ws.main.management.commands.nginx_conf import AddressLimits
    from tests.client import refused_status
    from tests.servers import Nginx

    headers = {"Authorization": f"Token {token}"}
    held = Nginx(
        state_dir / f"nginx-held-{secrets.token_hex(3)}",
        node.port,
        api.port,
        limits=AddressLimits(connections=3, handshake_rate="1000r/s", handshake_burst=1000, unlimited=()),
    ).start()
    rated = Nginx(
        state_dir / f"nginx-rated-{secrets.token_hex(3)}",
        node.port,
        api.port,
        limits=AddressLimits(connections=1000, handshake_rate="1r/m", handshake_burst=2, unlimited=()),
    ).start()
    try:
        sockets = [await open_ws(held.http_url.replace("http", "ws"), headers=headers) for _ in range(3)]
        assert await refused_status(held.http_url.replace("http", "ws"), headers=headers) == 429
        for ws in sockets:
            await ws.close()

        statuses = []
        for _ in range(6):  # one a minute with a burst of 2: 3 through, whatever the machine's speed
            try:
                client = await open_ws(rated.http_url.replace("http", "ws"), headers=headers)
                statuses.append(101)
                await client.close()
            except InvalidStatus as exc:
                statuses.append(exc.response.status_code)
        assert statuses == [101] * 3 + [429] * 3
    finally:
        held.stop()
        rated.stop()
