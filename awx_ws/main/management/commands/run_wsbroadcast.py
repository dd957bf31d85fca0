"""`manage.py run_wsbroadcast`: run this node's peer relay; `--status` prints its links."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from channels.layers import get_channel_layer
from django.core.management.base import BaseCommand, CommandError, CommandParser

from awx_ws.main import discovery, topology
from awx_ws.main.exceptions import LayerUnavailable, StartupError
from awx_ws.main.layers import service_layer
from awx_ws.main.management.tables import ago, format_table
from awx_ws.main.peer_protocol import configured_peers
from awx_ws.main.relay import Relay

logger = logging.getLogger(__name__)

# A status older than this means the relay is not running (it rewrites it every second).
STALE_AFTER = 10.0


class Command(BaseCommand):
    help = (
        "Relay group messages between this node and its peers (BROADCAST_WEBSOCKET_PEERS, and those "
        "found with BROADCAST_WEBSOCKET_DISCOVERY=postgres)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--status", action="store_true", help="print each peer link's state and exit")

    def handle(self, *args: Any, **options: Any) -> None:
        # The layer is made inside the loop: the RabbitMQ one is bound to the loop that creates it.
        if options["status"]:
            self.stdout.write(asyncio.run(status_table()))
            return
        asyncio.run(_run_until_signalled())


async def _run_until_signalled() -> None:
    try:
        relay = Relay.from_settings(get_channel_layer())
        await topology.refuse_relay_on_shared_layer(relay.layer, "run_wsbroadcast")
    except StartupError as exc:
        raise CommandError(str(exc)) from exc
    except LayerUnavailable as exc:
        # Redis down at start: the relay retries as it runs, and a node on our layer that dials
        # a peer of ours is refused by that peer (peer_consumer.py).
        logger.warning("could not check whether other nodes share this channel layer: %s", exc)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)  # type: ignore[union-attr]
    try:
        await relay.run()
    except asyncio.CancelledError:
        pass


async def status_table() -> str:
    """The relay's links as a table, read from this node's records (in Redis)."""
    layer = service_layer(get_channel_layer())
    records = layer.records if layer is not None else None
    if layer is None or records is None:
        raise CommandError(
            "--status reads the figures the relay writes to Redis; with the RabbitMQ layer see "
            "GET /api/v2/metrics (awx_ws_relay_link_up, awx_ws_relay_received)"
        )
    try:
        # The static peers, and those the running relay dials (discovered ones included).
        peers = dict.fromkeys(configured_peers(), "static") | await records.peers()
        rows = [await records.link_status(peer) for peer in peers]
    except LayerUnavailable as exc:
        raise CommandError(f"cannot read relay status from {layer.service} ({exc.where}): {exc}") from exc
    if not peers:
        if discovery.enabled():
            return "no peers found yet (BROADCAST_WEBSOCKET_DISCOVERY=postgres)"
        return "no peers configured (BROADCAST_WEBSOCKET_PEERS)"
    now = time.time()
    header = ("PEER", "STATE", "SINCE", "RECEIVED", "LAST MIN", "RECONNECTS", "SOURCE", "LAST SEEN")
    lines = [(*header, "LAST ERROR")]
    for (peer, source), row in zip(peers.items(), rows, strict=True):
        if not row:
            lines.append(
                (peer, "unknown", "-", "-", "-", "-", source, "-", "no status: is run_wsbroadcast running?")
            )
            continue
        state = row["state"]
        if now - float(row["updated"]) > STALE_AFTER:
            state = f"stale ({state})"
        seen = float(row.get("last_seen") or 0)
        lines.append(
            (
                peer,
                state,
                ago(float(row["since"]), now),
                row["received_total"],
                row["received_last_minute"],
                row["reconnects"],
                row.get("source", source),
                ago(seen, now) if seen else "never",
                row["last_error"],
            )
        )
    return format_table(lines)
