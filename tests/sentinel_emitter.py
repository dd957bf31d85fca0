"""`python -m tests.sentinel_emitter GROUP COUNT RATE [FIRST]`: emit_channel_notification COUNT
times at RATE per second (payloads numbered from FIRST, 0 by default), as a job runner would,
printing one JSON line per emit: its number, when it started (time.time()), how long it took,
and the error it raised, if any. SIGTERM ends the run early, after the emit under way.

Only the service's own errors (EmitError and its kinds) are caught: anything else ends the run
with a traceback, which the test reads as a failure.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import django


def main() -> None:
    """Emit and report, one line per emit."""
    group, count, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    first = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    django.setup()
    from awx_ws.main.emit import emit_channel_notification
    from awx_ws.main.exceptions import EmitError

    stopping = threading.Event()  # SIGTERM: stop after the emit under way, reporting all
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    started = time.monotonic()
    for n in range(first, first + count):
        if stopping.is_set():
            break
        # On a fixed schedule: a slow or failed emit does not push the later ones back.
        time.sleep(max(0.0, started + (n - first) / rate - time.monotonic()))
        began = time.time()
        error = None
        try:
            emit_channel_notification(group, {"n": n})
        except EmitError as exc:
            error = f"{type(exc).__name__}: {exc}"
        line = {"n": n, "at": began, "took": time.time() - began, "error": error}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
