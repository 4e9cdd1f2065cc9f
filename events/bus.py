"""Appending to and reading from the streams, and the atomic commit of a handler's effects.

``Bus.commit`` runs one Lua script that, in a single step: checks the scheduler's fencing token
(optional), checks that nothing was appended to the log since the caller's state was built
(optional, optimistic concurrency), skips a message already handled (dedupe key), appends the
facts and commands, and acknowledges the consumed entry. Effects and acknowledgement land together
or not at all.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ResponseError

from events.codec import DecodeError, decode, encode
from events.keys import Keys
from events.messages import Message

DEDUPE_TTL_S = 7 * 24 * 3600
PAGE = 1000
log = structlog.get_logger("events.bus")

_COMMIT_LUA = """
-- KEYS: fence, events, ack_stream, dedupe, then one stream per append
-- ARGV: token, expected_last, group, ack_id, dedupe_ttl, n_appends,
--       then per append: maxlen, n_fields, field, value, ...
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the fencing token moved on: this scheduler is no longer the leader')
end
if ARGV[2] ~= '' then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  local last_id = '0-0'
  if #last > 0 then last_id = last[1][1] end
  if last_id ~= ARGV[2] then return {'CONFLICT', last_id} end
end
if ARGV[5] ~= '' then
  if redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[5]) == false then
    if ARGV[3] ~= '' then redis.call('XACK', KEYS[3], ARGV[3], ARGV[4]) end
    return {'DUPLICATE'}
  end
end
local reply = {'OK'}
local i = 7
for a = 1, tonumber(ARGV[6]) do
  local args = {KEYS[4 + a]}
  if ARGV[i] ~= '0' then
    table.insert(args, 'MAXLEN'); table.insert(args, '~'); table.insert(args, ARGV[i])
  end
  table.insert(args, '*')
  local n = tonumber(ARGV[i + 1])
  i = i + 2
  for f = 1, n * 2 do table.insert(args, ARGV[i]); i = i + 1 end
  table.insert(reply, redis.call('XADD', unpack(args)))
end
if ARGV[3] ~= '' then redis.call('XACK', KEYS[3], ARGV[3], ARGV[4]) end
return reply
"""


class BusError(Exception):
    """Root of the errors raised by the event bus."""


class Fenced(BusError):
    """A write of a scheduler that is no longer the leader was refused."""


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


@dataclass(frozen=True)
class CommitResult:
    status: str  # OK, CONFLICT (log moved on: rebuild and retry) or DUPLICATE (already handled)
    entry_ids: tuple[str, ...] = ()
    last_id: str | None = None  # on CONFLICT: the log's last entry id


@dataclass(frozen=True)
class Entry:
    stream: str
    entry_id: str
    fields: dict[str, str]


def connect(url: str, *, block_ms: int | None = None) -> aioredis.Redis:
    """A client. A blocking reader gets its own, with a socket timeout above its block time.

    A command that meets a dropped connection (a pooled connection to a Redis that restarted) is
    retried a few times; a longer outage raises, and the service restarts its work once Redis is
    back. A retried append may land twice only if Redis ran it and then died before replying;
    commits are deduplicated, and every reader tolerates a repeated progress or heartbeat entry.
    """
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3)
    options: dict[str, Any] = {"decode_responses": True, "retry": retry, "health_check_interval": 30}
    if block_ms is not None:
        options.update(socket_timeout=block_ms / 1000 + 10, max_connections=4)
    return aioredis.Redis.from_url(url, **options)


def entry_id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Bus:
    def __init__(self, redis: aioredis.Redis, keys: Keys, source: str) -> None:
        self.redis = redis
        self.keys = keys
        self.source = source
        self._commit = redis.register_script(_COMMIT_LUA)

    def stamp(self, message: Message) -> Message:
        """The message with this process as its source."""
        return message if message.source else message.model_copy(update={"source": self.source})

    async def append(self, stream: str, *messages: Message, maxlen: int = 0) -> list[str]:
        async with self.redis.pipeline(transaction=True) as pipe:
            for message in messages:
                if maxlen:
                    pipe.xadd(stream, encode(self.stamp(message)), maxlen=maxlen, approximate=True)
                else:
                    pipe.xadd(stream, encode(self.stamp(message)))
            return [str(entry_id) for entry_id in await pipe.execute()]

    async def commit(
        self,
        appends: Sequence[Append],
        *,
        ack: Ack | None = None,
        fence_token: str | None = None,
        expect_last: str | None = None,
        dedupe_id: str | None = None,
    ) -> CommitResult:
        """Commit effects (and an acknowledgement) atomically. ``dedupe_id`` names the handling
        of one message by one group (``<group>:<message id>``): a second commit under it appends
        nothing."""
        keys = [
            self.keys.fence,
            self.keys.events,
            ack.stream if ack else self.keys.events,
            self.keys.done(dedupe_id) if dedupe_id else self.keys.done("-"),
        ]
        args: list[Any] = [
            fence_token or "",
            expect_last or "",
            ack.group if ack else "",
            ack.entry_id if ack else "",
            DEDUPE_TTL_S if dedupe_id else "",
            len(appends),
        ]
        for item in appends:
            keys.append(item.stream)
            fields = encode(self.stamp(item.message))
            args += [item.maxlen, len(fields)]
            for name, value in fields.items():
                args += [name, value]
        try:
            reply = await self._commit(keys=keys, args=args)
        except ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise Fenced(str(exc)) from exc
            raise
        status = str(reply[0])
        if status == "CONFLICT":
            return CommitResult(status, last_id=str(reply[1]))
        return CommitResult(status, tuple(str(x) for x in reply[1:]))

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
            page = await self.redis.xrange(stream, min=start, max=until, count=PAGE)
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
