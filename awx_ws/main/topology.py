"""How this node is joined to others, and the combination that is refused: a shared channel
layer together with relay peers.

Nodes reach each other's clients in one of two ways (docs/channels.md, "Topologies"):

- they share one channel layer (one Redis, or one Sentinel-managed Redis): a group_send on any
  node queues the message for every process holding the group, whichever node it runs on;
- each node has a layer of its own, and the relay (relay.py) carries messages between them.

Both at once would deliver every message twice: once through the shared layer, once more
through a relay link. The layer itself cannot tell: a node learns it shares its Redis from the
liveness records other nodes' processes write there (their AWX_WS_NODE_NAME). Daphne and the
relay refuse to start when they find another node there while relay peers are configured, and
a node refuses a relay link from a node that lives on its own layer (nodes started together,
before either could see the other's records).
"""

from __future__ import annotations

import logging

from awx_ws.main import discovery
from awx_ws.main.conf import ws_settings
from awx_ws.main.exceptions import StartupError
from awx_ws.main.layers import ServiceLayer
from awx_ws.main.peer_protocol import configured_peers

logger = logging.getLogger(__name__)


def relays() -> bool:
    """True when this node is configured to relay: static peers, or peers found by discovery."""
    return bool(configured_peers()) or discovery.enabled()


async def other_nodes_on(layer: ServiceLayer) -> set[str]:
    """The other nodes with a live process on this node's channel layer (none on a layer without
    records, RabbitMQ: the relay there is the operator's to configure); LayerUnavailable if the
    layer does not answer."""
    records = layer.records
    if records is None:
        return set()
    return await records.live_nodes() - {ws_settings.NODE_NAME}


async def refuse_relay_on_shared_layer(layer: ServiceLayer, who: str) -> None:
    """StartupError when this node relays and shares its channel layer with other nodes."""
    if not relays():
        return
    others = await other_nodes_on(layer)
    if others:
        raise StartupError(shared_layer_message(who, layer, others))


def shared_layer_message(who: str, layer: ServiceLayer, others: set[str]) -> str:
    """Why a node that shares its layer must not relay, and what to change."""
    return (
        f"{who} of node {ws_settings.NODE_NAME!r} refused to start: its channel layer "
        f"({layer.describe_hosts()}) is shared with node(s) {', '.join(sorted(others))}, and relay "
        "peers are configured (BROADCAST_WEBSOCKET_PEERS or BROADCAST_WEBSOCKET_DISCOVERY). Nodes on "
        "one layer already receive each other's messages; a relay would deliver each one twice. "
        "Either unset the relay settings and stop run_wsbroadcast on these nodes, or give each node "
        "a Redis of its own (see Topologies in docs/channels.md)"
    )
