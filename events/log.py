"""Folding the log into a state, the same way for every reader."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from events.audit import history
from events.bus import Bus
from events.codec import DecodeError, decode
from events.messages import Message
from events.state import IllegalTransition, State

log = structlog.get_logger("events.log")


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


async def catch_up(bus: Bus, state: State, until: str = "+") -> int:
    """Fold every entry after the state's position (from the archives too, where the live log
    was trimmed past it); returns how many were read."""
    count = 0
    async for entry in history(bus, after=state.position, until=until):
        apply_entry(state, entry.entry_id, entry.fields)
        count += 1
    return count
