"""The audit trail: the log's hash chain, its verification, archives, and the one history they form.

Every entry of the log carries ``hash``: SHA-1 over the hash of the entry before it (empty for the
first), the entry id and every other field, in order, each length-prefixed (the Lua in
:mod:`events.scripts` computes it inside Redis, where SHA-1 is the hash scripts have). A compact entry
(see :mod:`events.codec`) stores the 20 bytes of its hash in URL-safe base64 and not the hash
before it, which is its predecessor's ``hash``; an envelope entry, as written before compact
entries, stores both as hex, the one before as ``prev``. Both kinds chain on whatever the entry
before stored, so a log may hold both. Editing, removing, inserting or reordering an entry breaks
the chain at that entry.

Entries older than the retention policy are written to compressed JSON-lines archives (with their
chain fields) before they are trimmed; :func:`history` reads the archives and the live log as one.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from redis.typing import EncodableT, FieldT

from events.bus import MAX_SEQ, Bus, Entry, entry_id_key, next_id
from events.codec import entry_type
from events.connection import text, text_hash

CHAIN_FIELDS = ("prev", "hash")
ARCHIVE_BATCH = 2000  # archived entries read per step off the event loop
LIVE = "redis"  # where a live entry is, in reports


def _digest(prev: str, entry_id: str, fields: Mapping[str, str]) -> bytes:
    parts = [prev, entry_id]
    for name, value in fields.items():
        if name not in CHAIN_FIELDS:
            parts.append(f"{len(name.encode())}:{name}={len(value.encode())}:{value}")
    # SHA-1 because it is what Redis scripts offer; finding a second entry with a given hash is
    # still out of reach, which is what an edit would need.
    return hashlib.sha1("\n".join(parts).encode(), usedforsecurity=False).digest()


def is_compact(fields: Mapping[str, str]) -> bool:
    """A compact entry: it does not store the hash before it (see :mod:`events.codec`)."""
    return "at" in fields and "prev" not in fields


def entry_hash(prev: str, entry_id: str, fields: Mapping[str, str]) -> str:
    """The hash of an entry after ``prev``, as its layout stores it: the 20 bytes in URL-safe
    base64 for a compact entry, in hex for an envelope entry."""
    digest = _digest(prev, entry_id, fields)
    if is_compact(fields):
        return base64.urlsafe_b64encode(digest)[:27].decode()
    return digest.hex()


# --- archives -----------------------------------------------------------------------------------


def _archive_name(first: str, last: str) -> str:
    return f"events-{first}--{last}.jsonl.gz"


def archive_range(path: Path) -> tuple[str, str]:
    """The first and last entry ids an archive file holds, from its name."""
    stem = path.name.removeprefix("events-").removesuffix(".jsonl.gz")
    first, _, last = stem.partition("--")
    return first, last


def archive_files(directory: Path | None) -> list[Path]:
    """Archive files in log order."""
    if directory is None or not directory.is_dir():
        return []
    files = [p for p in directory.glob("events-*--*.jsonl.gz") if p.is_file()]
    return sorted(files, key=lambda p: entry_id_key(archive_range(p)[0]))


def write_archive(directory: Path, entries: list[Entry]) -> Path:
    """Write entries to a new archive file, durably (temporary file, fsync, rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _archive_name(entries[0].entry_id, entries[-1].entry_id)
    partial = path.with_suffix(".partial")
    with partial.open("wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
            for entry in entries:
                line = json.dumps({"id": entry.entry_id, "fields": entry.fields}, separators=(",", ":"))
                out.write(line.encode() + b"\n")
        raw.flush()
        os.fsync(raw.fileno())
    partial.rename(path)
    return path


def read_archive(path: Path) -> Iterator[list[Entry]]:
    """An archive's entries, in batches."""
    batch: list[Entry] = []
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            batch.append(Entry(str(path), record["id"], record["fields"]))
            if len(batch) >= ARCHIVE_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def is_after(entry_id: str, bound: str) -> bool:
    return bound in ("0", "0-0", "-") or entry_id_key(entry_id) > entry_id_key(bound)


def is_within(entry_id: str, until: str) -> bool:
    return until == "+" or entry_id_key(entry_id) <= entry_id_key(until)


async def history(bus: Bus, after: str = "0-0", until: str = "+") -> AsyncIterator[Entry]:
    """The log's entries after ``after`` (exclusive) up to ``until``: archived ones (from
    ``bus.archive_dir``) first, then the live ones; an archived entry's ``stream`` is its file."""
    archived_to = after
    for path in archive_files(bus.archive_dir):
        first, last = archive_range(path)
        if not is_after(last, after):
            continue
        if not is_within(first, until):
            break
        batches = read_archive(path)
        while batch := await anyio.to_thread.run_sync(next, batches, None):
            for entry in batch:
                if is_after(entry.entry_id, after) and is_within(entry.entry_id, until):
                    yield entry
        if is_after(last, archived_to):
            archived_to = last
    async for entry in bus.entries(bus.keys.events, after=archived_to, until=until):
        yield entry


# --- verification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Break:
    entry_id: str
    where: str  # "redis", or the archive file
    reason: str


@dataclass
class Verification:
    """Walks the history in order and finds the first entry where the chain breaks."""

    checked: int = 0  # entries on the chain, checked
    unchained: int = 0  # entries from before the chain began (a log of an older release)
    head_id: str | None = None
    head_hash: str = ""
    starts_after: str | None = None  # the history starts after this (archived, not found) entry
    first_break: Break | None = None
    _started: bool = field(default=False, repr=False)

    def expect_start(self, entry_id: str, entry_hash_: str) -> None:
        """The history begins after an entry that is not at hand (trimmed; archive not found)."""
        self.starts_after, self.head_id, self.head_hash, self._started = entry_id, entry_id, entry_hash_, True

    def feed(self, entry: Entry) -> bool:
        """Check one entry; False once the chain is broken (the first break is kept)."""
        if self.first_break is not None:
            return False
        where = LIVE if entry.stream.endswith(":events") else entry.stream
        prev, stated = entry.fields.get("prev"), entry.fields.get("hash")
        if stated is None or (prev is None and not is_compact(entry.fields)):
            if self._started:
                return self._broken(entry, where, "carries no hash: appended outside the chain, or its hash removed")
            self.unchained += 1
            self.head_id = entry.entry_id
            return True
        if self.head_id is not None and not is_after(entry.entry_id, self.head_id):
            return self._broken(entry, where, f"is out of order: it comes after {self.head_id}")
        if prev is None:
            if entry_hash(self.head_hash, entry.entry_id, entry.fields) != stated:
                if not self._started:
                    cause = "the entry was altered, or entries before it were removed"
                else:
                    cause = f"the entry was altered, or entries after {self.head_id} were removed or inserted"
                return self._broken(entry, where, f"does not match its hash: {cause}")
        elif entry_hash(prev, entry.entry_id, entry.fields) != stated:
            return self._broken(entry, where, "does not match its hash: the entry was altered")
        elif prev != self.head_hash:
            if self._started:
                reason = f"does not follow {self.head_id}: entries between them were removed or inserted"
            else:
                reason = "follows an entry that is not in the history: entries before it were removed"
            return self._broken(entry, where, reason)
        self._started = True
        self.head_id, self.head_hash = entry.entry_id, stated
        self.checked += 1
        return True

    def expect_head(self, chain_head_id: str | None) -> None:
        """The chain's head as Redis records it must be the last entry seen."""
        if self.first_break is None and chain_head_id and chain_head_id != self.head_id:
            self.first_break = Break(
                chain_head_id, LIVE, f"is the chain's head, but the log ends at {self.head_id}: entries were removed"
            )

    def _broken(self, entry: Entry, where: str, reason: str) -> bool:
        self.first_break = Break(entry.entry_id, where, f"entry {entry.entry_id} {reason}")
        return False

    @property
    def intact(self) -> bool:
        return self.first_break is None


async def verify(bus: Bus) -> Verification:
    """Walk the archives and the live log, checking the chain from its first entry to its head."""
    chain = text_hash(await bus.redis.hgetall(bus.keys.chain))
    result = Verification()
    files = archive_files(bus.archive_dir)
    archived_id = chain.get("archived_id")
    if archived_id and not any(is_within(archived_id, archive_range(p)[1]) for p in files):
        result.expect_start(archived_id, chain.get("archived_hash", ""))
        after = archived_id
    else:
        after = "0-0"
    async for entry in history(bus, after=after):
        if not result.feed(entry):
            break
    result.expect_head(chain.get("id"))
    return result


# --- retention ----------------------------------------------------------------------------------

ARCHIVE_FILE_MAX = 100_000  # entries per archive file


@dataclass(frozen=True)
class Archived:
    files: tuple[Path, ...] = ()
    entries: int = 0
    kept_from: str | None = None  # the live log now starts at or after this id
    held_back: str = ""  # why fewer entries than the policy allows were archived


async def _readers_bound(bus: Bus) -> tuple[str, str]:
    """The oldest entry some reader may still need: no consumer group's undelivered or pending
    entry, and nothing after the stored snapshot, may leave the live log (a reader starting
    afresh loads the snapshot and reads the log after it)."""
    events = bus.keys.events
    bounds: list[tuple[str, str]] = []
    position = text(await bus.redis.hget(bus.keys.snapshot, "position"))
    bounds.append((next_id(position) if position else "0-1", "no snapshot yet" if not position else "the snapshot"))
    for group in await bus.redis.xinfo_groups(events):
        bounds.append((next_id(group["last-delivered-id"]), f"group {group['name']}"))
        if group["pending"]:
            summary = await bus.redis.xpending(events, group["name"])
            bounds.append((summary["min"], f"group {group['name']}'s pending entries"))
    return min(bounds, key=lambda b: entry_id_key(b[0]))


async def archive_and_trim(bus: Bus, *, max_age_s: float | None, max_entries: int | None, now_ms: int) -> Archived:
    """Archive the entries past the retention policy (older than ``max_age_s``, or beyond the
    newest ``max_entries``), then trim them from the live log. Entries a reader may still need
    stay. Safe to repeat after a crash: entries already archived are trimmed, not archived twice."""
    assert bus.archive_dir is not None
    events = bus.keys.events
    if not await bus.redis.exists(events):
        return Archived()
    chain = text_hash(await bus.redis.hgetall(bus.keys.chain))
    archived_to = chain.get("archived_id", "0-0")
    files = archive_files(bus.archive_dir)
    if files and is_after(archive_range(files[-1])[1], archived_to):
        archived_to = archive_range(files[-1])[1]
    bound, bound_reason = await _readers_bound(bus)
    age_cutoff = (now_ms - int(max_age_s * 1000), 0) if max_age_s is not None else None
    excess = max(0, await bus.redis.xlen(events) - max_entries) if max_entries is not None else 0

    def past_policy(entry_id: str, index: int) -> bool:
        return (age_cutoff is not None and entry_id_key(entry_id) < age_cutoff) or index < excess

    written: list[Path] = []
    count, held_back, last = 0, "", None
    batch: list[Entry] = []
    async for entry in bus.entries(events, after=archived_to):
        if not past_policy(entry.entry_id, count):
            break
        if entry_id_key(entry.entry_id) >= entry_id_key(bound):
            held_back = f"entries from {entry.entry_id} on are still needed by {bound_reason}"
            break
        batch.append(entry)
        count += 1
        if len(batch) >= ARCHIVE_FILE_MAX:
            written.append(await anyio.to_thread.run_sync(write_archive, bus.archive_dir, batch))
            last, batch = batch[-1], []
    if batch:
        written.append(await anyio.to_thread.run_sync(write_archive, bus.archive_dir, batch))
        last = batch[-1]
    if last is None and files and chain.get("archived_id") != archived_to:
        # archived by an earlier run that stopped before trimming
        last = [entry for batch in read_archive(files[-1]) for entry in batch][-1]
    chain_fields: dict[FieldT, EncodableT] = {}
    if last is not None:
        archived_to = last.entry_id
        chain_fields = {"archived_id": last.entry_id, "archived_hash": last.fields.get("hash", "")}
    kept_from = None
    if archived_to not in ("0-0", ""):
        kept_from = next_id(archived_to)
        async with bus.redis.pipeline(transaction=True) as pipe:
            if chain_fields:
                pipe.hset(bus.keys.chain, mapping=chain_fields)
            pipe.xtrim(events, minid=kept_from, approximate=False)
            await pipe.execute()
    return Archived(tuple(written), count, kept_from, held_back)


# --- queries ------------------------------------------------------------------------------------


def _key(entry_id: str, open_end: tuple[int, int]) -> tuple[int, int]:
    return open_end if entry_id in ("+", "-") else entry_id_key(entry_id)


@dataclass(frozen=True)
class Query:
    """Which entries of the history to read: by job, type, time and entry-id range."""

    job_id: str | None = None
    types: tuple[str, ...] = ()  # exact types, or prefixes ending in '*' ("job.*")
    since_ms: int | None = None  # append time, inclusive
    until_ms: int | None = None  # append time, inclusive
    after: str = "0-0"  # entry id, exclusive
    until: str = "+"  # entry id, inclusive

    def bounds(self) -> tuple[str, str]:
        after, until = self.after, self.until
        too_late = self.since_ms is not None and self.since_ms > MAX_SEQ
        if too_late or (self.until_ms is not None and self.until_ms < 0):
            return "0-0", "0-0"  # no entry id lies there: an empty range, not one Redis refuses
        if self.since_ms is not None and self.since_ms > 0:
            since = f"{self.since_ms - 1}-{MAX_SEQ}"
            if entry_id_key(since) > _key(after, (0, 0)):
                after = since
        if self.until_ms is not None and self.until_ms < MAX_SEQ:
            limit = f"{self.until_ms}-{MAX_SEQ}"
            if entry_id_key(limit) < _key(until, (MAX_SEQ, MAX_SEQ)):
                until = limit
        return after, until

    def matches(self, entry: Entry) -> bool:
        if self.job_id is not None and entry.fields.get("job_id") != self.job_id:
            return False
        return type_matches(self.types, entry_type(entry.fields))


def type_matches(patterns: tuple[str, ...], type_: str) -> bool:
    """No patterns match every type; a pattern is a type, or a prefix ending in '*'."""
    return not patterns or any(type_ == p or (p.endswith("*") and type_.startswith(p[:-1])) for p in patterns)


async def query(bus: Bus, q: Query) -> AsyncIterator[Entry]:
    """The entries of the history (archives, then the live log) that ``q`` selects, in order."""
    after, until = q.bounds()
    if _key(after, (0, 0)) >= _key(until, (MAX_SEQ, MAX_SEQ)):
        return
    async for entry in matching(history(bus, after=after, until=until), q):
        yield entry


async def matching(entries: AsyncIterator[Entry], q: Query) -> AsyncIterator[Entry]:
    """The entries ``q`` selects by job and type (its range is the reader's to apply)."""
    async for entry in entries:
        if q.matches(entry):
            yield entry
