"""The soak's topology: three nodes as `make run` starts one, finding each other through PostgreSQL.

Each node is `make run` (supervisord with Redis, daphne, the relay, the API and nginx) on ports and
a var/ of its own. All three share one PostgreSQL (the API's data and peer discovery) started here,
so it can be restarted. Node C keeps its channel layer on a Redis Sentinel set (a master, a replica
and three sentinels) instead of the Redis its supervisord starts, and is dialled by its peers
through a TCP proxy the nemesis controls (BROADCAST_WEBSOCKET_SELF names the proxy).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.link_proxy import LinkProxy
from tests.sentinel import Sentinels, start_sentinels
from tests.servers import ROOT, PostgresServer, Process, free_port, free_ports, port_open

# Discovery heartbeats every 2 s, so a node that dies is dropped after 6 s, not 45.
CLUSTER_SETTINGS = {
    "BROADCAST_WEBSOCKET_PEERS": "",
    "BROADCAST_WEBSOCKET_DISCOVERY": "postgres",
    "BROADCAST_WEBSOCKET_HEARTBEAT": "2",
    "BROADCAST_WEBSOCKET_PING_INTERVAL": "5",
    "BROADCAST_WEBSOCKET_BACKOFF_MAX": "2",
    "BROADCAST_WEBSOCKET_SECRET": "soak-relay-secret-0123456789abcdef",
    "SECRET_KEY": "soak-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
    "LOG_LEVEL": "INFO",
}
# The programs of a node's supervisord, as supervisord.conf names them.
PROGRAMS = ("redis", "daphne", "relay", "api", "nginx")


@dataclass
class Node:
    """One node: `make run` on ports of its own."""

    name: str
    var: Path
    env: dict[str, str]
    ports: dict[str, int]
    proxy: LinkProxy | None = None
    make: Process | None = field(default=None, repr=False)

    @property
    def front(self) -> str:
        """nginx's address (HTTP)."""
        return f"http://127.0.0.1:{self.ports['NGINX']}"

    @property
    def ws(self) -> str:
        """The websocket URL through nginx."""
        return f"ws://127.0.0.1:{self.ports['NGINX']}/websocket/"

    def start(self) -> None:
        """`make run`, and wait until nginx serves the API and daphne has started up."""
        self.make = Process(
            f"make run {self.name}", ["make", "run"], self.var.parent / "make-run.log", self.env
        )
        self.make.start()
        self.wait_serving(180)

    def wait_serving(self, timeout: float) -> None:
        """Until the API answers ready and the stream endpoint answers 401 (start-up done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = self.make.proc.poll() if self.make is not None and self.make.proc is not None else None
            if ended is not None:
                raise RuntimeError(f"node {self.name}: make run exited ({ended}), see {self.var}")
            if port_open(self.ports["NGINX"]) and self.serving():
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {self.name} did not serve in {timeout}s; logs in {self.var / 'log'}")

    def serving(self) -> bool:
        """The API is ready and daphne is past its start-up, through nginx."""
        try:
            with urllib.request.urlopen(f"{self.front}/api/v2/ready/", timeout=5) as response:
                if response.status != 200:
                    return False
            urllib.request.urlopen(f"{self.front}/api/v2/stream/?groups=jobs-status_changed", timeout=5)
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code == 401
        except OSError:
            return False
        return False

    def pids(self) -> dict[str, int]:
        """The pid supervisord has for each of its programs that runs (one supervisorctl call)."""
        result = subprocess.run(
            [str(ROOT / ".venv/bin/supervisorctl"), "-c", str(ROOT / "supervisord.conf"), "status"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        found = {}
        for line in result.stdout.splitlines():
            match = re.match(r"(\S+)\s+RUNNING\s+pid (\d+),", line)
            if match:
                found[match[1]] = int(match[2])
        return found

    def pid(self, program: str) -> int | None:
        """The pid of one program (None when it is not running)."""
        return self.pids().get(program)

    def processes(self) -> dict[str, list[psutil.Process]]:
        """Each program's processes (the API's workers with their master), the main one first."""
        found: dict[str, list[psutil.Process]] = {}
        for program, pid in self.pids().items():
            try:
                main = psutil.Process(pid)
                found[program] = [main, *main.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return found

    def stop(self) -> None:
        """Ctrl-C, as in a terminal; killed if it will not stop."""
        if self.make is not None:
            self.make.stop(signal.SIGINT, timeout=60)

    def logs(self) -> list[Path]:
        """Every log this node's processes write."""
        return sorted({*self.var.glob("log/*.log"), *self.var.glob("nginx/error.log")})


@dataclass
class Cluster:
    """The three nodes, their database and node C's Sentinel set."""

    state: Path
    postgres: PostgresServer
    sentinels: Sentinels
    nodes: list[Node]

    def by_name(self, name: str) -> Node:
        """The node named name."""
        return next(node for node in self.nodes if node.name == name)

    def logs(self) -> list[Path]:
        """Every log of every process the soak started."""
        found = [log for node in self.nodes for log in node.logs()]
        found.append(self.postgres.log)
        found += [server.log for server in (self.sentinels.master, self.sentinels.replica)]
        return found

    def stop(self) -> None:
        """Stop every process the soak started."""
        for node in self.nodes:
            node.stop()
            if node.proxy is not None:
                node.proxy.close()
        self.sentinels.stop()
        self.postgres.stop(signal.SIGINT)


def migrate(database_url: str) -> None:
    """The schema, once, before any node starts (their `make run` migrates too, then finds it done)."""
    subprocess.run(
        [str(ROOT / ".venv/bin/python"), "manage.py", "migrate", "--noinput", "-v0"],
        cwd=ROOT,
        env={**os.environ, "SECRET_KEY": CLUSTER_SETTINGS["SECRET_KEY"], "DATABASE_URL": database_url},
        check=True,
        timeout=300,
    )


def node_env(
    name: str, var: Path, ports: dict[str, int], database_url: str, cluster_id: str
) -> dict[str, str]:
    """The environment `make run` gets for one node."""
    own = {"DATABASE_URL", "REDIS_URL", "REDIS_SENTINELS", "AWX_WS_TLS_CERT", "AWX_WS_TLS_KEY"}
    env = {k: v for k, v in os.environ.items() if k not in own and not k.startswith("PYTEST")}
    env.update(CLUSTER_SETTINGS)
    env.update({f"AWX_WS_{port}_PORT": str(number) for port, number in ports.items()})
    env.update(
        {
            "AWX_WS_VAR": str(var),
            "DATABASE_URL": database_url,
            "AWX_WS_CLUSTER_ID": cluster_id,
            "AWX_WS_NODE_NAME": f"soak-{name}",
            "BROADCAST_WEBSOCKET_SELF": f"127.0.0.1:{ports['DAPHNE']}",
        }
    )
    return env


async def start_cluster(state: Path, cluster_id: str) -> Cluster:
    """PostgreSQL, the Sentinel set, and nodes A, B and C (C on Sentinel, behind a proxy), one
    after another (each `make run` migrates: never two at once)."""
    # As root, PostgreSQL runs as `postgres`, which must reach its directory under state.
    state.chmod(0o711)
    postgres = await asyncio.to_thread(PostgresServer(free_port(), state / "postgres").start)
    started: list[Node] = []
    sentinels: Sentinels | None = None
    try:
        await asyncio.to_thread(migrate, postgres.url)
        sentinels = await asyncio.to_thread(start_sentinels, state / "sentinel")
        for name in ("A", "B", "C"):
            ports = dict(zip(("REDIS", "DAPHNE", "API", "NGINX", "TLS"), free_ports(5), strict=True))
            var = state / name / "var"
            env = node_env(name, var, ports, postgres.url, cluster_id)
            proxy = None
            if name == "C":
                env.update(sentinels.env)
                proxy = await LinkProxy(free_port(), ports["DAPHNE"]).start()
                env["BROADCAST_WEBSOCKET_SELF"] = f"127.0.0.1:{proxy.port}"
            node = Node(name, var, env, ports, proxy)
            started.append(node)
            await asyncio.to_thread(node.start)
        return Cluster(state, postgres, sentinels, started)
    except BaseException:
        for node in started:
            node.stop()
            if node.proxy is not None:
                node.proxy.close()
        if sentinels is not None:
            sentinels.stop()
        postgres.stop(signal.SIGINT)
        raise


def api_token_of(node: Node) -> str:
    """The demo superuser's token `make run` printed (bootstrap_demo)."""
    text = (node.var.parent / "make-run.log").read_text(errors="replace")
    found = re.findall(r"API token:\s+(\w+)", text)
    if not found:
        raise RuntimeError(f"node {node.name}: make run printed no API token")
    return found[-1]
