"""Both backends implement the whole channel-layer contract (layers/base.py), and the service asks
the contract, not the backend's type (pure rules; their behaviour is the rest of the suite)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from awx_ws.main.exceptions import BrokerUnavailable, EmitError, LayerUnavailable, RedisUnavailable
from awx_ws.main.layers import RabbitmqChannelLayer, RedisChannelLayer, ServiceLayer

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backend", [RedisChannelLayer, RabbitmqChannelLayer])
def test_each_backend_implements_every_member_of_the_contract(backend):
    assert issubclass(backend, ServiceLayer)
    assert backend.__abstractmethods__ == frozenset()
    assert {type(backend.service), type(backend.keeps_history), type(backend.keeps_records)} <= {str, bool}


def test_layer_errors_are_emit_errors_and_connection_errors_naming_where():
    error = RedisUnavailable("refused", where="REDIS_URL=redis://127.0.0.1:1/0", timed_out=False)
    assert isinstance(error, EmitError) and isinstance(error, ConnectionError)
    assert (error.service, error.where, error.timed_out) == (
        "Redis",
        "REDIS_URL=redis://127.0.0.1:1/0",
        False,
    )
    assert BrokerUnavailable("lost").service == "RabbitMQ"
    assert issubclass(BrokerUnavailable, LayerUnavailable)


# Modules that choose a behaviour by the layer's contract alone; a type check on a backend there
# would put knowledge of the backends back where it does not belong.
CONTRACT_ONLY = [
    "startup.py",
    "connlimit.py",
    "emit.py",
    "api/operations.py",
    "consumers.py",
    "sse.py",
    "auth.py",
    "fanout.py",
    "history.py",
    "interest.py",
    "retry.py",
]


@pytest.mark.parametrize("module", CONTRACT_ONLY)
def test_modules_beyond_the_layers_ask_the_contract_not_the_backend(module):
    tree = ast.parse((ROOT / "awx_ws" / "main" / module).read_text())
    named = {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    imported_modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not named & {"RedisChannelLayer", "RabbitmqChannelLayer", "SyncProducerLayer", "blocking_emitter"}
    assert not any(m and (m == "redis" or m.startswith("redis.")) for m in imported_modules)


# Modules beyond awx_ws/main/layers/ that still speak to Redis or RabbitMQ's client libraries
# themselves: two backends for other things (Django's cache on Redis, a log filter for the
# RabbitMQ client) and the relay's records in Redis, read by two commands and by streams.
# A new module must not join them; the relay's part is to move behind the contract.
LIBRARY_USERS = {
    "cache.py",
    "logfilters.py",
    "management/commands/connections.py",
    "management/commands/run_wsbroadcast.py",
    "relay.py",
    "streams.py",
}


def test_no_other_module_imports_a_backend_library():
    main = ROOT / "awx_ws" / "main"
    users = set()
    for path in main.rglob("*.py"):
        relative = path.relative_to(main).as_posix()
        if relative.startswith(("layers/", "migrations/")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(name.split(".")[0] in {"redis", "carehare"} for name in names):
                users.add(relative)
    assert users == LIBRARY_USERS


def test_the_redis_backend_declares_its_library_errors_expected_in_background_loops():
    from redis.exceptions import ConnectionError as RedisConnectionError

    from awx_ws.main import retry

    assert isinstance(RedisConnectionError("gone"), retry.EXPECTED)


def test_the_send_only_rabbitmq_layer_of_sync_code_names_where_it_failed():
    """AWX-style workers get this layer from get_channel_layer(); an async emit through it that
    fails says BrokerUnavailable with the broker's address, as the server-side layer does."""
    from awx_ws.main.emit import _emit_error
    from awx_ws.main.layers.rabbitmq_sync import SyncProducerLayer

    layer = SyncProducerLayer(host="amqp://guest:secret@127.0.0.1:1")
    error = _emit_error(layer.unavailable(TimeoutError()), "jobs-status_changed", 2.0)
    assert isinstance(error, BrokerUnavailable) and error.timed_out
    assert str(error) == (
        "emit to 'jobs-status_changed' took longer than 2s (AWX_WS_EMIT_TIMEOUT); "
        "is RabbitMQ up at RABBITMQ_URL=amqp://guest:***@127.0.0.1:1?"
    )
