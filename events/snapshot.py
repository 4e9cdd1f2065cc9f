"""Snapshots of the folded state (with the log position they cover), so that a reader starts by
loading one and folding only the log after it."""

from __future__ import annotations

import base64
import gc
import os
import sys
import zlib

import anyio
import structlog

from events.bus import Bus, entry_id_key
from events.connection import connect_sync, text_hash
from events.state import State

log = structlog.get_logger("events.snapshot")

# Bump when State changes shape: an older snapshot is then ignored and the log folded in full.
SNAPSHOT_VERSION = "3"  # 2: the state's JSON compressed (zlib, then base64); 3: quotas and usage
SNAPSHOT_EVERY = 100_000  # events folded between two snapshots (a large state takes a while to write)

# Only a snapshot further along the log replaces the stored one, and only one whose position is
# in the log (KEYS[2]): a snapshot of a state folded on a master that has since failed over (its
# child still writing) may hold entries the new master never had; it is not stored.
_SAVE_LUA = """
if ARGV[1] ~= '0-0' and #redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1]) == 0 then return 0 end
local current = redis.call('HGET', KEYS[1], 'position')
if current then
  local cm, cs = string.match(current, '(%d+)-(%d+)')
  local nm, ns = string.match(ARGV[1], '(%d+)-(%d+)')
  cm, cs, nm, ns = tonumber(cm), tonumber(cs), tonumber(nm), tonumber(ns)
  if cm > nm or (cm == nm and cs >= ns) then return 0 end
end
redis.call('HSET', KEYS[1], 'position', ARGV[1], 'version', ARGV[2], 'state', ARGV[3])
return 1
"""


def _packed(state: State) -> str:
    """The state's JSON, compressed: a tenth of the size, so that storing it holds Redis up for
    a tenth of the time (80 MB of JSON for 60,000 jobs took Redis 300 ms to take in)."""
    return base64.b64encode(zlib.compress(state.model_dump_json().encode(), 1)).decode()


def unpacked(stored: str) -> State:
    """The state from its stored form; raises ValueError (incl. ValidationError) if unreadable."""
    try:
        return State.model_validate_json(zlib.decompress(base64.b64decode(stored)))
    except zlib.error as exc:
        raise ValueError(f"not a compressed snapshot: {exc}") from exc


async def save(bus: Bus, state: State) -> bool:
    """Store the state if it is further along the log than the stored snapshot."""
    script = bus.redis.register_script(_SAVE_LUA)
    saved = await script(
        keys=[bus.keys.snapshot, bus.keys.events], args=[state.position, SNAPSHOT_VERSION, _packed(state)]
    )
    return bool(saved)


def save_in_child(redis_url: str, key: str, log_key: str, state: State) -> int:
    """Fork a child that stores the state as it is at this moment (the child's memory is a
    copy-on-write image of this process), so that the seconds a large state takes to serialize
    hold nobody up; returns the child's pid, for :func:`child_saved`. The caller must not be in
    the middle of changing the state."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        gc.disable()  # a collection would touch (and so copy) every page of the image
        client = connect_sync(redis_url)
        client.eval(_SAVE_LUA, 2, key, log_key, state.position, SNAPSHOT_VERSION, _packed(state))
        code = 0
    except BaseException as exc:
        print(f"snapshot not saved: {exc!r}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)  # nothing of the parent's (its event loop, its connections) runs here


async def child_saved(pid: int) -> bool:
    """Wait for a child of :func:`save_in_child`; whether it stored its state (or found a later one)."""
    _, status = await anyio.to_thread.run_sync(os.waitpid, pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


async def load(bus: Bus) -> State:
    """The stored snapshot, or an empty state when there is none (or of an older shape, or one
    whose position the log does not hold though it reaches back that far: a history lost in a
    failover)."""
    stored = text_hash(await bus.redis.hgetall(bus.keys.snapshot))
    if not stored or stored.get("version") != SNAPSHOT_VERSION:
        return State()
    try:
        state = unpacked(stored["state"])
    except (KeyError, ValueError) as exc:
        log.warning("snapshot unreadable; folding the whole log", error=str(exc))
        return State()
    if state.position != "0-0" and not await bus.redis.xrange(bus.keys.events, state.position, state.position):
        first = await bus.redis.xrange(bus.keys.events, count=1)
        if first and entry_id_key(str(first[0][0])) <= entry_id_key(state.position):
            log.warning("snapshot of a history the log does not hold; folding the whole log", position=state.position)
            return State()
    return state
