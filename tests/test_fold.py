"""The fast fold (runs of progress reports collapsed, in Redis and in archives) reaches exactly
the state of the entry-by-entry fold, on random logs with stale, refused and unreadable reports."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from events import messages as m
from events.audit import write_archive
from events.bus import Bus, Entry
from events.log import apply_entry, catch_up
from events.state import State
from tests.examples import LM, started

GPU = [m.GpuInfo(index=i, uuid=f"GPU-{i}", name="test", memory_total_mb=1000) for i in range(4)]


async def random_log(bus: Bus, seed: int, steps: int = 400) -> None:
    """Jobs training side by side; now and then a stale or refused report, an unreadable entry,
    a checkpoint, a retry on a new attempt, a node event, an end."""
    rng = random.Random(seed)
    attempts: dict[str, int] = {}
    facts: list[m.Message] = [m.NodeJoined(node="n1", simulated=True, gpus=GPU)]
    for i in range(4):
        job = f"j{i}"
        attempts[job] = 1
        facts += [
            m.JobAccepted(job_id=job, spec=LM),
            m.JobQueued(job_id=job, position=1),
            m.JobScheduled(job_id=job, node="n1", gpu_ids=[i], attempt=1),
            started(job),
        ]
    await bus.append(bus.keys.events, *facts)

    def progress(job: str, attempt: int, step: int) -> m.JobProgress:
        return m.JobProgress(job_id=job, attempt=attempt, step=step, max_steps=1000, percent=step / 10, loss=1 / step)

    for step in range(1, steps + 1):
        job = rng.choice(sorted(attempts))
        roll = rng.random()
        if roll < 0.80:
            fact: m.Message | None = progress(job, attempts[job], step)
        elif roll < 0.86:
            fact = progress(job, attempts[job] + rng.choice([-1, 1]), step)  # a stale attempt
        elif roll < 0.88:
            fact = progress("nobody", 1, step)  # for no job: refused
        elif roll < 0.91:
            fact = None
            broken = json.loads(json.dumps({"type": "job.progress", "v": 1, "job_id": job, "payload": {"attempt": 1}}))
            data = rng.choice(["{not json", json.dumps(broken, separators=(",", ":"))])
            await bus.redis.xadd(bus.keys.events, {"type": "job.progress", "job_id": job, "data": data})
        elif roll < 0.93:
            fact = m.CheckpointSaved(job_id=job, attempt=attempts[job], step=step, path=f"/c/{step}")
        elif roll < 0.95:
            fact = None
            attempt = attempts[job]
            attempts[job] = attempt + 1
            await bus.append(
                bus.keys.events,
                m.JobRequeued(job_id=job, attempt=attempt, reason="node_lost"),
                m.JobScheduled(job_id=job, node="n1", gpu_ids=[int(job[1:])], attempt=attempt + 1),
                started(job, attempt=attempt + 1),
            )
        elif roll < 0.97:
            fact = m.NodeJoined(node=f"n{rng.randint(2, 3)}", simulated=True, gpus=GPU)
        else:
            fact = m.JobSucceeded(job_id=job, attempt=attempts[job], exit_code=0, run_dir="/r")
        if fact is not None:
            await bus.append(bus.keys.events, fact)


def by_entry(entries: list[Entry]) -> State:
    state = State()
    for entry in entries:
        apply_entry(state, entry.entry_id, entry.fields)
    return state


@pytest.mark.parametrize("seed", range(6))
async def test_the_fast_fold_equals_the_entry_by_entry_fold(bus: Bus, seed: int) -> None:
    await random_log(bus, seed)
    entries = [e async for e in bus.entries(bus.keys.events)]
    expected = by_entry(entries)
    assert expected.stale_reports > 0  # the log exercises what the collapse must get right
    fast = State()
    assert await catch_up(bus, fast) == len(entries)
    assert fast.model_dump() == expected.model_dump()
    assert (fast.position, fast.stale_reports) == (expected.position, expected.stale_reports)
    # And folding in steps, up to a bound, ends the same
    stepwise = State()
    await catch_up(bus, stepwise, until=entries[len(entries) // 3].entry_id)
    assert stepwise.model_dump() == by_entry(entries[: len(entries) // 3 + 1]).model_dump()
    await catch_up(bus, stepwise)
    assert stepwise.model_dump() == expected.model_dump()


@pytest.mark.parametrize("seed", range(3))
async def test_the_fast_fold_over_archives_equals_the_entry_by_entry_fold(bus: Bus, seed: int, tmp_path: Path) -> None:
    # Given a log whose first part was archived (two files) and trimmed
    await random_log(bus, seed + 100)
    entries = [e async for e in bus.entries(bus.keys.events)]
    third = len(entries) // 3
    write_archive(tmp_path, entries[:third])
    write_archive(tmp_path, entries[third : 2 * third])
    ms, seq = entries[2 * third].entry_id.split("-")
    await bus.redis.xtrim(bus.keys.events, minid=f"{ms}-{seq}")
    bus.archive_dir = tmp_path
    # Then the fold reads the archives, then the live log, to the same state
    fast = State()
    assert await catch_up(bus, fast) == len(entries)
    assert fast.model_dump() == by_entry(entries).model_dump()
