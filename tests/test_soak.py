"""`make soak` in small, as `make test` runs it: two minutes of AWX-like jobs and viewers on three
nodes (`make run` each, discovery through PostgreSQL, one on Redis Sentinel) with a fault of every
kind, and the checker finding nothing lost, duplicated, unexplained or leaking
(bench/soak, docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak.nemesis import FAULT_KINDS
from tests.servers import ROOT

# Two minutes of workload, the cluster's start and stop, and the checks: about five in all.
pytestmark = [pytest.mark.slow, pytest.mark.soak, pytest.mark.timeout(900)]

# What two cores drive beside the rest of the suite: fewer jobs and viewers than `make soak`.
SMALL = ["--minutes", "2", "--jobs", "10", "--viewers", "40", "--streams", "6"]


def test_two_minutes_under_every_fault_lose_nothing(tmp_path: Path):
    out = tmp_path / "report"
    own = {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "AWX_WS_VAR", "PROMETHEUS_MULTIPROC_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in own and not k.startswith("PYTEST")}
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", *SMALL, "--seed", "7", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    report = json.loads((out / "soak.json").read_text())
    figures = report["figures"]
    assert report["failures"] == [], result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0
    # Every kind of fault was injected, and delivery came back after each within the bound.
    assert set(figures["faults"]) == set(FAULT_KINDS)
    assert figures["faults_not_injected"] == []
    assert all(fault["recovered_after"] is not None for fault in report["faults"])
    # Real work was judged: events stored, delivered live and caught up, resumes made.
    assert figures["events_stored"] > 1000
    assert figures["live"]["watches_to_the_end"] > 0 and figures["live"]["lost"] == 0
    assert figures["live"]["duplicated"] == 0
    assert figures["resumed"]["resumes"] > 0 and figures["resumed"]["lost"] == 0
    assert figures["status"]["expected"] > 0 and figures["status"]["lost"] == 0
    assert (out / "soak.png").stat().st_size > 10_000
