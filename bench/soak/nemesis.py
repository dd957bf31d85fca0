"""The nemesis: faults at seeded random moments, and the probes and samples that show what they did.

Kinds (FAULT_KINDS): `kill -9` a daphne, an API worker or a relay (supervisord or gunicorn start
another), SIGKILL the Sentinel master (the sentinels promote the replica; the old master comes back
as a replica), restart PostgreSQL, cut a relay link (node C's proxy) and heal it, stall clients (they
stop reading for a while). Every kind comes at least once in a run; the order and the moments come
from the seed, so a run can be repeated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import time
from typing import Any

import httpx
import psutil
import websockets
from redis.asyncio import Redis

from bench.soak.cluster import Cluster, Node
from bench.soak.ledger import Fault, Ledger
from bench.soak.viewers import LiveViewer
from bench.soak.workload import Stop

logger = logging.getLogger(__name__)

FAULT_KINDS = (
    "kill_daphne",
    "kill_api_worker",
    "kill_relay",
    "kill_sentinel_master",
    "restart_postgres",
    "cut_relay_link",
    "stall_clients",
)
CUT_SECONDS = 6.0
STALL_SECONDS = 15.0


def schedule(seed: int, started: float, minutes: float) -> list[tuple[float, str]]:
    """When each fault comes: every kind once, in seeded order, across the middle of the run,
    then one more of a random kind every 90 s of what is left."""
    rng = random.Random(seed)
    kinds = list(FAULT_KINDS)
    rng.shuffle(kinds)
    duration = minutes * 60
    first, last = duration * 0.15, duration * 0.75
    step = (last - first) / len(kinds)
    plan = [(started + first + i * step + rng.uniform(0, step * 0.3), kind) for i, kind in enumerate(kinds)]
    extra = int((duration * 0.8 - last) // 90)
    plan += [
        (started + last + (i + 1) * 90 * rng.uniform(0.8, 1.0), rng.choice(FAULT_KINDS)) for i in range(extra)
    ]
    return sorted(plan)


class Nemesis:
    """Injects the planned faults into the cluster and writes each into the ledger."""

    def __init__(self, cluster: Cluster, ledger: Ledger, viewers: list[LiveViewer], seed: int) -> None:
        self.cluster, self.ledger, self.viewers = cluster, ledger, viewers
        self.rng = random.Random(seed + 1)

    async def run(self, plan: list[tuple[float, str]], stop: Stop) -> None:
        """Each fault at its moment (none after the end)."""
        for at, kind in plan:
            if await stop.sleep(at - time.time()):
                return
            fault = Fault(kind, "", time.time())
            try:
                await getattr(self, kind)(fault)
            except Exception as exc:
                fault.detail = f"could not inject: {exc!r}"
                logger.exception("fault %s could not be injected", kind)
            fault.end = fault.end or time.time()
            self.ledger.faults.append(fault)
            logger.info("fault %s on %s (%s)", kind, fault.target, fault.detail)

    def _node(self) -> Node:
        return self.rng.choice(self.cluster.nodes)

    async def _kill(self, fault: Fault, program: str) -> None:
        node = self._node()
        pid = await asyncio.to_thread(node.pid, program)
        if pid is None:
            raise RuntimeError(f"{program} of node {node.name} is not running")
        os.kill(pid, signal.SIGKILL)
        fault.target, fault.detail = node.name, f"pid {pid}"

    async def kill_daphne(self, fault: Fault) -> None:
        """`kill -9` one node's daphne; supervisord starts another."""
        await self._kill(fault, "daphne")

    async def kill_relay(self, fault: Fault) -> None:
        """`kill -9` one node's relay; supervisord starts another."""
        await self._kill(fault, "relay")

    async def kill_api_worker(self, fault: Fault) -> None:
        """`kill -9` one gunicorn worker of a node's API; its master starts another."""
        node = self._node()
        master = await asyncio.to_thread(node.pid, "api")
        if master is None:
            raise RuntimeError(f"the API of node {node.name} is not running")
        workers = psutil.Process(master).children()
        victim = self.rng.choice(workers)
        victim.kill()
        fault.target, fault.detail = node.name, f"worker pid {victim.pid}"

    async def kill_sentinel_master(self, fault: Fault) -> None:
        """SIGKILL node C's Redis master; once the sentinels have promoted the replica, start the
        old master again (they make it a replica of the new one)."""
        sentinels = self.cluster.sentinels
        port = await asyncio.to_thread(sentinels.master_port)
        servers = {sentinels.master.port: sentinels.master, sentinels.replica.port: sentinels.replica}
        victim = servers[port] if port in servers else sentinels.master
        await asyncio.to_thread(victim.kill)
        fault.target, fault.detail = "C", f"master on port {victim.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = await asyncio.to_thread(sentinels.master_port)
            if new is not None and new != victim.port:
                break
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError("no failover within 60 s")
        fault.end = time.time()  # the failover is the fault's end; the old master returns after
        fault.detail += f", promoted the one on {new}"
        await asyncio.to_thread(victim.start)

    async def restart_postgres(self, fault: Fault) -> None:
        """Stop PostgreSQL (fast shutdown) and start it again."""
        postgres = self.cluster.postgres
        await asyncio.to_thread(postgres.stop, signal.SIGINT)
        await asyncio.to_thread(postgres.start)
        fault.target, fault.end = "postgres", time.time()

    async def cut_relay_link(self, fault: Fault) -> None:
        """Cut the peers' links to node C for CUT_SECONDS, then heal them."""
        proxy = self.cluster.by_name("C").proxy
        assert proxy is not None
        proxy.cut()
        fault.target = "C"
        await asyncio.sleep(CUT_SECONDS)
        proxy.heal()
        fault.end = time.time()

    async def stall_clients(self, fault: Fault) -> None:
        """A few live viewers stop reading for STALL_SECONDS."""
        stalled = self.rng.sample(self.viewers, min(3, len(self.viewers)))
        for viewer in stalled:
            viewer.stalled.clear()
            viewer.stalled_at = time.time()
        fault.target = ",".join(viewer.name for viewer in stalled)
        await asyncio.sleep(STALL_SECONDS)
        for viewer in stalled:
            viewer.stalled.set()
        fault.end = time.time()


async def probe(cluster: Cluster, token: str, ledger: Ledger, stop: Stop) -> None:
    """Every second, a probe emitted through each node's API; a listener on each node records
    which arrived where. After a fault, delivery has resumed once one round crossed every pair."""
    listeners = [asyncio.create_task(listen(node, token, ledger, stop)) for node in cluster.nodes]
    async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Token {token}"}) as http:
        round_ = 0
        while not await stop.sleep(1.0):
            round_ += 1
            await asyncio.gather(*(emit_probe(http, node, round_, ledger) for node in cluster.nodes))
    await asyncio.gather(*listeners, return_exceptions=True)


async def emit_probe(http: httpx.AsyncClient, node: Node, round_: int, ledger: Ledger) -> None:
    """One probe through one node's API (a failure is only a round that cannot complete)."""
    payload = {"group_name": "schedules", "probe": round_, "from": node.name}
    at = time.time()
    try:
        response = await http.post(
            f"{node.front}/api/v2/emit/", json={"group": "schedules-changed", "payload": payload}
        )
    except httpx.HTTPError:
        return
    if response.status_code == 202:
        ledger.probes.append((round_, node.name, at))


async def listen(node: Node, token: str, ledger: Ledger, stop: Stop) -> None:
    """One node's probe listener, reconnecting after any loss."""
    headers = {"Authorization": f"Token {token}"}
    while not stop.due:
        try:
            async with websockets.connect(node.ws, additional_headers=headers, open_timeout=10) as ws:
                await ws.recv()
                await ws.send(json.dumps({"groups": {"schedules": ["changed"]}, "xrftoken": None}))
                while not stop.due:
                    try:
                        message = json.loads(await asyncio.wait_for(ws.recv(), 1.0))
                    except TimeoutError:
                        continue
                    if "probe" in message:
                        ledger.probe_arrivals.append(
                            (message["probe"], message["from"], node.name, time.time())
                        )
        except (OSError, websockets.ConnectionClosed, websockets.InvalidStatus, TimeoutError):
            await stop.sleep(0.5)


async def sample(cluster: Cluster, ledger: Ledger, stop: Stop, every: float = 5.0) -> None:
    """Resources every `every` seconds: RSS and open files per node and program, each Redis's
    used_memory, group memberships per node."""
    while True:
        row: dict[str, Any] = {"at": time.time()}
        for node in cluster.nodes:
            for program, processes in (await asyncio.to_thread(node.processes)).items():
                rss = fds = 0
                for process in processes:
                    try:
                        rss += process.memory_info().rss
                        fds += process.num_fds()
                    except psutil.NoSuchProcess:
                        continue
                row[f"{node.name}.{program}.rss"] = rss
                row[f"{node.name}.{program}.fds"] = fds
                row[f"{node.name}.{program}.pid"] = processes[0].pid  # a restart starts afresh
            redis_memory, members = await redis_figures(node, cluster)
            row[f"{node.name}.redis.used_memory"] = redis_memory
            row[f"{node.name}.memberships"] = members
        ledger.samples.append(row)
        if await stop.sleep(every):
            return


async def redis_figures(node: Node, cluster: Cluster) -> tuple[int | None, int | None]:
    """used_memory of the node's channel-layer Redis and the members of all its groups."""
    if node.name == "C":
        port = await asyncio.to_thread(cluster.sentinels.master_port)
        client = Redis(port=port or 1, socket_timeout=2)
    else:
        password = (node.var / "redis_password").read_text().strip()
        client = Redis(port=node.ports["REDIS"], password=password, socket_timeout=2)
    try:
        memory = int((await client.info("memory"))["used_memory"])
        members = 0
        async for key in client.scan_iter(match="asgi:group:*", count=1000):
            members += int(await client.zcard(key))
        return memory, members
    except Exception:  # a Redis down for a fault: no figure this time
        return None, None
    finally:
        await client.aclose()
