"""Real server processes for the tests: redis-server, daphne (awx_ws.server), nginx, supervisord."""

from __future__ import annotations

import itertools
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent


def _server_ports() -> list[int]:
    """The ports this test process hands to servers: below the kernel's ephemeral range, so no
    outgoing connection (tens of thousands in the churn tests) can take one between choosing it
    and the server binding it, and a range of its own per pytest-xdist worker."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low < 12_000:  # no room below the ephemeral range: let the kernel choose
        return []
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    span = (low - 10_000) // max(workers, 1)
    ports = list(range(10_000 + worker * span, 10_000 + (worker + 1) * span))
    random.Random(os.getpid()).shuffle(ports)
    return ports


_PORTS = itertools.cycle(_server_ports() or [0])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, for a server to bind."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """count distinct free ports (all held open while choosing, so none repeats)."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", next(_PORTS)))
            except OSError:  # in use (or lingering): the next one
                sock.close()
                continue
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def find_program(name: str) -> str:
    """Path of a system program, looking in sbin too (Debian's nginx lives in /usr/sbin)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `make test`, which installs it")
    return found


def run_manage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`manage.py ARGS` in a process of its own, the test's environment plus env; its result."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


class Process:
    """A child process with its output in a log file, stopped for sure at the end."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_output(self, text: str, timeout: float = 10.0) -> bool:
        """True once text shows in the log (servers write their logs a little after answering)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            time.sleep(0.05)
        return False

    def wait_for_port(self, port: int, timeout: float = 30.0) -> None:
        """Until the process listens on port; a process that does not in time is stopped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.output()}")
            if port_open(port):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {port} in {timeout}s:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL to the process and all it started (hypercorn's worker too), as a crash would;
        returns once none of them runs (holds a connection or a port) any more."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.wait_group_gone(10)

    def group(self) -> list[psutil.Process]:
        """The processes of this one's process group still running (zombies are gone: they hold
        no socket), the process itself included."""
        assert self.proc is not None
        found = []
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == self.proc.pid and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        return found

    def wait_group_gone(self, timeout: float) -> None:
        """Until no process of the group runs: a server's workers outlive the main process by the
        moments their exit takes (or for good, if nothing ends them: RuntimeError)."""
        deadline = time.monotonic() + timeout
        while (left := self.group()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            raise RuntimeError(f"{self.name}: {[p.pid for p in left]} still run {timeout}s after it ended")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Ask the process group to stop, kill it if it will not; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        try:
            self.wait_group_gone(timeout)
        except RuntimeError:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.wait_group_gone(10)
        return self.proc.returncode


class RedisServer(Process):
    """redis-server on loopback, in-memory only."""

    def __init__(self, port: int, workdir: Path):
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            find_program("redis-server"),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        super().__init__(f"redis:{port}", argv, workdir / f"redis-{port}.log")

    def start(self) -> RedisServer:
        super().start()
        self.wait_for_port(self.port)
        return self


# Redis connections a daphne process may hold whatever its load: the fan-out's receive loop, its
# membership sync, the heartbeat, and one client's set-up work at a time under the fan-out's lock
# (stream positions, connection counts). None per client: 500 streams or 10,000 connect/close
# cycles must not leave pooled connections behind.
PROCESS_CONNECTIONS = 4

# The ways to run the service that the suite proves: our runner (daphne with lifespan and direct
# writes, as supervisord.conf starts it) and plain `daphne`, as the Channels docs and AWX start it.
# How long a server may take to start: longer than it waits for its channel layer itself
# (AWX_WS_STARTUP_LAYER_WAIT, 60 s by default), so that a layer it cannot reach is reported as
# the 503 naming the layer, not as a read timeout here that says nothing.
STARTUP_BOUND = 75.0

RUNNERS = ("awx_ws.server", "daphne")
# Every ASGI server users run Channels under: the daphne runners, and uvicorn and hypercorn
# (requirements-dev.txt only; docs/channels.md, "Which runner"). Modules marked `every_server`
# run under each of these; `both_runners` modules under the daphne runners.
ASGI_SERVERS = (*RUNNERS, "uvicorn", "hypercorn")


def server_command(runner: str, port: int, options: tuple[str, ...], app: str) -> list[str]:
    """The command line of one server on 127.0.0.1:port, as a user types it (console scripts from
    the virtualenv); options are the server's own (each server spells them its own way)."""
    scripts = Path(sys.executable).parent
    if runner == "awx_ws.server":
        return [sys.executable, "-m", "awx_ws.server", "-b", "127.0.0.1", "-p", str(port), *options, app]
    if runner == "daphne":
        return [str(scripts / "daphne"), "-b", "127.0.0.1", "-p", str(port), *options, app]
    if runner == "uvicorn":
        return [str(scripts / "uvicorn"), "--host", "127.0.0.1", "--port", str(port), *options, app]
    if runner == "hypercorn":
        return [str(scripts / "hypercorn"), "-b", f"127.0.0.1:{port}", *options, app]
    raise ValueError(f"unknown runner {runner!r}: one of {ASGI_SERVERS}")


class DaphneNode(Process):
    """One server process serving config.asgi: `python -m awx_ws.server`, plain `daphne`,
    `uvicorn` or `hypercorn` (ASGI_SERVERS)."""

    def __init__(
        self,
        workdir: Path,
        env_extra: dict[str, str] | None = None,
        port: int | None = None,
        runner: str = "awx_ws.server",
        app: str = "config.asgi:application",
        options: tuple[str, ...] = (),
    ):
        if runner not in ASGI_SERVERS:
            raise ValueError(f"unknown runner {runner!r}: one of {ASGI_SERVERS}")
        self.runner = runner
        self.port = port or free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(env_extra or {})
        # Peers sign for the node they dial (peerauth.py): this node is who it listens as.
        env.setdefault("BROADCAST_WEBSOCKET_SELF", f"127.0.0.1:{self.port}")
        self.self_address = env["BROADCAST_WEBSOCKET_SELF"]
        argv = server_command(runner, self.port, options, app)
        super().__init__(f"{runner}:{self.port}", argv, workdir / f"{runner}-{self.port}.log", env)

    def start(self, timeout: float = STARTUP_BOUND) -> DaphneNode:
        """Start, and wait until it listens and its start-up work is done (under every server).

        The stream endpoint answers only once start-up is done (plain daphne holds requests to
        it until then; the others, which send ASGI lifespan, listen only then): 401 without
        credentials when it is, 503 when start-up failed. Whatever went wrong, the error carries
        the server's log.
        """
        super().start()
        try:
            self.wait_for_port(self.port, timeout)
            url = f"{self.http_url}/api/v2/stream/?groups=jobs-status_changed"
            try:
                urllib.request.urlopen(url, timeout=timeout).close()
                status = 200
            except urllib.error.HTTPError as exc:
                status = exc.code
                exc.close()
            except OSError as exc:  # a read timeout, a reset: URLError is one too
                raise RuntimeError(
                    f"{self.name} did not answer once started ({exc!r}):\n{self.output()}"
                ) from exc
            if status != 401:
                raise RuntimeError(
                    f"{self.name} did not start (stream endpoint said {status}):\n{self.output()}"
                )
        except BaseException:
            self.stop()  # a server that failed to start is not left running
            raise
        return self


class Gunicorn(Process):
    """gunicorn serving config.wsgi, as supervisord runs it (one worker)."""

    def __init__(self, workdir: Path, env_extra: dict[str, str] | None = None):
        self.port = free_port()
        self.http_url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable, "-m", "gunicorn", "config.wsgi:application",
            "-b", f"127.0.0.1:{self.port}", "--workers", "1", "--access-logfile", "-",
            "--logger-class", "awx_ws.main.log_redaction.GunicornLogger",
        ]  # fmt: skip
        env = {**os.environ, **(env_extra or {})}
        super().__init__(f"gunicorn:{self.port}", argv, workdir / f"gunicorn-{self.port}.log", env)

    def start(self) -> Gunicorn:
        super().start()
        self.wait_for_port(self.port)
        return self


class Relay(Process):
    """`manage.py run_wsbroadcast` for one node."""

    def __init__(self, workdir: Path, name: str, env: dict[str, str]):
        argv = [sys.executable, "manage.py", "run_wsbroadcast"]
        super().__init__(f"relay:{name}", argv, workdir / f"relay-{name}.log", env)


def nginx_argv(prefix: Path) -> list[str]:
    """nginx in the foreground on prefix/nginx.conf, as supervisord starts it."""
    conf = prefix / "nginx.conf"
    return [
        find_program("nginx"),
        "-p",
        str(prefix),
        "-e",
        str(prefix / "error.log"),
        "-c",
        str(conf),
        "-g",
        "daemon off;",
    ]


class Nginx(Process):
    """nginx rendered from nginx/nginx.conf.template in front of a daphne and an API port.

    With as_user (and this process root): started as that user, as a non-root deployment starts
    it, on a prefix that user owns."""

    def __init__(
        self,
        prefix: Path,
        daphne_port: int | list[int],
        api_port: int,
        tls: tuple[Path, Path] | None = None,
        limits: Any = None,
        as_user: str | None = None,
    ):
        from awx_ws.main.management.commands.nginx_conf import AddressLimits, Workers, render

        self.port = free_port()
        self.http_url = f"http://127.0.0.1:{self.port}"
        # With tls=(certificate, key): HTTPS/WSS on a second port.
        self.tls_port = free_port() if tls else None
        ports = [daphne_port] if isinstance(daphne_port, int) else daphne_port
        daphnes = [f"127.0.0.1:{port}" for port in ports]
        tls_listen = (f"127.0.0.1:{self.tls_port}", *tls) if tls else None
        self.prefix_dir = prefix
        self.workers = Workers(None) if as_user else Workers.for_this_process()
        self.temp_dir = self.workers.temp_root(prefix)
        api = f"127.0.0.1:{api_port}"
        render(
            prefix,
            f"127.0.0.1:{self.port}",
            daphnes,
            api,
            tls_listen,
            limits or AddressLimits(),
            self.workers,
        )
        argv = nginx_argv(prefix)
        if as_user and os.geteuid() == 0:
            account = pwd.getpwnam(as_user)
            for path in [prefix, *prefix.rglob("*")]:
                os.chown(path, account.pw_uid, account.pw_gid)
            ids = [f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
            argv = [find_program("setpriv"), *ids, *argv]
        super().__init__(f"nginx:{self.port}", argv, prefix / "nginx.out", None)

    def start(self) -> Nginx:
        super().start()
        self.wait_for_port(self.port)
        if self.tls_port:
            self.wait_for_port(self.tls_port)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        code = super().stop(sig, timeout)
        if not self.temp_dir.is_relative_to(self.prefix_dir):  # root's workers' own, in TMPDIR
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return code


def postgres_bin(program: str) -> str:
    """A PostgreSQL server program from Debian's versioned directory (not on PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"))
    if not found:
        raise RuntimeError(f"{program} not found: install Debian's postgresql (make test does)")
    return str(found[-1])


class PostgresServer(Process):
    """A throwaway PostgreSQL cluster on loopback (initdb into workdir, trust auth).

    PostgreSQL refuses to run as root; as root it runs as the `postgres` user Debian creates.
    """

    def __init__(self, port: int, workdir: Path):
        self.port = port
        self.url = f"postgres://postgres@127.0.0.1:{port}/postgres"
        self.data = workdir / "pgdata"
        workdir.mkdir(parents=True, exist_ok=True)
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(workdir, "postgres")
        subprocess.run(
            [*self.as_user, postgres_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        argv = [
            *self.as_user, postgres_bin("postgres"), "-D", str(self.data), "-p", str(port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={workdir}",
            "-c", "max_connections=300", "-c", "fsync=off",
        ]  # fmt: skip
        super().__init__(f"postgres:{port}", argv, workdir / f"postgres-{port}.log")

    def start(self) -> PostgresServer:
        super().start()
        self.wait_for_port(self.port)
        return self


class RabbitMQServer(Process):
    """Debian's rabbitmq-server on loopback, with its own node name, ports, cookie and data.

    Every port is chosen here (AMQP, Erlang distribution, epmd) and bound to 127.0.0.1; `vhosts`
    are created at boot from a definitions file, so each test cluster node can have a broker of
    its own on one server.
    """

    BIN = Path("/usr/lib/rabbitmq/bin")

    def __init__(self, port: int, workdir: Path, vhosts: list[str]):
        self.port = port
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        dist_port, self.epmd_port = free_ports(2)
        definitions = {
            "users": [{"name": "guest", "password": "guest", "tags": "administrator"}],
            "vhosts": [{"name": vhost} for vhost in vhosts],
            "permissions": [
                {"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
                for vhost in vhosts
            ],
        }
        (workdir / "definitions.json").write_text(json.dumps(definitions))
        (workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{port}\n"
            f"load_definitions = {workdir / 'definitions.json'}\n"
            "log.console = true\nlog.file = false\n"
            "disk_free_limit.absolute = 50MB\n"
        )
        (workdir / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "HOME": str(workdir),  # the Erlang cookie goes here
            "RABBITMQ_NODENAME": f"awxws{port}@localhost",
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid"),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        program = self.BIN / "rabbitmq-server"
        if not program.exists():
            raise RuntimeError("rabbitmq-server is not installed: run `make test`, which installs it")
        super().__init__(f"rabbitmq:{port}", [str(program)], workdir / f"rabbitmq-{port}.log", self.env)

    def url(self, vhost: str = "/") -> str:
        """The AMQP URL of one vhost."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}" + ("" if vhost == "/" else f"/{vhost}")

    def start(self) -> RabbitMQServer:
        super().start()
        self.wait_for_port(self.port, timeout=60)
        return self

    def ctl(self, *args: str) -> str:
        """rabbitmqctl against this node; its output."""
        result = subprocess.run(
            [str(self.BIN / "rabbitmqctl"), "-q", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def rows(self, *args: str) -> list[list[str]]:
        """A rabbitmqctl list_* table as rows of tab-separated fields (no header)."""
        return [line.split("\t") for line in self.ctl("--no-table-headers", *args).splitlines() if line]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        code = super().stop(sig, timeout)
        # epmd outlives the node it served; it is ours, on our port: stop it too.
        found = sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))
        epmd = shutil.which("epmd") or (found[-1] if found else None)
        if epmd:
            subprocess.run(
                [str(epmd), "-port", str(self.epmd_port), "-kill"], capture_output=True, timeout=10
            )
        return code
