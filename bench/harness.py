"""The bench's processes and set-up: servers of each kind, load-client processes, Django in the
driver, CPU of a process tree. Shared by bench.run and the scenario modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(tempfile.mkdtemp(prefix="awx_ws-bench-"))
sys.path.insert(0, str(ROOT))

from tests.servers import DaphneNode, Nginx, Process, RabbitMQServer, RedisServer, free_port  # noqa: E402

# The RabbitMQ broker of the "ours-rabbitmq" kind (started by main()).
RABBITMQ: list[RabbitMQServer] = []


def rabbitmq_env() -> dict[str, str]:
    """The environment of a server on the bench's RabbitMQ broker."""
    return {"CHANNEL_LAYER_BACKEND": "rabbitmq", "RABBITMQ_URL": RABBITMQ[0].url()}


def cpu_seconds(process: Process) -> float:
    """User + system CPU of a process and its children (RabbitMQ's beam runs under a shell)."""
    parent = psutil.Process(process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [parent, *parent.children(recursive=True)])


def setup_django(redis_port: int) -> None:
    """Django in the bench process, on the bench's SQLite and Redis (servers inherit the environment)."""
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "AWX_WS_VAR": str(STATE / "var"),
            "DATABASE_URL": f"sqlite:///{STATE / 'db.sqlite3'}",
            "SECRET_KEY": "bench-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "LOG_LEVEL": "WARNING",
        }
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def make_token_and_jobs(count: int) -> tuple[str, list[int]]:
    """The bench user (member of the "bench" organization), its API token and count jobs it may see."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from awx_ws.main.models import AccessChange, Job, Organization

    user = get_user_model().objects.create_user("bench", "", "bench")
    org = Organization.objects.create(name="bench")
    org.members.add(user)
    jobs = Job.objects.bulk_create([Job(organization=org, kind="job") for _ in range(count)])
    key = Token.objects.create(user=user).key
    # Creating the bench user recorded access changes for it (revocation.py). A server reads the
    # changes of the last 30 s when it starts: whichever scenario began within 30 s of this set-up
    # paid for rechecking all its connections (+30 ms per 1,000 in the first one). Not a load of
    # any scenario: forget them.
    AccessChange.objects.all().delete()
    return key, [job.pk for job in jobs]


def add_jobs(count: int) -> list[int]:
    """count more jobs in the bench user's organization (make_token_and_jobs made it)."""
    from awx_ws.main.models import Job, Organization

    org = Organization.objects.get(name="bench")
    jobs = Job.objects.bulk_create([Job(organization=org, kind="job") for _ in range(count)])
    return [job.pk for job in jobs]


def log(line: str) -> None:
    """A line of progress, at once."""
    print(line, flush=True)


# The runner comparison: our application on the Redis layer under each ASGI server, by kind.
RUNNER_KINDS = {
    "ours": "awx_ws.server",
    "ours-daphne": "daphne",
    "ours-uvicorn": "uvicorn",
    "ours-hypercorn": "hypercorn",
}


class Server:
    """One server kind: its processes (for CPU and RSS) and its client URL."""

    def __init__(
        self,
        kind: str,
        redis: RedisServer,
        daphnes: int = 1,
        front: bool = False,
        env_extra: dict[str, str] | None = None,
    ):
        """Start the kind's processes (env_extra: more environment for ours)."""
        self.kind = kind
        self.processes: list[Process] = []
        logs = STATE / "logs"
        if kind in (*RUNNER_KINDS, "ours-rabbitmq"):
            # Every load client is the one bench user: its 1,000 sockets are past the per-user limit.
            env = {"LOG_LEVEL": "WARNING", "AWX_WS_MAX_CONNECTIONS_PER_USER": "100000"}
            env.update(rabbitmq_env() if kind == "ours-rabbitmq" else {})
            env.update(env_extra or {})
            runner = RUNNER_KINDS.get(kind, "awx_ws.server")
            nodes = [DaphneNode(logs, env, runner=runner).start() for _ in range(daphnes)]
            self.processes += nodes
            if front:
                nginx = Nginx(STATE / f"nginx-{free_port()}", [n.port for n in nodes], free_port()).start()
                self.front: Process = nginx
                self.processes.append(nginx)  # its CPU is part of serving
                self.url = f"ws://127.0.0.1:{nginx.port}"
            else:
                self.url = nodes[0].url
        elif kind == "baseline":
            port = free_port()
            env = {**os.environ, "DJANGO_SETTINGS_MODULE": "bench.baseline_settings"}
            argv = [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "bench.baseline_asgi:application",
            ]
            proc = Process(f"baseline:{port}", argv, logs / f"baseline-{port}.log", env).start()
            proc.wait_for_port(port)
            self.processes.append(proc)
            self.url = f"ws://127.0.0.1:{port}"
        else:
            port = free_port()
            argv = [sys.executable, "-m", "bench.floor_server", str(port), redis.url]
            proc = Process(f"floor:{port}", argv, logs / f"floor-{port}.log", dict(os.environ)).start()
            proc.wait_for_port(port)
            self.processes.append(proc)
            self.url = f"ws://127.0.0.1:{port}"

    def cpu_parts(self) -> dict[str, float]:
        """CPU seconds (user + system) of each server program, its child processes included."""
        parts: dict[str, float] = {}
        for process in self.processes:
            name = process.name.split(":")[0]
            parent = psutil.Process(process.pid)
            for member in [parent, *parent.children(recursive=True)]:  # nginx works in a child
                times = member.cpu_times()
                parts[name] = parts.get(name, 0.0) + times.user + times.system
        return parts

    def cpu(self) -> float:
        """CPU seconds of all its processes."""
        return sum(self.cpu_parts().values())

    def rss(self) -> int:
        """Resident bytes of all its processes."""
        return sum(psutil.Process(p.pid).memory_info().rss for p in self.processes)

    def stop(self) -> None:
        """Stop every process."""
        for process in self.processes:
            process.stop()


def groups_argument(groups: list[str]) -> str:
    """loadclient's --groups: comma-separated, or @file when the names are past argv's limit."""
    if len(groups) <= 1000:
        return ",".join(groups)
    listing = STATE / f"groups-{time.monotonic_ns()}.txt"
    listing.write_text("\n".join(groups) + "\n")
    return f"@{listing}"


def wait_floor_subscribed(redis: RedisServer, groups: list[str], timeout: float = 30) -> None:
    """Until Redis has the floor's subscription to every group (it subscribes after the handshake)."""
    from redis import Redis

    client = Redis.from_url(redis.url)
    deadline = time.monotonic() + timeout
    try:
        wanted = sorted(set(groups))
        while not all(count > 0 for _, count in client.pubsub_numsub(*wanted)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the floor did not subscribe to {len(wanted)} groups in {timeout}s")
            time.sleep(0.05)
    finally:
        client.close()


class Clients:
    """A bench.loadclient process."""

    def __init__(
        self,
        server: Server,
        count: int,
        groups: list[str],
        token: str,
        expect: int = 0,
        hold: bool = False,
        timeout: float = 90,
        groups_per_socket: int = 1,
        linger: float = 0.0,
    ):
        # Every "ours" kind speaks the same protocol.
        """Start the load-client process (its sockets connect in the background; linger: seconds
        it keeps reading once complete, for late duplicates)."""
        client_kind = "ours" if server.kind.startswith("ours") else server.kind
        argv = [
            sys.executable, "-m", "bench.loadclient", "--kind", client_kind, "--url", server.url,
            "--count", str(count), "--groups", groups_argument(groups), "--token", token,
            "--expect", str(expect), "--timeout", str(timeout),
            "--groups-per-socket", str(groups_per_socket), "--linger", str(linger),
        ]  # fmt: skip
        if hold:
            argv.append("--hold")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.progress = 0
        self._said = time.monotonic()

    def wait_ready(self) -> None:
        """Until every socket is connected (and subscribed, for ours)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "ready":
                return
        raise RuntimeError("load client died before it was ready")

    def result(self, label: str, total: int) -> dict[str, Any]:
        """What the clients received (showing progress meanwhile)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("progress "):
                self.progress = int(line.split()[1])
                if sys.stdout.isatty():
                    sys.stdout.write(f"\r  {label}: {self.progress}/{total} delivered   ")
                elif time.monotonic() - self._said >= 5:
                    sys.stdout.write(f"  {label}: {self.progress}/{total} delivered\n")
                    self._said = time.monotonic()
                sys.stdout.flush()
            elif line.startswith("result "):
                sys.stdout.write("\n")
                self.proc.wait(30)
                return json.loads(line[len("result ") :])
        raise RuntimeError("load client died without a result")

    def stop(self) -> None:
        """Kill the process if it still runs (a scenario that failed midway)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()

    def release(self) -> None:
        """End a --hold client: its sockets close, the process exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


def mark_left(redis: RedisServer, groups: list[str]) -> None:
    """Mark groups as a member's leave marks them (the layer's mark_left): their history is
    written while the mark lasts, as for a group someone could resume."""
    import redis as redis_py
    from channels.layers import get_channel_layer

    layer: Any = get_channel_layer()
    client = redis_py.Redis.from_url(redis.url)
    try:
        with client.pipeline(transaction=False) as pipe:
            for group in groups:
                layer.mark_left(pipe, group)
            pipe.execute()
    finally:
        client.close()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of values (nan for none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def connections_to(port: int) -> int:
    """TCP connections this process holds to a server on port."""
    return sum(1 for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port)


@contextmanager
def rabbitmq_server():
    """A RabbitMQ broker for the bench's run (the ours-rabbitmq kind's)."""
    server = RabbitMQServer(free_port(), STATE / "rabbitmq", ["/"]).start()
    RABBITMQ.append(server)
    try:
        yield server
    finally:
        RABBITMQ.clear()
        server.stop()


@contextmanager
def redis_server():
    """The bench's redis-server."""
    server = RedisServer(free_port(), STATE / "redis").start()
    try:
        yield server
    finally:
        server.stop()
