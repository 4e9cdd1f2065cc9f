"""`swift-trainer replay` and `swift-trainer audit …`: read, check and rebuild the history."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import httpx
from redis.exceptions import ResponseError

from events import audit, invariants, snapshot
from events.bus import Bus, Entry, connect, entry_id_key, entry_time
from events.codec import DecodeError, decode, entry_type
from events.connection import text_hash, text_streams
from events.describe import describe, render
from events.keys import SCHEDULER_GROUP
from events.log import catch_up
from events.state import State
from services.config import Settings
from services.runtime import wait_for_redis


def _row(entry: Entry) -> str:
    at = entry_time(entry.entry_id).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    try:
        message = decode(entry.fields)
    except DecodeError as exc:
        return f"{entry.entry_id:<16}  {at}  {entry_type(entry.fields) or '?':<22}  (unreadable: {exc})"
    job = (message.job_id or "-")[:12]
    return f"{entry.entry_id:<16}  {at}  {message.type:<22}  {job:<12}  {message.actor or '-':<10}  {describe(message)}"


def _print(entry: Entry, fmt: str, out: TextIO) -> None:
    out.write((_row(entry) if fmt == "table" else json.dumps(render(entry))) + "\n")


async def replay(
    settings: Settings, q: audit.Query, fmt: str, follow: bool, as_state: bool, commands: bool = False
) -> None:
    redis = connect(settings.resolved_redis_url)
    reader = connect(settings.resolved_redis_url, block_ms=5000) if follow else None
    try:
        await wait_for_redis(redis, timeout_s=10)
        bus = Bus(redis, settings.keys, "replay", settings.archive_dir)
        if as_state:
            state = State()
            await catch_up(bus, state, until=q.bounds()[1])
            dumped: Any = state.model_dump(mode="json")
            if q.job_id is not None:
                dumped = dumped["jobs"].get(q.job_id)
            print(json.dumps(dumped, indent=2))
            return
        if fmt == "table":
            print(f"{'entry id':<16}  {'time (UTC)':<23}  {'type':<22}  {'job':<12}  {'actor':<10}  what happened")
        stream = bus.keys.commands if commands else bus.keys.events
        last = q.bounds()[0]
        # The commands stream is kept whole in Redis; the log may be partly in archives.
        found = audit.matching(bus.entries(stream, *q.bounds()), q) if commands else audit.query(bus, q)
        async for entry in found:
            _print(entry, fmt, sys.stdout)
            last = entry.entry_id
        sys.stdout.flush()
        if reader is not None:
            if last == "0-0" and await redis.exists(stream):
                last = (await redis.xinfo_stream(stream))["last-generated-id"]
            while True:  # until interrupted
                for _, entries in text_streams(await reader.xread({stream: last}, count=1000, block=5000)):
                    for entry_id, fields in entries:
                        entry = Entry(stream, entry_id, fields)
                        if q.matches(entry):
                            _print(entry, fmt, sys.stdout)
                        last = entry_id
                sys.stdout.flush()
    finally:
        await redis.aclose()
        if reader is not None:
            await reader.aclose()


async def verify(settings: Settings) -> int:
    redis = connect(settings.resolved_redis_url)
    try:
        await wait_for_redis(redis, timeout_s=10)
        bus = Bus(redis, settings.keys, "audit", settings.archive_dir)
        result = await audit.verify(bus)
    finally:
        await redis.aclose()
    checked = f"{result.checked} entries checked"
    if result.unchained:
        checked += f" ({result.unchained} earlier entries predate the chain)"
    if result.starts_after:
        checked += f"; history before {result.starts_after} is archived, not found in {settings.archive_dir}"
    if result.first_break is not None:
        where = "" if result.first_break.where == audit.LIVE else f" in {result.first_break.where}"
        print(
            f"BROKEN at entry {result.first_break.entry_id}{where}: {result.first_break.reason}. {checked} before it."
        )
        return 1
    print(f"intact: {checked}; head {result.head_id} {result.head_hash}")
    return 0


def differences(log: Any, service: Any, path: str = "") -> Iterator[str]:
    """Field-by-field differences between two JSON values."""
    if isinstance(log, dict) and isinstance(service, dict):
        for key in sorted(set(log) | set(service), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in service:
                yield f"{where}: in the log, missing from the service"
            elif key not in log:
                yield f"{where}: shown by the service, not in the log"
            else:
                yield from differences(log[key], service[key], where)
    elif isinstance(log, list) and isinstance(service, list) and len(log) == len(service):
        for index, (a, b) in enumerate(zip(log, service, strict=True)):
            yield from differences(a, b, f"{path}[{index}]")
    elif log != service:
        yield f"{path}: log={json.dumps(log)} service={json.dumps(service)}"


async def _fold_until(bus: Bus, position: str) -> State:
    state = State()
    await catch_up(bus, state, until=position)
    return state


async def rebuild(settings: Settings, gateway_url: str | None, api_key: str | None) -> int:
    """Fold the whole history and compare it with what the services hold: the gateway's live
    projection and the scheduler's snapshot, each at its own position in the log."""
    url = gateway_url or f"http://{settings.app_host}:{settings.app_port}{settings.api_prefix}/audit/state"
    redis = connect(settings.resolved_redis_url)
    total = 0
    compared_all = True  # a state that could not be read is not one that matched
    try:
        await wait_for_redis(redis, timeout_s=10)
        bus = Bus(redis, settings.keys, "audit", settings.archive_dir)
        services: list[tuple[str, dict[str, Any]]] = []
        try:
            services.append((f"gateway ({url})", await _gateway_state(url, api_key)))
        except (httpx.HTTPError, ValueError) as exc:
            print(f"gateway: not compared ({exc})")
            compared_all = False
        try:
            stored = await _snapshot_state(bus)
        except ValueError as exc:
            print(f"scheduler snapshot: unreadable ({str(exc).splitlines()[0]})")
            compared_all = False
        else:
            if stored is None:
                print("scheduler snapshot: none yet")
            else:
                services.append(("scheduler snapshot", stored))
        for name, shown in services:
            position = shown.get("position", "0-0")
            folded = (await _fold_until(bus, position)).model_dump(mode="json")
            found = list(differences(folded, shown))
            total += len(found)
            jobs = len(folded.get("jobs", {}))
            if found:
                print(f"{name} at {position}: {len(found)} difference(s) from the log")
                for line in found:
                    print(f"  {line}")
            else:
                print(f"{name} at {position}: identical to the log ({jobs} jobs)")
    finally:
        await redis.aclose()
    if total:
        return 1
    return 0 if compared_all else 2


async def archive(settings: Settings) -> int:
    """Apply the retention policy once."""
    if not settings.retention:
        print("no retention policy set (AUDIT_MAX_AGE_S, AUDIT_MAX_ENTRIES): everything is kept")
        return 0
    redis = connect(settings.resolved_redis_url)
    try:
        await wait_for_redis(redis, timeout_s=10)
        bus = Bus(redis, settings.keys, "audit", settings.archive_dir)
        done = await audit.archive_and_trim(
            bus,
            max_age_s=settings.audit_max_age_s,
            max_entries=settings.audit_max_entries,
            now_ms=int(time.time() * 1000),
        )
    finally:
        await redis.aclose()
    print(f"archived {done.entries} entries to {[str(f) for f in done.files]}; live log kept from {done.kept_from}")
    if done.held_back:
        print(f"held back: {done.held_back}")
    return 0


async def _taken_submissions(bus: Bus) -> tuple[list[tuple[str, str]], int]:
    """The submissions the scheduler has taken (delivered to its group and acknowledged, so
    their effects are in the log), and how many it has still to take. Read before the log: a
    submission acknowledged by then has its facts in the log read after."""
    stream = bus.keys.commands
    try:
        groups = await bus.redis.xinfo_groups(stream)
    except ResponseError:  # no commands yet
        return [], 0
    group = next((g for g in groups if g["name"] == SCHEDULER_GROUP), None)
    delivered = group["last-delivered-id"] if group else "0-0"
    pending: set[str] = set()
    start = "-"
    while group is not None:
        page = await bus.redis.xpending_range(stream, SCHEDULER_GROUP, min=start, max="+", count=1000)
        pending.update(str(p["message_id"]) for p in page)
        if len(page) < 1000:
            break
        start = f"({page[-1]['message_id']!s}"
    taken: list[tuple[str, str]] = []
    waiting = 0
    async for entry in bus.entries(stream):
        if entry.fields.get("type") != "job.submit":
            continue
        if entry_id_key(entry.entry_id) <= entry_id_key(delivered) and entry.entry_id not in pending:
            taken.append((entry.entry_id, entry.fields.get("job_id", "")))
        else:
            waiting += 1
    return taken, waiting


async def _snapshot_state(bus: Bus) -> dict[str, Any] | None:
    """The scheduler's stored snapshot as JSON, None when there is none yet; raises ValueError
    when it cannot be read."""
    stored = text_hash(await bus.redis.hgetall(bus.keys.snapshot))
    if stored.get("version") != snapshot.SNAPSHOT_VERSION:
        return None
    return snapshot.unpacked(stored["state"]).model_dump(mode="json")


async def _gateway_state(url: str, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        response = await client.get(url)
    response.raise_for_status()
    shown = response.json()
    if not isinstance(shown, dict):
        raise ValueError("the gateway's state is not a JSON object")
    return shown


async def check(settings: Settings, gateway_url: str | None, api_key: str | None, *, gateway_required: bool) -> int:
    """Check the log's invariants (:mod:`events.invariants`) and that the live services' states
    equal its fold. Exit 0 when everything holds, 1 at a violation, 2 when it could not check."""
    url = gateway_url or f"http://{settings.app_host}:{settings.app_port}{settings.api_prefix}/audit/state"
    redis = connect(settings.resolved_redis_url)
    try:
        await wait_for_redis(redis, timeout_s=10)
        bus = Bus(redis, settings.keys, "audit", settings.archive_dir)
        # What the services show, and which submissions were taken, before reading the log: the
        # log read after holds everything they stand on.
        shown: list[tuple[str, dict[str, Any]]] = []
        try:
            shown.append((f"the gateway ({url})", await _gateway_state(url, api_key)))
        except (httpx.HTTPError, ValueError) as exc:
            if gateway_required or not isinstance(exc, httpx.ConnectError):
                print(f"could not compare the gateway's state: {exc}")
                return 2
            print(f"note: no gateway answers at {url}; its state was not compared")
        try:
            stored = await _snapshot_state(bus)
        except ValueError as exc:
            print(f"VIOLATION: the scheduler's snapshot cannot be read ({str(exc).splitlines()[0]})")
            return 1
        if stored is not None:
            shown.append(("the scheduler's snapshot", stored))
        taken, waiting = await _taken_submissions(bus)
        chain = text_hash(await redis.hgetall(bus.keys.chain))
        archived_id = chain.get("archived_id")
        files = audit.archive_files(bus.archive_dir)
        if archived_id and not any(audit.is_within(archived_id, audit.archive_range(p)[1]) for p in files):
            print(f"could not check: the history up to {archived_id} is archived, and not in {settings.archive_dir}")
            return 2
        result = invariants.LogCheck()
        at = {str(view.get("position", "0-0")): name for name, view in shown}
        folded: dict[str, dict[str, Any]] = {}
        if "0-0" in at:
            folded["0-0"] = result.state.model_dump(mode="json")
        async for entry in audit.history(bus):
            result.feed(entry.entry_id, entry.fields)
            if entry.entry_id in at:
                folded[entry.entry_id] = result.state.model_dump(mode="json")
        result.finish(taken)
    finally:
        await redis.aclose()
    for name, view in shown:
        position = str(view.get("position", "0-0"))
        if position not in folded:
            result.violations.append(
                invariants.Violation(position, f"{name} is at position {position}, which is not in the log")
            )
            continue
        found = list(differences(folded[position], view))
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            result.violations.append(
                invariants.Violation(position, f"{name} differs from the log's fold at {position}: {found[0]}{more}")
            )
    summary = (
        f"{result.entries} entries, {len(result.state.jobs)} jobs, {result.attempts} attempts, "
        f"{len(taken)} submissions taken ({waiting} not yet), {len(shown)} live state(s) compared"
    )
    if result.violations:
        print(f"VIOLATION: {result.violations[0].sentence}")
        if len(result.violations) > 1:
            print(f"({len(result.violations) - 1} more violation(s) after it)")
        print(summary)
        return 1
    print(f"ok: every invariant holds; {summary}")
    return 0
