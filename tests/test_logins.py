"""Password guessing meets 429 on every login path, through nginx, whatever X-Forwarded-For says,
and whichever API worker answers: failures are counted per address and per username in the
node's Redis (AWX_WS_LOGIN_FAILURE_RATE, 10 a minute each by default)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import httpx
import pytest
import redis

from tests.factories import create_user, set_login_password
from tests.servers import Gunicorn, free_port

# Its tests create users, tokens and jobs the servers read (conftest.shared_db).
pytestmark = pytest.mark.usefixtures("shared_db")

# Default budget: 10 failures a minute; the 11th attempt is refused before its password is checked.
BUDGET = 10


@pytest.fixture(autouse=True)
def forget_failures(redis_server) -> Iterator[None]:
    """Failures count against 127.0.0.1 for a minute: clear them, so the next test can log in."""
    yield
    client = redis.Redis.from_url(redis_server.url)
    try:
        for key in client.scan_iter(match="awx_ws-cache:*login-attempts:*"):
            client.delete(key)
    finally:
        client.close()


def random_address() -> str:
    return f"198.51.100.{secrets.randbelow(250) + 1}, 203.0.113.{secrets.randbelow(250) + 1}"


def token_attempts(base_url: str, usernames: Iterator[str], headers: Iterator[dict[str, str]]) -> list[int]:
    """Statuses of up to 15 wrong-password token requests; stops at the first 429."""
    statuses = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for _, username, extra in zip(range(15), usernames, headers, strict=False):
            response = client.post(
                "/api/v2/tokens/", json={"username": username, "password": "wrong"}, headers=extra
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1
                break
    return statuses


def fresh_names() -> Iterator[str]:
    while True:
        yield f"nobody-{secrets.token_hex(6)}"


def rotating_forwarded_for() -> Iterator[dict[str, str]]:
    while True:
        yield {"X-Forwarded-For": random_address()}


def test_rotating_x_forwarded_for_through_nginx_meets_429_within_15_attempts(nginx):
    # A new username and a new X-Forwarded-For each time: only the real address can be counted.
    statuses = token_attempts(nginx.http_url, fresh_names(), rotating_forwarded_for())
    assert statuses == [400] * BUDGET + [429]


def test_failures_for_one_username_are_limited_from_any_address(api, database):
    user = create_user()
    set_login_password(user, "the-right-one")

    def same_name() -> Iterator[str]:
        while True:
            yield user.username

    # Straight to gunicorn, as our nginx would send it: a different client address each time.
    statuses = token_attempts(api.http_url, same_name(), rotating_forwarded_for())
    assert statuses == [400] * BUDGET + [429]
    # Past the budget even the right password waits: the guesser learns nothing more this minute.
    locked = httpx.post(
        f"{api.http_url}/api/v2/tokens/",
        json={"username": user.username, "password": "the-right-one"},
        headers={"X-Forwarded-For": random_address()},
        timeout=30,
    )
    assert locked.status_code == 429
    # Another user, from another address, is not held up.
    other = create_user()
    set_login_password(other, "theirs")
    response = httpx.post(
        f"{api.http_url}/api/v2/tokens/",
        json={"username": other.username, "password": "theirs"},
        headers={"X-Forwarded-For": random_address()},
        timeout=30,
    )
    assert response.status_code == 200 and response.json()["token"]


def test_the_count_is_shared_by_every_api_worker(api, state_dir):
    """Two API processes on one node: failures on either count towards one budget."""
    second = Gunicorn(state_dir / "logs").start()
    try:
        bases = iter([api.http_url, second.http_url] * 8)
        statuses = []
        for _, username in zip(range(15), fresh_names(), strict=False):
            response = httpx.post(
                f"{next(bases)}/api/v2/tokens/",
                json={"username": username, "password": "wrong"},
                headers={"X-Forwarded-For": "192.0.2.77"},
                timeout=30,
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
        assert statuses == [400] * BUDGET + [429]
    finally:
        second.stop()


@pytest.mark.parametrize("path", ["/login/", "/admin/login/"])
def test_django_login_pages_meet_429_through_nginx(nginx, path):
    statuses = []
    with httpx.Client(base_url=nginx.http_url, timeout=30) as browser:
        for attempt in range(15):
            form = browser.get(path)
            assert form.status_code == 200
            match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
            assert match, form.text[:500]
            response = browser.post(
                path,
                data={
                    "csrfmiddlewaretoken": match.group(1),
                    "username": f"nobody-{attempt}-{secrets.token_hex(4)}",
                    "password": "wrong",
                },
                headers={"X-Forwarded-For": random_address(), "Referer": f"{nginx.http_url}{path}"},
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert response.headers["Retry-After"]
                break
    # Django answers a failed login with the form again (200).
    assert statuses == [200] * BUDGET + [429]


def test_a_node_without_redis_counts_in_its_database(state_dir, database):
    """On RabbitMQ a node has no Redis: the counts live in the database cache table (migrated)."""
    env = {"CHANNEL_LAYER_BACKEND": "rabbitmq", "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    api = Gunicorn(state_dir / "logs", env).start()
    try:
        statuses = token_attempts(
            api.http_url, fresh_names(), iter(lambda: {"X-Forwarded-For": "192.0.2.88"}, None)
        )
        assert statuses == [400] * BUDGET + [429]
    finally:
        api.stop()
        from django.db import connection

        with connection.cursor() as cursor:  # the next test's logins from this address start afresh
            cursor.execute("DELETE FROM awx_ws_cache")


def test_with_redis_down_logins_are_still_limited_per_process(state_dir, database):
    """No 500s and no lifted limit while the shared cache is unreachable: the process counts."""
    api = Gunicorn(state_dir / "logs", {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}).start()
    try:
        statuses = token_attempts(
            api.http_url, fresh_names(), iter(lambda: {"X-Forwarded-For": "192.0.2.99"}, None)
        )
        assert statuses == [400] * BUDGET + [429]
        assert api.wait_for_output("shared cache at REDIS_URL=redis://127.0.0.1:")
        assert api.output().count("counting per process") == 1  # one line, not one per request
    finally:
        api.stop()


def test_guesses_sent_at_once_cannot_all_pass_the_check(database):
    """Each attempt is counted before its password is checked: of 30 concurrent attempts for one
    username, no more than the budget get to a password check (counted in the node's Redis; an
    attempt refused meanwhile may hold a slot for an instant, so fewer may)."""
    from concurrent.futures import ThreadPoolExecutor

    from awx_ws.main.logins import LoginThrottled, reserve

    username = f"parallel-{secrets.token_hex(4)}"

    def attempt(_: int) -> bool:
        try:
            reserve(None, username)
        except LoginThrottled:
            return False
        return True

    with ThreadPoolExecutor(max_workers=30) as pool:
        checked = list(pool.map(attempt, range(30)))
    assert 1 <= checked.count(True) <= BUDGET
    # After the burst the count is exact: the rest of the budget, and not one more.
    later = [attempt(0) for _ in range(BUDGET + 1)]
    assert checked.count(True) + later.count(True) == BUDGET
