"""Both backends implement the whole channel-layer contract (layers/base.py), and the service asks
the contract, not the backend's type (pure rules; their behaviour is the rest of the suite)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from awx_ws.main.exceptions import BrokerUnavailable, EmitError, LayerUnavailable, RedisUnavailable
from awx_ws.main.layers import RabbitmqChannelLayer, RedisChannelLayer, ServiceLayer

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
