"""Snapshots of the leader's state, written by a forked child, and the log's retention.

A snapshot holds committed facts only, so it is taken when no decision is in flight; a child
process writes it (a state of 60,000 jobs takes over a second to serialize) while the leader
goes on deciding. Retention archives and trims the log only up to the stored snapshot.
"""

from __future__ import annotations

import time

import anyio
import structlog

from events import audit, snapshot
from events.bus import Bus
from events.state import State
from services.config import Settings

log = structlog.get_logger("scheduler")


class Snapshots:
    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.unsaved = 0  # events folded since the last snapshot
        self.due = False  # the retention task asks for a snapshot
        self.saved = anyio.Event()
        self.writing = False  # a child is writing one

    @property
    def wanted(self) -> bool:
        return self.due or self.unsaved >= snapshot.SNAPSHOT_EVERY

    def save_when_due(self, state: State, task_group: anyio.abc.TaskGroup) -> None:
        """Start a child writing the state, if one is due and none is being written; the state
        must hold no decisions in flight (no savepoint open)."""
        if state.savepoints or self.writing or not self.wanted:
            return
        keys = self.bus.keys
        pid = snapshot.save_in_child(self.settings.resolved_redis_url, keys.snapshot, keys.events, state)
        self.unsaved = 0
        asked, self.due = self.due, False
        self.writing = True
        task_group.start_soon(self._written, pid, asked)

    async def _written(self, pid: int, asked: bool) -> None:
        try:
            if not await snapshot.child_saved(pid):
                log.warning("snapshot not saved; the log is kept from the previous one", pid=pid)
        finally:
            self.writing = False
            if asked:  # the retention task trims only up to the stored snapshot, saved or not
                self.saved.set()
                self.saved = anyio.Event()

    async def retain(self) -> None:
        """Apply the log's retention policy now and then: archive, then trim. The snapshot is
        saved first, so that nothing a restarting reader needs is trimmed."""
        while True:
            await anyio.sleep(self.settings.retention_interval_s)
            # Saved by the consumer loop, between decisions (none in flight), at the latest
            # when the streams next fall quiet (a blocking read's timeout).
            saved = self.saved
            self.due = True
            await saved.wait()
            done = await audit.archive_and_trim(
                self.bus,
                max_age_s=self.settings.audit_max_age_s,
                max_entries=self.settings.audit_max_entries,
                now_ms=int(time.time() * 1000),
            )
            if done.entries or done.held_back:
                log.info(
                    "log archived",
                    entries=done.entries,
                    files=[str(f) for f in done.files],
                    kept_from=done.kept_from,
                    held_back=done.held_back,
                )
