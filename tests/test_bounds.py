"""Bounded bytes: request bodies refused past AWX_WS_MAX_REQUEST_BYTES (413, at the API and at
nginx), and a Redis at its memory limit refusing new writes (503) without losing what it holds."""

from __future__ import annotations

import json

import httpx
import pytest
import redis as sync_redis

from awx_ws.main.exceptions import RedisUnavailable
from tests.client import emit_to, open_ws, watch
from tests.factories import adb, create_token, create_user
from tests.servers import Gunicorn

# Its tests create users, tokens and jobs the servers read (conftest.shared_db).
pytestmark = pytest.mark.usefixtures("shared_db")


@pytest.fixture
def staff_token(shared_db) -> str:
    staff = create_user()
    staff.is_staff = True
    staff.save()
    return create_token(staff)


def emit_body(size: int) -> bytes:
    return json.dumps({"group": "jobs-bounded", "payload": {"stdout": "x" * size}}).encode()


def test_a_body_over_the_limit_is_413_at_the_api_and_at_nginx(api, nginx, staff_token):
    headers = {"Authorization": f"Token {staff_token}", "Content-Type": "application/json"}
    response = httpx.post(
        f"{api.http_url}/api/v2/emit/", content=emit_body(5 * 1024 * 1024), headers=headers, timeout=30
    )
    assert response.status_code == 413
    assert "AWX_WS_MAX_REQUEST_BYTES" in response.json()["detail"]
    # nginx refuses it before the API reads a byte (client_max_body_size).
    response = httpx.post(
        f"{nginx.http_url}/api/v2/emit/", content=emit_body(5 * 1024 * 1024), headers=headers, timeout=30
    )
    assert response.status_code == 413
    # Under the limit, the same request is served.
    response = httpx.post(
        f"{nginx.http_url}/api/v2/emit/", content=emit_body(1024), headers=headers, timeout=30
    )
    assert response.status_code == 202


async def test_a_full_redis_refuses_new_emits_and_keeps_what_it_holds(daphne_factory, own_redis, state_dir):
    """maxmemory with noeviction (make run's redis.conf): emits past it answer 503, naming Redis;
    memberships and history already there stay, and delivery goes on once there is room."""
    staff = await adb(create_user)
    staff.is_staff = True
    await adb(staff.save)
    key = await adb(create_token, staff)
    node = daphne_factory({"REDIS_URL": own_redis.url})
    api = Gunicorn(state_dir / "logs", {"REDIS_URL": own_redis.url}).start()
    control = sync_redis.Redis.from_url(own_redis.url)
    try:
        client = await open_ws(node.url, headers={"Authorization": f"Token {key}"})
        control_group = f"control-limit_reached_{staff.pk}"  # a kind that keeps no history
        await client.subscribe({"schedules": ["bounded"], "control": [f"limit_reached_{staff.pk}"]})
        # Members that are no fan-out: a plain Channels consumer's channel (its own Lua path).
        await watch(own_redis.url, control_group, "control-limit_reached_0")
        headers = {"Authorization": f"Token {key}"}
        post = {"group": "schedules-bounded", "payload": {"n": 1}}
        async with httpx.AsyncClient(base_url=api.http_url, headers=headers, timeout=30) as http:
            assert (await http.post("/api/v2/emit/", json=post)).status_code == 202
            assert await client.recv_json() == {"n": 1}
            # Full: 2 MiB of other data, then a limit below what Redis now uses.
            for n in range(8):
                control.set(f"ballast:{n}", "x" * (256 * 1024))
            used = int(control.info("memory")["used_memory"])
            control.config_set("maxmemory-policy", "noeviction")
            control.config_set("maxmemory", str(used - 512 * 1024))
            members_before = control.zrange("asgi:group:schedules-bounded", 0, -1)
            full = await http.post("/api/v2/emit/", json={**post, "payload": {"n": 2}})
            assert full.status_code == 503, full.text
            assert "REDIS_URL" in full.json()["detail"]
            assert control.zrange("asgi:group:schedules-bounded", 0, -1) == members_before
            # Nothing else grows past the limit either: a kind without history, with a fan-out
            # member and a plain channel, or with a plain channel alone.
            for group in (control_group, "control-limit_reached_0"):
                with pytest.raises(RedisUnavailable, match="maxmemory"):
                    await emit_to(own_redis.url, group, {"n": 2})
            control.delete(*control.keys("ballast:*"))
            assert (await http.post("/api/v2/emit/", json={**post, "payload": {"n": 3}})).status_code == 202
        assert await client.recv_json() == {"n": 3}
        await client.close()
    finally:
        control.config_set("maxmemory", "0")
        control.close()
        api.stop()
