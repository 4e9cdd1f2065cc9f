"""The chaos run at a small size with a fixed seed (`python -m tests.chaos` runs the full size),
and the faults it found, one by one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from events import messages as m
from events.bus import Bus
from events.codec import decode, encode
from events.consumer import Delivery, Outcome
from events.params import LanguageModelJob
from services.config import load_settings
from services.runner.record import RunRecord
from services.runner.service import Runner
from tests.chaos import (
    FAULTS,
    Chaos,
    Cluster,
    Config,
    PlannedJob,
    Tally,
    job_request,
    prepare,
    run,
    stand_in_swift,
)
from tests.conftest import wait_for
from tests.test_runner import running, start_command


@pytest.mark.e2e
def test_a_seeded_chaos_run_loses_nothing_runs_nothing_twice_and_the_audit_passes(tmp_path: Path) -> None:
    # Given the whole system under a workload, while every kind of fault is injected once
    report = run(Config(jobs=24, seed=7, faults=len(FAULTS), span_s=45), tmp_path, progress=print)
    print(report.table())
    # Then every fault was recovered from, no job was lost, run twice or given a GPU held by
    # another, nothing exited by itself, and `audit verify` and `audit check` pass
    assert {fault.kind for fault in report.injected} == set(FAULTS)
    assert report.ok, report.table()
    assert report.verdict.accepted >= 24 and report.verdict.outcomes["job.succeeded"] > 0
    assert report.tally.refused_while_full and set(report.tally.refused_while_full) == {503}


def ended_in_ledger(ledger: Path, job_id: str) -> bool:
    return bool(ledger_rows(ledger, "end", job_id))


@pytest.mark.e2e
def test_a_full_redis_is_a_503_and_a_pause_not_a_crash_and_a_job_that_ended_meanwhile_is_reported(
    tmp_path: Path,
) -> None:
    prepare(tmp_path)
    config = Config(jobs=0)
    cluster = Cluster(tmp_path, config)
    cluster.start()
    chaos = Chaos(cluster, config, Tally())
    base = cluster.sys.base
    try:
        # Given a job training
        body = job_request(tmp_path, PlannedJob(0, 0, 5, 1, 30, 10, False, 0))
        job_id = httpx.post(f"{base}/jobs", json=body).json()["job_id"]
        wait_for(lambda: httpx.get(f"{base}/jobs/{job_id}").json()["status"] == "running", 30, "the job to run")
        # When Redis fills up to its maxmemory, and stays full until the trainer has finished and
        # no heartbeat has landed for longer than the node timeout
        chaos.fill()
        refused = httpx.post(f"{base}/jobs", json=body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        wait_for(lambda: ended_in_ledger(cluster.ledger, job_id), 30, "the trainer to finish")
        wait_for(lambda: chaos.quiet_s() > config.node_timeout_s, 30, "no heartbeat for the node timeout")
        cluster.check_alive()
        assert not cluster.unexpected_exits, cluster.unexpected_exits
        chaos.free()
        # Then no process exited, and the job is reported completed once Redis has room again
        wait_for(lambda: httpx.get(f"{base}/jobs/{job_id}").json()["status"] == "completed", 30, "the job's end")
        cluster.sys.wait_healthy(timeout_s=30)
        cluster.check_alive()
        assert not cluster.unexpected_exits, cluster.unexpected_exits
    finally:
        chaos.close()
        cluster.stop()


async def test_a_start_the_stream_already_revokes_is_not_run_and_leaves_the_next_attempt_alone(
    bus: Bus, tmp_path: Path
) -> None:
    # Given the job's attempt 2 running on node n2, as its run record says
    elsewhere = RunRecord("job-1", 2, "n2", 4242, 4242, str(tmp_path / "n2"), str(tmp_path / "n2"), 0.0, False)
    await bus.redis.hset(bus.keys.run("job-1", 2), mapping=elsewhere.to_redis())
    # And node n1's stream with attempt 1's start and, after it, its stop: n1 was declared lost
    # while its runner was paused, before it took the start
    command = start_command(tmp_path)
    stream = bus.keys.node("n1")
    start_id = await bus.redis.xadd(stream, encode(command))
    await bus.redis.xadd(stream, encode(m.StopJob(job_id="job-1", attempt=1, reason="preempt")))
    async with running(bus, tmp_path) as runner:
        # When n1's runner comes back and takes the start
        [append] = await runner.handle(Delivery(stream, start_id, command, 1))  # type: ignore[misc]
    # Then attempt 1 is reported ended, no process was started for it, and attempt 2's record
    # is as it was
    assert isinstance(append.message, m.JobStopped) and append.message.attempt == 1
    assert append.message.reason == "preempt"
    assert runner.runs == {}
    assert not (tmp_path / "data" / "runs" / "job-1").exists()
    assert RunRecord.from_redis(await bus.redis.hgetall(bus.keys.run("job-1", 2))) == elsewhere


async def test_a_start_waits_until_an_attempt_told_to_stop_has_left_its_gpus(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with stand_in_runner(bus, tmp_path, monkeypatch, step_s=0.3) as (runner, ledger):
        # Given an attempt training on GPU 0, told to stop: its node was lost and is back, and
        # GPU 0 went to another job meanwhile
        await stopping(runner, tmp_path, ledger, "stale")
        # When the other job's start for GPU 0 arrives
        await started(runner, stand_in_start(tmp_path, "next", 1, gpu=0, steps=1000), ledger)
    # Then its process started only once the stopped attempt's had exited
    [stale_end] = ledger_rows(ledger, "end", "stale")
    [next_start] = ledger_rows(ledger, "start", "next")
    assert stale_end["stopped"] and stale_end["t"] <= next_start["t"]


async def test_a_restarted_runner_starting_a_job_on_the_gpus_of_an_adopted_attempt_told_to_stop_waits_for_its_end_not_forever(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with stand_in_runner(bus, tmp_path, monkeypatch, step_s=0.3) as (runner, ledger):
        # Given an attempt training on GPU 0, started by a runner of this node that is gone: the
        # restarted runner adopts it, and has not yet handled the starts pending in its stream
        old = stand_in_start(tmp_path, "old", 1, gpu=0, steps=1000)
        record, _ = await anyio.to_thread.run_sync(runner._launch, old)
        await bus.redis.hset(bus.keys.run("old", 1), mapping=record.to_redis())
        await runner.adopt()
        with anyio.fail_after(30):
            while not ledger_rows(ledger, "start", "old"):
                await anyio.sleep(0.05)
        # And the attempt preempted: its stop is handled
        await runner.handle(Delivery("s", "2-0", m.StopJob(job_id="old", attempt=1, reason="preempt"), 1))
        # When the pending start of the job that takes GPU 0 is handled
        with anyio.fail_after(30):
            outcome = await runner.handle(Delivery("s", "3-0", stand_in_start(tmp_path, "next", 1, gpu=0, steps=1), 1))
            while not ledger_rows(ledger, "start", "next"):
                await anyio.sleep(0.05)
    # Then it is handled once the adopted attempt has stopped and said so, not never
    assert isinstance(outcome, Outcome)
    [old_end] = ledger_rows(ledger, "end", "old")
    [next_start] = ledger_rows(ledger, "start", "next")
    assert old_end["stopped"] and old_end["t"] <= next_start["t"]
    reports = [decode(fields) for _, fields in await bus.redis.xrange(bus.keys.events)]
    assert [(r.type, r.job_id) for r in reports if r.type == "job.stopped"] == [("job.stopped", "old")]


def ledger_rows(ledger: Path, event: str, job_id: str | None = None) -> list[dict[str, object]]:
    """What the stand-in trainers recorded: ``event`` rows, of one job's processes or all."""
    rows = [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []
    return [row for row in rows if row["event"] == event and job_id in (None, str(row["tag"]).split(":")[0])]


@contextlib.asynccontextmanager
async def trainers_killed(ledger: Path) -> AsyncIterator[None]:
    """The stand-in trainers a test's runner started are killed when it ends (a runner leaves
    its jobs running when it stops)."""
    try:
        yield
    finally:
        for row in ledger_rows(ledger, "start"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(str(row["pid"])), signal.SIGKILL)


async def test_an_attempt_reports_from_its_own_run_directory_not_from_the_one_its_stopped_predecessor_just_wrote(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with stand_in_runner(bus, tmp_path, monkeypatch, step_s=0.05) as (runner, ledger):
        # Given attempt 1 stopped (its node was lost): it saves a checkpoint in its run directory
        # on the way out
        await stopping(runner, tmp_path, ledger, "job-1")
        with anyio.fail_after(30):
            await runner.ended[("job-1", 1)].wait()
        # When attempt 2 starts at once, in the same output directory, and trains to the end
        await started(runner, stand_in_start(tmp_path, "job-1", 2, gpu=1, steps=5), ledger)
        with anyio.fail_after(30):
            while ("job-1", 2) in runner.runs:
                await anyio.sleep(0.05)
    # Then it is reported as it ended, from its own run directory: succeeded, at its last step
    reports = [decode(fields) for _, fields in await bus.redis.xrange(bus.keys.events)]
    final = [r for r in reports if r.type in ("job.succeeded", "job.failed") and getattr(r, "attempt", 0) == 2]
    assert [r.type for r in final] == ["job.succeeded"]
    [row] = ledger_rows(ledger, "start", "job-1")[1:]
    steps = [r.step for r in reports if isinstance(r, m.JobProgress) and r.attempt == 2]
    assert steps == [1, 2, 3, 4, 5] and final[0].run_dir == row["output_dir"]  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def stand_in_runner(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, step_s: float
) -> AsyncIterator[tuple[Runner, Path]]:
    """A runner of node n1 whose `swift` is the chaos run's stand-in trainer, and the ledger its
    trainers write; the trainers are killed, and its supervising tasks end, with the block."""
    ledger = tmp_path / "ledger.jsonl"
    monkeypatch.setenv("CHAOS_LEDGER", str(ledger))
    monkeypatch.setenv("CHAOS_STEP_S", str(step_s))
    prepare(tmp_path)
    settings = load_settings(
        namespace=bus.keys.namespace,
        data_dir=tmp_path / "data",
        path_roots=str(tmp_path),
        node_name="n1",
        swift_bin=str(stand_in_swift(tmp_path)),
    )
    async with anyio.create_task_group() as tg, trainers_killed(ledger):
        yield Runner(settings, bus, tg), ledger
        tg.cancel_scope.cancel()


def stand_in_start(tmp_path: Path, job_id: str, attempt: int, *, gpu: int, steps: int) -> m.StartJob:
    spec = LanguageModelJob.model_validate(job_request(tmp_path, PlannedJob(0, 0, 5, 1, steps, steps, False, 0)))
    return m.StartJob(job_id=job_id, attempt=attempt, node="n1", gpu_ids=[gpu], spec=spec)


async def started(runner: Runner, command: m.StartJob, ledger: Path) -> None:
    """Hand a start to the runner, and wait until the trainer it starts is up."""
    outcome = await runner.handle(Delivery("s", f"{command.attempt}-0", command, 1))
    assert isinstance(outcome, Outcome) and outcome.committed is not None
    outcome.committed.set()
    tag = f"{command.job_id}:{command.attempt}"
    with anyio.fail_after(30):
        while not any(row["tag"] == tag for row in ledger_rows(ledger, "start")):
            await anyio.sleep(0.05)


async def stopping(runner: Runner, tmp_path: Path, ledger: Path, job_id: str) -> None:
    """Attempt 1 of a job, training on GPU 0, told to stop: its node was lost, and is back."""
    await started(runner, stand_in_start(tmp_path, job_id, 1, gpu=0, steps=1000), ledger)
    await runner.handle(Delivery("s", "2-0", m.StopJob(job_id=job_id, attempt=1, reason="preempt"), 1))
