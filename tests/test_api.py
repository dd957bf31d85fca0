"""The REST API under /api/v2/: every endpoint, permission and transition, errors included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.core.cache import cache
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.factories import create_job, create_org, create_token, create_user
from tests.servers import ROOT, Gunicorn, free_port

# Its tests create users, tokens and jobs the servers read (conftest.shared_db).
pytestmark = pytest.mark.usefixtures("shared_db")


@pytest.fixture
def member() -> Any:
    return create_user()


@pytest.fixture
def admin() -> Any:
    return create_user(superuser=True)


@pytest.fixture
def org(member: Any) -> Any:
    return create_org(member)


def as_user(user: Any | None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {create_token(user)}")
    return client


# --- root, tokens, me -----------------------------------------------------------------------


def test_root_lists_the_endpoints():
    response = APIClient().get("/api/v2/")
    assert response.status_code == 200
    assert response.json() == {
        "tokens": "http://testserver/api/v2/tokens/",
        "me": "http://testserver/api/v2/me/",
        "organizations": "http://testserver/api/v2/organizations/",
        "jobs": "http://testserver/api/v2/jobs/",
        "emit": "http://testserver/api/v2/emit/",
        "ping": "http://testserver/api/v2/ping/",
        "ready": "http://testserver/api/v2/ready/",
        "metrics": "http://testserver/api/v2/metrics",
        "websocket": "http://testserver/websocket/",
        "stream": "http://testserver/api/v2/stream/",
    }


def test_token_for_username_and_password(member):
    response = APIClient().post("/api/v2/tokens/", {"username": member.username, "password": "pw"})
    assert response.status_code == 200
    assert response.json() == {"token": Token.objects.get(user=member).key}


def test_token_refused_for_a_wrong_password(member):
    response = APIClient().post("/api/v2/tokens/", {"username": member.username, "password": "wrong"})
    assert response.status_code == 400
    assert response.json() == {"non_field_errors": ["Unable to log in with provided credentials."]}


def test_token_needs_username_and_password():
    response = APIClient().post("/api/v2/tokens/", {})
    assert response.status_code == 400
    assert response.json() == {
        "username": ["This field is required."],
        "password": ["This field is required."],
    }


def test_drf_create_token_keeps_working(member):
    result = subprocess.run(
        [sys.executable, "manage.py", "drf_create_token", member.username],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    key = Token.objects.get(user=member).key
    assert key in result.stdout
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get("/api/v2/me/").json()["username"] == member.username


@pytest.mark.parametrize("keyword", ["Token", "Bearer"])
def test_me_shows_the_user_and_their_organizations(member, org, keyword):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"{keyword} {create_token(member)}")
    assert client.get("/api/v2/me/").json() == {
        "id": member.pk,
        "username": member.username,
        "is_superuser": False,
        "is_staff": False,
        "organizations": [org.pk],
    }


@pytest.mark.parametrize("header", [None, "Token nope", "Bearer " + "0" * 40])
def test_me_needs_credentials(header):
    client = APIClient()
    if header:
        client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/api/v2/me/")
    assert response.status_code == 401
    assert "detail" in response.json()


# --- organizations --------------------------------------------------------------------------


def test_superuser_manages_organizations(admin):
    client = as_user(admin)
    created = client.post("/api/v2/organizations/", {"name": f"acme-{admin.pk}"})
    assert created.status_code == 201
    org_id = created.json()["id"]
    assert created.json() == {"id": org_id, "name": f"acme-{admin.pk}", "members": []}
    assert client.patch(f"/api/v2/organizations/{org_id}/", {"name": f"acme2-{admin.pk}"}).status_code == 200
    assert client.get(f"/api/v2/organizations/{org_id}/").json()["name"] == f"acme2-{admin.pk}"
    duplicate = client.post("/api/v2/organizations/", {"name": f"acme2-{admin.pk}"})
    assert duplicate.status_code == 400
    assert "name" in duplicate.json()
    assert client.delete(f"/api/v2/organizations/{org_id}/").status_code == 204
    assert client.get(f"/api/v2/organizations/{org_id}/").status_code == 404


def test_members_see_only_their_organizations_and_cannot_change_them(member, org):
    other = create_org()
    client = as_user(member)
    listed = client.get("/api/v2/organizations/").json()
    assert [o["id"] for o in listed["results"]] == [org.pk]
    assert client.get(f"/api/v2/organizations/{other.pk}/").status_code == 404
    assert client.post("/api/v2/organizations/", {"name": "mine"}).status_code == 403
    assert client.patch(f"/api/v2/organizations/{org.pk}/", {"name": "x"}).status_code == 403
    assert client.delete(f"/api/v2/organizations/{org.pk}/").status_code == 403


def test_membership_is_managed_by_superusers(admin, member, org):
    newcomer = create_user()
    client = as_user(admin)
    added = client.post(f"/api/v2/organizations/{org.pk}/members/", {"user": newcomer.pk})
    assert added.status_code == 201
    assert added.json()["id"] == newcomer.pk
    members = client.get(f"/api/v2/organizations/{org.pk}/members/").json()
    assert [m["id"] for m in members] == [member.pk, newcomer.pk]
    assert client.delete(f"/api/v2/organizations/{org.pk}/members/{newcomer.pk}/").status_code == 204
    assert client.delete(f"/api/v2/organizations/{org.pk}/members/{newcomer.pk}/").status_code == 404
    missing = client.post(f"/api/v2/organizations/{org.pk}/members/", {"user": 10**9})
    assert missing.status_code == 400
    assert "user" in missing.json()


def test_members_read_but_do_not_change_membership(member, org):
    client = as_user(member)
    assert client.get(f"/api/v2/organizations/{org.pk}/members/").status_code == 200
    assert client.post(f"/api/v2/organizations/{org.pk}/members/", {"user": member.pk}).status_code == 403
    assert client.delete(f"/api/v2/organizations/{org.pk}/members/{member.pk}/").status_code == 403


# --- jobs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["job", "workflow_job", "ad_hoc_command", "project_update", "inventory_update", "system_job"]
)
def test_member_creates_jobs_of_every_kind_in_their_organization(member, org, kind):
    response = as_user(member).post("/api/v2/jobs/", {"kind": kind, "name": "deploy", "organization": org.pk})
    assert response.status_code == 201
    body = response.json()
    assert (body["kind"], body["status"], body["organization"]) == (kind, "new", org.pk)
    assert body["started"] is None and body["finished"] is None


@pytest.mark.parametrize(
    ("data", "errors"),
    [
        ({"kind": "job", "name": "x"}, {"organization": ["this field is required"]}),
        ({"kind": "job", "status": "running", "in_org": True}, {"status": ["a new job starts as 'new'"]}),
        ({"kind": "rocket", "in_org": True}, {"kind": ['"rocket" is not a valid choice.']}),
    ],
)
def test_job_creation_errors(member, org, data, errors):
    if data.pop("in_org", False):
        data["organization"] = org.pk
    response = as_user(member).post("/api/v2/jobs/", data)
    assert response.status_code == 400
    assert response.json() == errors


def test_jobs_only_in_own_organizations(member):
    foreign = create_org()
    response = as_user(member).post("/api/v2/jobs/", {"kind": "job", "organization": foreign.pk})
    assert response.status_code == 400
    assert response.json() == {"organization": ["you may only create jobs in your own organizations"]}


def test_superuser_creates_a_system_job_without_organization(admin):
    response = as_user(admin).post("/api/v2/jobs/", {"kind": "system_job", "name": "cleanup"})
    assert response.status_code == 201
    assert response.json()["organization"] is None


def test_job_list_is_filtered_by_access_and_query(member, org):
    done = create_job(org)
    done.status = "successful"
    done.save()
    fresh = create_job(org, kind="project_update")
    hidden = create_job(create_org())
    client = as_user(member)

    def ids(query: str = "") -> list[int]:
        return [job["id"] for job in client.get(f"/api/v2/jobs/{query}").json()["results"]]

    assert ids() == [done.pk, fresh.pk]
    assert ids("?status=successful") == [done.pk]
    assert ids("?kind=project_update") == [fresh.pk]
    assert ids(f"?organization={org.pk}") == [done.pk, fresh.pk]
    assert hidden.pk not in ids(f"?organization={hidden.organization_id}")
    assert client.get(f"/api/v2/jobs/{hidden.pk}/").status_code == 404
    bad = client.get("/api/v2/jobs/?status=bogus")
    assert bad.status_code == 400
    assert "status" in bad.json()


def test_superuser_sees_every_job(admin):
    job = create_job(create_org())
    assert as_user(admin).get(f"/api/v2/jobs/{job.pk}/").status_code == 200


def test_status_walks_the_state_machine(member, org):
    job = create_job(org)
    client = as_user(member)
    for status in ["pending", "waiting", "running", "successful"]:
        response = client.patch(f"/api/v2/jobs/{job.pk}/", {"status": status}, format="json")
        assert response.status_code == 200, response.json()
        assert response.json()["status"] == status
    body = response.json()
    assert body["started"] is not None
    assert body["finished"] is not None


@pytest.mark.parametrize(
    ("path", "target", "error"),
    [
        ([], "running", "cannot go from new to running; allowed: canceled, pending"),
        ([], "successful", "cannot go from new to successful; allowed: canceled, pending"),
        (["pending"], "pending", "cannot go from pending to pending; allowed: canceled, error, waiting"),
        (["pending", "waiting", "running", "failed"], "running",
         "cannot go from failed to running; allowed: none: the job has finished"),
        (["canceled"], "pending", "cannot go from canceled to pending; allowed: none: the job has finished"),
    ],
)  # fmt: skip
def test_invalid_transitions_are_400(member, org, path, target, error):
    job = create_job(org)
    client = as_user(member)
    for status in path:
        assert client.patch(f"/api/v2/jobs/{job.pk}/", {"status": status}, format="json").status_code == 200
    response = client.patch(f"/api/v2/jobs/{job.pk}/", {"status": target}, format="json")
    assert response.status_code == 400
    assert response.json() == {"status": [error]}


@pytest.mark.parametrize("status", ["bogus", "", None])
def test_unknown_status_values_are_400(member, org, status):
    job = create_job(org)
    response = as_user(member).patch(f"/api/v2/jobs/{job.pk}/", {"status": status}, format="json")
    assert response.status_code == 400
    assert "status" in response.json()


def test_kind_and_organization_cannot_change(admin, org):
    job = create_job(org)
    client = as_user(admin)
    assert client.patch(f"/api/v2/jobs/{job.pk}/", {"kind": "system_job"}, format="json").json() == {
        "kind": ["cannot be changed after creation"]
    }
    moved = client.patch(f"/api/v2/jobs/{job.pk}/", {"organization": create_org().pk}, format="json")
    assert moved.json() == {"organization": ["cannot be changed after creation"]}
    assert (
        client.patch(f"/api/v2/jobs/{job.pk}/", {"name": "renamed"}, format="json").json()["name"]
        == "renamed"
    )


def test_jobs_cannot_be_deleted_over_the_api(admin, org):
    job = create_job(org)
    assert as_user(admin).delete(f"/api/v2/jobs/{job.pk}/").status_code == 405


def test_outsiders_cannot_touch_a_job(org):
    job = create_job(org)
    client = as_user(create_user())
    assert client.patch(f"/api/v2/jobs/{job.pk}/", {"status": "pending"}, format="json").status_code == 404
    assert (
        client.post(
            f"/api/v2/jobs/{job.pk}/job_events/", {"counter": 1, "event": "x"}, format="json"
        ).status_code
        == 404
    )
    assert as_user(None).get("/api/v2/jobs/").status_code == 401


# --- job events -----------------------------------------------------------------------------


def event(counter: int, **fields: Any) -> dict[str, Any]:
    return {"counter": counter, "event": "runner_on_ok", "stdout": f"line {counter}", **fields}


def test_post_one_event_or_a_list(member, org):
    job = create_job(org)
    client = as_user(member)
    one = client.post(f"/api/v2/jobs/{job.pk}/job_events/", event(1, event_data={"host": "a"}), format="json")
    assert one.status_code == 201
    assert one.json()["counter"] == 1
    assert one.json()["job"] == job.pk
    assert one.json()["event_data"] == {"host": "a"}
    many = client.post(f"/api/v2/jobs/{job.pk}/job_events/", [event(3), event(2)], format="json")
    assert many.status_code == 201
    assert [e["counter"] for e in many.json()] == [3, 2]
    assert list(job.events.values_list("counter", flat=True)) == [1, 2, 3]


@pytest.mark.parametrize(
    ("body", "error_part"),
    [
        ([event(1), event(1)], "counter repeated in this request: [1]"),
        ([], "send at least one event"),
        ([event(5), {"event": "x"}], "This field is required."),
        (event(0), "greater than or equal to 1"),
        (event(1, event_data=[1]), "must be a JSON object"),
        ("not an event", "Invalid data"),
    ],
)
def test_bad_event_batches_are_refused_whole(member, org, body, error_part):
    job = create_job(org)
    response = as_user(member).post(f"/api/v2/jobs/{job.pk}/job_events/", body, format="json")
    assert response.status_code == 400
    assert error_part in str(response.json())
    assert job.events.count() == 0


def test_a_single_event_gets_its_errors_as_an_object(member, org):
    job = create_job(org)
    response = as_user(member).post(f"/api/v2/jobs/{job.pk}/job_events/", {"event": "x"}, format="json")
    assert response.status_code == 400
    assert response.json() == {"counter": ["This field is required."]}


def test_an_existing_counter_is_refused(member, org):
    job = create_job(org)
    client = as_user(member)
    client.post(f"/api/v2/jobs/{job.pk}/job_events/", event(1), format="json")
    response = client.post(f"/api/v2/jobs/{job.pk}/job_events/", [event(2), event(1)], format="json")
    assert response.status_code == 400
    assert response.json() == {"non_field_errors": [f"job {job.pk} already has events with counter [1]"]}
    assert job.events.count() == 1


def test_events_page_by_counter_and_catch_up(member, org):
    job = create_job(org)
    client = as_user(member)
    client.post(f"/api/v2/jobs/{job.pk}/job_events/", [event(c) for c in (5, 1, 4, 2, 3)], format="json")
    first = client.get(f"/api/v2/jobs/{job.pk}/job_events/?page_size=2").json()
    assert [e["counter"] for e in first["results"]] == [1, 2]
    second = client.get(first["next"]).json()
    assert [e["counter"] for e in second["results"]] == [3, 4]
    caught_up = client.get(f"/api/v2/jobs/{job.pk}/job_events/?counter__gt=3").json()
    assert [e["counter"] for e in caught_up["results"]] == [4, 5]
    assert caught_up["next"] is None
    gap = client.get(f"/api/v2/jobs/{job.pk}/job_events/?counter__gt=1&counter__lt=5").json()
    assert [e["counter"] for e in gap["results"]] == [2, 3, 4]
    for lookup in ("counter__gt", "counter__lt"):
        bad = client.get(f"/api/v2/jobs/{job.pk}/job_events/?{lookup}=x")
        assert bad.status_code == 400
        assert bad.json() == {lookup: ["must be an integer from 0 to 2147483647"]}


# --- HTTP publish ---------------------------------------------------------------------------


def test_emit_needs_staff_or_the_permission(member):
    body = {"group": "jobs-status_changed", "payload": {"x": 1}}
    refused = as_user(member).post("/api/v2/emit/", body, format="json")
    assert refused.status_code == 403
    assert refused.json() == {
        "detail": "emitting needs staff status or the main.emit_notification permission"
    }
    member.user_permissions.add(Permission.objects.get(codename="emit_notification"))
    allowed = as_user(member).post("/api/v2/emit/", body, format="json")
    assert allowed.status_code == 202
    assert allowed.json() == {"group": "jobs-status_changed", "emitted": True}


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"group": "bad group", "payload": {}}, "group", "invalid group name 'bad group'"),
        ({"group": "broadcast-all", "payload": {}}, "group", "group 'broadcast-all' is reserved"),
        ({"group": "jobs-x"}, "payload", "This field is required."),
        ({"payload": {}}, "group", "This field is required."),
    ],
)
def test_emit_validates_the_group_and_payload(body, field, message):
    staff = create_user()
    staff.is_staff = True
    staff.save()
    response = as_user(staff).post("/api/v2/emit/", body, format="json")
    assert response.status_code == 400
    assert message in response.json()[field][0]


def test_emit_is_throttled(settings):
    staff = create_user()
    staff.is_staff = True
    staff.save()
    client = as_user(staff)
    cache.clear()
    settings.AWX_WS = {"EMIT_RATE": "2/min"}
    codes = [
        client.post("/api/v2/emit/", {"group": "jobs-t", "payload": 1}, format="json").status_code
        for _ in range(3)
    ]
    assert codes == [202, 202, 429]
    cache.clear()


def test_emit_with_redis_down_is_503_naming_redis(state_dir):
    staff = create_user()
    staff.is_staff = True
    staff.save()
    dead_redis = free_port()
    api = Gunicorn(
        state_dir / "logs",
        {"REDIS_URL": f"redis://127.0.0.1:{dead_redis}/0", "AWX_WS_EMIT_TIMEOUT": "2"},
    ).start()
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{api.port}/api/v2/emit/",
            data=json.dumps({"group": "jobs-x", "payload": {}}).encode(),
            headers={"Authorization": f"Token {create_token(staff)}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(request, timeout=30)
        with failure.value as response:
            assert response.code == 503
            detail = json.loads(response.read())["detail"]
        assert f"REDIS_URL=redis://127.0.0.1:{dead_redis}/0" in detail
    finally:
        api.stop()
