"""Batched group_send on Redis: many messages in one round trip, all or none.

Each message is the same group_send script call a single emit makes (redis_scripts.py: queue it
once per process holding the group, append it to the group's history). A batch queues those
calls in one MULTI/EXEC: Redis runs them in order, and none of them runs if the connection fails
before EXEC arrives. Then, as for a single emit, members the script left out (not fan-outs, for
a message Lua cannot pack back unchanged: redis_scripts.py) get theirs in a second round trip.

When something fails, the caller learns which messages were sent and which may have been
(BatchEmitError): a reply lost after EXEC leaves the first round's messages uncertain, never
silently half-sent. The plan and the reading of replies are shared by the sync emit (gunicorn
workers, job runners) and the async one; only the round trips differ.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError, RedisError, ResponseError

from awx_ws.main.exceptions import BatchEmitError
from awx_ws.main.history import SHARE_KEY
from awx_ws.main.layers import redis_keys
from awx_ws.main.layers.redis_connect import NotConnected
from awx_ws.main.layers.redis_scripts import FANOUT_SHA, GROUP_SEND_FANOUT_LUA, GROUP_SEND_LUA
from awx_ws.main.messages import with_group

if TYPE_CHECKING:
    from awx_ws.main.layers.redis_types import RedisLayer

# (script or its digest, number of keys, keys and args) of each call of one round trip
Call = tuple[str, list[Any]]
RoundTrip = Callable[[list[Call], bool], Awaitable[list[Any]]]


@dataclass
class Batch:
    """The messages of one batch and how far each has gone."""

    layer: RedisLayer
    messages: list[tuple[str, dict[str, Any]]]
    # Indices whose script has run (the fan-out members and history have them).
    done: set[int] = field(default_factory=set)
    # Index -> the members still to be sent to (the second round trip).
    others: dict[int, list[bytes]] = field(default_factory=dict)
    # Each message's history share (history.SHARE_KEY), read once: with_group takes it off.
    shares: list[str | None] = field(default_factory=list)

    @classmethod
    def of(cls, layer: RedisLayer, messages: Sequence[tuple[str, dict[str, Any]]]) -> Batch:
        """The batch, each message checked and marked with its group (nothing is sent yet)."""
        if layer.ring_size > 1:
            raise TypeError("batched emit supports one Redis host (channels_redis sharding is not supported)")
        checked, shares = [], []
        for group, message in messages:
            if not layer.require_valid_group_name(group):
                raise TypeError(f"invalid group name {group!r}")
            shares.append(message.get(SHARE_KEY))
            checked.append((group, with_group(group, message)))
        return cls(layer, checked, shares=shares)

    def first_calls(self, indices: list[int], by_digest: bool) -> list[Call]:
        """The group_send script call of each message in indices."""
        calls = []
        for index in indices:
            keys, args = self.layer.fanout_call(*self.messages[index], self.shares[index])
            calls.append((FANOUT_SHA if by_digest else GROUP_SEND_FANOUT_LUA, [len(keys), *keys, *args]))
        return calls

    def settle_first(self, indices: list[int], replies: list[Any]) -> tuple[list[int], bool]:
        """Read the first round's replies: (indices to run again, whether the script must be sent
        whole). A message whose history has no origin yet (NOORIGIN) ran nothing and is run again
        once the origin exists; so is every one when Redis lost the script (NOSCRIPT)."""
        again: list[int] = []
        missing_script = False
        refused: BaseException | None = None
        for index, reply in zip(indices, replies, strict=True):
            if isinstance(reply, NoScriptError):
                missing_script = True
                again.append(index)
            elif isinstance(reply, ResponseError) and str(reply).startswith("NOORIGIN"):
                again.append(index)
            elif isinstance(reply, Exception):
                refused = refused or reply  # e.g. OOM at maxmemory: the others still ran
            else:
                group, message = self.messages[index]
                self.done.add(index)
                others = self.layer.after_fanout(group, message, reply)
                if others:
                    self.others[index] = others
        if refused is not None:
            raise self.failure(refused, [])
        return again, missing_script

    def second_calls(self) -> list[Call]:
        """The calls for members that are not fan-outs, in the batch's order."""
        calls = []
        for index in sorted(self.others):
            keys, args = self.layer.group_send_plan(self.others[index], self.messages[index][1])
            calls.append((GROUP_SEND_LUA, [len(keys), *keys, *args]))
        return calls

    def settle_second(self, replies: list[Any]) -> None:
        """Report the second round's drops (channels at capacity)."""
        for index, over in zip(sorted(self.others), replies, strict=True):
            if isinstance(over, Exception):
                raise over
            self.layer.report_over_capacity(int(over), self.messages[index][0])

    def failure(self, exc: BaseException, uncertain: Sequence[int]) -> BatchEmitError:
        """exc as BatchEmitError: done ones sent, uncertain ones maybe, the rest not."""
        maybe = set(uncertain)
        sent = sorted(self.done - maybe)
        unsent = [i for i in range(len(self.messages)) if i not in self.done and i not in maybe]
        cause = self.layer.unavailable(_without_the_command(exc))
        return BatchEmitError(cause, sent=sent, unsent=unsent, unknown=sorted(maybe))


def _without_the_command(exc: BaseException) -> BaseException:
    """A refusal without the command redis-py prefixes to it in a pipeline: the command's arguments
    are the serialised message (a payload does not belong in an error message or a log)."""
    if not isinstance(exc, ResponseError):
        return exc
    _, annotated, refusal = str(exc).partition(" of pipeline caused error: ")
    return ResponseError(f"{type(exc).__name__}: {refusal if annotated else exc}")


async def run(batch: Batch, round_trip: RoundTrip, set_origin: Callable[[], Awaitable[Any]]) -> None:
    """Send the batch: the first round (again for the messages that need it), then the second."""
    pending, by_digest, tries = list(range(len(batch.messages))), True, 0
    while pending:
        tries += 1
        if tries > 3:  # an origin or a script that does not stay: not a state to loop in
            raise batch.failure(RedisError("the batch could not be applied in 3 tries"), [])
        try:
            replies = await round_trip(batch.first_calls(pending, by_digest), True)
        except ResponseError as exc:
            # Refused while queued (OOM at maxmemory, say): Redis discarded the whole MULTI, so
            # none of these ran. redis-py raises the first refusal in place of EXECABORT.
            raise batch.failure(exc, []) from exc
        except NotConnected as exc:  # no connection was made: nothing of the round was sent
            raise batch.failure(exc, []) from exc
        except (RedisError, OSError) as exc:  # lost or silent: the EXEC may have run
            raise batch.failure(exc, pending) from exc
        again, missing_script = batch.settle_first(pending, replies)
        if again and not missing_script:
            try:
                await set_origin()  # first message this Redis keeps history for
            except (RedisError, OSError) as exc:
                raise batch.failure(exc, []) from exc
        pending, by_digest = again, not missing_script
    calls = batch.second_calls()
    if calls:
        try:
            batch.settle_second(await round_trip(calls, True))
        except (RedisError, OSError) as exc:
            # Every message reached the fan-outs and history; its other members may not have.
            raise batch.failure(exc, sorted(batch.others)) from exc


def _queue(pipe: Any, calls: list[Call]) -> None:
    """Queue each call on a pipeline (sync or async: queueing is the same)."""
    for script, args in calls:
        if script == FANOUT_SHA:
            pipe.evalsha(script, *args)
        else:
            pipe.eval(script, *args)


async def send(layer: RedisLayer, messages: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """The batch on the layer's event-loop connection."""
    batch = Batch.of(layer, messages)
    connection = layer.connection(0)

    async def round_trip(calls: list[Call], atomic: bool) -> list[Any]:
        async with connection.pipeline(transaction=atomic) as pipe:
            _queue(pipe, calls)
            return list(await pipe.execute(raise_on_error=False))

    async def set_origin() -> None:
        await connection.set(redis_keys.origin_key(layer.prefix), secrets.token_hex(4), nx=True)

    await run(batch, round_trip, set_origin)


def send_blocking(layer: RedisLayer, messages: Sequence[tuple[str, dict[str, Any]]], timeout: float) -> None:
    """The batch from sync code, on the pooled blocking connection (no event loop is run: the
    round trips below complete inside run()'s awaits without ever suspending)."""
    batch = Batch.of(layer, messages)
    connection = layer.blocking_client(0, timeout)

    async def round_trip(calls: list[Call], atomic: bool) -> list[Any]:
        with connection.pipeline(transaction=atomic) as pipe:
            _queue(pipe, calls)
            return list(pipe.execute(raise_on_error=False))

    async def set_origin() -> None:
        connection.set(redis_keys.origin_key(layer.prefix), secrets.token_hex(4), nx=True)

    coroutine = run(batch, round_trip, set_origin)
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("the blocking batch suspended: its round trips must not await anything")
