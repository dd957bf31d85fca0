"""Errors raised at awx_ws's boundary; library errors are translated into these."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


class AwxWsError(Exception):
    """Base class of every error awx_ws raises on purpose."""


class InvalidGroupName(AwxWsError, ValueError):
    """A group name Channels would refuse, or one reserved for internal use."""


class InvalidTransition(AwxWsError, ValueError):
    """A job status change the state machine does not allow."""


class EmitError(AwxWsError):
    """A notification could not be handed to the channel layer."""


class RedisUnavailable(EmitError):
    """Redis could not be reached (or did not answer) within the configured time."""


class BrokerUnavailable(EmitError, ConnectionError):
    """RabbitMQ could not be reached (or the connection was lost) within the configured time.

    A ConnectionError too, so code that handles a lost Redis connection handles this the same way.
    """


class DatabaseUnavailable(AwxWsError, ConnectionError):
    """The Django database (DATABASE_URL) could not be read from a background loop."""


class StartupError(AwxWsError):
    """The server cannot start: its start-up work failed for good."""


def redact_url(url: str) -> str:
    """Return url with any password replaced, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
