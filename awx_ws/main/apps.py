"""App config for awx_ws.main."""

from __future__ import annotations

import os
from pathlib import Path

from django.apps import AppConfig


class MainConfig(AppConfig):
    """awx_ws's Django app: models, consumers, emit, access."""

    name = "awx_ws.main"
    label = "main"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Make the metrics directory (rid of a dead namesake's files); connect access signals;
        redact daphne's access log."""
        # prometheus_client's multiprocess mode writes a file per process there (settings set it),
        # from the moment awx_ws.main.metrics is imported: made before the imports below.
        metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if metrics_dir:
            Path(metrics_dir).mkdir(parents=True, exist_ok=True)
            from awx_ws.main.metrics import forget_previous_owner_of_this_pid

            forget_previous_owner_of_this_pid(metrics_dir)
        from awx_ws.main.daphne_hooks import redact_access_log
        from awx_ws.main.revocation import connect_signals

        connect_signals()
        # daphne writes its access log itself, URIs with their query: no ?token= in it.
        redact_access_log()
