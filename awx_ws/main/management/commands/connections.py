"""`manage.py connections`: this node's daphne processes, their connections and groups."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from channels.layers import get_channel_layer
from django.core.management.base import BaseCommand, CommandError, CommandParser
from redis.exceptions import RedisError

from awx_ws.main.conf import ws_settings
from awx_ws.main.emit import layer_class
from awx_ws.main.layers import RedisChannelLayer
from awx_ws.main.layers.redis_interest import interest_key
from awx_ws.main.layers.redis_presence import LivenessJudge
from awx_ws.main.management.tables import ago, format_table
from awx_ws.main.stats import stats_key


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
        layer = get_channel_layer()
        try:
            report = asyncio.run(connections_report(layer, options["groups"]))
        except (RedisError, OSError) as exc:
            raise CommandError(f"cannot read from Redis ({layer.describe_hosts()}): {exc}") from exc
        self.stdout.write(report)


async def connections_report(layer: RedisChannelLayer, with_groups: bool) -> str:
    """Per live process (as each wrote with its last heartbeat): sockets, streams, groups, tasks."""
    connection = layer.connection(0)
    judge = LivenessJudge(layer)
    prefix = stats_key(layer.prefix, "")
    now = time.time()
    rows = []
    held: dict[str, list[str]] = {}
    async for raw_key in connection.scan_iter(match=prefix + "*", count=500):
        client_prefix = raw_key.decode()[len(prefix) :]
        if await judge.dead(client_prefix):
            continue
        stats = {k.decode(): v.decode() for k, v in (await connection.hgetall(raw_key)).items()}
        if not stats:
            continue
        rows.append(stats)
        for group in await connection.smembers(interest_key(layer.prefix, client_prefix)):
            held.setdefault(group.decode(), []).append(stats["pid"])
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
