"""Load client process: N websockets to one server kind, then timestamps of what arrives.

Talks to the driver (bench.run) over stdout: `ready`, `progress <received>` every second, and a
final `result <json>`. With --hold it keeps the sockets idle until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from websockets.asyncio.client import ClientConnection, connect


def say(line: str) -> None:
    """One line to the driver, at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def groups_of(args: argparse.Namespace, index: int) -> list[str]:
    """The groups of socket index: one, round-robin, or a slice of --groups-per-socket (ours only)."""
    if args.groups_per_socket > 1:
        start = index * args.groups_per_socket
        return args.groups[start : start + args.groups_per_socket]
    return [args.groups[index % len(args.groups)]]


def subscribe_frame(groups: list[str]) -> str:
    """AWX's subscribe frame for groups: `{"groups": {kind: [items]}}` (event kinds take job ids)."""
    wanted: dict[str, list[object]] = {}
    for group in groups:
        kind, _, item = group.partition("-")
        wanted.setdefault(kind, []).append(int(item) if kind.endswith("_events") else item)
    return json.dumps({"groups": wanted, "xrftoken": None})


async def open_one(args: argparse.Namespace, index: int, gate: asyncio.Semaphore) -> ClientConnection:
    """Connect socket index (and subscribe it, for ours)."""
    groups = groups_of(args, index)
    async with gate:
        if args.kind == "ours":
            token = args.tokens[index % len(args.tokens)]
            ws = await connect(f"{args.url}/websocket/?token={token}", max_queue=None, open_timeout=60)
            await ws.recv()  # {"accept": true, ...}
            await ws.send(subscribe_frame(groups))
            while "groups_current" not in json.loads(await ws.recv()):
                pass
        elif args.kind == "baseline":
            ws = await connect(f"{args.url}/ws/?group={groups[0]}", max_queue=None, open_timeout=60)
        else:
            ws = await connect(f"{args.url}/?group={groups[0]}", max_queue=None, open_timeout=60)
        return ws


async def main(args: argparse.Namespace) -> None:
    """Open the sockets, then hold them or time what arrives."""
    gate = asyncio.Semaphore(100)
    sockets = await asyncio.gather(*(open_one(args, i, gate) for i in range(args.count)))
    say("ready")
    if args.hold:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        say("result " + json.dumps({"received": 0, "latencies_ms": []}))
        return
    result = await timed(args, sockets)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    result["cpu_s"] = time.process_time()
    say("result " + json.dumps(result))


async def timed(args: argparse.Namespace, sockets: list[ClientConnection]) -> dict[str, object]:
    """Time what arrives until every socket has --expect messages (or --timeout), then --linger.
    Frames with a `probe` key (bench.mesh's readiness probes) are skipped; a `seq` a socket already
    had is a duplicate, counted apart."""
    latencies: list[float] = []
    counts = [0] * len(sockets)
    seen: list[set[object]] = [set() for _ in sockets]
    tally = {"duplicates": 0, "extra": 0}
    complete = asyncio.Event()
    left = [len(sockets)]
    if args.expect <= 0:
        complete.set()

    async def read(i: int, ws: ClientConnection) -> None:
        """Timestamp socket i's frames (the first --expect of them), count duplicates and extras."""
        async for frame in ws:
            now, data = time.time(), json.loads(frame)
            if "probe" in data:
                continue
            seq = data.get("seq")
            if seq is not None:
                if seq in seen[i]:
                    tally["duplicates"] += 1
                    continue
                seen[i].add(seq)
            if counts[i] >= args.expect:
                tally["extra"] += 1
                continue
            latencies.append((now - data["t"]) * 1000)
            counts[i] += 1
            if counts[i] == args.expect:
                left[0] -= 1
                if not left[0]:
                    complete.set()

    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(sockets)]
    waiter = asyncio.create_task(complete.wait())
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and not complete.is_set() and not all(r.done() for r in readers):
        await asyncio.wait([waiter], timeout=1.0)
        say(f"progress {len(latencies)}")
    waiter.cancel()
    if args.linger > 0:  # late duplicates or extras still count
        await asyncio.sleep(args.linger)
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    short = sum(1 for count in counts if count < args.expect)
    return {"received": len(latencies), "latencies_ms": latencies, "short_sockets": short, **tally}


def read_groups(value: str) -> list[str]:
    """--groups or --token: `a,b,c` or `@file` with one item per line."""
    if value.startswith("@"):
        with open(value[1:]) as given:
            return [line.strip() for line in given if line.strip()]
    return value.split(",")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["ours", "baseline", "floor"], required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    # Comma-separated, or @path: a file of one group per line (10,000 names are past argv's limit).
    parser.add_argument("--groups", type=read_groups, required=True)
    parser.add_argument("--groups-per-socket", type=int, default=1)
    # One API token, or @file of one token per line (socket i takes line i, round-robin).
    parser.add_argument("--token", dest="tokens", type=read_groups, default=[""])
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--hold", action="store_true")
    # Seconds to keep reading once every socket has its --expect messages (late duplicates).
    parser.add_argument("--linger", type=float, default=0.0)
    asyncio.run(main(parser.parse_args()))
