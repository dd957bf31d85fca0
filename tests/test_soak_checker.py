"""The soak checker's rules for live viewers' order and the end of a run (bench/soak/checker.py),
on ledgers written here (pure rules; the soak itself is test_soak.py)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from bench.soak.checker import Verdict, check, check_live, check_logs
from bench.soak.ledger import Fault, Ledger, Watch

pytestmark = pytest.mark.unit

T0 = 1_000_000.0
POSTED, ELSEWHERE = "http://127.0.0.1:1001", "http://127.0.0.1:2002"


def ledger_with(fault: str | None, front: str, *, late_at: float = 50.0) -> Ledger:
    """One job posted through POSTED, one viewer on front that got counter 3 after 5 at late_at."""
    ledger = Ledger(T0, {})
    ledger.job_fronts[7] = POSTED
    if fault is not None:
        ledger.faults.append(Fault(fault, "C", T0 + 40, T0 + 46))
    watch = Watch("ws-1", 7, T0 + 10, T0 + 80, held={1, 2, 3, 4, 5}, final=5)
    watch.disorder.append((T0 + late_at, 3, 5, front))
    ledger.watches.append(watch)
    return ledger


def live(ledger: Ledger) -> Verdict:
    verdict = Verdict()
    check_live(ledger, verdict)
    return verdict


@pytest.mark.parametrize("fault", ["cut_relay_link", "kill_relay", "kill_daphne", "kill_sentinel_master"])
def test_a_relayed_event_late_after_a_relay_catch_up_is_reported_not_failed(fault):
    verdict = live(ledger_with(fault, ELSEWHERE))
    assert verdict.failures == []
    figures = verdict.figures["live"]
    assert (figures["late_in_fault_windows"], figures["out_of_order"]) == (1, 0)
    assert figures["out_of_order_examples"] == [
        f"ws-1@2002 job 7 (posted through 1001): 3 after 5 at 50.0s ({fault})"
    ]


@pytest.mark.parametrize(
    ("fault", "front", "late_at"),
    [
        (None, ELSEWHERE, 50.0),  # no fault at all
        ("cut_relay_link", ELSEWHERE, 90.0),  # past the fault's window (its end + 30 s)
        ("cut_relay_link", POSTED, 50.0),  # on the node it was emitted on: no relay involved
        ("restart_postgres", ELSEWHERE, 50.0),  # a fault no relay link catches up after
        ("kill_api_worker", ELSEWHERE, 50.0),
    ],
)
def test_any_other_event_out_of_order_fails_the_run(fault, front, late_at):
    verdict = live(ledger_with(fault, front, late_at=late_at))
    assert verdict.failures == ["live viewers: 0 lost, 0 duplicated, 1 out of order"]


def test_deliveries_still_on_their_way_past_the_bound_after_the_last_job_fail_the_run():
    quick, slow = Ledger(T0, {}), Ledger(T0, {})
    quick.settled_after, slow.settled_after = 1.6, 31.0
    assert check(quick, []).failures == []
    assert check(slow, []).failures == ["deliveries still on their way 31s after the last job (bound 30s)"]


def gunicorn_line(moment: float, message: str) -> str:
    return f"[{datetime.fromtimestamp(moment):%Y-%m-%d %H:%M:%S} +0000] [25560] [ERROR] {message}"


def test_error_lines_of_the_run_fail_it_and_those_of_the_stop_in_its_first_second_do_not(tmp_path: Path):
    """Log stamps are whole seconds: the stop began at T0 + 120.3, so a line stamped 120 may be
    the stop's; one stamped 119 was written while the run was still going."""
    ledger = Ledger(T0, {})
    ledger.ended = T0 + 120.3
    log = tmp_path / "A" / "log" / "api.log"  # a node's log, as Node.logs() lists them
    log.parent.mkdir(parents=True)
    log.write_text(
        gunicorn_line(T0 + 119, "Worker (pid:1) exited with code 1.")
        + "\n"
        + gunicorn_line(T0 + 120, "Worker (pid:2) was sent SIGTERM!")
        + "\n"
    )
    verdict = Verdict()
    check_logs(ledger, [log], [], verdict)
    assert verdict.figures["log_errors"]["unexplained"] == [
        "A/api.log: " + gunicorn_line(T0 + 119, "Worker (pid:1) exited with code 1.")
    ]
    assert verdict.failures == ["1 ERROR lines or tracebacks outside any fault"]
