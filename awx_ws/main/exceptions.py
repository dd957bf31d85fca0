"""Errors raised at awx_ws's boundary; library errors are translated into these."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


class AwxWsError(Exception):
    """Base class of every error awx_ws raises on purpose."""


class InvalidGroupName(AwxWsError, ValueError):
    """A group name Channels would refuse, or one reserved for internal use."""


class InvalidHistoryShare(AwxWsError, ValueError):
    """A history share (emit's `share`) that is not 1 to 64 ASCII letters, digits, '_', '.' or '-'."""


class InvalidTransition(AwxWsError, ValueError):
    """A job status change the state machine does not allow."""


class EmitError(AwxWsError):
    """A notification could not be handed to the channel layer."""


class LayerUnavailable(EmitError, ConnectionError):
    """The channel layer could not be reached (or did not answer) within the configured time.

    Every backend raises it (a subclass naming its service) in place of its library's errors. An
    EmitError, as emit has always raised, and a ConnectionError (an OSError), as a lost socket is.
    `where` names the setting and address at fault; `timed_out` says the layer did not answer in
    time (rather than refusing or failing).
    """

    service = "the channel layer"

    def __init__(self, message: str, *, where: str = "", timed_out: bool = False) -> None:
        super().__init__(message)
        self.where = where
        self.timed_out = timed_out


class RedisUnavailable(LayerUnavailable):
    """Redis could not be reached (or did not answer) within the configured time."""

    service = "Redis"


class BrokerUnavailable(LayerUnavailable):
    """RabbitMQ could not be reached (or the connection was lost) within the configured time."""

    service = "RabbitMQ"


class BatchEmitError(EmitError):
    """A batch of notifications failed part-way or whole: which were sent, which not, and which
    may have been (the layer failed while they were under way), by their index in the batch.

    `cause` is the layer's error (a LayerUnavailable naming where); the message says both.
    """

    def __init__(
        self, cause: LayerUnavailable, *, sent: list[int], unsent: list[int], unknown: list[int]
    ) -> None:
        total = len(sent) + len(unsent) + len(unknown)
        super().__init__(
            f"batch of {total} notifications failed: {len(sent)} sent, {len(unsent)} not sent, "
            f"{len(unknown)} may have been sent; {cause}"
        )
        self.cause = cause
        self.sent, self.unsent, self.unknown = sent, unsent, unknown


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
