"""App config for awx_ws.main."""

from __future__ import annotations

from django.apps import AppConfig


class MainConfig(AppConfig):
    """awx_ws's Django app: models, consumers, emit, access."""

    name = "awx_ws.main"
    label = "main"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Connect the access-change recorders to their signals."""
        from awx_ws.main.revocation import connect_signals

        connect_signals()
