"""The consumer-group loop, written once for every service that shares work over a stream.

It creates its groups idempotently, first re-reads its own pending entries, reclaims entries left
pending by a dead consumer with XAUTOCLAIM, then blocks on XREADGROUP. Each entry is decoded (an
undecodable one, or one delivered too often, goes to the dead-letter stream with the reason), given
to the handler, and the handler's effects are committed together with the acknowledgement.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import anyio
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events.bus import Ack, Append, Bus, Entry
from events.codec import DecodeError, decode
from events.messages import Message

log = structlog.get_logger("events.consumer")


class Handled(StrEnum):
    """What became of one entry handed to a handler."""

    DONE = "done"  # handled, its effects and acknowledgement committed
    FAILED = "failed"  # the handler raised: left pending, reclaimed after the idle threshold
    ACK_OWED = "ack owed"  # no effects, its acknowledgement deferred (to be sent with others)


@dataclass(frozen=True)
class Delivery:
    stream: str
    entry_id: str
    message: Message
    deliveries: int  # how many times this entry has been delivered, this time included


@dataclass(frozen=True)
class Outcome:
    """A handler's effects, and an event to set once they have been committed."""

    appends: Sequence[Append]
    committed: anyio.Event | None = None


Handler = Callable[[Delivery], Awaitable[Sequence[Append] | Outcome | None]]
# Handles a whole read at once: the decoded deliveries, and entries owed only an acknowledgement.
# It commits the acknowledgement of each one with its effects, and returns how many deliveries it
# left pending (they are redelivered after the idle threshold).
BatchHandler = Callable[[list[Delivery], list[Entry]], Awaitable[int]]


async def ensure_group(redis: aioredis.Redis, stream: str, group: str, start: str = "0") -> None:
    try:
        await redis.xgroup_create(stream, group, id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class GroupConsumer:
    def __init__(
        self,
        bus: Bus,
        reader: aioredis.Redis,
        streams: Sequence[str],
        group: str,
        consumer: str,
        handler: Handler | None,
        *,
        block_ms: int = 5000,
        count: int = 100,
        claim_idle_ms: int = 60_000,
        max_deliveries: int = 5,
        on_idle: Callable[[], Awaitable[None]] | None = None,
        group_start: str = "0",
        batch: BatchHandler | None = None,
        skip: Callable[[Entry], bool] = lambda entry: False,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        """``handler`` handles one entry at a time; with ``batch``, each read is handed over
        whole instead. ``skip`` picks entries to acknowledge without decoding them. ``count`` is
        the most entries a read takes of each stream; ``counts`` sets it apart for some."""
        self.bus = bus
        self.reader = reader
        self.streams = list(streams)
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.block_ms = block_ms
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.on_idle = on_idle
        self.group_start = group_start
        self.batch = batch
        self.skip = skip
        self._last_claim = 0.0
        # streams grouped by the count they are read with, the largest first
        by_count: dict[int, list[str]] = {}
        for stream in self.streams:
            by_count.setdefault((counts or {}).get(stream, count), []).append(stream)
        self._reads = sorted(by_count.items(), reverse=True)

    async def setup(self) -> None:
        for stream in self.streams:
            await ensure_group(self.bus.redis, stream, self.group, self.group_start)

    async def run(self) -> None:
        """Consume until cancelled. A lost Redis connection propagates: the service restarts its
        work when Redis is back, and this loop starts over with its own pending entries."""
        await self.setup()
        await self.drain_own_pending()
        while True:
            try:
                await self.poll(self.block_ms)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("consumer group vanished, recreating", group=self.group)
                await self.setup()

    async def drain_own_pending(self) -> int:
        """Entries delivered to this consumer before a restart and never acknowledged."""
        handled = 0
        while True:
            reply = await self.bus.redis.xreadgroup(
                self.group, self.consumer, dict.fromkeys(self.streams, "0"), count=self.count
            )
            entries = [e for e in _entries(reply) if e.fields]
            if not entries:
                return handled
            if self.batch is not None:
                counts = [await self._delivery_count(entry) for entry in entries]
                if await self._handle_batch(entries, counts):
                    return handled  # as below: what failed waits for the idle-time reclaim
                handled += len(entries)
                continue
            for entry in entries:
                if await self._handle(entry, await self._delivery_count(entry)) == Handled.FAILED:
                    # Re-reading history counts as a delivery: leave a failing entry to the
                    # idle-time reclaim instead of burning its retries now.
                    return handled
                handled += 1

    async def poll(self, block_ms: int | None) -> int:
        """One round: reclaim stale entries, then read new ones (blocking up to ``block_ms``)."""
        handled = await self.reclaim()
        entries = await self._read(block_ms)
        if not entries and not handled and self.on_idle is not None:
            await self.on_idle()
        if self.batch is not None:
            if entries:
                await self._handle_batch(entries, [1] * len(entries))
            return handled + len(entries)
        acks: list[Entry] = []
        for entry in entries:
            if await self._handle(entry, 1, defer_ack=True) == Handled.ACK_OWED:
                acks.append(entry)
        await self._ack(acks)
        return handled + len(entries)

    async def _read(self, block_ms: int | None) -> list[Entry]:
        """New entries. XREADGROUP takes one count for all its streams: streams read with
        different counts are read apart, in one round trip without blocking, and only when they
        all came back empty does the read block on every stream (at the smallest count)."""
        group, consumer = self.group, self.consumer
        if len(self._reads) == 1:
            reply = await self.reader.xreadgroup(
                group, consumer, dict.fromkeys(self.streams, ">"), count=self.count, block=block_ms
            )
            return _entries(reply)
        async with self.reader.pipeline(transaction=False) as pipe:
            for count, streams in self._reads:
                pipe.xreadgroup(group, consumer, dict.fromkeys(streams, ">"), count=count)
            replies = await pipe.execute()
        order = {stream: index for index, stream in enumerate(self.streams)}
        entries = sorted((e for reply in replies for e in _entries(reply)), key=lambda e: order[e.stream])
        if entries or block_ms is None:
            return entries
        reply = await self.reader.xreadgroup(
            group, consumer, dict.fromkeys(self.streams, ">"), count=self._reads[-1][0], block=block_ms
        )
        return _entries(reply)

    async def reclaim(self, *, force: bool = False) -> int:
        """Claim entries pending longer than the idle threshold on any consumer of the group."""
        now = time.monotonic()
        if not force and now - self._last_claim < self.claim_idle_ms / 2000:
            return 0
        self._last_claim = now
        handled = 0
        claimed: list[Entry] = []
        for stream in self.streams:
            reply = await self.bus.redis.execute_command(  # type: ignore[no-untyped-call]  # unannotated in redis-py
                "XAUTOCLAIM",
                stream,
                self.group,
                self.consumer,
                self.claim_idle_ms,
                "0-0",
                "COUNT",
                self.count,
            )
            # Redis 6.2 replies [next, entries]; 7.x adds a third element, the deleted ids.
            for raw in reply[1]:
                if raw is None:
                    continue
                entry_id, fields = raw[0], raw[1]
                entry = Entry(stream, str(entry_id), _pairs(fields))
                if not entry.fields:  # deleted from the stream while pending
                    await self.bus.redis.xack(stream, self.group, entry.entry_id)
                    continue
                if self.batch is not None:
                    claimed.append(entry)
                    continue
                await self._handle(entry, await self._delivery_count(entry))
                handled += 1
        if claimed:
            await self._handle_batch(claimed, [await self._delivery_count(entry) for entry in claimed])
        return handled + len(claimed)

    async def _handle_batch(self, entries: Sequence[Entry], deliveries: Sequence[int]) -> int:
        """Decode a read and hand it to the batch handler; returns how many were left pending."""
        assert self.batch is not None
        batch: list[Delivery] = []
        acks: list[Entry] = []
        for entry, count in zip(entries, deliveries, strict=True):
            if self.skip(entry):
                acks.append(entry)
                continue
            delivery = await self._decoded(entry, count)
            if delivery is not None:
                batch.append(delivery)
        return await self.batch(batch, acks)

    async def _decoded(self, entry: Entry, deliveries: int) -> Delivery | None:
        """The entry as a delivery; None when it was dead-lettered instead (undecodable, or
        delivered too often)."""
        try:
            message = decode(entry.fields)
        except DecodeError as exc:
            log.warning(
                "dead-lettered undecodable entry", stream=entry.stream, entry_id=entry.entry_id, reason=str(exc)
            )
            await self.bus.dead_letter(entry, self.group, f"undecodable: {exc}")
            return None
        if deliveries > self.max_deliveries:
            log.error("dead-lettered entry delivered too often", entry_id=entry.entry_id, deliveries=deliveries)
            await self.bus.dead_letter(entry, self.group, f"delivered {deliveries} times without success")
            return None
        return Delivery(entry.stream, entry.entry_id, message, deliveries)

    async def _delivery_count(self, entry: Entry) -> int:
        info = await self.bus.redis.xpending_range(
            entry.stream, self.group, min=entry.entry_id, max=entry.entry_id, count=1
        )
        return int(info[0]["times_delivered"]) if info else 1

    async def _ack(self, entries: Sequence[Entry]) -> None:
        by_stream: dict[str, list[str]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry.entry_id)
        for stream, ids in by_stream.items():
            await self.bus.redis.xack(stream, self.group, *ids)

    async def _handle(self, entry: Entry, deliveries: int, *, defer_ack: bool = False) -> Handled:
        """Handle one entry: DONE, FAILED (left pending), or ACK_OWED (with ``defer_ack``, when
        only a plain acknowledgement is still owed)."""
        delivery = await self._decoded(entry, deliveries)
        if delivery is None:
            return Handled.DONE
        message = delivery.message
        with structlog.contextvars.bound_contextvars(job_id=message.job_id, message_type=message.type):
            assert self.handler is not None
            try:
                reply = await self.handler(delivery)
            except (RedisConnectionError, RedisTimeoutError, OutOfMemoryError):
                raise  # not the entry's fault: the service restarts once Redis is back (or has room)
            except Exception:
                # Left pending: reclaimed after the idle threshold, dead-lettered when too often.
                log.exception("handler failed; entry left pending", entry_id=entry.entry_id)
                return Handled.FAILED
            outcome = reply if isinstance(reply, Outcome) else Outcome(reply or ())
            if not outcome.appends:
                if defer_ack:
                    return Handled.ACK_OWED
                await self._ack([entry])
                return Handled.DONE
            await self.bus.commit(
                outcome.appends,
                ack=Ack(entry.stream, self.group, entry.entry_id),
                dedupe_id=f"{self.group}:{message.id}",
            )
            if outcome.committed is not None:
                outcome.committed.set()
            return Handled.DONE


def _pairs(fields: object) -> dict[str, str]:
    if isinstance(fields, dict):
        if all(type(k) is str and type(v) is str for k, v in fields.items()):
            return fields  # as read with decode_responses
        return {str(k): str(v) for k, v in fields.items()}
    if isinstance(fields, list):
        return {str(fields[i]): str(fields[i + 1]) for i in range(0, len(fields), 2)}
    return {}


def _entries(reply: Any) -> list[Entry]:
    """The entries of an XREADGROUP reply: [[stream, [[id, fields], ...]], ...], or None."""
    found: list[Entry] = []
    for stream, items in reply or []:
        for entry_id, fields in items:
            found.append(Entry(str(stream), str(entry_id), _pairs(fields)))
    return found
