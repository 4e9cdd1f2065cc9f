"""Sharing the pool end to end, with real processes and the real `swift` CLI on the tiny model:
a more urgent job preempts a running one (checkpoint, GPUs handed over once its processes are
gone, queued again in its place, resumed from that checkpoint), and a job suspended over REST
frees its GPUs until it is resumed from its checkpoint. Then the runner alone, with a stand-in
for `swift` whose checkpoint on SIGTERM takes its time: the trainer is given its grace period to
save it, the GPUs go to the next job only once the stopped one's processes are gone, and a stop
that a restarted runner sees to its end is not mistaken for a finished training."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from events import messages as m
from events.bus import Bus
from events.codec import decode
from events.consumer import Delivery, Outcome
from events.params import LanguageModelJob
from services.config import Settings, load_settings
from services.demo.tinymodel import DemoAssets
from services.runner import service, supervisor
from services.runner.record import CHILDREN
from services.runner.service import Runner
from tests.conftest import RedisServer, wait_for
from tests.system import TRAINING_TIMEOUT_S, System, job_body, running

# 30 to 80 steps a second on the tiny model here; a stop lets the trainer run ~3 s more before it
# saves its checkpoint (ms-swift's JIT checkpoint), so a job stopped early is still far from its
# end (with 250 steps, a quiet machine finished the job before the stop came).
MAX_STEPS = 1000
SAVE_STEPS = 20
LOGGING_STEPS = 5
STOP_AT = 40  # the step reached before the job is preempted or suspended (two saves in)


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    settings = {"PREEMPTION": "priority", "PREEMPT_MIN_RUNTIME_S": "0", "SIMULATED_GPUS": "2"}
    with running(redis_server.url, tmp_path_factory.mktemp("system"), clean_exits=True, **settings) as system:
        yield system


def submit(system: System, body: dict[str, Any]) -> str:
    response = httpx.post(f"{system.base}/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def long_job(assets: DemoAssets, **fields: object) -> dict[str, Any]:
    body = job_body(assets, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, logging_steps=LOGGING_STEPS)
    return {**body, "auto_export": False, **fields}


def short_job(assets: DemoAssets, **fields: object) -> dict[str, Any]:
    return {**job_body(assets, max_steps=4, save_steps=4, logging_steps=2), "auto_export": False, **fields}


def view(system: System, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{system.base}/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def until(system: System, job_id: str, holds: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """The job as the API shows it, once ``holds`` is true of it."""

    def check() -> dict[str, Any] | None:
        job = view(system, job_id)
        return job if holds(job) else None

    return wait_for(check, TRAINING_TIMEOUT_S, f"{what} ({job_id})", interval_s=0.1)


def assert_completed(job: dict[str, Any]) -> None:
    assert job["status"] == "completed", {k: job[k] for k in ("status", "reason", "message", "stderr_tail")}


def trained(step: int) -> Callable[[dict[str, Any]], bool]:
    return lambda job: job["progress"] is not None and job["progress"]["step"] >= step


def ended(job: dict[str, Any]) -> bool:
    return job["status"] in ("completed", "failed", "cancelled")


def logged(system: System, job_id: str, event_type: str, **payload: object) -> dict[str, Any]:
    """The job's entry of that type (with that payload) once it is in the log."""

    def check() -> dict[str, Any] | None:
        found = [e for e in history(system, job_id) if e["type"] == event_type]
        return next((e for e in found if all(e["payload"].get(k) == v for k, v in payload.items())), None)

    return wait_for(check, TRAINING_TIMEOUT_S, f"{event_type} of {job_id}", interval_s=0.1)


def history(system: System, job_id: str) -> list[dict[str, Any]]:
    """The job's entries of the log, through the audit API."""
    response = httpx.get(f"{system.base}/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


def only(events: list[dict[str, Any]], event_type: str, **payload: object) -> dict[str, Any]:
    found = [e for e in events if e["type"] == event_type and all(e["payload"].get(k) == v for k, v in payload.items())]
    assert len(found) == 1, (event_type, payload, [(e["type"], e["payload"].get("attempt")) for e in events])
    return found[0]


def position(entry_id: str) -> tuple[int, int]:
    """Where an entry lies in the log (entry ids of one stream sort as these pairs)."""
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def argv_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def stopped_entry(events: list[dict[str, Any]]) -> str:
    return str(only(events, "job.stopped", attempt=1)["entry_id"])


def assert_continued(events: list[dict[str, Any]], checkpoint: str, checkpoint_step: int) -> None:
    """The job's next attempt resumed from the checkpoint and trained on from it to the end."""
    started = only(events, "job.started", attempt=2)
    assert argv_value(started["payload"]["argv"], "--resume_from_checkpoint") == checkpoint
    only(events, "job.succeeded", attempt=2)
    steps = [e["payload"]["step"] for e in events if e["type"] == "job.progress" and e["payload"]["attempt"] == 2]
    assert steps, "the resumed attempt reported no progress"
    assert steps[0] > checkpoint_step - LOGGING_STEPS, (checkpoint_step, steps[:5])  # not from step 0 again
    assert steps == sorted(steps) and steps[-1] == MAX_STEPS, steps


@pytest.mark.e2e
def test_an_urgent_two_gpu_job_preempts_a_running_job_which_resumes_from_its_checkpoint(
    system: System, assets: DemoAssets
) -> None:
    # Given a low-priority job training on both GPUs (torchrun, one rank per GPU)
    victim = submit(system, long_job(assets, priority=1, gpu_count=2))
    until(system, victim, trained(STOP_AT), f"step {STOP_AT}")
    # When a job of priority 9 that needs both GPUs is submitted
    urgent = submit(system, short_job(assets, priority=9, gpu_count=2))
    # Then it starts only once the victim's processes are gone
    logged(system, urgent, "job.started")
    assert group_gone(logged(system, victim, "job.started", attempt=1)["payload"]["pgid"])
    # And the victim is queued again, behind it
    assert view(system, victim)["status"] == "queued"
    # And it completes, and so does the victim, in its next attempt
    assert_completed(until(system, urgent, ended, "the urgent job's end"))
    job = until(system, victim, ended, "the victim's end")
    assert_completed(job)
    assert job["preemptions"] == 1

    # And the log tells the whole story: the victim was preempted by the urgent job, ...
    victim_events, urgent_events = history(system, victim), history(system, urgent)
    preempted = only(victim_events, "job.preempted", attempt=1)
    assert preempted["payload"]["by_job_id"] == urgent and preempted["payload"]["reason"] == "priority"
    scheduled = only(urgent_events, "job.scheduled", attempt=1)
    assert scheduled["payload"]["preempted"] == [victim]
    # ... stopped with a checkpoint at or after the step it had reached, ...
    stopped = only(victim_events, "job.stopped", attempt=1)
    checkpoint, checkpoint_step = stopped["payload"]["last_checkpoint"], stopped["payload"]["step"]
    assert stopped["payload"]["reason"] == "preempt"
    k = preempted["payload"]["step"]  # the step the log knew when the preemption was decided
    assert k >= STOP_AT
    assert checkpoint.endswith(f"checkpoint-{checkpoint_step}") and checkpoint_step >= k - SAVE_STEPS
    assert checkpoint_step < MAX_STEPS  # stopped mid-run
    # ... and only then did the urgent job start, on the victim's GPUs
    urgent_start = only(urgent_events, "job.started", attempt=1)
    assert position(preempted["entry_id"]) < position(stopped["entry_id"]) < position(urgent_start["entry_id"])
    assert urgent_start["payload"]["cuda_visible_devices"] == "0,1"
    only(urgent_events, "job.succeeded", attempt=1)
    # And the victim was queued again and resumed from that checkpoint
    rescheduled = only(victim_events, "job.scheduled", attempt=2)
    assert position(rescheduled["entry_id"]) > position(stopped["entry_id"])
    assert_continued(victim_events, checkpoint, checkpoint_step)


@pytest.mark.e2e
def test_a_suspended_job_frees_its_gpus_and_resumes_from_its_checkpoint(system: System, assets: DemoAssets) -> None:
    # Given a job training on both GPUs
    job_id = submit(system, long_job(assets, gpu_count=2))
    k = until(system, job_id, trained(STOP_AT), f"step {STOP_AT}")["progress"]["step"]
    # When it is suspended over REST, at step k or later
    assert httpx.post(f"{system.base}/jobs/{job_id}/suspend").status_code == 202
    # Then it is suspended, its process stopped with a checkpoint
    stopped = logged(system, job_id, "job.stopped", attempt=1)["payload"]
    assert view(system, job_id)["status"] == "suspended"
    checkpoint, checkpoint_step = stopped["last_checkpoint"], stopped["step"]
    assert stopped["reason"] == "suspend" and checkpoint.endswith(f"checkpoint-{checkpoint_step}")
    assert k - SAVE_STEPS <= checkpoint_step < MAX_STEPS
    # And its GPUs are free: another job that needs both starts
    gpus = httpx.get(f"{system.base}/gpus").json()["nodes"][0]["gpus"]
    assert [gpu["held_by"] for gpu in gpus] == [None, None]
    other = submit(system, short_job(assets, gpu_count=2))
    logged(system, other, "job.started")
    # When it is resumed, while that job holds the GPUs
    assert httpx.post(f"{system.base}/jobs/{job_id}/resume").status_code == 202
    # Then it is queued again, and once that job is gone it trains on from its checkpoint to the end
    until(system, job_id, lambda job: job["status"] == "queued", "the resume")
    assert httpx.post(f"{system.base}/jobs/{other}/cancel").status_code == 202
    assert_completed(until(system, job_id, ended, "the job's end"))
    events = history(system, job_id)
    suspended, resumed = only(events, "job.suspended", attempt=1), only(events, "job.resumed")
    assert position(suspended["entry_id"]) < position(stopped_entry(events)) < position(resumed["entry_id"])
    assert_continued(events, checkpoint, checkpoint_step)
    assert view(system, other)["status"] == "cancelled"


# A stand-in for `swift sft` as ms-swift 4 behaves (measured): the `swift` wrapper runs the trainer
# as its child and dies at once on SIGTERM; the trainer logs a row per step and, on SIGTERM, saves
# a checkpoint (which takes SAVE_S here), writes the closing row naming it, and exits 0, exactly as
# when it trains to its last step.
SAVE_S = 1.5
STAND_IN = f"""#!{sys.executable} -S
import json, signal, subprocess, sys, time
from pathlib import Path
if sys.argv[1] == "sft":
    sys.exit(subprocess.run([sys.executable, "-S", __file__, "train", *sys.argv[2:]]).returncode)
flags = sys.argv[2:]
options = {{name[2:]: value for name, value in zip(flags[::2], flags[1::2])}}
run = Path(options["output_dir"]) / "v0-20260101-000000"
run.mkdir(parents=True)
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
step, max_steps = 0, int(options["max_steps"])
while step < max_steps and not stopping:
    time.sleep(0.05)
    step += 1
    with (run / "logging.jsonl").open("a") as rows:
        rows.write(json.dumps({{"loss": 1.0, "global_step/max_steps": f"{{step}}/{{max_steps}}"}}) + "\\n")
if stopping:
    time.sleep({SAVE_S})
checkpoint = run / f"checkpoint-{{step}}"
checkpoint.mkdir()
(checkpoint / "trainer_state.json").write_text("{{}}")
with (run / "logging.jsonl").open("a") as rows:
    rows.write(json.dumps({{"last_model_checkpoint": str(checkpoint), "global_step": step}}) + "\\n")
"""


def stand_in_settings(bus: Bus, tmp_path: Path, **overrides: object) -> Settings:
    swift = tmp_path / "swift"
    swift.write_text(STAND_IN)
    swift.chmod(0o755)
    (tmp_path / "model").mkdir(exist_ok=True)
    return load_settings(
        namespace=bus.keys.namespace,
        data_dir=tmp_path / "data",
        path_roots=str(tmp_path),
        node_name="n1",
        swift_bin=str(swift),
        **overrides,
    )


def start_command(tmp_path: Path, job_id: str, gpu_ids: list[int], max_steps: int) -> m.StartJob:
    spec = LanguageModelJob(
        task_type="language_model",
        model_path=str(tmp_path / "model"),
        data_path="org/data",
        train_params={"max_steps": max_steps, "save_steps": max_steps, "logging_steps": 1},
    )
    return m.StartJob(job_id=job_id, attempt=1, node="n1", gpu_ids=gpu_ids, spec=spec)


async def log_of(bus: Bus) -> list[m.Message]:
    return [decode(fields) for _, fields in await bus.redis.xrange(bus.keys.events)]


async def until_in_log(bus: Bus, found: Any, timeout_s: float = 30) -> list[m.Message]:
    with anyio.fail_after(timeout_s):
        while not found(facts := await log_of(bus)):
            await anyio.sleep(0.05)
    return facts


async def started(runner: Runner, command: m.StartJob) -> int:
    """Start a job through the runner as its consumer does; the pid of its process."""
    outcome = await runner.handle(Delivery("stream", "1-0", command, 1))
    assert isinstance(outcome, Outcome) and outcome.committed is not None
    outcome.committed.set()
    return runner.runs[(command.job_id or "", 1)].record.pid


def stopped_of(facts: list[m.Message], job_id: str) -> m.JobStopped | None:
    return next((f for f in facts if isinstance(f, m.JobStopped) and f.job_id == job_id), None)


def progress_of(job_id: str) -> Any:
    return lambda facts: any(isinstance(f, m.JobProgress) and f.job_id == job_id for f in facts)


async def test_a_preempted_trainer_saves_its_checkpoint_and_its_gpus_are_handed_over_only_once_it_is_gone(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a runner whose stopped jobs have a grace period of 4 s, processes that outlive their
    # group leader (the `swift` wrapper) are not otherwise given long, and NVML lists a stopped
    # job's processes on its GPUs for a while after they are gone (as a driver may)
    monkeypatch.setattr(supervisor, "GROUP_EXIT_TIMEOUT_S", 0.2)
    monkeypatch.setattr(service, "GROUP_EXIT_TIMEOUT_S", 0.2)
    settings = stand_in_settings(bus, tmp_path, stop_grace_s=4)
    listed_until = float("inf")
    listed: set[int] = set()
    probe = lambda indices: listed if time.monotonic() < listed_until else set()  # noqa: E731
    async with anyio.create_task_group() as tg:
        runner = Runner(settings, bus, tg, gpu_probe=probe)
        # And a job training on two GPUs
        victim = await started(runner, start_command(tmp_path, "victim", [0, 1], max_steps=10_000))
        listed.add(victim)
        await until_in_log(bus, progress_of("victim"))
        # When it is preempted and a job is started on one of its GPUs (the scheduler's stop, then
        # its start, as they come in the node's stream)
        listed_until = time.monotonic() + SAVE_S + 4
        await runner.handle(Delivery("stream", "2-0", m.StopJob(job_id="victim", attempt=1, reason="preempt"), 1))
        urgent = await started(runner, start_command(tmp_path, "urgent", [0], max_steps=5))
        # Then the job started only once the stopped one's processes were gone, and NVML listed
        # none of them on the GPUs: its job.stopped is in the log before the start is reported
        assert time.monotonic() >= listed_until
        stopped = stopped_of(await log_of(bus), "victim")
        assert stopped is not None and stopped.reason == "preempt"
        # And the stopped trainer had the time to save its checkpoint, which the next attempt
        # resumes from
        assert stopped.last_checkpoint is not None and stopped.last_checkpoint.endswith(f"checkpoint-{stopped.step}")
        assert stopped.step is not None and 0 < stopped.step < 10_000
        await until_in_log(bus, lambda facts: any(isinstance(f, m.JobSucceeded) for f in facts))
        tg.cancel_scope.cancel()
    assert urgent != victim


async def test_a_stop_seen_to_its_end_by_a_restarted_runner_is_not_taken_for_a_finished_training(
    bus: Bus, tmp_path: Path
) -> None:
    settings = stand_in_settings(bus, tmp_path)
    # Given a job being suspended, its runner gone before the job's trainer has saved its checkpoint
    async with anyio.create_task_group() as tg:
        runner = Runner(settings, bus, tg)
        pid = await started(runner, start_command(tmp_path, "job-1", [0], max_steps=10_000))
        await until_in_log(bus, progress_of("job-1"))
        await runner.handle(Delivery("stream", "2-0", m.StopJob(job_id="job-1", attempt=1, reason="suspend"), 1))
        tg.cancel_scope.cancel()
    # (a runner of another process: the job's processes are not its children)
    wrapper = CHILDREN.get(pid)
    assert wrapper is not None and wrapper.wait(timeout=10) == -signal.SIGTERM
    CHILDREN.forget(pid)
    # And the trainer ends, its checkpoint saved and its closing row written, while no runner
    # watches it
    wait_for(lambda: group_gone(pid), 20, "the trainer to save its checkpoint and exit")
    # When a runner starts again and adopts the job
    async with anyio.create_task_group() as tg:
        runner = Runner(settings, bus, tg)
        await runner.adopt()
        runner.release_adopted()
        facts = await until_in_log(bus, lambda facts: any(f.id == "job-1-1-final" for f in facts))
        tg.cancel_scope.cancel()
    # Then it reports the job stopped, with that checkpoint to go on from: not succeeded
    final = next(f for f in facts if f.id == "job-1-1-final")
    assert isinstance(final, m.JobStopped), final
    assert final.reason == "suspend" and final.exit_code is None
    assert final.last_checkpoint is not None and final.last_checkpoint.endswith(f"checkpoint-{final.step}")
    assert final.step is not None and 0 < final.step < 10_000
