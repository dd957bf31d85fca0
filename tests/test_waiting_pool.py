"""The sync emit's pool waits for Redis it cannot reach (layers/redis_connect.SyncWaitingPool):
the rules of the wait, on connections that refuse or succeed as each test says (no server).
Through a real Redis and a real failover: test_emit_reconnect.py and test_sentinel.py."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from redis.connection import Connection
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from awx_ws.main.layers.redis_connect import NotConnected, SyncAddressPool, at_once

pytestmark = pytest.mark.unit


class Scripted(Connection):
    """A connection whose connect() fails with `failure` (None: succeeds) and counts attempts."""

    failure: ClassVar[BaseException | None] = None
    attempts: ClassVar[int] = 0

    def connect(self) -> None:
        type(self).attempts += 1
        if type(self).failure is not None:
            raise type(self).failure

    def can_read(self, timeout: float = 0) -> bool:
        return False


@pytest.fixture
def pool() -> Any:
    Scripted.failure = RedisConnectionError("Error 111 connecting. Connection refused.")
    Scripted.attempts = 0
    return SyncAddressPool(connection_class=Scripted, reconnect_within=0.3, max_connections=2, timeout=0.1)


def test_a_refused_connection_is_tried_again_until_the_window_ends_then_not_connected(pool):
    with pytest.raises(NotConnected, match="Connection refused"):
        pool.get_connection()
    assert Scripted.attempts >= 2


def test_after_a_wait_ran_out_callers_try_once_until_redis_answers_again(pool):
    with pytest.raises(NotConnected):
        pool.get_connection()
    Scripted.attempts = 0
    with pytest.raises(NotConnected):
        pool.get_connection()
    assert Scripted.attempts == 1  # a long outage: fail at once, as without the wait

    Scripted.failure = None  # Redis is back
    pool.release(pool.get_connection())
    Scripted.failure = RedisConnectionError("refused again")
    Scripted.attempts = 0
    with pytest.raises(NotConnected):
        pool.get_connection()
    assert Scripted.attempts >= 2  # waits again, as after any success


def test_within_at_once_a_caller_tries_once(pool):
    with at_once(), pytest.raises(NotConnected):
        pool.get_connection()
    assert Scripted.attempts == 1
    Scripted.attempts = 0
    with pytest.raises(NotConnected):
        pool.get_connection()  # outside it the wait is back (at_once did not end it for good)
    assert Scripted.attempts >= 2


def test_refused_credentials_are_not_waited_for_and_are_not_connected(pool):
    Scripted.failure = AuthenticationError("invalid username-password pair")
    with pytest.raises(NotConnected, match="invalid username-password pair") as raised:
        pool.get_connection()
    assert Scripted.attempts == 1
    assert isinstance(raised.value.__cause__, AuthenticationError)
    Scripted.failure = RedisConnectionError("refused")
    Scripted.attempts = 0
    with pytest.raises(NotConnected):
        pool.get_connection()
    assert Scripted.attempts >= 2  # a refused password opened no outage
