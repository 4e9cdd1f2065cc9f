"""Both layouts of the log's entries (events.codec): a log written before compact entries, and
one where writers of both layouts took turns, verify, fold, replay and rebuild, from Redis and from
archives; the fold collapses progress runs in either layout."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from events import audit, codec
from events import messages as m
from events.bus import Bus, Entry
from events.log import _parse, _read_page, catch_up, collapse
from events.state import State
from tests.test_fold import by_entry, random_log

DATA = Path(__file__).parent / "data"
# The append script of the release before compact entries, verbatim: envelope entries with prev
# and hash in hex.
ENVELOPE_APPEND = (DATA / "chain-append-envelope.lua").read_text()


async def append_envelopes(bus: Bus, messages: Sequence[m.Message]) -> list[str]:
    """Append facts as a writer of the release before compact entries did."""
    args: list[str] = []
    for message in messages:
        args += codec.encode(message, bus.source).values()
    ids = await bus.script(ENVELOPE_APPEND)(keys=[bus.keys.events, bus.keys.chain], args=args)
    return [str(i) for i in ids]


async def load_recorded(bus: Bus, name: str) -> list[dict[str, Any]]:
    """A recorded log put back into Redis as its writer left it (the entries, the chain's head)."""
    records = [json.loads(line) for line in (DATA / name).read_text().splitlines()]
    for record in records:
        await bus.redis.xadd(bus.keys.events, record["fields"], id=record["id"])
    await bus.redis.hset(bus.keys.chain, mapping={"id": records[-1]["id"], "hash": records[-1]["fields"]["hash"]})
    return records


def statuses(state: State) -> dict[str, tuple[str, str]]:
    return {job_id[:6]: (job.status.value, job.export.status.value) for job_id, job in state.jobs.items()}


async def test_a_log_written_before_compact_entries_verifies_folds_replays_and_rebuilds(
    bus: Bus, tmp_path: Path
) -> None:
    # Given a log recorded by the release before compact entries (envelopes chained in hex): a
    # job trained (progress with every metric and an evaluation), checkpointed, succeeded and was
    # exported; one was cancelled while running; one failed and was deleted
    records = await load_recorded(bus, "log-json-chained.jsonl")
    assert all("prev" in r["fields"] and "at" not in r["fields"] for r in records)
    # Then it verifies, whole
    report = await audit.verify(bus)
    assert report.intact and report.checked == len(records) == 39 and report.unchained == 0
    # And every entry replays, as the message it was, and as the envelope it was stored as
    entries = [e async for e in audit.history(bus)]
    for entry in entries:
        message = codec.decode(entry.fields)
        assert codec.envelope_json(entry.fields) == entry.fields["data"]
        assert codec.decode(codec.encode(message)) == message  # (fields added since, at their defaults)
    # And the fold, fast and entry by entry, ends as the jobs did
    state = State()
    assert await catch_up(bus, state) == 39
    assert state.model_dump() == by_entry(entries).model_dump()
    assert statuses(state) == {"ea2154": ("completed", "completed"), "21ea2a": ("cancelled", "none")}
    assert [d[:6] for d in state.deleted] == ["174021"] and state.stale_reports == 0
    # When this release appends after it
    job = next(iter(state.jobs))
    new = await bus.append(bus.keys.events, m.JobPriorityChanged(job_id=job, priority=7, previous=5))
    # Then the compact entry chains on the last envelope, and the whole log verifies
    [(_, fields)] = await bus.redis.xrange(bus.keys.events, min=new[0], max=new[0])
    assert "prev" not in fields and fields["hash"] == audit.entry_hash(records[-1]["fields"]["hash"], new[0], fields)
    report = await audit.verify(bus)
    assert report.intact and report.checked == 40 and report.head_id == new[0]
    # And archived and trimmed, it rebuilds and verifies from the archive
    entries = [e async for e in audit.history(bus)]
    audit.write_archive(tmp_path, entries[:39])
    await bus.redis.xtrim(bus.keys.events, minid=new[0])
    bus.archive_dir = tmp_path
    rebuilt = State()
    assert await catch_up(bus, rebuilt) == 40
    assert rebuilt.model_dump() == by_entry(entries).model_dump()
    report = await audit.verify(bus)
    assert report.intact and report.checked == 40


class ChainedXadd:
    """A client whose XADD to the log appends on the chain, as a writer of the release before
    compact entries (the fold test's log adds unreadable entries that way)."""

    def __init__(self, bus: TakingTurns, client: Any) -> None:
        self.bus, self.client = bus, client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    async def xadd(self, name: str, fields: dict[str, str], **options: Any) -> str:
        assert name == self.bus.keys.events and not options
        data = fields["data"]
        if self.bus.json_only and data == "{not json":
            data = '{"type":"job.progress","v":1,"payload":{}}'
        script = self.bus.script(ENVELOPE_APPEND)
        [entry_id] = await script(keys=[name, self.bus.keys.chain], args=[fields["type"], fields["job_id"], data])
        self.bus.appended.append((str(entry_id), None))
        return str(entry_id)


class TakingTurns(Bus):
    """Appends to the log in either layout, by turns drawn at random (writers of two releases
    sharing one log, as during an upgrade), and sometimes a chained compact entry that cannot be
    read: a progress report whose data is cut off (unless ``json_only``), or lacks its step. (A
    page of the log with data that is not JSON is folded entry by entry.)"""

    def __init__(self, bus: Bus, seed: int, *, json_only: bool) -> None:
        super().__init__(bus.redis, bus.keys, "test@host")
        self.redis = ChainedXadd(self, bus.redis)  # type: ignore[assignment]
        self.json_only = json_only
        self.rng = random.Random(seed)
        self.appended: list[tuple[str, m.Message | None]] = []  # entry id, message (None: unreadable)

    async def append(self, stream: str, *messages: m.Message, maxlen: int = 0) -> list[str]:
        assert stream == self.keys.events
        if messages and isinstance(messages[0], m.JobProgress) and self.rng.random() < 0.05:
            progress = messages[0]
            cut = codec.encode_fact(progress, self.source)
            data = self.rng.choice(
                [*([] if self.json_only else [cut[2][:-5]]), json.dumps([[progress.attempt], "x" * 22])]
            )
            [entry_id] = await self._append_events(
                keys=[self.keys.events, self.keys.chain], args=[cut[0], cut[1], data, cut[3]]
            )
            self.appended.append((str(entry_id), None))
        if self.rng.random() < 0.5:
            ids = await append_envelopes(self, messages)
        else:
            ids = [str(i) for i in await self.append_events(messages)]
        self.appended += zip(ids, messages, strict=True)
        return ids


@pytest.mark.parametrize(("seed", "json_only"), [(0, False), (1, False), (2, True), (3, True)])
async def test_a_log_of_both_layouts_verifies_folds_replays_and_rebuilds(
    bus: Bus, seed: int, json_only: bool, tmp_path: Path
) -> None:
    # Given a log written by writers of both layouts taking turns: jobs training side by side,
    # stale and refused reports, unreadable entries, retries, node events
    mixed = TakingTurns(bus, seed, json_only=json_only)
    await random_log(mixed, seed)
    entries = [e async for e in audit.history(bus)]
    if json_only:  # the fold collapses runs inside Redis (a page with data not JSON: entry by entry)
        _, _, read, kept = await _read_page(bus, "-", "+")
        assert read == len(entries) and len(json.loads(kept)) < read * 0.8
    compact = [e for e in entries if audit.is_compact(e.fields)]
    assert 0.3 < len(compact) / len(entries) < 0.7
    # Then the chain verifies across every change of layout
    report = await audit.verify(bus)
    assert report.intact, report.first_break
    assert report.checked == len(entries) and report.head_id == entries[-1].entry_id
    # And every entry replays as the message appended, in either layout
    by_id = dict(mixed.appended)
    assert list(by_id) == [e.entry_id for e in entries]
    for entry in entries:
        message = by_id[entry.entry_id]
        if message is None:
            with pytest.raises(codec.DecodeError):
                codec.decode(entry.fields)
        else:
            expected = message.model_copy(update={"source": message.source or "test@host"})
            assert codec.decode(entry.fields) == expected
            assert codec.envelope_json(entry.fields) == codec.encode(expected)["data"]
    # And the fast fold equals the entry-by-entry fold, from Redis
    expected_state = by_entry(entries)
    assert expected_state.stale_reports > 0
    fast = State()
    assert await catch_up(bus, fast) == len(entries)
    assert fast.model_dump() == expected_state.model_dump()
    assert (fast.position, fast.stale_reports) == (expected_state.position, expected_state.stale_reports)
    # And from archives and the live log after them, where verify reads too
    third = len(entries) // 3
    audit.write_archive(tmp_path, entries[:third])
    audit.write_archive(tmp_path, entries[third : 2 * third])
    await bus.redis.xtrim(bus.keys.events, minid=entries[2 * third].entry_id)
    bus.archive_dir = tmp_path
    rebuilt = State()
    assert await catch_up(bus, rebuilt) == len(entries)
    assert rebuilt.model_dump() == expected_state.model_dump()
    report = await audit.verify(bus)
    assert report.intact and report.checked == len(entries)


def progress(job_id: str, step: int) -> m.JobProgress:
    return m.JobProgress(job_id=job_id, attempt=2, step=step, max_steps=100, percent=float(step), loss=1 / step)


@pytest.mark.parametrize("layout", ["compact", "envelope"])
async def test_a_run_of_progress_reports_is_collapsed_in_redis_and_in_archives(
    bus: Bus, layout: str, tmp_path: Path
) -> None:
    # Given a run of 50 progress reports of one job's attempt, in one layout
    reports = [progress("j", step) for step in range(1, 51)]
    ids = await (bus.append(bus.keys.events, *reports) if layout == "compact" else append_envelopes(bus, reports))
    # Then the fold's page from Redis keeps only the last, standing for the 49 before it
    _, last, read, kept = await _read_page(bus, "-", "+")
    assert (last, read) == (ids[-1], 50)
    [item] = json.loads(kept)
    assert (item[0], item[2], item[3]) == (ids[-1], 49, ids[0])
    # And so does the fold of an archive of them
    entries: list[Entry] = [e async for e in bus.entries(bus.keys.events)]
    path = audit.write_archive(tmp_path, entries)
    lines = [_parse(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]
    assert {line.attempt for line in lines} == {"2"}
    [(line, superseded, first)] = list(collapse(lines))
    assert (line.entry_id, superseded, first) == (ids[-1], 49, ids[0])


async def test_an_edit_or_a_removal_is_found_in_either_layout(bus: Bus) -> None:
    # Given a log whose first half is envelopes and second half compact entries
    old = await append_envelopes(bus, [progress("j", s) for s in range(1, 11)])
    new = await bus.append(bus.keys.events, *(progress("j", s) for s in range(11, 21)))
    assert (await audit.verify(bus)).intact
    entries = dict(await bus.redis.xrange(bus.keys.events))

    async def broken_after(change: dict[str, dict[str, str]], removed: str | None = None) -> audit.Break:
        copy = Bus(bus.redis, type(bus.keys)(bus.keys.namespace + "x"), "test")
        for entry_id, fields in entries.items():
            if entry_id != removed:
                await bus.redis.xadd(copy.keys.events, {**fields, **change.get(entry_id, {})}, id=entry_id)
        await bus.redis.hset(copy.keys.chain, mapping=await bus.redis.hgetall(bus.keys.chain))
        report = await audit.verify(copy)
        await bus.redis.delete(copy.keys.events, copy.keys.chain)
        assert report.first_break is not None
        return report.first_break

    # Then an edit of either layout is named by its entry
    edited = json.loads(entries[old[4]]["data"])
    edited["payload"]["loss"] = 0.0
    found = await broken_after({old[4]: {"data": json.dumps(edited)}})
    assert found.entry_id == old[4] and "altered" in found.reason
    found = await broken_after({new[4]: {"job_id": "k"}})
    assert found.entry_id == new[4] and "altered" in found.reason
    found = await broken_after({new[4]: {"at": str(int(entries[new[4]]["at"]) + 1)}})
    assert found.entry_id == new[4] and "altered" in found.reason
    # And a removal breaks the chain at the next entry, whichever its layout
    found = await broken_after({}, removed=old[3])
    assert found.entry_id == old[4] and "removed" in found.reason
    found = await broken_after({}, removed=old[-1])
    assert found.entry_id == new[0] and "removed" in found.reason
    found = await broken_after({}, removed=new[3])
    assert found.entry_id == new[4] and "removed" in found.reason
    # And a compact entry given back a stored previous hash is no longer one of ours
    found = await broken_after({new[4]: {"prev": entries[new[3]]["hash"]}})
    assert found.entry_id == new[4]
