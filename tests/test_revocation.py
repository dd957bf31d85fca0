"""Access taken away reaches open connections within 5 s: closed (4003) when the credential is
gone, out of the groups the user may no longer read when only that changed; on every node that
shares the database, websocket and SSE alike."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from awx_ws.main.emit import aemit_channel_notification
from tests.client import WsClient, emit_to, open_ws
from tests.factories import adb, create_job, create_org, create_token, create_user, session_cookie
from tests.sse import open_sse

pytestmark = [pytest.mark.usefixtures("shared_db"), pytest.mark.every_server]

REVOKED = 4003
DEADLINE = 5.0  # the promise: within 5 s of the change


async def close_code(client: WsClient, timeout: float = DEADLINE) -> int | None:
    """The close code the server sends within timeout (frames before it are skipped)."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await client.ws.recv()
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else None


@pytest.fixture
async def member() -> Any:
    return await adb(create_user)


@pytest.fixture
async def member_token(member: Any) -> str:
    return await adb(create_token, member)


async def test_deleting_a_token_closes_its_websockets_with_4003(node, member_token):
    from rest_framework.authtoken.models import Token

    headers = {"Authorization": f"Token {member_token}"}
    first, second = await open_ws(node.url, headers=headers), await open_ws(node.url, headers=headers)
    await first.subscribe({"jobs": ["status_changed"]})
    await adb(lambda: Token.objects.filter(key=member_token).delete())
    assert await close_code(first) == REVOKED
    assert await close_code(second) == REVOKED
    assert node.wait_for_output("its credential was revoked")


async def test_deactivating_a_user_closes_their_websockets(node, member, member_token):
    client = await open_ws(node.url, headers={"Authorization": f"Token {member_token}"})

    def deactivate() -> None:
        member.is_active = False
        member.save()

    await adb(deactivate)
    assert await close_code(client) == REVOKED


async def test_other_users_connections_are_left_alone(node, member_token, token):
    from rest_framework.authtoken.models import Token

    bystander = await open_ws(node.url, headers={"Authorization": f"Token {token}"})
    await bystander.subscribe({"jobs": ["status_changed"]})
    doomed = await open_ws(node.url, headers={"Authorization": f"Token {member_token}"})
    await adb(lambda: Token.objects.filter(key=member_token).delete())
    assert await close_code(doomed) == REVOKED
    await aemit_channel_notification("jobs-status_changed", {"still": "here"})
    assert await bystander.recv_json() == {"still": "here"}
    await bystander.close()


async def test_logging_out_closes_the_sessions_websocket(node, api, member, database):
    from tests.factories import set_login_password

    await adb(set_login_password, member, "pw-for-logout")
    async with httpx.AsyncClient(base_url=api.http_url, timeout=30) as browser:
        form = await browser.get("/login/")
        csrf = browser.cookies["csrftoken"]
        logged_in = await browser.post(
            "/login/",
            data={"username": member.username, "password": "pw-for-logout", "csrfmiddlewaretoken": csrf},
            headers={"Referer": f"{api.http_url}/login/"},
        )
        assert logged_in.status_code == 302, form.text[:200]
        session = browser.cookies["awx_sessionid"]
        client = await open_ws(
            node.url,
            headers={"Cookie": f"awx_sessionid={session}; csrftoken={browser.cookies['csrftoken']}"},
            origin=f"http://127.0.0.1:{node.port}",
        )
        assert client.hello["user"] == member.pk
        logged_out = await browser.post(
            "/logout/",
            data={"csrfmiddlewaretoken": browser.cookies["csrftoken"]},
            headers={"Referer": f"{api.http_url}/"},
        )
        assert logged_out.status_code in (200, 302)
    assert await close_code(client) == REVOKED


async def test_a_session_that_expires_closes_its_websocket(node, member):
    from django.contrib.sessions.backends.db import SessionStore

    key = await adb(session_cookie, member)

    def expire_soon() -> None:
        session = SessionStore(key)
        session.set_expiry(3)
        session.save()

    await adb(expire_soon)
    client = await open_ws(
        node.url, headers={"Cookie": f"awx_sessionid={key}"}, origin=f"http://127.0.0.1:{node.port}"
    )
    assert client.hello["user"] == member.pk
    started = time.monotonic()
    assert await close_code(client, 3 + DEADLINE) == REVOKED
    assert time.monotonic() - started >= 2  # not before its expiry


async def test_removing_a_membership_leaves_that_jobs_groups_only(node, member, member_token):
    org = await adb(create_org, member)
    job = await adb(create_job, org)
    client = await open_ws(node.url, headers={"Authorization": f"Token {member_token}"})
    errors, reply = await client.subscribe({"jobs": ["status_changed"], "job_events": [job.pk]})
    assert errors == [] and reply["groups_current"] == [f"job_events-{job.pk}", "jobs-status_changed"]

    await adb(org.members.remove, member)
    async with asyncio.timeout(DEADLINE):
        notice = await client.recv_json()
    assert notice == {
        "groups_current": ["jobs-status_changed"],
        "groups_left": [f"job_events-{job.pk}"],
        "groups_joined": [],
    }
    # The job's output no longer arrives; the rest still does, on the same socket.
    await aemit_channel_notification(f"job_events-{job.pk}", {"secret": "output"})
    await aemit_channel_notification("jobs-status_changed", {"after": "removal"})
    assert await client.recv_json() == {"after": "removal"}
    await client.assert_silent(0.5)
    await client.close()


async def test_an_sse_stream_ends_when_its_token_goes_and_leaves_jobs_it_may_no_longer_read(
    node, member, member_token
):
    from rest_framework.authtoken.models import Token

    org = await adb(create_org, member)
    job = await adb(create_job, org)
    headers = {"Authorization": f"Token {member_token}"}
    async with open_sse(node.http_url, f"jobs-status_changed,job_events-{job.pk}", headers=headers) as stream:
        await stream.wait_ready()
        await adb(org.members.remove, member)
        event = await stream.next_event(DEADLINE)
        assert event.event == "access-changed"
        assert event.json() == {
            "groups_current": ["jobs-status_changed"],
            "groups_left": [f"job_events-{job.pk}"],
            "groups_joined": [],
        }
        await aemit_channel_notification(f"job_events-{job.pk}", {"secret": "output"})
        await aemit_channel_notification("jobs-status_changed", {"after": "removal"})
        assert await stream.payloads(1) == [{"after": "removal"}]

        await adb(lambda: Token.objects.filter(key=member_token).delete())
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(StopAsyncIteration):
                while True:
                    await anext(stream.events)  # the server ends the response


async def test_revocation_reaches_every_node_sharing_the_database(node, daphne_factory, own_redis):
    """Two nodes, each with its own Redis (no relay between them): the database carries it."""
    from rest_framework.authtoken.models import Token

    user = await adb(create_user)
    key = await adb(create_token, user)
    other = daphne_factory({"REDIS_URL": own_redis.url})
    on_this = await open_ws(node.url, headers={"Authorization": f"Token {key}"})
    on_other = await open_ws(other.url, headers={"Authorization": f"Token {key}"})
    await emit_to(own_redis.url, "jobs-status_changed", {"warm": True})  # the other node is live
    await adb(lambda: Token.objects.filter(key=key).delete())
    assert await close_code(on_this) == REVOKED
    assert await close_code(on_other) == REVOKED


# --- writes that bypass the signals: the sweep (AWX_WS_REVOCATION_SWEEP) -----------------------

SWEEP = 1.0  # seconds between sweeps on the daphne of these tests (30 by default)


@pytest.fixture
def sweeping(daphne_factory: Any) -> Any:
    """A daphne of the test's own that sweeps every SWEEP seconds."""
    return daphne_factory({"AWX_WS_REVOCATION_SWEEP": str(SWEEP)})


def run_sql(sql: str, *params: Any) -> None:
    """A write straight to the database: no model, no signal, no AccessChange row."""
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params)


def recorded_changes(user: Any) -> int:
    from awx_ws.main.models import AccessChange

    return AccessChange.objects.filter(user_id=user.pk).count()


async def test_a_user_deactivated_by_a_bulk_update_is_closed_by_the_sweep(
    sweeping, member, member_token, token
):
    from django.contrib.auth.models import User

    headers = {"Authorization": f"Token {member_token}"}
    client = await open_ws(sweeping.url, headers=headers)
    bystander = await open_ws(sweeping.url, headers={"Authorization": f"Token {token}"})
    await bystander.subscribe({"jobs": ["status_changed"]})
    async with open_sse(sweeping.http_url, "jobs-status_changed", headers=headers) as stream:
        await stream.wait_ready()
        await adb(lambda: User.objects.filter(pk=member.pk).update(is_active=False))
        assert await adb(recorded_changes, member) == 0  # no signal: only the sweep can see it
        assert await close_code(client, SWEEP + DEADLINE) == REVOKED
        async with asyncio.timeout(SWEEP + DEADLINE):
            with pytest.raises(StopAsyncIteration):
                while True:
                    await anext(stream.events)  # the server ends the response
    await aemit_channel_notification("jobs-status_changed", {"still": "here"})
    assert await bystander.recv_json() == {"still": "here"}  # the sweep left it alone
    await bystander.close()
    assert sweeping.wait_for_output("2 of 3 open connections changed without a record")


async def test_a_token_deleted_in_sql_is_closed_by_the_sweep(sweeping, member, member_token):
    client = await open_ws(sweeping.url, headers={"Authorization": f"Token {member_token}"})
    await adb(run_sql, "DELETE FROM authtoken_token WHERE key = %s", member_token)
    assert await close_code(client, SWEEP + DEADLINE) == REVOKED


async def test_a_membership_deleted_in_sql_leaves_that_jobs_groups(sweeping, member, member_token):
    from awx_ws.main.models import Organization

    org = await adb(create_org, member)
    job = await adb(create_job, org)
    client = await open_ws(sweeping.url, headers={"Authorization": f"Token {member_token}"})
    errors, reply = await client.subscribe({"jobs": ["status_changed"], "job_events": [job.pk]})
    assert errors == []
    table = Organization.members.through._meta.db_table
    await adb(run_sql, f"DELETE FROM {table} WHERE user_id = %s", member.pk)  # noqa: S608 (our table name)
    async with asyncio.timeout(SWEEP + DEADLINE):
        notice = await client.recv_json()
    assert notice == {
        "groups_current": ["jobs-status_changed"],
        "groups_left": [f"job_events-{job.pk}"],
        "groups_joined": [],
    }
    await client.close()
