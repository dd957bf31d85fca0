"""`make bench`: awx_ws against the Channels tutorial baseline and a no-Django floor, same load.

Every server runs in its own process; load clients run in other processes (bench.loadclient) on
the same 2 cores, so absolute rates are shared-CPU figures. The fair figure is the server's own
CPU time per 1,000 deliveries (psutil: user + system of the server processes only); the channel
layer's server (redis-server or RabbitMQ's beam) is reported beside it as `layer CPU`.
"ours" runs on the Redis layer under `python -m awx_ws.server` (direct writes), "ours-daphne" the
same under plain `daphne` (the ASGI send path), "ours-uvicorn" and "ours-hypercorn" under those
servers (the ASGI send through a per-connection outbox, backlog.py), "ours-rabbitmq" on the
RabbitMQ layer. `python -m bench.run --runners` runs only the runner comparison (2 scenarios),
`--flood` only the job-event flood and its catch-up. The floor (bench/floor_server.py) holds one
Redis pub/sub subscription per group its clients are on.
Delivery through a 3-node relay mesh beside a single node (bench/mesh.py) is a table of its own;
`python -m bench.mesh` runs only that.
Prints a table with ratios to the baseline, the other figures (bench/figures.py and the rest),
issue 17's targets with met/missed (bench/targets.py), and writes bench/results/<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import psutil

from bench import backends, figures, mesh, targets
from bench.harness import (
    ROOT,
    STATE,
    add_jobs,
    log,
    make_token_and_jobs,
    rabbitmq_server,
    redis_server,
    setup_django,
)
from bench.scenarios import (
    deliveries,
    emit_cost,
    emit_cost_rabbitmq,
    idle_rss,
    slow_client_latency,
    watched_emit_cost,
)
from tests.servers import RedisServer

Rows = list[dict[str, Any]]


def table(rows: Rows) -> str:
    """The delivery scenarios, one line each, with ours' ratio to the baseline."""
    base = {r["scenario"]: r for r in rows if r["kind"] == "baseline" and "cpu_ms_per_1000" in r}
    out = [
        f"{'scenario':<34} {'server':<15} {'deliv/s':>9} {'CPU ms/1k':>10} {'x base':>7} "
        f"{'p50 ms':>8} {'p99 ms':>9} {'got/expected':>14} {'layer CPU ms/1k':>16}"
    ]
    for r in rows:
        if "cpu_ms_per_1000" not in r or r.get("section") == "mesh":  # mesh.table prints those
            continue
        ref = base.get(r["scenario"])
        ratio = (
            ref["cpu_ms_per_1000"] / r["cpu_ms_per_1000"] if ref and r["cpu_ms_per_1000"] else float("nan")
        )
        out.append(
            f"{r['scenario']:<34} {r['kind']:<15} {r['deliveries_per_s']:>9.0f} "
            f"{r['cpu_ms_per_1000']:>10.1f} "
            f"{ratio:>7.2f} {r['p50_ms']:>8.1f} {r['p99_ms']:>9.1f} {r['received']:>7}/{r['expected']:<6} "
            f"{r.get('layer_cpu_ms_per_1000', float('nan')):>16.1f}"
        )
    return "\n".join(out)


# Every server kind of the delivery scenarios; the other ASGI servers in the runner comparison.
KINDS = ("baseline", "floor", "ours", "ours-daphne", "ours-rabbitmq")
OTHER_SERVERS = ("ours-uvicorn", "ours-hypercorn")


def fan_out_1000(redis: RedisServer, token: str, scale: float, kinds: tuple[str, ...]) -> Rows:
    """1,000 subscribers of one group, 50 msgs/s (issue 17 compares it with the floor's)."""
    label = "fan-out 1 group x 1000"
    plan = ["jobs-bench"] * (int(50 * scale) or 5)
    rows = []
    for kind in kinds:
        log(f"{label}: {kind}")
        rows.append(deliveries(kind, redis, token, 1000, ["jobs-bench"], plan, 50.0, label))
    return rows


def latency_1000(redis: RedisServer, token: str, scale: float, kinds: tuple[str, ...]) -> Rows:
    """1,000 subscribers of one group at 10 msgs/s: latency more than throughput."""
    label = "1000 subs x 10 msg/s (latency)"
    plan = ["jobs-latency"] * int(100 * scale or 20)
    rows = []
    for kind in kinds:
        log(f"{label}: {kind}")
        rows.append(deliveries(kind, redis, token, 1000, ["jobs-latency"], plan, 10.0, label))
    return rows


def runner_comparison(redis: RedisServer, token: str, scale: float) -> Rows:
    """The application under every ASGI server, in the two scenarios that tell them apart."""
    kinds = ("ours", "ours-daphne", *OTHER_SERVERS)
    return fan_out_1000(redis, token, scale, kinds) + latency_1000(redis, token, scale, kinds)


def delivery_scenarios(redis: RedisServer, token: str, jobs: list[int], scale: float) -> Rows:
    """Fan-out, job status, own group and latency, for each server kind."""
    label = "fan-out 1 group x 100"
    rows = []
    for kind in KINDS:
        log(f"{label}: {kind}")
        plan = ["jobs-bench"] * 50
        rows.append(deliveries(kind, redis, token, 100, ["jobs-bench"], plan, 50.0, label))
    rows += fan_out_1000(redis, token, scale, (*KINDS, *OTHER_SERVERS))

    # Job statuses go only to subscribers who may see the job (audience.py): the same fan-out
    # with that check, beside the unfiltered one above.
    label = "job status 1 group x 1000 (filtered)"
    for kind in ("ours", "ours-daphne"):
        log(f"{label}: {kind}")
        plan = ["jobs-status_changed"] * (int(50 * scale) or 5)
        status = {"group_name": "jobs", "unified_job_id": jobs[0], "status": "running"}
        rows.append(
            deliveries(kind, redis, token, 1000, ["jobs-status_changed"], plan, 20.0, label, extra=status)
        )

    count = int(1000 * scale) or 100
    groups = [f"job_events-{job}" for job in jobs[:count]]
    label = f"{count} clients, own group each"
    for kind in KINDS:
        log(f"{label}: {kind}")
        rows.append(deliveries(kind, redis, token, count, groups, groups * 5, 1000.0, label))

    return rows + latency_1000(redis, token, scale, (*KINDS, *OTHER_SERVERS))


def emit_costs(redis: RedisServer, token: str) -> Rows:
    """The sync emit: watched with history, without history, to never-watched groups, RabbitMQ."""
    log("emit cost")
    return [
        watched_emit_cost(redis, token),
        emit_cost(redis, ["control-emitcost"] * 2000, "sync emit, no history"),
        figures.unwatched_emit_cost(redis),
        emit_cost_rabbitmq("jobs-emitcost"),
    ]


def multi_daphne(redis: RedisServer, token: str, scale: float) -> Rows:
    """1,000 subscribers through nginx to one daphne, then to two."""
    label, rows = "1000 subs via nginx, 1 vs 2 daphne", []
    for daphnes in (1, 2):
        log(f"{label}: {daphnes} daphne")
        row = deliveries(
            "ours",
            redis,
            token,
            1000,
            ["jobs-multi"],
            ["jobs-multi"] * int(100 * scale or 20),
            100.0,
            f"{label} ({daphnes})",
            daphnes,
            front=True,  # both behind nginx, so only the process count differs
        )
        rows.append(row)
    return rows


def issue_17_figures(redis: RedisServer, token: str) -> Rows:
    """Emit throughput, the flood, subscribe + leave with 10 and 10,000 groups held (figures.py)."""
    log("emit throughput")
    rows = figures.emit_rates(redis)
    log("flood: 5,000 events of one job through the REST API")
    rows.append(figures.flood(redis, token, add_jobs(1)[0]))
    log("access sweep: 10,000 websockets of 10,000 users")
    rows.append(figures.access_sweep(redis))
    held = add_jobs(10_000)
    for count in (10, 10_000):
        log(f"subscribe + leave, {count} groups held")
        rows.append(figures.subscribe_leave_cost(redis, token, held[:count], add_jobs(201)))
    return rows


def measure(redis: RedisServer, quick: bool) -> Rows:
    """Every scenario and figure of the run."""
    scale = 0.2 if quick else 1.0
    setup_django(redis.port)
    token, jobs = make_token_and_jobs(1000)
    rows = delivery_scenarios(redis, token, jobs, scale)
    rows += emit_costs(redis, token)
    rows += multi_daphne(redis, token, scale)

    log("slow client")
    rows.append(slow_client_latency(redis, token, int(400 * scale) or 80))

    log("idle sockets")
    counts = [1000, 5000] if quick else [1000, 5000, 10000]
    rows.append(idle_rss("ours", redis, token, counts))
    rows.append(idle_rss("baseline", redis, token, [1000]))

    log("backends: the database behind a handshake, TLS at nginx")
    handshakes = int(300 * scale) or 50
    rows += backends.database_figures(STATE, handshakes, token, jobs[0])
    rows += backends.tls_figures(STATE, token, jobs[0], handshakes, int(5000 * scale) or 500)

    rows += issue_17_figures(redis, token)
    rows += mesh.mesh_rows(token, scale)
    return rows


def describe(rows: Rows) -> str:
    """The rows the table leaves out, as printed lines."""
    lines = []
    for r in rows:
        if r["scenario"] == "sync emit (RabbitMQ)":
            lines.append(
                f"{r['scenario']}: median {r['median_us']:.0f} µs, p99 {r['p99_us']:.0f} µs, "
                f"connections opened {r['connections_opened']}, threads started {r['threads_started']} "
                f"over {r['calls']} calls (one emit loop thread and connection per process)"
            )
        elif r["scenario"].startswith("sync emit"):
            lines.append(
                f"{r['scenario']}: median {r['median_us']:.0f} µs, p99 {r['p99_us']:.0f} µs, "
                f"Redis connections opened {max(0, r['redis_connections_opened'])} over {r['calls']} calls "
                f"(one sync Redis round trip: {r['redis_rtt_median_us']:.0f} µs)"
            )
        if "stalled_closed" in r:
            lines.append(
                f"{r['scenario']}: readers' p99 {r['p99_ms']:.1f} ms, stalled client closed "
                f"{r['stalled_closed']} time(s), daphne RSS +{r['rss_growth_mib']:.1f} MiB"
            )
        if r["scenario"] == "idle sockets":
            lines.append(
                f"idle sockets, {r['kind']}: "
                + ", ".join(f"{k}: {v:.1f} KB" for k, v in r["kb_per_socket"].items())
            )
    lines.append(backends.describe([r for r in rows if "connect_p50_ms" in r]))
    return "\n".join(lines)


def describe_multi(rows: Rows) -> str:
    """How busy the cores were with one and two daphne processes behind nginx."""
    multi = [r for r in rows if r["scenario"].startswith("1000 subs via nginx")]
    lines = []
    for r in multi:
        busy = (r["server_cpu_s"] + r["client_cpu_s"]) / (r["wall_s"] * (os.cpu_count() or 1))
        lines.append(
            f"{r['scenario']}: server {r['server_cpu_by_process_s']} s CPU, load client "
            f"{r['client_cpu_s']:.1f} s CPU in {r['wall_s']:.1f} s: {busy:.0%} of all cores busy"
        )
    if len(multi) == 2 and multi[0]["deliveries_per_s"]:
        lines.append(
            "2 daphne / 1 daphne deliveries per second: "
            f"{multi[1]['deliveries_per_s'] / multi[0]['deliveries_per_s']:.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    """Run everything, print the table, the other figures and the targets, save the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    parser.add_argument("--runners", action="store_true", help="only the runner comparison")
    parser.add_argument("--flood", action="store_true", help="only the job-event flood and its catch-up")
    parser.add_argument("--sweep", action="store_true", help="only the access sweep with 10,000 sockets")
    args = parser.parse_args()
    started = time.monotonic()
    log(
        f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        "load clients share the cores"
    )
    if args.runners:
        with redis_server() as redis:
            setup_django(redis.port)
            rows = runner_comparison(redis, make_token_and_jobs(1)[0], 0.2 if args.quick else 1.0)
        print(table(rows))
        return
    if args.sweep:
        with redis_server() as redis:
            setup_django(redis.port)
            make_token_and_jobs(1)
            print(figures.describe([figures.access_sweep(redis)]))
        return
    if args.flood:
        with redis_server() as redis:
            setup_django(redis.port)
            print(figures.describe([figures.flood(redis, make_token_and_jobs(1)[0], add_jobs(1)[0])]))
        return
    with redis_server() as redis, rabbitmq_server():
        rows = measure(redis, args.quick)

    print()
    print(table(rows))
    print()
    print(mesh.table(rows))
    print()
    print(describe(rows))
    print(describe_multi(rows))
    print(figures.describe(rows))
    found = targets.targets(rows)
    print()
    print(targets.render(found))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    saved = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results = {"rows": rows, "targets": targets.as_json(found), "seconds": time.monotonic() - started}
    saved.write_text(json.dumps(results, indent=2))
    print(f"\n{time.monotonic() - started:.0f} s; results in {saved.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
