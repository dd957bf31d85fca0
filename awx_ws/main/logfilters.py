"""Logging filters for the handlers in settings.LOGGING (imported by dictConfig: keep it light)."""

from __future__ import annotations

import logging
import time


class BrokerReconnects(logging.Filter):
    """channels_rabbitmq logs every failed reconnect (once a second) at ERROR with a traceback.

    A broker outage is an operational state, not a bug in this process: one WARNING line without
    the traceback, then at most one a minute while it lasts.
    """

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self.every = every
        self._last = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        """Let the record through, shortened, or drop a repeat."""
        if not record.name.startswith("channels_rabbitmq") or not record.exc_info:
            return True
        # Imported here: dictConfig imports this module before the apps load. A record from
        # channels_rabbitmq means its layer, and so this, is loaded already.
        from awx_ws.main.layers.rabbitmq import RECONNECT_ERRORS

        if not isinstance(record.exc_info[1], RECONNECT_ERRORS):
            return True
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True
