"""`python -m bench.soak` (`make soak`): a production day under faults, judged at the end.

Three nodes as `make run` starts them (bench/soak/cluster.py), jobs and viewers modelled on AWX
(workload.py), faults at seeded moments (nemesis.py), the checker (checker.py) and the report
(report.py: JSON and PNG under bench/results/). Exits 1 when the checker finds a loss, a duplicate,
an unexplained ERROR, a leak or a slow recovery; every process it started is stopped first.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.soak import checker, report
from bench.soak.cluster import Cluster, api_token_of, start_cluster
from bench.soak.ledger import Ledger
from bench.soak.nemesis import Nemesis, probe, sample, schedule
from bench.soak.viewers import AwxkitViewer, LiveViewer, SseResumer, settle
from bench.soak.workload import Api, Stop, run_job

ROOT = Path(__file__).resolve().parent.parent.parent
logger = logging.getLogger("bench.soak")

# Seconds the end of a run waits for deliveries still on their way (bench/soak/viewers.settle):
# past it, what an open connection lacks is lost.
SETTLE_BOUND = 60.0

# What two cores drive with the driver keeping up (staleness p99 about a second); at 16 jobs and
# 80 viewers the machine ran at a load of 11, the driver read 30 s behind and the figures measured
# it (docs/reliability.md). SOAK_JOBS and SOAK_VIEWERS raise them on a bigger machine.
DEFAULTS = {"jobs": 10, "viewers": 40, "streams": 6, "awxkit": 2, "flood_share": 0.1}


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, defaulted from SOAK_* variables."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    env = os.environ.get
    parser.add_argument("--minutes", type=float, default=float(env("SOAK_MINUTES", "15")))
    parser.add_argument("--seed", type=int, default=int(env("SOAK_SEED", "1")))
    parser.add_argument("--jobs", type=int, default=int(env("SOAK_JOBS", str(DEFAULTS["jobs"]))))
    parser.add_argument("--viewers", type=int, default=int(env("SOAK_VIEWERS", str(DEFAULTS["viewers"]))))
    parser.add_argument("--streams", type=int, default=int(env("SOAK_STREAMS", str(DEFAULTS["streams"]))))
    parser.add_argument("--out", type=Path, default=None, help="report directory (bench/results/soak-<time>)")
    parser.add_argument("--keep", action="store_true", help="keep the state directory (logs) afterwards")
    return parser.parse_args(argv)


def setup_django(database_url: str) -> None:
    """Django in the driver, on the cluster's database, to make the viewers' users."""
    os.environ.update({"DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": database_url})
    os.environ.setdefault("SECRET_KEY", "soak-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz")
    import django

    django.setup()


def make_viewers_and_org(users: int) -> tuple[int, list[str]]:
    """The organization the jobs run in, and tokens of `users` members of it."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from awx_ws.main.models import Organization

    org = Organization.objects.create(name=f"soak-{time.time_ns()}")
    tokens = []
    for n in range(users):
        user = get_user_model().objects.create_user(f"soak-viewer-{org.pk}-{n}", "", None)
        org.members.add(user)
        tokens.append(Token.objects.create(user=user).key)
    return org.pk, tokens


async def soak(args: argparse.Namespace, state: Path) -> tuple[Ledger, Cluster | None]:
    """Start the cluster, run the workload and the nemesis, stop everything; the ledger."""
    ledger = Ledger(time.time(), {k: v for k, v in vars(args).items() if k not in ("out",)})
    cluster = await start_cluster(state, f"soak-{args.seed}-{os.getpid()}")
    try:
        await run(args, cluster, ledger)
    finally:
        ledger.ended = time.time()
        await asyncio.to_thread(cluster.stop)
    return ledger, cluster


async def run(args: argparse.Namespace, cluster: Cluster, ledger: Ledger) -> None:
    """The workload, the nemesis, the probes and the sampler, for args.minutes."""
    setup_django(cluster.postgres.url)
    # A viewer user holds at most 40 connections on a node (the limit is 100 per user and node).
    org, tokens = await asyncio.to_thread(
        make_viewers_and_org, max(1, (args.viewers + args.streams) // 40 + 1)
    )
    admin = api_token_of(cluster.nodes[0])
    fronts = [node.front for node in cluster.nodes]
    ledger.settings["nodes"] = {node.name: node.front for node in cluster.nodes}
    rng = random.Random(args.seed)
    ledger.started = time.time()
    producing = Stop(ledger.started + args.minutes * 60)
    watching = Stop(producing.deadline + 3600)  # set once the jobs have finished
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        api = Api(http, ledger)

        def active(count: int) -> list[int]:
            running = [job for job in ledger.stored if job not in ledger.finals]
            return rng.sample(running, min(count, len(running)))

        async def job_slot(slot: int) -> None:
            slot_rng = random.Random(args.seed * 1000 + slot)
            await producing.sleep(slot_rng.uniform(0, 10))  # jobs start spread out
            while not producing.due:
                flood = slot_rng.random() < DEFAULTS["flood_share"]
                try:
                    await run_job(api, fronts, admin, org, ledger, slot_rng, flood, producing)
                except RuntimeError as exc:  # refused or unanswered: a failure the checker lists
                    ledger.job_failures.append(str(exc))

        viewers = [
            LiveViewer(
                f"ws-{n}",
                fronts,
                tokens[n % len(tokens)],
                lambda: active(rng.randint(1, 3)),
                api,
                ledger,
                random.Random(args.seed * 7 + n),
                watching,
            )
            for n in range(args.viewers)
        ]
        streams = [
            SseResumer(
                f"sse-{n}",
                fronts,
                tokens[(args.viewers + n) % len(tokens)],
                lambda: active(1),
                ledger,
                random.Random(args.seed * 11 + n),
                watching,
            )
            for n in range(args.streams)
        ]
        awxkit = [
            AwxkitViewer(f"awxkit-{n}", cluster.nodes[n % 3].ports["NGINX"], tokens[0], ledger, watching)
            for n in range(DEFAULTS["awxkit"])
        ]
        nemesis = Nemesis(cluster, ledger, viewers, args.seed)
        plan = schedule(args.seed, ledger.started, args.minutes)
        logger.info(
            "workload: %d job slots, %d viewers, %d streams; faults: %s",
            args.jobs,
            len(viewers),
            len(streams),
            [kind for _, kind in plan],
        )
        jobs = [asyncio.create_task(job_slot(n)) for n in range(args.jobs)]
        watchers = [asyncio.create_task(v.run()) for v in [*viewers, *awxkit]]
        # Streams start once jobs run, so that each follows one.
        await producing.sleep(12)
        watchers += [asyncio.create_task(s.run()) for s in streams]
        background = [
            asyncio.create_task(nemesis.run(plan, producing)),
            asyncio.create_task(probe(cluster, admin, ledger, watching)),
            asyncio.create_task(sample(cluster, ledger, watching)),
        ]
        await asyncio.gather(*jobs)
        logger.info("jobs done; waiting for every open connection to hold every status change")
        ledger.settled_after = await settle(ledger, viewers, streams, awxkit, SETTLE_BOUND)
        logger.info("settled in %.1f s", ledger.settled_after)
        watching.event.set()
        results = await asyncio.gather(*watchers, *background, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.error("a workload task failed", exc_info=result)
                ledger.client_errors[f"task {type(result).__name__}: {result}"] += 1


def main(argv: list[str] | None = None) -> int:
    """Run the soak, check it, write the report; 0 when it passed."""
    args = arguments(argv)
    # Its own handler: Django's set-up (setup_django) replaces the root logger's.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    bench_logger = logging.getLogger("bench")
    bench_logger.addHandler(handler)
    bench_logger.setLevel(logging.INFO)
    bench_logger.propagate = False
    out = args.out or ROOT / "bench" / "results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    state = Path(tempfile.mkdtemp(prefix="awx_ws-soak-"))
    cluster: Cluster | None = None
    try:
        ledger, cluster = asyncio.run(soak(args, state))
        verdict = checker.check(ledger, cluster.logs() if cluster else [])
        json_path, png_path = report.write(ledger, verdict, out)
        for log in cluster.logs() if cluster else []:
            if log.exists():  # the logs beside the report, for whoever reads a failure
                target = out / "logs" / log.relative_to(state)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, target)
    finally:
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)
    print_summary(verdict.figures, verdict.failures, json_path, png_path)
    return 1 if verdict.failures else 0


def print_summary(figures: dict[str, Any], failures: list[str], json_path: Path, png_path: Path) -> None:
    """The headline figures and the verdict on stdout."""
    live, resumed, status = figures["live"], figures["resumed"], figures["status"]
    print(f"events stored {figures['events_stored']}, jobs {figures['jobs']}, faults {figures['faults']}")
    print(
        f"live: delivered {live['delivered_live']}, fetched {live['fetched']}, lost {live['lost']}, "
        f"duplicated {live['duplicated']}"
    )
    print(
        f"resumed: delivered {resumed['delivered']}, lost {resumed['lost']}, "
        f"duplicated {resumed['duplicated']}, told by reset {resumed['gaps_told_by_reset']}"
    )
    print(f"status: expected {status['expected']}, lost {status['lost']}, duplicated {status['duplicated']}")
    print(f"staleness: {figures['staleness_seconds']}; recovery: {figures['recovery_seconds']}")
    print(f"report: {json_path} and {png_path}")
    print("PASSED" if not failures else "FAILED:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    sys.exit(main())
