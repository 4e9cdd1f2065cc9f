"""`swift-trainer audit check`: each invariant of the log, broken on purpose, is named in a
sentence; a sound log passes. The checker keeps its own account of attempts and GPUs, so the
cases below are caught even where the fold would merely pass over the entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from events import messages as m
from events import snapshot
from events.bus import Bus
from events.codec import encode
from events.invariants import LogCheck
from events.keys import SCHEDULER_GROUP
from events.state import State
from services import audit
from services.config import load_settings
from tests.conftest import RedisServer, free_port
from tests.examples import LM, started

GPUS = [m.GpuInfo(index=i, uuid=f"GPU-{i}", name="test", memory_total_mb=1000) for i in range(2)]


def node() -> m.NodeJoined:
    return m.NodeJoined(node="n1", simulated=True, gpus=GPUS)


def placed(job_id: str, gpu: int = 0, attempt: int = 1) -> list[m.Message]:
    return [
        m.JobAccepted(job_id=job_id, spec=LM),
        m.JobQueued(job_id=job_id, position=1),
        m.JobScheduled(job_id=job_id, node="n1", gpu_ids=[gpu], attempt=attempt),
    ]


def checked(messages: list[m.Message], submissions: list[tuple[str, str]] = ()) -> LogCheck:  # type: ignore[assignment]
    result = LogCheck()
    for number, message in enumerate(messages, start=1):
        result.feed(f"{number}-0", encode(message))
    result.finish(submissions)
    return result


def sound_log() -> list[m.Message]:
    """Two jobs side by side; one finishes, the other is requeued and runs again elsewhere."""
    return [
        node(),
        *placed("a", gpu=0),
        started("a"),
        *placed("b", gpu=1),
        started("b"),
        m.JobSucceeded(job_id="a", attempt=1, exit_code=0, run_dir="/r"),
        m.JobRequeued(job_id="b", attempt=1, reason="node_lost"),
        m.JobScheduled(job_id="b", node="n1", gpu_ids=[0], attempt=2),
        started("b", attempt=2),
        m.JobProgress(job_id="b", attempt=1, step=3, max_steps=10, percent=30.0),  # stale: ignored
    ]


def test_a_sound_log_passes() -> None:
    result = checked(sound_log(), submissions=[("1-0", "a"), ("2-0", "b")])
    assert result.violations == []
    assert result.attempts == 3 and result.entries == len(sound_log())


def test_a_preemption_and_a_suspension_pass_the_check() -> None:
    # The victim's GPU goes to the urgent job in the same decision, while its process still
    # stops; it reports its checkpoint, is queued again and runs on; another is suspended.
    log = [
        node(),
        *placed("low", gpu=0),
        started("low"),
        *placed("other", gpu=1),
        started("other"),
        m.JobAccepted(job_id="urgent", spec=LM.model_copy(update={"priority": 9})),
        m.JobQueued(job_id="urgent", position=1),
        m.JobPreempted(job_id="low", attempt=1, by_job_id="urgent", reason="priority", step=4),
        m.JobScheduled(job_id="urgent", node="n1", gpu_ids=[0], attempt=1, preempted=["low"]),
        m.CheckpointSaved(job_id="low", attempt=1, step=5, path="/out/checkpoint-5"),
        m.JobStopped(job_id="low", attempt=1, last_checkpoint="/out/checkpoint-5", step=5, reason="preempt"),
        started("urgent"),
        m.JobSuspended(job_id="other", attempt=1),
        m.JobScheduled(job_id="low", node="n1", gpu_ids=[1], attempt=2),
        m.JobStopped(job_id="other", attempt=1, reason="suspend"),
    ]
    result = checked(log)
    assert result.violations == []
    assert result.state.jobs["low"].last_checkpoint == "/out/checkpoint-5"
    assert result.state.jobs["other"].status == "suspended"


def test_a_gpu_held_by_two_attempts_is_named() -> None:
    result = checked([node(), *placed("a", gpu=0), *placed("b", gpu=0)])
    assert result.first is not None
    assert result.first.sentence.startswith("GPU n1/0 is held by two attempts at entry 7-0: job b attempt 1")


def test_a_sweep_over_its_max_concurrent_is_named() -> None:
    sweep = m.SweepCreated(sweep_id="s", grid={"lora_rank": [4, 8, 16]}, max_concurrent=2, job_ids=["a", "b", "c"])
    points = [
        [
            m.JobAccepted(job_id=job_id, spec=LM, sweep_id="s", point={"lora_rank": rank}),
            m.JobQueued(job_id=job_id, position=1),
            m.JobScheduled(job_id=job_id, node="n1", gpu_ids=[gpu], attempt=1),
        ]
        for gpu, (job_id, rank) in enumerate([("a", 4), ("b", 8), ("c", 16)])
    ]
    three = m.NodeJoined(node="n1", simulated=True, gpus=[*GPUS, GPUS[0].model_copy(update={"index": 2})])
    # Two at once pass; a third once one of them ended too; a third while both still run is named
    assert checked([three, sweep, *points[0], *points[1]]).violations == []
    a_ends = [started("a"), m.JobSucceeded(job_id="a", attempt=1, exit_code=0, run_dir="/r")]
    assert checked([three, sweep, *points[0], *points[1], *a_ends, *points[2]]).violations == []
    result = checked([three, sweep, *points[0], *points[1], *points[2]])
    assert result.first is not None
    assert result.first.sentence == (
        "sweep s runs 3 jobs at once at entry 11-0 (job c scheduled), over its max_concurrent of 2"
    )


def test_a_second_live_attempt_is_named() -> None:
    result = checked([node(), *placed("a", gpu=0), m.JobScheduled(job_id="a", node="n1", gpu_ids=[1], attempt=2)])
    assert result.first is not None
    assert "job a has two live attempts: attempt 2 scheduled" in result.first.sentence


def test_a_process_of_another_attempt_starting_is_named() -> None:
    result = checked([node(), *placed("a", gpu=0), started("a", attempt=2)])
    assert result.first is not None
    assert "job a has two live attempts: attempt 2 started" in result.first.sentence


def test_attempt_numbers_going_back_are_named() -> None:
    log = [
        node(),
        *placed("a", gpu=0, attempt=2),
        m.JobRequeued(job_id="a", attempt=2, reason="node_lost"),
        m.JobScheduled(job_id="a", node="n1", gpu_ids=[0], attempt=1),
    ]
    result = checked(log)
    assert result.first is not None
    assert result.first.sentence.startswith("attempt numbers of job a went back: attempt 1 scheduled")


def test_a_message_id_twice_is_named() -> None:
    first = m.JobAccepted(job_id="a", spec=LM)
    again = m.JobAccepted(id=first.id, job_id="b", spec=LM)
    result = checked([first, again])
    assert result.first is not None
    assert result.first.sentence == f"message id {first.id} appears a second time, at entry 2-0"


def test_an_unreadable_entry_is_named() -> None:
    result = LogCheck()
    result.feed("1-0", {"type": "job.accepted", "job_id": "a", "data": "{not json"})
    assert result.first is not None and result.first.sentence.startswith("entry 1-0 cannot be read")


def test_a_fact_that_does_not_apply_is_named() -> None:
    result = checked([node(), started("ghost")])
    assert result.first is not None
    assert result.first.sentence.startswith("entry 2-0 (job.started of job ghost) does not apply")


def test_a_taken_submission_missing_from_the_log_is_named() -> None:
    result = checked([node(), *placed("a")], submissions=[("5-0", "a"), ("6-0", "lost")])
    assert result.first is not None
    assert result.first.sentence.startswith("the submission of job lost (commands entry 6-0) was acknowledged")


# --- the command, against a real Redis ---------------------------------------------------------


async def run_check(bus: Bus, redis_server: RedisServer, tmp_path: Path) -> int:
    settings = load_settings(redis_url=redis_server.url, namespace=bus.keys.namespace, data_dir=tmp_path)
    nobody = f"http://127.0.0.1:{free_port()}/api/v1/audit/state"  # no gateway: checked without it
    return await audit.check(settings, nobody, None, gateway_required=False)


def folded(ids: list[str], messages: list[m.Message]) -> State:
    state = State()
    for entry_id, message in zip(ids, messages, strict=True):
        state.apply(entry_id, message)
    return state


async def take(bus: Bus, *, ack: bool) -> None:
    """The scheduler's group reads every command; acknowledges them if ``ack``."""
    await bus.redis.xgroup_create(bus.keys.commands, SCHEDULER_GROUP, id="0", mkstream=True)
    read = await bus.redis.xreadgroup(SCHEDULER_GROUP, "s1", {bus.keys.commands: ">"}, count=100)
    if ack:
        for _, entries in read:
            await bus.redis.xack(bus.keys.commands, SCHEDULER_GROUP, *[entry_id for entry_id, _ in entries])


async def test_the_command_passes_a_sound_log_and_counts_what_waits(
    bus: Bus, redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = sound_log()
    ids = await bus.append(bus.keys.events, *log)
    assert await snapshot.save(bus, folded(ids, log))
    await bus.append(bus.keys.commands, m.SubmitJob(job_id="a", spec=LM))
    await take(bus, ack=True)
    await bus.append(bus.keys.commands, m.SubmitJob(job_id="c", spec=LM))  # not taken yet: not a violation
    assert await run_check(bus, redis_server, tmp_path) == 0
    out = capsys.readouterr().out
    assert "ok: every invariant holds" in out
    assert "1 submissions taken (1 not yet), 1 live state(s) compared" in out


async def test_the_command_names_a_submission_taken_but_never_accepted(
    bus: Bus, redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await bus.append(bus.keys.events, node())
    await bus.append(bus.keys.commands, m.SubmitJob(job_id="gone", spec=LM))
    # Delivered but not acknowledged: the scheduler may still decide it.
    await take(bus, ack=False)
    assert await run_check(bus, redis_server, tmp_path) == 0
    # Acknowledged with nothing in the log: lost.
    pending = await bus.redis.xpending_range(bus.keys.commands, SCHEDULER_GROUP, min="-", max="+", count=10)
    await bus.redis.xack(bus.keys.commands, SCHEDULER_GROUP, pending[0]["message_id"])
    assert await run_check(bus, redis_server, tmp_path) == 1
    assert "VIOLATION: the submission of job gone" in capsys.readouterr().out


async def test_the_command_names_a_snapshot_that_differs_from_the_fold(
    bus: Bus, redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = sound_log()
    ids = await bus.append(bus.keys.events, *log)
    state = folded(ids, log)
    state.jobs["a"].priority = 9  # what the scheduler would hold had it folded something else
    assert await snapshot.save(bus, state)
    assert await run_check(bus, redis_server, tmp_path) == 1
    out = capsys.readouterr().out
    assert f"VIOLATION: the scheduler's snapshot differs from the log's fold at {ids[-1]}: jobs.a.priority" in out
