"""What the application uses of daphne beyond ASGI, in one place (tests/test_daphne_hooks.py).

Plain `daphne config.asgi:application` sends no ASGI lifespan and gives the application no handle
on a connection's socket. Three things are still worth having under it:

- start-up work when the server starts, and the liveness record withdrawn when it stops: daphne
  runs Twisted's asyncio reactor, which has start and shutdown triggers (`when_server_runs`,
  `before_server_stops`);
- how much a client has not read yet, to cut off slow readers (backlog.py): daphne calls the
  application with `send=functools.partial(server.handle_reply, protocol)`, so the protocol, and
  its Twisted transport, can be found from `send` (`connection_protocol`);
- daphne's websocket timeout, which closes every websocket after 86,400 s unless daphne runs
  with `--websocket_timeout -1` (AWX PR #3424): the application warns once (`websocket_timeout`);
- daphne's access log, which writes each request's URI with its query string: a `?token=` in it
  is redacted (`redact_access_log`, log_redaction.py).

Each looks at daphne's private structure and gives up (None, False) when it is not what it
expects, so the application still runs, unhooked, under any other ASGI server or daphne release.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from awx_ws.main.log_redaction import redact_credentials

logger = logging.getLogger(__name__)


def _daphne_server(send: Any) -> Any | None:
    """The daphne Server whose handle_reply `send` is, or None."""
    module = sys.modules.get("daphne.server")  # never imported here: importing installs a reactor
    if module is None or not isinstance(send, functools.partial) or len(send.args) != 1:
        return None
    server = getattr(send.func, "__self__", None)
    if not isinstance(server, module.Server) or getattr(send.func, "__name__", "") != "handle_reply":
        return None
    return server


def connection_protocol(send: Any) -> Any | None:
    """daphne's protocol object for the connection `send` replies to (None under other servers)."""
    if _daphne_server(send) is None:
        return None
    return send.args[0]


def websocket_timeout(send: Any) -> float | None:
    """Seconds after which daphne closes websockets (None: never, or not daphne)."""
    server = _daphne_server(send)
    timeout = getattr(server, "websocket_timeout", None)
    return float(timeout) if isinstance(timeout, int | float) and timeout > 0 else None


def redact_access_log() -> bool:
    """Make daphne's access log (daphne.access.AccessLogGenerator) redact credentials in the
    URIs it writes; False if that class is not what it was. Called once per process (apps.py)."""
    try:
        from daphne.access import AccessLogGenerator  # datetime only: installs no reactor
    except ImportError:
        return False
    write_entry = getattr(AccessLogGenerator, "write_entry", None)
    if write_entry is None or getattr(write_entry, "redacts", False):
        return write_entry is not None

    @functools.wraps(write_entry)
    def redacting_write_entry(self: Any, host: Any, date: Any, request: Any, *more: Any, **kw: Any) -> None:
        request = redact_credentials(request) if isinstance(request, str) else request
        write_entry(self, host, date, request, *more, **kw)

    redacting_write_entry.redacts = True  # type: ignore[attr-defined]
    AccessLogGenerator.write_entry = redacting_write_entry
    return True


def _reactor() -> Any | None:
    """Twisted's reactor if one is installed in this process (never installs one)."""
    return sys.modules.get("twisted.internet.reactor")


def when_server_runs(callback: Callable[[], None]) -> bool:
    """Call callback on the server's running event loop, as soon as its reactor runs; False
    without a reactor.

    Twisted fires callWhenRunning callbacks while it starts, before the asyncio loop runs: the
    callback is deferred once more (callLater 0) so that it can start tasks on that loop.
    """
    reactor = _reactor()
    if reactor is None or not hasattr(reactor, "callWhenRunning"):
        return False
    reactor.callWhenRunning(lambda: reactor.callLater(0, callback))
    return True


def before_server_stops(work: Callable[[], Awaitable[None]]) -> bool:
    """Run the coroutine `work()` on the server's loop before its reactor shuts down."""
    reactor = _reactor()
    if reactor is None or not hasattr(reactor, "addSystemEventTrigger"):
        return False
    from twisted.internet import defer

    def trigger() -> Any:
        return defer.Deferred.fromFuture(asyncio.ensure_future(work()))

    reactor.addSystemEventTrigger("before", "shutdown", trigger)
    return True
