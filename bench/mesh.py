"""Delivery through a 3-node relay mesh beside a single node: the same clients, the same emits.

The mesh is three nodes A, B and C, each with its own redis-server, daphne (`python -m
awx_ws.server`, as the "ours" kind runs it) and relay (`manage.py run_wsbroadcast`, static peers),
started as tests/test_cluster.py starts them. A third of the clients are on each node, all in one
group; the messages are emitted on A, paced and timed as bench.scenarios.deliveries does. The
single node has the same clients (in three load-client processes, as in the mesh) and the same
emits, on a redis-server and daphne of its own. For each: deliveries got/expected and duplicates
(every client must get every message once), emit→receive p50/p99 (in the mesh, apart for A's
clients and for B's and C's, which pay the relay hop), and CPU per 1,000 deliveries of every
daphne and relay, with the Redis servers' beside it as layer CPU.

Before the emits start, every relay's link to every peer is `connected` (what `run_wsbroadcast
--status` prints) and probes emitted on A have reached a client on B and on C (the group's
interest has crossed): no fixed sleep.

`python -m bench.mesh [--quick]` runs only this scenario (and writes bench/results/mesh-<time>.json);
`make bench` (bench.run) runs it among the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import psutil

from bench.harness import (
    ROOT,
    STATE,
    Clients,
    Server,
    cpu_seconds,
    log,
    make_token_and_jobs,
    percentile,
    redis_server,
    setup_django,
)
from bench.loadclient import subscribe_frame
from bench.scenarios import emit_paced
from tests.servers import DaphneNode, RedisServer, Relay, free_port, free_ports, run_manage

GROUP = "jobs-mesh"
SECRET = "bench-mesh-shared-secret-0123456789"
# Seconds each load client keeps reading once it has every message: a late duplicate still counts.
LINGER_S = 0.5

Row = dict[str, Any]


class Node(Server):
    """One node: its own redis-server, daphne and (in a mesh) relay; a Server for bench.Clients."""

    def __init__(self, name: str, port: int, peers: list[int]):
        """Start its processes (peers: every mesh node's daphne port, its own too; [] for no relay)."""
        self.kind, self.name, self.processes = "ours", name, []
        self.address = f"127.0.0.1:{port}"
        workdir = STATE / f"mesh-{name}-{port}"
        self.redis = RedisServer(free_port(), workdir).start()
        env = {
            # Every load client is the one bench user: its sockets are past the per-user limit.
            "LOG_LEVEL": "WARNING",
            "AWX_WS_MAX_CONNECTIONS_PER_USER": "100000",
            "REDIS_URL": self.redis.url,
            "AWX_WS_NODE_NAME": name,
            "AWX_WS_VAR": str(workdir / "var"),  # metrics and logs per node, as on separate machines
            "BROADCAST_WEBSOCKET_SELF": self.address,
        }
        if peers:
            env["BROADCAST_WEBSOCKET_PEERS"] = ",".join(f"127.0.0.1:{peer}" for peer in peers)
            env["BROADCAST_WEBSOCKET_SECRET"] = SECRET
        self.env = {**os.environ, **env}
        try:
            daphne = DaphneNode(workdir, env, port=port).start()
            self.processes.append(daphne)
            if peers:
                self.processes.append(Relay(workdir, name, self.env).start())
        except BaseException:
            self.stop()
            raise
        self.url = daphne.url

    def stop(self) -> None:
        """Stop its daphne, relay and redis-server."""
        super().stop()
        self.redis.stop()


def start_nodes(names: list[str]) -> list[Node]:
    """Nodes peering with each other (one name: a single node, no relay); all stopped on failure."""
    ports = free_ports(len(names))
    nodes: list[Node] = []
    try:
        for name, port in zip(names, ports, strict=True):
            nodes.append(Node(name, port, ports if len(names) > 1 else []))
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def stop_nodes(nodes: list[Node]) -> None:
    """Stop every node's processes."""
    for node in nodes:
        node.stop()


def wait_links(nodes: list[Node], timeout: float = 60.0) -> None:
    """Until every node's relay has its link to every other node connected, as `--status` says."""
    from redis import Redis

    deadline = time.monotonic() + timeout
    for node in nodes:
        client = Redis.from_url(node.redis.url)
        try:
            for other in nodes:
                # The relay writes each link's state to its node's Redis every second.
                key = f"asgi:relay-status:{other.address}"
                while other is not node and client.hget(key, "state") != b"connected":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{node.name}'s relay link to {other.name} not up in {timeout}s")
                    time.sleep(0.1)
        finally:
            client.close()
    for node in nodes:  # and what an operator would read
        table = run_manage("run_wsbroadcast", "--status", env=node.env).stdout
        states = dict(line.split()[:2] for line in table.splitlines() if line.startswith("127.0.0.1:"))
        down = [o.name for o in nodes if o is not node and states.get(o.address) != "connected"]
        if down:
            raise RuntimeError(f"{node.name}'s --status shows links to {down} not connected:\n{table}")


def sender(node: Node) -> Any:
    """An async send(group, payload) into node's Redis as our emit does (send.close ends it)."""
    from django.conf import settings

    from awx_ws.main.emit import build_message
    from awx_ws.main.layers import RedisChannelLayer

    # Configured as our settings configure it (capacity and all), on this node's Redis.
    config = {**settings.CHANNEL_LAYERS["default"]["CONFIG"], "hosts": [{"address": node.redis.url}]}
    layer = RedisChannelLayer(**config)

    async def send(group: str, payload: dict[str, Any]) -> None:
        """group_send on the node's layer."""
        await layer.group_send(group, build_message(group, payload))

    async def close() -> None:
        """Close the layer's connections."""
        await layer.close_pools()

    send.close = close  # type: ignore[attr-defined]
    return send


async def probe_socket(url: str, token: str) -> Any:
    """A websocket subscribed to GROUP."""
    from websockets.asyncio.client import connect

    ws = await connect(f"{url}/websocket/?token={token}", open_timeout=30)
    await ws.recv()  # {"accept": true, ...}
    await ws.send(subscribe_frame([GROUP]))
    while "groups_current" not in json.loads(await ws.recv()):
        pass
    return ws


async def probe(nodes: list[Node], token: str, timeout: float = 30.0) -> int:
    """Emit probes on nodes[0] until one reaches a client on every other node; how many it took."""
    sockets = [await probe_socket(node.url, token) for node in nodes[1:]]
    send, sent = sender(nodes[0]), 0
    deadline = time.monotonic() + timeout
    try:
        waiting = list(sockets)
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"probes emitted on {nodes[0].name} reached no client on some peer")
            await send(GROUP, {"probe": sent})
            sent += 1
            still = []
            for ws in waiting:
                try:
                    async with asyncio.timeout(0.5):
                        while "probe" not in json.loads(await ws.recv()):
                            pass
                except TimeoutError:
                    still.append(ws)
            waiting = still
    finally:
        await send.close()
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return sent


def snapshot(nodes: list[Node]) -> dict[str, Any]:
    """CPU seconds so far: per service program over all nodes, and of the Redis servers."""
    parts: dict[str, float] = {}
    by_node: dict[str, float] = {}
    for node in nodes:
        for name, value in node.cpu_parts().items():
            parts[name] = parts.get(name, 0.0) + value
            by_node[node.name] = by_node.get(node.name, 0.0) + value
    return {
        "parts": parts,
        "nodes": by_node,
        "layer": sum(cpu_seconds(node.redis) for node in nodes),
    }


def run_load(nodes: list[Node], token: str, per_node: int, plan: list[str], rate: float) -> Row:
    """Clients on every node (three processes on a single node), emits on nodes[0]: the figures."""
    homes = nodes if len(nodes) > 1 else nodes * 3
    timeout = max(30.0, len(plan) / rate * 4)
    loads = [
        Clients(node, per_node, [GROUP], token, expect=len(plan), timeout=timeout, linger=LINGER_S)
        for node in homes
    ]
    try:
        for load in loads:
            load.wait_ready()
        if len(nodes) > 1:
            log(f"  probes until {GROUP} crosses: {asyncio.run(probe(nodes, token))} sent")
        before = snapshot(nodes)
        # The load clients' CPU so far (each reports its total with its result).
        before["clients"] = sum(sum(psutil.Process(load.proc.pid).cpu_times()[:2]) for load in loads)
        started = time.time()
        asyncio.run(emit_paced(sender(nodes[0]), plan, rate))
        pairs = zip(loads, homes, strict=True)
        results = [(node, load.result(node.name, per_node * len(plan))) for load, node in pairs]
        wall = time.time() - started
        after = snapshot(nodes)
    finally:
        for load in loads:
            load.stop()
    return figures(nodes[0], results, before, after, wall)


def figures(
    origin: Node, by_node: list[tuple[Node, dict[str, Any]]], before: Row, after: Row, wall: float
) -> Row:
    """One row from each load client's node and result (origin: where the emits went in) and
    the CPU before and after."""
    results = [result for _, result in by_node]
    received = sum(r["received"] for r in results)
    local = [ms for node, r in by_node if node is origin for ms in r["latencies_ms"]]
    relayed = [ms for node, r in by_node if node is not origin for ms in r["latencies_ms"]]
    parts = {name: value - before["parts"].get(name, 0.0) for name, value in after["parts"].items()}
    cpu, layer = sum(parts.values()), after["layer"] - before["layer"]

    def per_1000(seconds: float) -> float:
        """ms of CPU per 1,000 deliveries."""
        return seconds * 1e6 / received if received else float("nan")

    return {
        "received": received,
        "duplicates": sum(r["duplicates"] for r in results),
        "extra": sum(r["extra"] for r in results),
        "short_sockets": sum(r["short_sockets"] for r in results),
        "deliveries_per_s": received / wall if wall else 0.0,
        "cpu_ms_per_1000": per_1000(cpu),
        "cpu_ms_per_1000_by_process": {name: per_1000(value) for name, value in parts.items()},
        "layer_cpu_ms_per_1000": per_1000(layer),
        "p50_ms": percentile(local + relayed, 0.50),
        "p99_ms": percentile(local + relayed, 0.99),
        "p50_local_ms": percentile(local, 0.50),
        "p99_local_ms": percentile(local, 0.99),
        "p50_relayed_ms": percentile(relayed, 0.50),
        "p99_relayed_ms": percentile(relayed, 0.99),
        "wall_s": wall,
        "server_cpu_s": cpu,
        "server_cpu_by_process_s": parts,
        # daphne + relay of each node: A's includes forwarding to the peers
        "server_cpu_by_node_s": {name: cpu - before["nodes"][name] for name, cpu in after["nodes"].items()},
        "client_cpu_s": sum(r["cpu_s"] for r in results) - before["clients"],
    }


def mesh_rows(token: str, scale: float = 1.0) -> list[Row]:
    """The single node, then the 3-node mesh: the same clients, the same emits on the first node."""
    per_node, messages, rate = int(333 * scale) or 50, int(100 * scale) or 20, 20.0
    plan = [GROUP] * messages
    rows = []
    for names in (["single"], ["A", "B", "C"]):
        kind = "single node" if len(names) == 1 else f"mesh {len(names)} nodes"
        label = f"relay mesh: {3 * per_node} subs, {messages} msgs at {rate:.0f}/s"
        log(f"{label}: {kind}")
        load_avg = os.getloadavg()[0]  # the machine is shared: a busy one makes noisy figures
        nodes = start_nodes(names)
        try:
            if len(nodes) > 1:
                wait_links(nodes)
            row = run_load(nodes, token, per_node, plan, rate)
        finally:
            stop_nodes(nodes)
        row.update(kind=kind, scenario=label, section="mesh", nodes=len(names), clients=3 * per_node)
        row.update(messages=messages, rate=rate, expected=3 * per_node * messages, load_avg_1m=load_avg)
        rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    """The mesh rows beside the single node's, as printed lines."""
    mesh = [r for r in rows if r.get("section") == "mesh"]
    if not mesh:
        return ""
    loads = ", ".join(f"{r['load_avg_1m']:.2f}" for r in mesh)
    out = [
        f"relay mesh (3 nodes) vs single node: {mesh[0]['clients']} clients in one group, a third on "
        f"each node; {mesh[0]['messages']} messages at {mesh[0]['rate']:.0f}/s emitted on the first "
        f"(load average before each: {loads})",
        f"{'setup':<14} {'got/expected':>15} {'dup':>4} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'on A p50/p99':>13} {'B,C p50/p99':>13} {'CPU ms/1k':>10} {'daphne+relay':>13} "
        f"{'layer CPU ms/1k':>16}",
    ]
    for r in mesh:
        by = r["cpu_ms_per_1000_by_process"]
        split = f"{by.get('awx_ws.server', 0.0):.1f}+{by.get('relay', 0.0):.1f}"
        local = f"{r['p50_local_ms']:.1f}/{r['p99_local_ms']:.1f}"
        relayed = f"{r['p50_relayed_ms']:.1f}/{r['p99_relayed_ms']:.1f}" if r["nodes"] > 1 else "-"
        out.append(
            f"{r['kind']:<14} {r['received']:>7}/{r['expected']:<7} {r['duplicates']:>4} "
            f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {local:>13} {relayed:>13} "
            f"{r['cpu_ms_per_1000']:>10.1f} {split:>13} {r['layer_cpu_ms_per_1000']:>16.1f}"
        )
    return "\n".join(out)


def main() -> None:
    """Run only the mesh scenario, print its table, save its rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    args = parser.parse_args()
    started = time.monotonic()
    log(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    with redis_server() as redis:  # the driver's Django (the bench user and its token) needs one
        setup_django(redis.port)
        token, _ = make_token_and_jobs(1)
        rows = mesh_rows(token, 0.2 if args.quick else 1.0)
    print()
    print(table(rows))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    saved = out / f"mesh-{time.strftime('%Y%m%d-%H%M%S')}.json"
    saved.write_text(json.dumps({"rows": rows, "seconds": time.monotonic() - started}, indent=2))
    print(f"\n{time.monotonic() - started:.0f} s; results in {saved.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
