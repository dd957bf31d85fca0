"""Django settings of a test session: config.settings, read under an environment of the session's own.

pytest-django imports this module (`--ds tests.settings` in pyproject's addopts) before any
conftest runs, and it would import config.settings there as soon as DJANGO_SETTINGS_MODULE is in
the environment (make exports it): so the environment is prepared here, before config.settings
reads it. Every test process prepares its own: pytest-xdist's controller (which runs no test and
starts nothing) and each worker, which gets ports, a Redis and a database of its own
(tests/servers.py); the worker inherits the controller's environment and overwrites it here.
The daphne and gunicorn processes the tests start inherit it, and read config.settings (conftest).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tests.servers import free_port

STATE = Path(tempfile.mkdtemp(prefix="awx_ws-tests-"))

# AWX_WS_TEST_DATABASE=postgres runs the suite against a PostgreSQL of its own (make test does
# both): its port is chosen here, the cluster is created and started by conftest's
# django_db_setup, so a process that runs no test (or only unit tests) starts none. By default
# the servers share an SQLite file.
POSTGRES_PORT = free_port() if os.environ.get("AWX_WS_TEST_DATABASE") == "postgres" else None


def _database_url() -> str:
    if POSTGRES_PORT is None:
        return f"sqlite:///{STATE / 'db.sqlite3'}"
    return f"postgres://postgres@127.0.0.1:{POSTGRES_PORT}/postgres"


os.environ.update(
    {
        "AWX_WS_VAR": str(STATE / "var"),
        "DATABASE_URL": _database_url(),
        "SECRET_KEY": "tests-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        # Used by nodes started with CHANNEL_LAYER_BACKEND=rabbitmq (the rabbitmq_server fixture).
        "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}",
        "ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
        "LOG_LEVEL": "INFO",
        # Short liveness periods so purge scenarios need no long waits.
        "AWX_WS_LIVENESS_TTL": "6",
        "AWX_WS_LIVENESS_INTERVAL": "2",
        "BROADCAST_WEBSOCKET_SECRET": "session-tests-secret",
    }
)

from config import var  # noqa: E402

var.prepare()  # as every entry point does before Django loads the settings

from config.settings import *  # noqa: E402, F403

# Only this process creates users: a fast hasher keeps fixtures cheap; servers never hash.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
