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

from events import connection
from events.codec import TYPE_CODES, DecodeError, decode, encode, encode_fact
from events.errors import EventsError
from events.keys import Keys
from events.messages import Message

DEDUPE_TTL_S = 7 * 24 * 3600
PAGE = 1000
log = structlog.get_logger("events.bus")

# Appends to the log go through this: each entry carries ``hash`` = SHA-1 of (the previous entry's
# hash, entry id, fields), computed inside Redis so that concurrent writers cannot fork the chain,
# stored as its 20 bytes in URL-safe base64. The previous hash is not stored again: it is the
# entry before's. The entry id is chosen here (as XADD * would) so that it is hashed too.
_CHAIN_LUA = """
local floor = math.floor

local function b64_48(B, n)  -- 48 bits (12 hex digits, exact in a Lua number) in 8 characters
  return B[floor(n / 4398046511104)] .. B[floor(n / 68719476736) % 64] .. B[floor(n / 1073741824) % 64]
    .. B[floor(n / 16777216) % 64] .. B[floor(n / 262144) % 64] .. B[floor(n / 4096) % 64]
    .. B[floor(n / 64) % 64] .. B[n % 64]
end

local function sha1_b64(B, text)
  -- SHA-1 of text: its 20 bytes in URL-safe base64 without padding, 27 characters
  local hex = redis.sha1hex(text)
  local last = tonumber(string.sub(hex, 37, 40), 16) * 4  -- 16 bits and 2 zero bits: 3 characters
  return b64_48(B, tonumber(string.sub(hex, 1, 12), 16)) .. b64_48(B, tonumber(string.sub(hex, 13, 24), 16))
    .. b64_48(B, tonumber(string.sub(hex, 25, 36), 16)) .. B[floor(last / 4096)] .. B[floor(last / 64) % 64]
    .. B[last % 64]
end

local function last_generated(events)
  local info = redis.pcall('XINFO', 'STREAM', events)
  if info.err then return '0-0' end
  for i = 1, #info, 2 do if info[i] == 'last-generated-id' then return info[i + 1] end end
  return '0-0'
end

local function chain_open(events, chain)
  local head = redis.call('HMGET', chain, 'id', 'hash')
  local last_id = head[1] or last_generated(events)
  local t = redis.call('TIME')
  local ms, seq = string.match(last_id, '^(%d+)-(%d+)$')
  -- the base64 alphabet, for the hashes (a table made on each call: here, only for appends)
  local B64 = {[0] = 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O',
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h',
    'i', 'j', 'k', 'l', 'm', 'n', 'o', 'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', '0',
    '1', '2', '3', '4', '5', '6', '7', '8', '9', '-', '_'}
  return {events = events, key = chain, prev = head[2] or '', last_ms = tonumber(ms), b64 = B64,
          last_seq = tonumber(seq), now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
end

local function chain_add(c, kind, job_id, data, at)
  -- every entry of ours has four fields, type, job_id, data and at (events.codec.encode_fact)
  if c.now > c.last_ms then
    c.last_ms, c.last_seq, c.ms = c.now, 0, nil
  else
    c.last_seq = c.last_seq + 1
  end
  c.ms = c.ms or string.format('%.0f', c.last_ms)
  local id = c.ms .. '-' .. string.format('%.0f', c.last_seq)
  local hashed = sha1_b64(c.b64, c.prev .. '\\n' .. id .. '\\n4:type=' .. #kind .. ':' .. kind
    .. '\\n6:job_id=' .. #job_id .. ':' .. job_id .. '\\n4:data=' .. #data .. ':' .. data
    .. '\\n2:at=' .. #at .. ':' .. at)
  local ok = redis.pcall('XADD', c.events, id, 'type', kind, 'job_id', job_id, 'data', data, 'at', at,
    'hash', hashed)
  if type(ok) == 'table' and ok.err then
    -- an entry appended outside the chain holds a later id: go on after it
    local ms, seq = string.match(last_generated(c.events), '^(%d+)-(%d+)$')
    c.last_ms, c.last_seq, c.now, c.ms = tonumber(ms), tonumber(seq), 0, nil
    return chain_add(c, kind, job_id, data, at)
  end
  c.prev, c.id, c.count = hashed, id, (c.count or 0) + 1
  return id
end

local function chain_close(c)
  if c.id then redis.call('HSET', c.key, 'id', c.id, 'hash', c.prev) end
end
"""

_APPEND_LUA = (
    _CHAIN_LUA
    + """
-- KEYS: events, chain; ARGV: per entry: type, job_id, data, at
local c = chain_open(KEYS[1], KEYS[2])
local reply = {}
for i = 1, #ARGV, 4 do
  reply[#reply + 1] = chain_add(c, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
end
chain_close(c)
return reply
"""
)

_COMMIT_LUA = (
    _CHAIN_LUA
    + """
-- KEYS: fence, events, chain, then one key per dedupe id, then each stream acknowledged in or
--       appended to (once each)
-- ARGV: token, expected_last, dedupe_ttl, n_dedupe, reader_group, maxlens, acks, appends, body,
--       tolerated, touched, most
--   maxlens: per stream, its cap (0: none), space-separated
--   acks:    per run of acknowledgements, 'stream group id id ...', runs separated by ';'
--   appends: per entry 'stream n_type n_job_id n_data n_at', space-separated; the four fields
--            follow each other in body, their lengths in bytes (a stream is its position among the
--            KEYS); at is empty, and not written, for a stream other than the log
--   tolerated, touched, most: with expected_last, entries appended after it are passed over
--            (not a conflict) when there are at most ``most``, each of a type in ``tolerated``
--            and of a job not in ``touched`` (both space-separated); the reply carries them
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the fencing token moved on: this scheduler is no longer the leader')
end
local passed = {}
if ARGV[2] ~= '' then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  local last_id = '0-0'
  if #last > 0 then last_id = last[1][1] end
  if last_id ~= ARGV[2] then
    -- Entries appended since may be passed over when each is of a type the committer tolerates
    -- and about a job its decisions do not touch; they are returned, to be folded first.
    if ARGV[10] == '' then return {'CONFLICT', last_id} end
    local tolerated, touched = {}, {}
    for word in string.gmatch(ARGV[10], '%S+') do tolerated[word] = true end
    for word in string.gmatch(ARGV[11], '%S+') do touched[word] = true end
    local most = tonumber(ARGV[12])
    passed = redis.call('XRANGE', KEYS[2], '(' .. ARGV[2], '+', 'COUNT', most + 1)
    if #passed > most then return {'CONFLICT', last_id} end
    for p = 1, #passed do
      local kind, job_id = nil, nil
      local f = passed[p][2]
      for j = 1, #f, 2 do
        if f[j] == 'type' then kind = f[j + 1] elseif f[j] == 'job_id' then job_id = f[j + 1] end
      end
      if not kind or not tolerated[kind] or not job_id or job_id == '' or touched[job_id] then
        return {'CONFLICT', last_id}
      end
    end
  end
end
local n_dedupe = tonumber(ARGV[4])
local streams_from = 3 + n_dedupe
local function ack_all()
  for run in string.gmatch(ARGV[7], '[^;]+') do
    local words = {}
    for word in string.gmatch(run, '%S+') do words[#words + 1] = word end
    local stream = KEYS[streams_from + tonumber(words[1])]
    for from = 3, #words, 1000 do
      redis.call('XACK', stream, words[2], unpack(words, from, math.min(#words, from + 999)))
    end
  end
end
if n_dedupe > 0 then
  local seen = {}
  for d = 1, n_dedupe do
    if redis.call('EXISTS', KEYS[3 + d]) == 1 then seen[#seen + 1] = d - 1 end
  end
  if #seen == n_dedupe then
    ack_all()
    return {'DUPLICATE'}
  end
  if #seen > 0 then return {'SOME_DUPLICATE', unpack(seen)} end
  for d = 1, n_dedupe do redis.call('SET', KEYS[3 + d], '1', 'EX', ARGV[3]) end
end
local maxlens = {}
for cap in string.gmatch(ARGV[6], '%d+') do maxlens[#maxlens + 1] = cap end
local reply = {'OK', 0, passed}
local chain = nil
local body, at = ARGV[9], 1
for target, n_kind, n_job, n_data, n_at in string.gmatch(ARGV[8], '(%d+) (%d+) (%d+) (%d+) (%d+)') do
  local kind = string.sub(body, at, at + n_kind - 1)
  at = at + n_kind
  local job_id = string.sub(body, at, at + n_job - 1)
  at = at + n_job
  local data = string.sub(body, at, at + n_data - 1)
  at = at + n_data
  local time = string.sub(body, at, at + n_at - 1)
  at = at + n_at
  local t = tonumber(target)
  local stream = KEYS[streams_from + t]
  if stream == KEYS[2] then
    if chain == nil then chain = chain_open(KEYS[2], KEYS[3]) end
    reply[#reply + 1] = chain_add(chain, kind, job_id, data, time)
  elseif maxlens[t] ~= '0' then
    reply[#reply + 1] = redis.call('XADD', stream, 'MAXLEN', '~', maxlens[t], '*',
      'type', kind, 'job_id', job_id, 'data', data)
  else
    reply[#reply + 1] = redis.call('XADD', stream, '*', 'type', kind, 'job_id', job_id, 'data', data)
  end
end
if chain ~= nil then chain_close(chain) end
ack_all()
-- The committer's own group need not read back what it appended: when that group had been
-- given everything up to the expected last entry, move it past the appended facts.
if ARGV[5] ~= '' and ARGV[2] ~= '' and chain ~= nil and #passed == 0 then
  local groups = redis.call('XINFO', 'GROUPS', KEYS[2])
  for g = 1, #groups do
    local info = {}
    for f = 1, #groups[g], 2 do info[groups[g][f]] = groups[g][f + 1] end
    if info['name'] == ARGV[5] and info['last-delivered-id'] == ARGV[2] then
      if type(info['entries-read']) == 'number' then
        redis.call('XGROUP', 'SETID', KEYS[2], ARGV[5], chain.id, 'ENTRIESREAD', info['entries-read'] + chain.count)
      else
        redis.call('XGROUP', 'SETID', KEYS[2], ARGV[5], chain.id)
      end
      reply[2] = 1
    end
  end
end
return reply
"""
)


class BusError(EventsError):
    """Root of the errors raised by the event bus."""


class Fenced(BusError):
    """A write of a scheduler that is no longer the leader was refused."""


class NotReplicated(BusError, RedisError):
    """Commands were appended, but fewer replicas than asked confirmed them in time: a failover
    could lose them, so they are not acknowledged (whether they take effect is unknown)."""


# Commands appended in one step, when they must then wait for replicas (a transaction's WAIT
# would not wait). KEYS[1]: the stream; ARGV: per entry, its number of fields, then field, value...
_XADD_ALL_LUA = """
local ids, i = {}, 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, i + 2 * n))
  i = i + 1 + 2 * n
end
return ids
"""


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
        self._commit = redis.register_script(_COMMIT_LUA)
        self._append_events = redis.register_script(_APPEND_LUA)
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
                await self.script(_XADD_ALL_LUA)(keys=[stream], args=args, client=pipe)
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
