"""Layered fixtures: redis → migrated database → daphne node → user → token → connected client.

Everything is real: a redis-server on a free loopback port, daphne processes, an SQLite file
shared between this process and the servers. Two axes run the same tests through every door:

- `runner`: modules marked `both_runners` run each test against plain `daphne` (as the Channels
  docs and AWX start it) and against `python -m awx_ws.server`; modules marked `every_server`
  (delivery, the purge, resumes, revocation) under uvicorn and hypercorn as well; others use
  awx_ws.server.
- `layer_backend`: modules that spell out behaviour both channel layers must share override
  `node` with `layer_node`, a node on Redis and one on RabbitMQ (a rabbitmq-server started here).
"""

from __future__ import annotations

import gc
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client import WsClient, close_left_open, open_ws
from tests.factories import adb, create_token, create_user
from tests.servers import (
    ASGI_SERVERS,
    RUNNERS,
    DaphneNode,
    Gunicorn,
    Nginx,
    Process,
    RabbitMQServer,
    RedisServer,
    free_port,
)
from tests.settings import POSTGRES_PORT
from tests.settings import STATE as _STATE

# The environment of this session (ports, database, secrets) is prepared by tests/settings.py,
# which pytest-django imports first (pyproject's addopts: --ds tests.settings).


def pytest_configure(config: pytest.Config) -> None:
    # Servers this process starts read config.settings, under the environment tests.settings set.
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"


def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get("AWX_WS_KEEP_TEST_STATE"):  # server logs, for a failure's post-mortem
        print(f"test state kept in {_STATE}")
        return
    shutil.rmtree(_STATE, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Longest first, whole modules at a time: the soak, then the slow scenarios, then the rest,
    # so that make test's two xdist workers (--dist loadfile --no-loadscope-reorder) do not end
    # with one of them alone on a five-minute file. xdist's own reorder sorts by the number of
    # tests, which puts the one-test soak and the 10,000-cycle churn last.
    def weight(item: pytest.Item) -> int:
        if item.get_closest_marker("soak"):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    first: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        first[module] = min(first.get(module, 2), weight(item))
    items.sort(key=lambda item: first[item.nodeid.split("::", 1)[0]])


def unit_only(session: pytest.Session) -> bool:
    """True for a session of tests marked `unit` only (pure rules: `pytest -m unit`)."""
    return all(item.get_closest_marker("unit") is not None for item in session.items)


@pytest.fixture(scope="session")
def state_dir() -> Path:
    """A scratch directory for this test session (logs, nginx prefixes)."""
    return _STATE


@pytest.fixture(scope="session")
def redis_server(state_dir: Path) -> Iterator[RedisServer]:
    """The session's redis-server, on the port REDIS_URL names."""
    port = int(os.environ["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    server = RedisServer(port, state_dir / "redis").start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
async def closes_what_it_opens() -> AsyncIterator[None]:
    """Websockets and Redis clients a test left open are closed in its own event loop."""
    yield
    await close_left_open()
    # Whatever else the test dropped is collected now, so a resource warning is reported on the
    # test that leaked it, not on the next one (filterwarnings = error).
    gc.collect()


@pytest.fixture
def own_redis(state_dir: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: its keys and connections are the test's alone."""
    port = free_port()
    server = RedisServer(port, state_dir / f"redis-{port}").start()
    yield server
    server.stop()


@pytest.fixture
async def layer(own_redis: RedisServer) -> AsyncIterator[Any]:
    """awx_ws's Redis channel layer in the test process, on the test's own Redis (its fan-out,
    liveness and pools are stopped afterwards)."""
    from awx_ws.main.layers import RedisChannelLayer

    layer = RedisChannelLayer(hosts=[{"address": own_redis.url}])
    yield layer
    await layer.fanout.stop()
    await layer.liveness.stop()
    await layer.close_pools()


@pytest.fixture(scope="session")
def django_db_setup(request: pytest.FixtureRequest, django_db_blocker: Any) -> Iterator[None]:
    """The one database this process and the servers it starts share, migrated (pytest-django's
    database set-up, overridden: no test_ database, no per-test rollback of what servers must see).

    A session of unit tests only starts no server: the unit tests that need a database get
    pytest-django's own test database (SQLite in memory)."""
    if unit_only(request.session):
        from django.test.utils import setup_databases, teardown_databases

        with django_db_blocker.unblock():
            created = setup_databases(verbosity=0, interactive=False)
        yield
        with django_db_blocker.unblock():
            teardown_databases(created, verbosity=0)
        return
    postgres = None
    if POSTGRES_PORT is not None:
        from tests.servers import PostgresServer

        # Its own directory: PostgreSQL runs as the postgres user, who cannot enter our 0700 one.
        postgres = PostgresServer(POSTGRES_PORT, Path(tempfile.mkdtemp(prefix="awx_ws-pg-"))).start()
    from django.core.management import call_command

    with django_db_blocker.unblock():
        call_command("migrate", verbosity=0, interactive=False)
    yield
    if postgres is not None:
        from django.db import connections

        with django_db_blocker.unblock():
            connections.close_all()
        postgres.stop(signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(postgres.data.parent, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def database(request: pytest.FixtureRequest) -> None:
    """Migrated database shared with the server processes, and the session's Redis: set up before
    any test (and any module's servers) of a session that has tests needing servers. A session of
    tests marked `unit` only (pure rules: `pytest -m unit`) starts no server at all."""
    if unit_only(request.session):
        return
    request.getfixturevalue("redis_server")
    request.getfixturevalue("django_db_setup")


@pytest.fixture
def shared_db(database: None, django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """Database access for a test whose rows the servers must see: committed as it goes, never
    rolled back (each test's users and tokens are its own: factories name them uniquely).
    Unblocks pytest-django's guard for every thread of this process, so `adb` works too."""
    with django_db_blocker.unblock():
        yield


def module_runners(definition: pytest.Function) -> tuple[str, ...]:
    """The servers a test runs under: every ASGI server (`every_server`), the daphne runners
    (`both_runners`), else none (the `runner` fixture's default)."""
    if definition.get_closest_marker("every_server"):
        return ASGI_SERVERS
    if definition.get_closest_marker("both_runners"):
        return RUNNERS
    return ()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Modules marked every_server or both_runners: every test that starts or talks to a server
    # runs on each of theirs, unless the test names its runner itself (behaviour only one has).
    runners = module_runners(metafunc.definition)
    if "runner" not in metafunc.fixturenames or not runners:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        if "runner" in mark.args[0]:
            return
    # AWX_WS_TEST_RUNNERS=awx_ws.server narrows a pass to the runners it names (make test's
    # PostgreSQL pass: the database is its point; the SQLite pass proves every server).
    wanted = os.environ.get("AWX_WS_TEST_RUNNERS")
    if wanted:
        if not set(wanted.split(",")) <= set(ASGI_SERVERS):
            raise pytest.UsageError(f"AWX_WS_TEST_RUNNERS={wanted!r}: use {', '.join(ASGI_SERVERS)}")
        runners = tuple(runner for runner in runners if runner in wanted.split(","))
    metafunc.parametrize("runner", runners, indirect=True, scope="module")


@pytest.fixture(scope="module")
def runner(request: pytest.FixtureRequest) -> str:
    """How server nodes of this module run: "awx_ws.server" unless parametrised (every_server,
    both_runners)."""
    return str(getattr(request, "param", "awx_ws.server"))


class NodePool:
    """Long-lived daphne nodes of the session, one per (runner, channel layer), started on demand."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.nodes: dict[tuple[str, str, str], DaphneNode] = {}

    def get(
        self,
        runner: str,
        backend: str,
        env: dict[str, str] | None = None,
        app: str = "config.asgi:application",
    ) -> DaphneNode:
        key = (runner, backend, app)
        if key not in self.nodes:
            self.nodes[key] = DaphneNode(self.logs, env, runner=runner, app=app).start()
        return self.nodes[key]

    def stop(self) -> None:
        for server in self.nodes.values():
            server.stop()


@pytest.fixture(scope="session")
def node_pool(redis_server: RedisServer, state_dir: Path) -> Iterator[NodePool]:
    """The session's long-lived nodes; all are stopped at the end."""
    pool = NodePool(state_dir / "logs")
    yield pool
    pool.stop()


@pytest.fixture(scope="module")
def redis_node(node_pool: NodePool, runner: str) -> DaphneNode:
    """A daphne node on the Redis layer (the default)."""
    return node_pool.get(runner, "redis")


@pytest.fixture(scope="module")
def node(redis_node: DaphneNode) -> DaphneNode:
    """The node most tests talk to: the Redis one."""
    return redis_node


# vhosts of the session's RabbitMQ: "/" for single-node tests, one per node of a 2-node cluster.
RABBITMQ_VHOSTS = ["/", "node-a", "node-b"]


@pytest.fixture(scope="session")
def rabbitmq_server(state_dir: Path) -> Iterator[RabbitMQServer]:
    """The session's rabbitmq-server, on the port RABBITMQ_URL names."""
    port = int(os.environ["RABBITMQ_URL"].rsplit(":", 1)[1])
    server = RabbitMQServer(port, state_dir / "rabbitmq", RABBITMQ_VHOSTS).start()
    yield server
    server.stop()


def rabbitmq_env(server: RabbitMQServer, vhost: str = "/") -> dict[str, str]:
    """Environment of a process on the RabbitMQ layer (vhost: its own broker, in effect)."""
    return {"CHANNEL_LAYER_BACKEND": "rabbitmq", "RABBITMQ_URL": server.url(vhost)}


@pytest.fixture(scope="module")
def rabbitmq_node(rabbitmq_server: RabbitMQServer, node_pool: NodePool, runner: str) -> DaphneNode:
    """A daphne node on the RabbitMQ layer."""
    return node_pool.get(runner, "rabbitmq", rabbitmq_env(rabbitmq_server))


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def layer_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each channel layer in turn; this process's emits go through the same one."""
    if request.param == "redis":
        yield "redis"
        return
    from django.test import override_settings

    from config.settings import channel_layer_config

    request.getfixturevalue("rabbitmq_server")  # on the port RABBITMQ_URL names
    # override_settings: pytest-django's `settings` fixture is function-scoped, and this override
    # holds for the whole module (its nodes are module-scoped too).
    with override_settings(CHANNEL_LAYERS={"default": channel_layer_config("rabbitmq")}):
        yield "rabbitmq"


@pytest.fixture(scope="module")
def layer_env(layer_backend: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment for a process (a manage.py command) on the layer under test."""
    if layer_backend == "redis":
        return {}
    return rabbitmq_env(request.getfixturevalue("rabbitmq_server"))


@pytest.fixture(scope="module")
def layer_node(layer_backend: str, runner: str, node_pool: NodePool, layer_env: dict[str, str]) -> DaphneNode:
    """The daphne node of the layer under test (and of the module's runner)."""
    return node_pool.get(runner, layer_backend, layer_env or None)


async def close_in_process_layer() -> None:
    """Close this process's RabbitMQ layer, if it made one (Channels' own reset drops it unclosed)."""
    from channels.layers import channel_layers

    from awx_ws.main.layers.rabbitmq import RabbitmqChannelLayer

    layer = channel_layers.backends.get("default")
    if isinstance(layer, RabbitmqChannelLayer):
        del channel_layers.backends["default"]
        await layer.close()


@pytest.fixture
async def fresh_in_process_layer() -> AsyncIterator[None]:
    """Close this process's channel layer after each test: a RabbitMQ one is bound to the test's
    event loop, and each test has a loop of its own."""
    yield
    await close_in_process_layer()


@pytest.fixture
def daphne_factory(
    redis_server: RedisServer, state_dir: Path, runner: str
) -> Iterator[Callable[..., DaphneNode]]:
    """Start extra server processes (the module's runner) for one test; all are stopped afterwards."""
    started: list[DaphneNode] = []

    def start(
        env: dict[str, str] | None = None,
        wait: bool = True,
        options: tuple[str, ...] = (),
        port: int | None = None,
    ) -> DaphneNode:
        server = DaphneNode(state_dir / "logs", env, port=port, runner=runner, options=options)
        started.append(server)
        if wait:
            return server.start()
        Process.start(server)  # without waiting for the port: for servers expected to fail
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
async def user(shared_db: None) -> Any:
    """An ordinary active user."""
    return await adb(create_user)


@pytest.fixture
async def token(user: Any) -> str:
    """The user's DRF API token key."""
    return await adb(create_token, user)


@pytest.fixture
async def client(node: DaphneNode, token: str) -> AsyncIterator[WsClient]:
    """A token client connected to the node."""
    ws = await open_ws(node.url, headers={"Authorization": f"Token {token}"})
    yield ws
    await ws.close()


@pytest.fixture(scope="module")
def api(redis_server: RedisServer, state_dir: Path) -> Iterator[Gunicorn]:
    """gunicorn serving config.wsgi, as supervisord runs it."""
    server = Gunicorn(state_dir / "logs").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nginx(node: DaphneNode, api: Gunicorn, state_dir: Path) -> Iterator[Nginx]:
    """nginx in front of the session daphne node and the API."""
    server = Nginx(state_dir / f"nginx-{secrets.token_hex(3)}", node.port, api.port).start()
    yield server
    server.stop()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's headless Chromium, driven by Playwright (no browser download)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make test installs it with apt-get)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        await chromium.close()
