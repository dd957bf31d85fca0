"""awx_ws's channel layers: the contract (base.py) and its backends, Redis and RabbitMQ.

`CHANNEL_LAYERS` names them as `awx_ws.main.layers.RedisChannelLayer` and
`awx_ws.main.layers.RabbitmqChannelLayer` (config/settings.py builds it from CHANNEL_LAYER_BACKEND).
"""

from __future__ import annotations

from awx_ws.main.layers.base import (
    ConnectionStore,
    NodeRecords,
    ProcessFigures,
    ServiceLayer,
    service_layer,
    service_layer_class,
)
from awx_ws.main.layers.rabbitmq import RabbitmqChannelLayer
from awx_ws.main.layers.redis import RedisChannelLayer

__all__ = [
    "ConnectionStore",
    "NodeRecords",
    "ProcessFigures",
    "RabbitmqChannelLayer",
    "RedisChannelLayer",
    "ServiceLayer",
    "service_layer",
    "service_layer_class",
]
