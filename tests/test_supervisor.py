"""Supervising a job's process against a real Redis and real processes (stand-ins for `swift`):
its exit status across a restart of the runner's main, every logged row as a fact, and the one
line that says why a run failed."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import anyio
import psutil
import pytest

from events import messages as m
from events.bus import Bus
from events.codec import decode, progress_id
from events.consumer import Delivery, Outcome
from events.params import LanguageModelJob
from services.config import load_settings
from services.runner.progress import JsonlTail, final_metrics, read_rows
from services.runner.record import RunRecord
from services.runner.service import Runner
from services.runner.supervisor import PROGRESS_ROWS_PER_COMMIT, JobRun
from services.swift import failure_message
from tests.conftest import wait_for

DATA = Path(__file__).parent / "data"


async def facts(bus: Bus, count: int, timeout_s: float = 30) -> list[m.Message]:
    """The first ``count`` entries of the log, waiting (bounded) for them to be appended."""
    with anyio.fail_after(timeout_s):
        while len(entries := await bus.redis.xrange(bus.keys.events)) < count:
            await bus.redis.xread({bus.keys.events: entries[-1][0] if entries else "0-0"}, block=1000)
    return [decode(fields) for _, fields in entries]


async def test_a_job_that_ends_while_the_runners_main_starts_again_is_reported_with_its_exit_code(
    bus: Bus, tmp_path: Path
) -> None:
    # A stand-in for `swift` that exits 3 once the test lets it (it reads a FIFO).
    release = tmp_path / "release"
    os.mkfifo(release)
    stand_in = tmp_path / "swift"
    stand_in.write_text(f"#!{sys.executable}\nimport sys\nopen({str(release)!r}).read()\nsys.exit(3)\n")
    stand_in.chmod(0o755)
    settings = load_settings(
        namespace=bus.keys.namespace,
        data_dir=tmp_path / "data",
        path_roots=str(tmp_path),  # the runner checks the job's paths against it at launch
        node_name="n1",
        swift_bin=str(stand_in),
    )
    (tmp_path / "model").mkdir()
    spec = LanguageModelJob(task_type="language_model", model_path=str(tmp_path / "model"), data_path="org/data")
    start = m.StartJob(job_id="job-1", attempt=1, node="n1", gpu_ids=[0], spec=spec)

    # Given a job the runner started
    async with anyio.create_task_group() as tg:
        runner = Runner(settings, bus, tg)
        outcome = await runner.handle(Delivery("stream", "1-0", start, 1))
        assert isinstance(outcome, Outcome) and outcome.committed is not None
        outcome.committed.set()
        pid = runner.runs[("job-1", 1)].record.pid
        # When the runner's main ends, as it does when Redis goes away, while the job runs
        tg.cancel_scope.cancel()
    # And the job ends before the main starts again: it waits, a zombie, for its parent
    with release.open("w") as fifo:
        fifo.write("go")
    wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10, "the job to exit")

    # Then the main started again (same process) adopts the job and reports how it really ended
    async with anyio.create_task_group() as tg:
        runner = Runner(settings, bus, tg)
        await runner.adopt()
        runner.release_adopted()
        [final] = await facts(bus, 1)
        tg.cancel_scope.cancel()
    assert isinstance(final, m.JobFailed) and final.exit_code == 3
    assert not psutil.pid_exists(pid)  # reaped
    assert not await bus.redis.exists(bus.keys.run("job-1", 1))


async def test_every_logged_row_is_a_progress_fact_in_order_with_eval_rows_kept(bus: Bus, tmp_path: Path) -> None:
    # Given the logging.jsonl of a real run: 24 steps logged one by one, an evaluation at steps
    # 8, 16 and 24, and the closing rows
    version_dir = tmp_path / "output" / "v0-20261204-000000"
    version_dir.mkdir(parents=True)
    shutil.copy(DATA / "logging-with-eval.jsonl", version_dir / "logging.jsonl")
    record = RunRecord("job-1", 1, "n1", 1, 1, str(tmp_path / "run"), str(tmp_path / "output"), 0.0, False)
    # When the runner reads it
    await JobRun(bus, record, log_maxlen=100, stop_grace_s=1).pump()
    # Then each row is a fact of its own, in the order written
    progress = [fact for fact in await facts(bus, 27) if isinstance(fact, m.JobProgress)]
    assert [p.step for p in progress] == [*range(1, 9), 8, *range(9, 17), 16, *range(17, 25), 24]
    evaluated = [p for p in progress if p.eval]
    assert [(p.step, round(p.eval["eval_loss"], 4)) for p in evaluated] == [(8, 5.4732), (16, 5.3012), (24, 5.2766)]
    # and an evaluation keeps the training loss of its step beside its own
    assert all(p.loss == progress[i - 1].loss and p.loss is not None for i, p in enumerate(progress) if p.eval)
    assert progress[0].loss == pytest.approx(5.99777317) and progress[-2].loss == pytest.approx(5.2666173)
    # and a training row's report has the id its job, attempt and step make (the log stores none
    # for it); an evaluation's, its step's second report, a random one
    assert [p.id == progress_id("job-1", 1, p.step) for p in progress] == [not p.eval for p in progress]
    assert len({p.id for p in progress}) == len(progress)


async def test_a_run_whose_last_step_is_not_a_logging_step_reaches_it_by_its_closing_row(
    bus: Bus, tmp_path: Path
) -> None:
    # Given a run of 5 steps logging every 2nd: rows at steps 2 and 4, then the closing row at 5
    version_dir = tmp_path / "output" / "v0-20261204-000000"
    version_dir.mkdir(parents=True)
    rows = [
        {"loss": 2.0, "learning_rate": 1e-4, "global_step/max_steps": "2/5", "elapsed_time": "1s"},
        {"loss": 1.5, "learning_rate": 5e-5, "global_step/max_steps": "4/5", "elapsed_time": "2s"},
        {"train_runtime": 2.6, "train_loss": 1.7, "global_step/max_steps": "5/5", "elapsed_time": "3s"},
    ]
    (version_dir / "logging.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    record = RunRecord("job-1", 1, "n1", 1, 1, str(tmp_path / "run"), str(tmp_path / "output"), 0.0, False)
    # When the runner reads them
    await JobRun(bus, record, log_maxlen=100, stop_grace_s=1).pump()
    # Then the job's progress reaches step 5, all done, keeping the last training row's loss
    progress = [fact for fact in await facts(bus, 3) if isinstance(fact, m.JobProgress)]
    assert [(p.step, p.percent, p.loss) for p in progress] == [(2, 40.0, 2.0), (4, 80.0, 1.5), (5, 100.0, 1.5)]
    assert progress[-1].learning_rate == 5e-5 and progress[-1].elapsed_s == 3.0


def test_a_runs_final_values_are_its_last_training_row_and_its_last_evaluation() -> None:
    final = final_metrics(read_rows(DATA / "logging-with-eval.jsonl"))
    assert final == pytest.approx(
        {"loss": 5.2666173, "eval_loss": 5.27663708, "eval_token_acc": 0.52, "train_loss": 5.46324023}
    )
    assert final_metrics([{"loss": "nan", "global_step/max_steps": "1/1"}]) == {}  # not a finite number


async def test_a_long_backlog_of_rows_is_reported_whole_in_several_commits(bus: Bus, tmp_path: Path) -> None:
    # Given more rows than one commit takes (a runner that was away for long)
    version_dir = tmp_path / "output" / "v0-20261204-000000"
    version_dir.mkdir(parents=True)
    total = PROGRESS_ROWS_PER_COMMIT * 2 + 7
    rows = [{"loss": 1.0, "global_step/max_steps": f"{step}/{total}"} for step in range(1, total + 1)]
    (version_dir / "logging.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    record = RunRecord("job-1", 1, "n1", 1, 1, str(tmp_path / "run"), str(tmp_path / "output"), 0.0, False)
    # When the runner reads them
    await JobRun(bus, record, log_maxlen=100, stop_grace_s=1).pump()
    # Then every one is reported, in order, and the stored offset is the file's end
    assert [p.step for p in await facts(bus, total)] == list(range(1, total + 1))  # type: ignore[attr-defined]
    saved = await bus.redis.hgetall(bus.keys.run("job-1", 1))
    assert int(saved["jsonl_offset"]) == (version_dir / "logging.jsonl").stat().st_size
    assert JsonlTail(version_dir / "logging.jsonl", int(saved["jsonl_offset"])).peek() == (
        [],
        int(saved["jsonl_offset"]),
    )


@pytest.mark.parametrize(
    ("recording", "message"),
    [
        ("stderr-local-dataset-missing.txt", "ValueError: The local path does not exist, dataset_id: `/tmp/gone/"),
        ("stderr-hub-dataset-unreachable.txt", "modelscope_hub._download_control._DownloadDeadlineError: [E1001]"),
        ("stderr-hub-model-unreachable.txt", "modelscope_hub.errors.NetworkError: [E1020] Connection failed: "),
        # Two workers under torchrun: the worker's exception, not torchrun's ChildFailedError after it
        ("stderr-torchrun-model-missing.txt", "ValueError: path: '/data/models/gone' not found"),
    ],
)
def test_a_failures_message_is_the_line_its_traceback_ends_with(recording: str, message: str) -> None:
    # Real stderr of `swift sft` 4.6 (paths shortened)
    lines = (DATA / recording).read_text().splitlines()
    found = failure_message(lines)
    assert found.startswith(message)
    assert "\n" not in found and "^" not in found and "Traceback" not in found


def test_a_failures_message_without_a_traceback() -> None:
    assert failure_message(["[INFO:swift] loading", "RuntimeError: CUDA error: out of memory"]) == (
        "RuntimeError: CUDA error: out of memory"
    )
    assert failure_message(["Train:  10%|#   | 1/10", "Killed"]) == ""
    assert len(failure_message(["  File 'x'", "ValueError: " + "x" * 5000])) == 1000
