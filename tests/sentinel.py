"""A Sentinel-managed Redis on loopback: a master, a replica and three sentinels (Debian's
redis-server and redis-sentinel), for the tests of the service behind a failover."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.servers import Process, RedisServer, find_program, free_ports

MASTER_NAME = "awxws"
# Sentinels agree that the master is down after 1 s without an answer (2 of 3 must agree).
DOWN_AFTER_MS = 1000


@dataclass(frozen=True)
class Passwords:
    """The master's and replica's `requirepass`, and the sentinels' own (empty: none)."""

    master: str = ""
    sentinels: str = ""


class ReplicaServer(RedisServer):
    """redis-server replicating another one."""

    def __init__(self, port: int, workdir: Path, master_port: int, password: str):
        super().__init__(port, workdir)
        self.argv += ["--replicaof", "127.0.0.1", str(master_port)]
        if password:
            self.argv += ["--masterauth", password]


class SentinelServer(Process):
    """redis-sentinel watching one master; its configuration file is its own (Sentinel rewrites it)."""

    def __init__(self, port: int, workdir: Path, master_port: int, passwords: Passwords):
        self.port = port
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / f"sentinel-{port}.conf"
        lines = [
            "bind 127.0.0.1",
            f"port {port}",
            f"dir {workdir}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} 10000",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        if passwords.master:
            lines.append(f"sentinel auth-pass {MASTER_NAME} {passwords.master}")
        if passwords.sentinels:
            lines.append(f"requirepass {passwords.sentinels}")  # asked of clients and other sentinels
        config.write_text("\n".join([*lines, ""]))
        argv = [find_program("redis-sentinel"), str(config)]
        super().__init__(f"sentinel:{port}", argv, workdir / f"sentinel-{port}.log")

    def start(self) -> SentinelServer:
        super().start()
        self.wait_for_port(self.port)
        return self


class Sentinels:
    """The running set: master, replica, sentinels, and how the service is pointed at them."""

    def __init__(
        self, master: RedisServer, replica: RedisServer, sentinels: list[SentinelServer], passwords: Passwords
    ):
        self.master = master
        self.replica = replica
        self.sentinels = sentinels
        self.passwords = passwords

    @property
    def env(self) -> dict[str, str]:
        """The service's settings for this set. REDIS_URL names a port nothing listens on: the
        sentinels, not REDIS_URL's host, must say where the master is."""
        auth = f":{self.passwords.master}@" if self.passwords.master else ""
        return {
            "REDIS_SENTINELS": ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels),
            "REDIS_SENTINEL_MASTER": MASTER_NAME,
            "REDIS_SENTINEL_PASSWORD": self.passwords.sentinels,
            "REDIS_URL": f"redis://{auth}127.0.0.1:1/0",
        }

    def redis(self, server: RedisServer) -> Redis:
        """A sync client of the master or the replica (with the password)."""
        return Redis(port=server.port, password=self.passwords.master or None, socket_timeout=1)

    def state(self, sentinel: SentinelServer) -> dict[str, Any]:
        """What one sentinel says of the master (SENTINEL MASTER), {} if it does not answer."""
        password = self.passwords.sentinels or None
        client = Redis(port=sentinel.port, password=password, socket_timeout=1, decode_responses=True)
        try:
            return dict(client.sentinel_master(MASTER_NAME))
        except (RedisConnectionError, RedisTimeoutError):
            return {}
        finally:
            client.close()

    def master_port(self) -> int | None:
        """The master's port as every sentinel now says, None while they disagree."""
        ports = {int(self.state(sentinel).get("port", 0)) for sentinel in self.sentinels}
        return ports.pop() if len(ports) == 1 else None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the replica is in sync and every sentinel knows it and the two other sentinels."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [self.state(sentinel) for sentinel in self.sentinels]
            if self.replica_offset() is not None and all(
                state.get("num-slaves") == 1 and state.get("num-other-sentinels") == 2 for state in states
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the sentinels did not see the replica and each other in {timeout}s: {states}")

    def replica_offset(self) -> int | None:
        """How far the replica has applied the master's stream; None while its link is down."""
        client = self.redis(self.replica)
        try:
            info = client.info("replication")
        finally:
            client.close()
        return int(info["slave_repl_offset"]) if info.get("master_link_status") == "up" else None

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Until the replica has applied everything the master had written when asked.

        Replication is asynchronous: only what reached the replica survives the master's death.
        A replica in service has long caught up; one just started may still be syncing.
        """
        client = self.redis(self.master)
        try:
            written = int(client.info("replication")["master_repl_offset"])
        finally:
            client.close()
        deadline = time.monotonic() + timeout
        while (self.replica_offset() or 0) < written:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica did not reach offset {written} in {timeout}s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop every server of the set."""
        for process in [*self.sentinels, self.replica, self.master]:
            process.stop()


@contextmanager
def sentinel_set(workdir: Path, passwords: Passwords = Passwords()) -> Iterator[Sentinels]:
    """A master, its replica and three sentinels, started and ready; all stopped at the end."""
    servers = start_sentinels(workdir, passwords)
    try:
        yield servers
    finally:
        servers.stop()


def start_sentinels(workdir: Path, passwords: Passwords = Passwords()) -> Sentinels:
    """A master, its replica and three sentinels, started and ready (the caller stops them)."""
    master_port, replica_port, *sentinel_ports = free_ports(5)
    master = RedisServer(master_port, workdir / "master")
    master.argv += ["--repl-diskless-sync-delay", "0"]  # a replica syncs at once, not after 5 s
    replica = ReplicaServer(replica_port, workdir / "replica", master_port, passwords.master)
    for server in (master, replica):
        if passwords.master:
            server.argv += ["--requirepass", passwords.master]
    sentinels = [
        SentinelServer(port, workdir / f"sentinel-{port}", master_port, passwords) for port in sentinel_ports
    ]
    servers = Sentinels(master, replica, sentinels, passwords)
    try:
        master.start()
        replica.start()
        for sentinel in sentinels:
            sentinel.start()
        servers.wait_ready()
    except BaseException:
        servers.stop()
        raise
    return servers
