"""Appending to and reading from the streams, and the atomic commit of a handler's effects.

``Bus.commit`` runs one Lua script that, in a single step: checks the scheduler's fencing token
(optional), checks that nothing was appended to the log since the caller's state was built
(optional, optimistic concurrency), skips messages already handled (dedupe keys), appends the
facts and commands, and acknowledges the consumed entries. Effects and acknowledgements land together
or not at all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis
import structlog
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from events import connection, scripts
from events.codec import TYPE_CODES, DecodeError, decode, encode, encode_fact
from events.errors import EventsError
from events.keys import Keys
from events.messages import Message

DEDUPE_TTL_S = 7 * 24 * 3600
PAGE = 1000
log = structlog.get_logger("events.bus")


class BusError(EventsError):
    """Root of the errors raised by the event bus."""


class Fenced(BusError):
    """A write of a scheduler that is no longer the leader was refused."""


class NotReplicated(BusError, RedisError):
    """Commands were appended, but fewer replicas than asked confirmed them in time: a failover
    could lose them, so they are not acknowledged (whether they take effect is unknown)."""


@dataclass(frozen=True)
class Append:
    stream: str
    message: Message
    maxlen: int = 0  # 0: never trimmed; else an approximate cap


@dataclass(frozen=True)
class Ack:
    stream: str
    group: str
    entry_id: str


class CommitStatus(StrEnum):
    """How a commit ended (the commit script's first word)."""

    OK = "OK"
    CONFLICT = "CONFLICT"  # the log moved on: nothing committed; fold what is new and decide again
    DUPLICATE = "DUPLICATE"  # every handling had been committed before: only the acknowledgements landed
    SOME_DUPLICATE = "SOME_DUPLICATE"  # some had been: nothing committed


@dataclass(frozen=True)
class CommitResult:
    status: CommitStatus
    entry_ids: tuple[str, ...] = ()
    last_id: str | None = None  # on CONFLICT: the log's last entry id
    duplicates: tuple[int, ...] = ()  # on SOME_DUPLICATE: indices into the dedupe ids
    skipped: bool = False  # on OK: the reader group was moved past the appended facts
    # on OK: entries appended after the expected last one and passed over (see prepare_commit)
    passed: tuple[Entry, ...] = ()


@dataclass(frozen=True)
class PreparedCommit:
    keys: list[str]
    args: list[Any]


@dataclass(frozen=True)
class Entry:
    stream: str
    entry_id: str
    fields: dict[str, str]


def connect(url: str, *, block_ms: int | None = None) -> aioredis.Redis:
    """A client, to one Redis or to the master Sentinel names (see :mod:`events.connection`).
    A blocking reader gets its own, with a socket timeout above its block time."""
    return connection.connect(url, block_ms=block_ms)


MAX_SEQ = 2**64 - 1  # the largest sequence part of an entry id
MOST_PASSED = 64  # entries a commit may pass over (see Bus.prepare_commit); more: a conflict


def _fields(flat: Sequence[Any]) -> dict[str, str]:
    """An entry's fields from the flat list a script returns them in."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


def entry_id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def entry_time(entry_id: str) -> datetime:
    """When Redis appended an entry, by its id."""
    return datetime.fromtimestamp(entry_id_key(entry_id)[0] / 1000, UTC)


async def clock_behind(redis: aioredis.Redis) -> timedelta:
    """How far this process's clock is ahead of Redis's (by which entry ids are stamped)."""
    before = datetime.now(UTC)
    seconds, micros = await redis.time()
    after = datetime.now(UTC)
    return before + (after - before) / 2 - datetime.fromtimestamp(seconds + micros / 1e6, UTC)


def previous_id(entry_id: str) -> str:
    """The id just before an entry, so that a range after it includes the entry."""
    ms, seq = entry_id_key(entry_id)
    return f"{ms}-{seq - 1}" if seq else (f"{ms - 1}-{MAX_SEQ}" if ms else "0-0")


def next_id(entry_id: str) -> str:
    """The id just after an entry, so that a range from it excludes the entry."""
    ms, seq = entry_id_key(entry_id)
    return f"{ms}-{seq + 1}"


class Bus:
    def __init__(self, redis: aioredis.Redis, keys: Keys, source: str, archive_dir: Path | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.source = source
        self.archive_dir = archive_dir  # where entries trimmed from the log were archived
        self._commit = redis.register_script(scripts.COMMIT_LUA)
        self._append_events = redis.register_script(scripts.APPEND_LUA)
        self._scripts: dict[str, AsyncScript] = {}
        self._outbox: list[tuple[str, dict[str, str], asyncio.Future[str]]] = []
        self._sending = anyio.Lock()
        self.wait_replicas = 0  # see replicate_commands
        self.wait_timeout_ms = 0

    def replicate_commands(self, replicas: int, timeout_ms: int) -> None:
        """From now on, an append to the commands stream returns once ``replicas`` replicas hold
        it (``WAIT``), or raises NotReplicated after ``timeout_ms``: what a caller acknowledges
        then survives a failover to any of them. 0: return once the master holds it."""
        self.wait_replicas, self.wait_timeout_ms = replicas, timeout_ms

    def _replicated(self, confirmed: int) -> None:
        if confirmed < self.wait_replicas:
            raise NotReplicated(
                f"appended, but {confirmed} of the {self.wait_replicas} replicas asked for confirmed it "
                f"within {self.wait_timeout_ms} ms"
            )

    def script(self, source: str) -> AsyncScript:
        """A Lua script, registered once per bus."""
        if source not in self._scripts:
            self._scripts[source] = self.redis.register_script(source)
        return self._scripts[source]

    def append_events(self, messages: Sequence[Message], client: Any = None) -> Any:
        """Append facts to the log, on its hash chain, in one step (``client``: a pipeline)."""
        args: list[str] = []
        for message in messages:
            args += encode_fact(message, self.source)
        return self._append_events(keys=[self.keys.events, self.keys.chain], args=args, client=client)

    async def append(self, stream: str, *messages: Message, maxlen: int = 0) -> list[str]:
        if stream == self.keys.events:
            return [str(entry_id) for entry_id in await self.append_events(messages)]
        if stream == self.keys.commands and self.wait_replicas:
            args: list[str | int] = []
            for message in messages:
                fields = encode(message, self.source)
                args += [len(fields), *(part for pair in fields.items() for part in pair)]
            async with self.redis.pipeline(transaction=False) as pipe:  # WAIT: on the same connection
                await self.script(scripts.XADD_ALL_LUA)(keys=[stream], args=args, client=pipe)
                pipe.wait(self.wait_replicas, self.wait_timeout_ms)
                ids, confirmed = await pipe.execute()
            self._replicated(confirmed)
            return [str(entry_id) for entry_id in ids]
        if len(messages) == 1:
            entry_id = await self.redis.xadd(
                stream,
                encode(messages[0], self.source),  # type: ignore[arg-type]  # redis-py asks an invariant dict[FieldT, EncodableT]
                maxlen=maxlen or None,
                approximate=bool(maxlen),
            )
            return [str(entry_id)]
        async with self.redis.pipeline(transaction=True) as pipe:
            for message in messages:
                if maxlen:
                    pipe.xadd(stream, encode(message, self.source), maxlen=maxlen, approximate=True)  # type: ignore[arg-type]  # redis-py asks an invariant dict[FieldT, EncodableT]
                else:
                    pipe.xadd(stream, encode(message, self.source))  # type: ignore[arg-type]  # redis-py asks an invariant dict[FieldT, EncodableT]
            return [str(entry_id) for entry_id in await pipe.execute()]

    async def send(self, stream: str, message: Message) -> str:
        """Append one message to a stream other than the log, sharing the round trip with the
        messages concurrent callers send meanwhile: while one batch is written, the next one
        gathers, and goes out in one pipeline."""
        sent: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._outbox.append((stream, encode(message, self.source), sent))
        async with self._sending:
            if not sent.done():
                batch, self._outbox = self._outbox, []
                durable = self.wait_replicas > 0 and any(target == self.keys.commands for target, _, _ in batch)
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for target, fields, _ in batch:
                            pipe.xadd(target, fields)  # type: ignore[arg-type]  # redis-py asks an invariant dict[FieldT, EncodableT]
                        if durable:  # after the appends, on their connection
                            pipe.wait(self.wait_replicas, self.wait_timeout_ms)
                        ids = await pipe.execute()
                    if durable:
                        self._replicated(ids.pop())
                except BaseException as exc:
                    for _, _, waiter in batch:
                        if waiter is not sent and not waiter.done():  # this caller gets it raised
                            waiter.set_exception(exc)
                    raise
                for (_, _, waiter), entry_id in zip(batch, ids, strict=True):
                    waiter.set_result(str(entry_id))
        return await sent

    async def commit(
        self,
        appends: Sequence[Append],
        *,
        ack: Ack | None = None,
        acks: Sequence[Ack] = (),
        fence_token: str | None = None,
        expect_last: str | None = None,
        dedupe_id: str | None = None,
        dedupe_ids: Sequence[str] = (),
        reader_group: str | None = None,
        tolerate: Collection[str] = (),
        touched: Collection[str] = (),
    ) -> CommitResult:
        """Commit effects and acknowledgements atomically. A dedupe id names the handling of one
        message by one group (``<group>:<message id>``): when every one given was committed
        before, only the acknowledgements land (DUPLICATE); when some were, nothing lands and
        ``duplicates`` holds their indices (SOME_DUPLICATE). With ``expect_last``, the facts
        appended are the last entries of the log: ``reader_group``, if it had been given every
        entry up to ``expect_last``, is moved past them (``skipped``), so that it does not read
        back what its own consumer wrote. ``tolerate`` and ``touched``: see :meth:`prepare_commit`."""
        prepared = self.prepare_commit(
            appends,
            acks=[*([ack] if ack else []), *acks],
            fence_token=fence_token,
            dedupe_ids=[*([dedupe_id] if dedupe_id else []), *dedupe_ids],
            reader_group=reader_group,
            tolerate=tolerate,
            touched=touched,
        )
        return await self.run_commit(prepared, expect_last)

    def prepare_commit(
        self,
        appends: Sequence[Append],
        *,
        acks: Sequence[Ack] = (),
        fence_token: str | None = None,
        dedupe_ids: Sequence[str] = (),
        reader_group: str | None = None,
        tolerate: Collection[str] = (),
        touched: Collection[str] = (),
    ) -> PreparedCommit:
        """A commit encoded, to be run once the log position it expects is known. Facts
        appended to the log after the expected position do not make it conflict when there are
        at most :data:`MOST_PASSED`, each of a type in ``tolerate`` and about a job (never none)
        not in ``touched``: it lands after them, and its result carries them (``passed``)."""
        streams: dict[str, int] = {}  # each stream named, by its position among the KEYS
        runs: dict[tuple[str, str], list[str]] = {}
        for a in acks:
            streams.setdefault(a.stream, len(streams) + 1)
            runs.setdefault((a.stream, a.group), []).append(a.entry_id)
        maxlens: dict[str, int] = {}
        header: list[str] = []
        body: list[bytes] = []
        for item in appends:
            target = streams.setdefault(item.stream, len(streams) + 1)
            maxlens[item.stream] = max(maxlens.get(item.stream, 0), item.maxlen)
            parts: tuple[str, ...]
            if item.stream == self.keys.events:
                parts = encode_fact(item.message, self.source)
            else:
                parts = (*encode(item.message, self.source).values(), "")
            kind, job_id, data, at = (part.encode() for part in parts)
            header.append(f"{target} {len(kind)} {len(job_id)} {len(data)} {len(at)}")
            body += (kind, job_id, data, at)
        keys = [self.keys.fence, self.keys.events, self.keys.chain]
        keys += [self.keys.done(d) for d in dedupe_ids]
        keys += streams
        args: list[Any] = [
            fence_token or "",
            "",  # expect_last: given when the commit is run
            DEDUPE_TTL_S,
            len(dedupe_ids),
            reader_group or "",
            " ".join(str(maxlens.get(stream, 0)) for stream in streams),
            ";".join(" ".join((str(streams[stream]), group, *ids)) for (stream, group), ids in runs.items()),
            " ".join(header),
            b"".join(body),
            " ".join(TYPE_CODES.get(kind, kind) for kind in tolerate),
            " ".join(touched) if tolerate else "",
            MOST_PASSED,
        ]
        return PreparedCommit(keys, args)

    async def run_commit(self, prepared: PreparedCommit, expect_last: str | None = None) -> CommitResult:
        """Run a prepared commit; with ``expect_last``, only if that is still the log's last entry."""
        args = list(prepared.args)
        args[1] = expect_last or ""
        try:
            reply = await self._commit(keys=prepared.keys, args=args)
        except ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise Fenced(str(exc)) from exc
            raise
        status = CommitStatus(str(reply[0]))
        if status == CommitStatus.CONFLICT:
            return CommitResult(status, last_id=str(reply[1]))
        if status == CommitStatus.SOME_DUPLICATE:
            return CommitResult(status, duplicates=tuple(int(x) for x in reply[1:]))
        if status == CommitStatus.OK:
            passed = tuple(Entry(self.keys.events, str(raw[0]), _fields(raw[1])) for raw in reply[2])
            return CommitResult(status, tuple(str(x) for x in reply[3:]), skipped=bool(reply[1]), passed=passed)
        return CommitResult(status)

    async def dead_letter(self, entry: Entry, group: str, reason: str) -> None:
        """Move an entry aside with the reason, and acknowledge it, in one step."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.keys.dead_letter,
                {
                    "stream": entry.stream,
                    "entry_id": entry.entry_id,
                    "group": group,
                    "reason": reason,
                    "fields": json.dumps(entry.fields),
                    "source": self.source,
                },
            )
            pipe.xack(entry.stream, group, entry.entry_id)
            await pipe.execute()

    async def entries(self, stream: str, after: str = "0-0", until: str = "+") -> AsyncIterator[Entry]:
        """Every entry after ``after`` (exclusive) up to ``until``, in pages."""
        start = f"({after}" if after not in ("0", "0-0", "-") else "-"
        while True:
            page = connection.text_entries(await self.redis.xrange(stream, min=start, max=until, count=PAGE))
            for entry_id, fields in page:
                yield Entry(stream, str(entry_id), fields)
            if len(page) < PAGE:
                return
            start = f"({page[-1][0]}"

    async def messages(self, stream: str, after: str = "0-0", until: str = "+") -> AsyncIterator[tuple[str, Message]]:
        """Decoded entries; ones this release cannot decode are skipped (they are in the log)."""
        async for entry in self.entries(stream, after, until):
            try:
                yield entry.entry_id, decode(entry.fields)
            except DecodeError as exc:
                log.warning("undecodable entry skipped", stream=stream, entry_id=entry.entry_id, reason=str(exc))
