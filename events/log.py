"""Folding the log into a state, the same way for every reader.

:func:`apply_entry` folds one entry. :func:`catch_up` folds the history after a state's position
(archives, then the live log), and passes over superseded progress reports instead of decoding
them: a run of ``job.progress`` entries of one job and one attempt, with no other entry of that
job and no entry without a job (a node joining or lost) between them, folds to the same state as
its last entry alone. A progress report changes only its job's progress, position and the count
of stale reports; whether it is taken, ignored as stale or refused depends only on the job's status
and attempt, which the run itself does not change. So the run's last entry is folded; when it was
stale, or cannot be read, the run is folded entry by entry (a report of the run that cannot be
read counts as nothing, not as stale; stale runs are rare). The result is the state
:func:`apply_entry` reaches entry by entry; the tests compare the two.

The live log is collapsed inside Redis, by a Lua script that runs on Redis's own core and returns
only the entries to fold, as one JSON document per page; archives are collapsed as they are read,
from each line's leading fields.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

import anyio
import structlog

from events.audit import archive_files, archive_range, is_after, is_within
from events.bus import Bus, entry_id_key, previous_id
from events.codec import TYPE_CODES, DecodeError, Fields, decode, decode_compact, decode_envelope, entry_type, type_name
from events.errors import IllegalTransition
from events.messages import Message
from events.state import State

log = structlog.get_logger("events.log")

PAGE = 1000
PROGRESS = "job.progress"
PROGRESS_CODE = TYPE_CODES[PROGRESS]  # how a compact entry may name it

_FOLD_PAGE_LUA = """
-- KEYS[1]: the log. ARGV: min ('-' or '(<id>'), max ('+' or an id), count, the progress
-- report's type code.
-- Returns {last id read, entries read, JSON array of [id, data, superseded, first id of run, job]
-- (an envelope entry) or [id, data, superseded, first id of run, job, type as stored, at] (a
-- compact one)}.
-- Our entries start with type, job_id, data (then at, for a compact entry); any other layout is
-- read field by field. A progress report's attempt: the first value of a compact entry's
-- positional payload, the last field of an envelope's payload.
local page = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local n = #page
local ids, datas, sup, firsts, jobs, kinds, ats, alive = {}, {}, {}, {}, {}, {}, {}, {}
local open, open_attempt = {}, {}
local k = 0
for idx = 1, n do
  local e = page[idx]
  local f = e[2]
  local kind, job, data, at
  if f[1] == 'type' and f[3] == 'job_id' and f[5] == 'data' then
    kind, job, data = f[2], f[4], f[6]
    if f[7] == 'at' then at = f[8] end
  else
    kind, job, data = '', '', 'null'
    for j = 1, #f, 2 do
      local name = f[j]
      if name == 'type' then kind = f[j + 1]
      elseif name == 'job_id' then job = f[j + 1]
      elseif name == 'data' then data = f[j + 1]
      elseif name == 'at' then at = f[j + 1] end
    end
  end
  k = k + 1
  local id = e[1]
  ids[k], datas[k], sup[k], firsts[k], jobs[k], alive[k] = id, data, 0, id, job, true
  kinds[k], ats[k] = kind, at
  if (kind == ARGV[4] or kind == 'job.progress') and job ~= '' then
    local attempt
    if at then
      attempt = string.match(data, '^%[%[(%d+)[,%]]')
    else
      attempt = string.match(string.sub(data, -32), '"attempt":(%d+)}}$')
    end
    local i = open[job]
    if i and attempt and open_attempt[job] == attempt then
      sup[k], firsts[k] = sup[i] + 1, firsts[i]
      alive[i] = false
    end
    if attempt then open[job], open_attempt[job] = k, attempt else open[job] = nil end
  elseif job ~= '' then
    open[job] = nil
  else
    open, open_attempt = {}, {}
  end
end
local out = {}
for i = 1, k do
  if alive[i] then
    local item = '["' .. ids[i] .. '",' .. datas[i] .. ',' .. sup[i] .. ',"' .. firsts[i] .. '","' .. jobs[i] .. '"'
    if ats[i] then item = item .. ',"' .. kinds[i] .. '","' .. ats[i] .. '"' end
    out[#out + 1] = item .. ']'
  end
end
local last = ''
if n > 0 then last = page[n][1] end
return {last, n, '[' .. table.concat(out, ',') .. ']'}
"""


def apply_entry(state: State, entry_id: str, fields: Mapping[str, str]) -> Message | None:
    """Fold one entry of the log. An entry that cannot be decoded, or does not apply, is logged
    and passed over: the state's position moves past it either way, so no reader stalls on it."""
    try:
        event = decode(fields)
        state.apply(entry_id, event)
    except (DecodeError, IllegalTransition) as exc:
        log.warning("log entry skipped", entry_id=entry_id, reason=str(exc))
        state.position = entry_id
        return None
    return event


@dataclass(frozen=True)
class Kept:
    entry_id: str
    data: object  # the parsed data (live log), or the entry's fields (archives)
    superseded: int  # earlier entries of its run, passed over
    first_id: str  # the run's first entry
    job_id: str
    compact: tuple[str, str] | None = None  # a compact entry of the live log: its type and at
    whole: bool = False  # data is the entry's fields

    def decode(self) -> Message:
        if self.whole:
            return decode(cast("Fields", self.data))  # (whole: the entry's fields)
        if self.compact is not None:
            return decode_compact(self.compact[0], self.job_id, self.data, self.compact[1])
        return decode_envelope(self.data)


def _fold_kept(state: State, item: Kept) -> bool:
    """Fold one kept entry; False when it stands for earlier reports and cannot be decoded or was
    stale: its run must then be folded entry by entry (only the reports that can be read count)."""
    try:
        event = item.decode()
    except DecodeError as exc:
        if item.superseded:
            return False
        log.warning("log entry skipped", entry_id=item.entry_id, reason=str(exc))
        state.position = item.entry_id
        return True
    stale = state.stale_reports
    try:
        state.apply(item.entry_id, event)
    except IllegalTransition as exc:
        log.warning("log entry skipped", entry_id=item.entry_id, reason=str(exc), passed_over=item.superseded)
        state.position = item.entry_id
        return True
    if item.superseded and state.stale_reports > stale:
        state.stale_reports = stale  # taken back: the run is folded entry by entry
        return False
    return True


Page = tuple[str, str, int, str]  # the range's start, its last id, entries read, the entries to fold


async def _fold_page(bus: Bus, state: State, page: Page) -> None:
    start, last, _, kept = page
    try:
        items = json.loads(kept)
    except ValueError:  # an entry whose data is not JSON: fold this page entry by entry
        items = None
    if items is None:
        async for entry in bus.entries(bus.keys.events, after=start.removeprefix("("), until=last):
            apply_entry(state, entry.entry_id, entry.fields)
    else:
        for item in items:
            entry_id, data, superseded, first_id, job_id = item[:5]
            compact = (item[5], item[6]) if len(item) == 7 else None
            if not _fold_kept(state, Kept(entry_id, data, superseded, first_id, job_id, compact)):
                async for entry in bus.entries(bus.keys.events, after=previous_id(first_id), until=entry_id):
                    if entry.fields.get("job_id") == job_id and entry_type(entry.fields) == PROGRESS:
                        apply_entry(state, entry.entry_id, entry.fields)
    state.position = last


async def _read_page(bus: Bus, start: str, until: str) -> Page:
    script = bus.script(_FOLD_PAGE_LUA)
    last, read, kept = await script(keys=[bus.keys.events], args=[start, until, PAGE, PROGRESS_CODE])
    return start, str(last), int(read), kept


async def _fold_live(bus: Bus, state: State, after: str, until: str) -> int:
    """Fold the live log page by page; past the first page, Redis collapses the next page while
    this process folds the current one."""
    page = await _read_page(bus, "-" if after in ("0", "0-0", "-") else f"({after}", until)
    if page[2]:
        await _fold_page(bus, state, page)
    if page[2] < PAGE:
        return page[2]
    send, receive = anyio.create_memory_object_stream[Page](1)

    async def read_ahead(start: str) -> None:
        async with send:
            while True:
                page = await _read_page(bus, start, until)
                await send.send(page)
                if page[2] < PAGE:
                    return
                start = f"({page[1]}"

    count = page[2]
    async with anyio.create_task_group() as tg, receive:
        tg.start_soon(read_ahead, f"({page[1]}")
        async for page in receive:
            if page[2]:
                await _fold_page(bus, state, page)
            count += page[2]
    return count


# An archive line as written by events.audit.write_archive: the leading fields, found without
# parsing the line; a progress report's attempt, from the start of a compact entry's data (its
# positional payload's first value) or the end of an envelope's.
_LINE = re.compile(
    r'^\{"id":"(\d+-\d+)","fields":\{"type":"([^"\\]*)","job_id":"([^"\\]*)","data":(?:"\[\[(\d+)[,\]])?'
)
_ATTEMPT = re.compile(r'\\"attempt\\":(\d+)\}\}","prev"')


class _Line(NamedTuple):
    entry_id: str
    kind: str
    job_id: str
    attempt: str | None
    raw: str


def _parse(raw: str) -> _Line:
    found = _LINE.match(raw)
    if found is None:  # not as written here: read it whole, and never pass it over
        record = json.loads(raw)
        return _Line(record["id"], "", record["fields"].get("job_id", ""), None, raw)
    entry_id, stored_kind, job_id, compact_attempt = found.groups()
    kind = type_name(stored_kind)
    if kind != PROGRESS:
        return _Line(entry_id, kind, job_id, None, raw)
    if compact_attempt is not None:
        return _Line(entry_id, kind, job_id, compact_attempt, raw)
    attempt = _ATTEMPT.search(raw, max(0, len(raw) - 200))  # near the end: prev and hash follow
    return _Line(entry_id, kind, job_id, attempt[1] if attempt else None, raw)


def collapse(lines: Iterable[_Line]) -> Iterator[tuple[_Line, int, str]]:
    """The lines to fold, each with how many earlier lines of its run it stands for, and the
    run's first id (the same rule as the Lua script, over archive lines)."""
    kept: list[tuple[_Line, int, str] | None] = []
    open_run: dict[str, tuple[int, str]] = {}
    for line in lines:
        item = (line, 0, line.entry_id)
        if line.kind == PROGRESS and line.job_id:
            run = open_run.get(line.job_id)
            if run is not None and line.attempt is not None and run[1] == line.attempt:
                previous = kept[run[0]]
                assert previous is not None
                item = (line, previous[1] + 1, previous[2])
                kept[run[0]] = None
            kept.append(item)
            if line.attempt is not None:
                open_run[line.job_id] = (len(kept) - 1, line.attempt)
            else:
                open_run.pop(line.job_id, None)
        else:
            kept.append(item)
            if line.job_id:
                open_run.pop(line.job_id, None)
            else:
                open_run.clear()
    return (item for item in kept if item is not None)


@contextlib.contextmanager
def _bulk() -> Iterator[None]:
    """No cyclic garbage collection while many small, long-lived objects are made (it would
    scan them again and again, for nothing: they form no cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _fold_archive(path: Path, state: State, after: str, until: str) -> int:
    with _bulk():
        return _fold_archive_lines(path, state, after, until)


def _fold_archive_lines(path: Path, state: State, after: str, until: str) -> int:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        chosen = [_parse(raw) for raw in handle]
    first, last = archive_range(path)
    if not (is_after(first, after) and is_within(last, until)):  # only part of this file
        chosen = [line for line in chosen if is_after(line.entry_id, after) and is_within(line.entry_id, until)]
    for line, superseded, first_id in collapse(chosen):
        fields = json.loads(line.raw)["fields"]
        if "data" not in fields:
            apply_entry(state, line.entry_id, fields)
        elif not _fold_kept(state, Kept(line.entry_id, fields, superseded, first_id, line.job_id, whole=True)):
            ids = [each.entry_id for each in chosen]
            for run_line in chosen[ids.index(first_id) : ids.index(line.entry_id) + 1]:
                if run_line.job_id == line.job_id and run_line.kind == PROGRESS:
                    apply_entry(state, run_line.entry_id, json.loads(run_line.raw)["fields"])
    if chosen:
        state.position = chosen[-1].entry_id
    return len(chosen)


async def catch_up(bus: Bus, state: State, until: str = "+") -> int:
    """Fold the history after the state's position (archives, then the live log, up to
    ``until``) into it; returns how many entries were covered."""
    count = 0
    archived_to = state.position
    for path in archive_files(bus.archive_dir):
        first, last = archive_range(path)
        if not is_after(last, state.position):
            continue
        if not is_within(first, until):
            break
        count += _fold_archive(path, state, state.position, until)  # at start-up: blocking is fine
        archived_to = max(archived_to, last, key=entry_id_key)
    return count + await _fold_live(bus, state, archived_to, until)
