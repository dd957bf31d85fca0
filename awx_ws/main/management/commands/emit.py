"""`manage.py emit GROUP 'JSON'`: send one notification, for operators and scripts."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from awx_ws.main.emit import emit_channel_notification
from awx_ws.main.exceptions import AwxWsError


class Command(BaseCommand):
    help = 'Emit a JSON payload to a channel group, e.g. emit jobs-status_changed \'{"status": "running"}\''

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("group", help="group name, e.g. job_events-42")
        parser.add_argument("payload", help="the payload as JSON text")

    def handle(self, *args: Any, group: str, payload: str, **options: Any) -> None:
        try:
            data = json.loads(payload)
        except ValueError as exc:
            raise CommandError(f"payload is not valid JSON: {exc}") from exc
        try:
            emit_channel_notification(group, data)
        except AwxWsError as exc:
            raise CommandError(str(exc)) from exc
        if options["verbosity"] >= 1:
            self.stdout.write(f"emitted to {group}")
