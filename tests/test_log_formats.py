"""The layouts of the log's entries (events.codec): a log written before compact entries, one
written before derived ids and type codes, and one where writers of every layout took turns,
verify, fold, replay and rebuild, from Redis and from archives; the fold collapses progress runs in
every layout; an edit of any field of an entry breaks the chain."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.types import ASGIApp, Message

from events import audit, codec
from events import messages as m
from events.bus import Bus, Entry
from events.describe import render
from events.log import _parse, _read_page, catch_up, collapse
from events.state import State
from services.config import load_settings
from services.gateway.app import create_app
from services.gateway.projection import Projection
from tests.test_fold import by_entry, random_log

DATA = Path(__file__).parent / "data"
# The append script of the release before compact entries, verbatim: envelope entries with prev
# and hash in hex.
ENVELOPE_APPEND = (DATA / "chain-append-envelope.lua").read_text()


def first_compact(message: m.Message, source: str) -> list[str]:
    """A message's compact entry as the release before derived ids and type codes wrote it (every
    id stored, as its runner made random ones; every type by name)."""
    _, job_id, data, at = codec.encode_fact(message, source)
    assert json.loads(data)[1:2] not in ([], [0]), "an id that release would have stored"
    return [message.type, job_id, data, at]


async def append_first_compact(bus: Bus, messages: Sequence[m.Message]) -> list[str]:
    """Append facts as a writer of the release before derived ids and type codes did."""
    args = [part for message in messages for part in first_compact(message, bus.source)]
    ids = await bus._append_events(keys=[bus.keys.events, bus.keys.chain], args=args)
    return [str(i) for i in ids]


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


async def test_a_log_written_before_derived_ids_and_type_codes_verifies_folds_replays_and_rebuilds(
    bus: Bus, tmp_path: Path
) -> None:
    # Given a log recorded by the release before derived ids and type codes: the messages of the
    # log above, as that release's compact entries (every type by name, every id stored)
    records = await load_recorded(bus, "log-compact-chained.jsonl")
    assert all(audit.is_compact(r["fields"]) and r["fields"]["type"] in m.message_types() for r in records)
    progress_ids = [json.loads(r["fields"]["data"])[1] for r in records if r["fields"]["type"] == "job.progress"]
    assert len(progress_ids) == 16 and all(type(i) is str and len(i) == 22 for i in progress_ids)
    # Then it verifies, whole
    report = await audit.verify(bus)
    assert report.intact and report.checked == len(records) == 39 and report.unchained == 0
    # And every entry replays as the message the envelope log holds, and as its envelope
    envelopes = [json.loads(line)["fields"] for line in (DATA / "log-json-chained.jsonl").read_text().splitlines()]
    entries = [e async for e in audit.history(bus)]
    for entry, envelope in zip(entries, envelopes, strict=True):
        message = codec.decode(entry.fields)
        assert message == codec.decode(envelope)
        assert codec.envelope_json(entry.fields) == codec.encode(message)["data"]
    # And the fold, fast and entry by entry, ends as the jobs did
    state = State()
    assert await catch_up(bus, state) == 39
    assert state.model_dump() == by_entry(entries).model_dump()
    assert statuses(state) == {"ea2154": ("completed", "completed"), "21ea2a": ("cancelled", "none")}
    assert [d[:6] for d in state.deleted] == ["174021"] and state.stale_reports == 0
    # When this release appends after it: a decision and a training step's report
    job = next(iter(state.jobs))
    report = m.JobProgress(id=codec.progress_id(job, 1, 13), job_id=job, attempt=1, step=13, max_steps=13)
    new = await bus.append(bus.keys.events, m.JobPriorityChanged(job_id=job, priority=7, previous=5), report)
    # Then its entries chain on the recorded ones, in this release's layout, and the whole log verifies
    [(_, fields)] = await bus.redis.xrange(bus.keys.events, min=new[1], max=new[1])
    assert (fields["type"], fields["data"]) == ("p", '[[1,13,13,0.0],0,"test"]')
    assert codec.decode(fields) == report.model_copy(update={"source": "test"})
    report = await audit.verify(bus)
    assert report.intact and report.checked == 41 and report.head_id == new[1]
    # And archived and trimmed, it rebuilds and verifies from the archive
    entries = [e async for e in audit.history(bus)]
    audit.write_archive(tmp_path, entries[:39])
    await bus.redis.xtrim(bus.keys.events, minid=new[0])
    bus.archive_dir = tmp_path
    rebuilt = State()
    assert await catch_up(bus, rebuilt) == 41
    assert rebuilt.model_dump() == by_entry(entries).model_dump()
    report = await audit.verify(bus)
    assert report.intact and report.checked == 41


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
    """Appends to the log in any layout, by turns drawn at random (writers of three releases
    sharing one log, as during upgrades; this release's gives half of the progress reports the id
    a runner derives), and sometimes a chained compact entry that cannot be read: a progress report
    whose data is cut off (unless ``json_only``), or lacks its step. (A page of the log with data
    that is not JSON is folded entry by entry.)"""

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
        turn = self.rng.random()
        if turn < 1 / 3:
            ids = await append_envelopes(self, messages)
        elif turn < 2 / 3:
            ids = await append_first_compact(self, messages)
        else:
            messages = tuple(self.rng.choice([message, derived(message)]) for message in messages)
            ids = [str(i) for i in await self.append_events(messages)]
        self.appended += zip(ids, messages, strict=True)
        return ids


def derived(message: m.Message) -> m.Message:
    """A progress report of a job with the id its job, attempt and step make (as a runner gives
    a training row's); any other message as it is."""
    if not isinstance(message, m.JobProgress) or not message.job_id:
        return message
    return message.model_copy(update={"id": codec.progress_id(message.job_id, message.attempt, message.step)})


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
    assert 0.5 < len(compact) / len(entries) < 0.8
    # Then the chain verifies across every change of layout
    report = await audit.verify(bus)
    assert report.intact, report.first_break
    assert report.checked == len(entries) and report.head_id == entries[-1].entry_id
    # And every entry replays as the message appended, in either layout
    by_id = dict(mixed.appended)
    assert list(by_id) == [e.entry_id for e in entries]
    # (progress reports of both compact layouts: by name, ids stored; by code, some ids derived)
    reports = [e.fields for e in compact if isinstance(by_id[e.entry_id], m.JobProgress)]
    coded = [json.loads(fields["data"]) for fields in reports if fields["type"] == "p"]
    assert 0.2 < len(coded) / len(reports) < 0.8
    assert 0.2 < sum(data[1:2] in ([], [0]) for data in coded) / len(coded) < 0.8
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


@pytest.mark.parametrize("layout", ["compact", "compact, ids stored", "first compact", "envelope"])
async def test_a_run_of_progress_reports_is_collapsed_in_redis_and_in_archives(
    bus: Bus, layout: str, tmp_path: Path
) -> None:
    # Given a run of 50 progress reports of one job's attempt, in one layout: this release's
    # (type by code; ids derived, or random), the release's before (type by name), the envelope
    reports = [progress("j", step) for step in range(1, 51)]
    if layout == "compact":
        ids = await bus.append(bus.keys.events, *map(derived, reports))
    elif layout == "compact, ids stored":
        ids = await bus.append(bus.keys.events, *reports)
    elif layout == "first compact":
        ids = await append_first_compact(bus, reports)
    else:
        ids = await append_envelopes(bus, reports)
    stored = {fields["type"] for _, fields in await bus.redis.xrange(bus.keys.events)}
    assert stored == {"p" if layout.startswith("compact") else "job.progress"}
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


@pytest.mark.parametrize("field", ["type", "job_id", "data", "at", "hash"])
async def test_an_edit_or_a_removal_of_any_field_of_an_entry_is_found(bus: Bus, field: str) -> None:
    # Given training steps' reports in this release's layout (the type by its code, the ids
    # derived, not stored)
    job = "f" * 32
    reports = [
        m.JobProgress(id=codec.progress_id(job, 1, s), job_id=job, attempt=1, step=s, max_steps=9, loss=1 / s)
        for s in range(1, 10)
    ]
    ids = await bus.append(bus.keys.events, *reports)
    entries = dict(await bus.redis.xrange(bus.keys.events))
    fields = entries[ids[4]]
    assert (fields["type"], json.loads(fields["data"])[1:]) == ("p", [0, "test"]) and (await audit.verify(bus)).intact

    async def broken_after(changed: dict[str, str]) -> audit.Break:
        copy = Bus(bus.redis, type(bus.keys)(bus.keys.namespace + "x"), "test")
        for entry_id, each in entries.items():
            await bus.redis.xadd(copy.keys.events, changed if entry_id == ids[4] else each, id=entry_id)
        await bus.redis.hset(copy.keys.chain, mapping=await bus.redis.hgetall(bus.keys.chain))
        report = await audit.verify(copy)
        await bus.redis.delete(copy.keys.events, copy.keys.chain)
        assert report.first_break is not None
        return report.first_break

    # When the field is edited: even to a value that reads as the same message (the type by
    # name, the id written out), or to another entry's
    edits = {
        "type": ["job.progress", "job.checkpoint_saved"],
        "job_id": ["e" * 32],
        "data": ['[[1,5,9,0.0,0.2],"=' + reports[4].id + '","test"]', entries[ids[5]]["data"]],
        "at": [str(int(fields["at"]) + 1), str(int(fields["at"]) - int(fields["at"]) // 2)],
        "hash": [entries[ids[5]]["hash"], "A" * 27],
    }[field]
    for edited in edits:
        # Then the chain breaks at that entry
        found = await broken_after({**fields, field: edited})
        assert found.entry_id == ids[4] and "altered" in found.reason, (edited, found)
    # And so it does when the field is removed
    found = await broken_after({name: value for name, value in fields.items() if name != field})
    assert found.entry_id == ids[4], found
    assert ("carries no hash" if field in ("hash", "at") else "altered") in found.reason, found


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


async def stream_events(app: ASGIApp, url: str, last_event_id: str, count: int) -> list[dict[str, str]]:
    """The first ``count`` events of an event stream, read in-process (from its start, by
    Last-Event-ID); then the client leaves."""
    body = b""
    enough = anyio.Event()
    asked = False

    def events() -> list[dict[str, str]]:
        blocks = body.decode().replace("\r\n", "\n").split("\n\n")
        lines = [[line.partition(": ") for line in block.splitlines()] for block in blocks[:-1]]
        return [item for item in ({name: value for name, _, value in block} for block in lines) if "data" in item]

    async def receive() -> Message:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await enough.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal body
        body += message.get("body", b"")
        if len(events()) >= count:
            enough.set()

    path, _, query = url.partition("?")
    headers = [(b"host", b"localhost"), (b"last-event-id", last_event_id.encode())]
    scope = {"type": "http", "method": "GET", "path": path, "query_string": query.encode(), "headers": headers}
    with anyio.fail_after(10):
        await app({**scope, "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http"}, receive, send)
    return events()[:count]


async def test_readers_of_the_type_field_read_a_code_as_its_name(bus: Bus, tmp_path: Path) -> None:
    # Given progress reports of this release (the type by its code), one that cannot be read, and
    # an entry of a type by name
    reports = [derived(progress("j", step)) for step in (1, 2)]
    ids = await bus.append(bus.keys.events, m.JobCancelRequested(job_id="j", reason="user"), *reports)
    unreadable = {"type": "p", "job_id": "j", "data": "[[2]]", "at": "1"}
    [cut_off] = await bus._append_events(keys=[bus.keys.events, bus.keys.chain], args=list(unreadable.values()))
    entries = {e.entry_id: e async for e in bus.entries(bus.keys.events)}
    assert {entries[i].fields["type"] for i in [*ids[1:], cut_off]} == {"p"}
    # Then a query of the history by type, or by a prefix, finds the reports (and not the others)
    for types in [("job.progress",), ("job.p*",), ("job.progress", "job.checkpoint_saved")]:
        assert [e.entry_id async for e in audit.query(bus, audit.Query(types=types))] == [*ids[1:], cut_off]
    assert [e.entry_id async for e in audit.query(bus, audit.Query(types=("job.cancel*",)))] == ids[:1]
    # And the event stream, read from its start, names them and filters on the name
    settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data")
    app = create_app(settings, bus, Projection(bus, bus.redis))
    url = "/api/v1/training/events/stream?type=job.progress"
    streamed = await stream_events(app, url, "0-0", 2)  # (the one that cannot be read is not sent)
    assert [(e["event"], e["id"]) for e in streamed] == [("job.progress", ids[1]), ("job.progress", ids[2])]
    assert [codec.decode_envelope(json.loads(e["data"])) for e in streamed] == [
        r.model_copy(update={"source": "test"}) for r in reports
    ]
    # And the one that cannot be read is shown by its type's name
    assert render(entries[cut_off])["type"] == codec.entry_type(unreadable) == "job.progress"
