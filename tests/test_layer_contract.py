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
    "relay.py",
    "streams.py",
    "peer_protocol.py",
    "peer_consumer.py",
    "management/commands/connections.py",
    "management/commands/run_wsbroadcast.py",
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


def _modules_beyond_the_layers():
    main = ROOT / "awx_ws" / "main"
    for path in sorted(main.rglob("*.py")):
        relative = path.relative_to(main).as_posix()
        if not relative.startswith(("layers/", "migrations/")):
            yield relative, ast.parse(path.read_text())


def test_only_the_backends_import_redis_or_the_rabbitmq_client():
    users = set()
    for relative, tree in _modules_beyond_the_layers():
        for node in ast.walk(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(name.split(".")[0] in {"redis", "carehare"} for name in names):
                users.add(relative)
    assert users == set()


def test_no_module_beyond_the_layers_checks_a_layer_type():
    """`service_layer()` (layers/base.py) is the one place that tells our layers from others."""
    checks = set()
    for relative, tree in _modules_beyond_the_layers():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in {"isinstance", "issubclass"}:
                if "Layer" in ast.unparse(node.args[1]):
                    checks.add(f"{relative}:{node.lineno}")
    assert checks == set()


def test_redis_key_formats_are_those_deployed_nodes_already_use():
    """A node upgraded in place reads what the previous version wrote: key names do not move."""
    from awx_ws.main.layers import redis_keys as keys

    assert keys.alive_key("asgi", "abc") == "asgi:alive:abc"
    assert keys.stats_key("asgi", "abc") == "asgi:process-stats:abc"
    assert keys.interest_key("asgi", "abc") == "asgi:interest:abc"
    assert keys.interest_changed("asgi") == "asgi:interest-changed"
    assert keys.user_counts_key("asgi") == "asgi:user-connections"
    assert keys.process_counts_key("asgi", "abc") == "asgi:connections:abc"
    assert keys.stream_key("asgi", "jobs-status_changed") == "asgi:history:jobs-status_changed"
    assert keys.origin_key("asgi") == "asgi:history-origin"
    assert keys.watched_key("asgi", "job_events-42") == "asgi:watched:job_events-42"
    assert keys.group_of_key("asgi", "asgi:group:job_events-42") == "job_events-42"
    assert keys.history_total_keys("asgi") == [
        "asgi:history-sizes",
        "asgi:history-total",
        "asgi:history-expiry",
        "asgi:history-owners",
        "asgi:history-shares",
    ]
    assert keys.link_status_key("asgi", "b:8051") == "asgi:relay-status:b:8051"
    assert keys.forwarding_key("asgi", "b:8051") == "asgi:relay-forwarding:b:8051"
    assert keys.nonce_key("asgi", "n1") == "asgi:peer-nonce:n1"
    assert keys.group_pattern("asgi") == "asgi:group:*"
    assert keys.queue_key("asgi", "fanout.x!y") == "asgifanout.x!y"


def test_a_liveness_record_of_the_previous_version_is_still_read():
    """Records written before they named their node (AWX_WS_NODE_NAME) still say who is alive."""
    from awx_ws.main.layers.redis_presence import ProcessRecord

    old = ProcessRecord.loads('{"node": "host/boot", "pid": 7, "started": 1.5}')
    assert old == ProcessRecord(node="host/boot", pid=7, started=1.5, name="")
    current = ProcessRecord(node="host/boot", pid=7, started=1.5, name="B")
    assert ProcessRecord.loads(current.dumps()) == current
    assert ProcessRecord.loads("not json") is None


def test_with_sentinels_redis_url_gives_only_how_to_log_in_to_the_master():
    """Its host is the sentinels' to say; TLS (rediss://) is kept as ssl=True, whose connection
    class redis-py's Sentinel pool chooses itself."""
    from awx_ws.main.layers.redis_connect import master_options

    assert master_options("redis://:pw@ignored:1/2") == {"password": "pw", "db": 2}
    assert master_options("rediss://user:pw@ignored:1/0") == {
        "username": "user",
        "password": "pw",
        "db": 0,
        "ssl": True,
    }
    assert master_options("unix:///run/redis.sock?db=3") == {"db": 3}


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
