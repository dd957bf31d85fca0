"""`manage.py connections`: this node's daphne processes, their connections and groups."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from channels.layers import get_channel_layer
from django.core.management.base import BaseCommand, CommandError, CommandParser

from awx_ws.main.conf import ws_settings
from awx_ws.main.emit import layer_class
from awx_ws.main.exceptions import LayerUnavailable
from awx_ws.main.layers import NodeRecords, ServiceLayer, service_layer
from awx_ws.main.management.tables import ago, format_table


class Command(BaseCommand):
    help = "Print the client connections and groups of this node's server processes."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--groups", action="store_true", help="also list each group and its processes")

    def handle(self, *args: Any, **options: Any) -> None:
        backend = layer_class()
        if backend is None:
            raise CommandError("connections needs awx_ws.main.layers.RedisChannelLayer as the default layer")
        if not backend.keeps_records:
            raise CommandError(
                f"connections reads what each process writes to Redis; the {backend.service} layer keeps no "
                "such record: see GET /api/v2/metrics (awx_ws_connections) and `rabbitmqctl list_queues`"
            )
        layer = service_layer(get_channel_layer())
        records = layer.records if layer is not None else None
        if layer is None or records is None:
            raise CommandError("connections needs one of awx_ws's channel layers (CHANNEL_LAYER_BACKEND)")
        try:
            report = asyncio.run(connections_report(layer, records, options["groups"]))
        except LayerUnavailable as exc:
            raise CommandError(f"cannot read from {layer.service} ({exc.where}): {exc}") from exc
        self.stdout.write(report)


async def connections_report(layer: ServiceLayer, records: NodeRecords, with_groups: bool) -> str:
    """Per live process (as each wrote with its last heartbeat): sockets, streams, groups, tasks."""
    now = time.time()
    rows = []
    held: dict[str, list[str]] = {}
    for process in await records.processes():
        rows.append(process.figures)
        for group in process.groups:
            held.setdefault(group, []).append(process.figures["pid"])
    rows.sort(key=lambda stats: int(stats["pid"]))
    header = ("PID", "WEBSOCKETS", "STREAMS", "GROUPS", "TASKS", "UPDATED")
    lines = [header] + [
        (s["pid"], s["websockets"], s["streams"], s["groups"], s["tasks"], ago(float(s["updated"]), now))
        for s in rows
    ]
    total_ws = sum(int(s["websockets"]) for s in rows)
    total_streams = sum(int(s["streams"]) for s in rows)
    lines.append(("total", str(total_ws), str(total_streams), f"{len(held)} distinct", "", ""))
    out = [
        f"node {ws_settings.NODE_NAME}, {layer.describe_hosts()}: {len(rows)} live processes",
        format_table(lines),
    ]
    if with_groups:
        group_lines = [("GROUP", "PROCESSES")] + [
            (group, ",".join(sorted(pids))) for group, pids in sorted(held.items())
        ]
        out += ["", format_table(group_lines)]
    return "\n".join(out)
