"""The runner's start and stop handling against a real Redis and real processes (no training),
and the parsing of ms-swift's progress rows and failures."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from events import messages as m
from events.bus import Append, Bus
from events.consumer import Delivery, Outcome
from events.params import LanguageModelJob
from services.config import Settings, load_settings
from services.launch import TAG_VARIABLE
from services.runner.progress import classify_failure, hub_failure_message, parse_duration_s, progress_fields
from services.runner.service import Runner


@contextlib.asynccontextmanager
async def running(bus: Bus, tmp_path: Path) -> AsyncIterator[Runner]:
    """A runner whose supervising tasks end with the block (a task group cannot span fixtures)."""
    settings = load_settings(
        namespace=bus.keys.namespace,
        data_dir=tmp_path / "data",
        path_roots=str(tmp_path),
        node_name="n1",
        swift_bin="swift",
    )
    async with anyio.create_task_group() as tg:
        yield Runner(settings, bus, tg)
        tg.cancel_scope.cancel()


def start_command(tmp_path: Path, attempt: int = 1, **spec: object) -> m.StartJob:
    (tmp_path / "model").mkdir(exist_ok=True)
    job = LanguageModelJob(task_type="language_model", model_path=str(tmp_path / "model"), data_path="org/data", **spec)
    return m.StartJob(job_id="job-1", attempt=attempt, node="n1", gpu_ids=[0], spec=job)


def deliver(message: m.Message) -> Delivery:
    return Delivery("stream", "1-0", message, 1)


async def handled_alone(settings: Settings, bus: Bus, command: m.StartJob) -> tuple[Append, Runner]:
    """What a runner with these settings answers to one start (its supervising tasks stopped)."""
    async with anyio.create_task_group() as tg:
        runner = Runner(settings, bus, tg)
        [append] = await runner.handle(deliver(command))  # type: ignore[misc]
        tg.cancel_scope.cancel()
    return append, runner


async def test_a_job_that_cannot_start_fails_with_the_reason_instead_of_holding_its_gpus(
    bus: Bus, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    command = start_command(tmp_path, output_dir=str(tmp_path / "a-file" / "not-writable"))
    async with running(bus, tmp_path) as runner:
        [append] = await runner.handle(deliver(command))  # type: ignore[misc]
    assert isinstance(append.message, m.JobFailed)
    assert append.message.reason == "spawn_failed" and append.message.attempt == 1
    assert "not-writable" in append.message.message
    assert runner.runs == {}


async def test_an_output_dir_whose_parent_became_a_symlink_out_of_the_roots_is_refused_at_launch(
    bus: Bus, tmp_path: Path
) -> None:
    # Given a job whose output_dir was inside the roots when it was submitted (and held)
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    (roots / "jobs").mkdir(parents=True)
    outside.mkdir()
    command = start_command(roots, output_dir=str(roots / "jobs" / "out"))
    # When its parent is swapped for a symlink to a place outside the roots before it starts
    (roots / "jobs").rmdir()
    (roots / "jobs").symlink_to(outside, target_is_directory=True)
    settings = load_settings(
        namespace=bus.keys.namespace, data_dir=roots / "data", path_roots=str(roots), node_name="n1"
    )
    append, runner = await handled_alone(settings, bus, command)
    # Then the job fails with the reason, naming the field and where it leads, and nothing was
    # written there (nor started)
    assert isinstance(append.message, m.JobFailed) and append.message.reason == "path_outside_roots"
    assert "output_dir" in append.message.message and str(outside) in append.message.message
    assert list(outside.iterdir()) == []
    assert runner.runs == {} and not (settings.runs_dir / "job-1").exists()


@pytest.mark.parametrize(
    ("field", "named"),
    [
        ("model_path", "model_path"),
        ("data_path", "data_path"),
        ("val_dataset", "train_params.extra_args.val_dataset"),
        ("logging_dir", "train_params.extra_args.logging_dir"),
    ],
)
async def test_every_local_path_of_the_job_is_checked_again_at_launch(
    bus: Bus, tmp_path: Path, field: str, named: str
) -> None:
    # Given a job whose files were all inside the roots when it was submitted
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    (roots / "kept" / "model").mkdir(parents=True)
    (roots / "kept" / "train.jsonl").write_text("{}\n")
    (roots / "swapped").mkdir()
    outside.mkdir()
    values = {
        "model_path": str(roots / "kept" / "model"),
        "data_path": str(roots / "kept" / "train.jsonl"),
        "val_dataset": str(roots / "kept" / "train.jsonl"),
        "logging_dir": str(roots / "kept" / "logs"),
        field: str(roots / "swapped" / "x"),
    }
    extra = {"val_dataset": values.pop("val_dataset"), "logging_dir": values.pop("logging_dir")}
    job = LanguageModelJob(task_type="language_model", train_params={"extra_args": extra}, **values)  # type: ignore[arg-type]
    command = m.StartJob(job_id="job-1", attempt=1, node="n1", gpu_ids=[0], spec=job)
    # When one of their directories now leads outside the roots
    (roots / "swapped").rmdir()
    (roots / "swapped").symlink_to(outside, target_is_directory=True)
    settings = load_settings(
        namespace=bus.keys.namespace, data_dir=roots / "data", path_roots=str(roots), node_name="n1"
    )
    append, _ = await handled_alone(settings, bus, command)
    # Then the job is refused, naming that value and where it leads
    assert isinstance(append.message, m.JobFailed) and append.message.reason == "path_outside_roots"
    assert append.message.message.startswith(f"refused to start: {named}: ")
    assert str(outside / "x") in append.message.message
    assert not (settings.runs_dir / "job-1").exists()


async def test_a_job_naming_the_services_own_files_is_refused_at_launch(bus: Bus, tmp_path: Path) -> None:
    # Given a job stored before its data path was refused: DATA_DIR's secrets, inside the roots
    settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data", path_roots=str(tmp_path))
    (tmp_path / "data" / "secrets").mkdir(parents=True)
    (tmp_path / "data" / "secrets" / "redis-password").write_text("hunter2\n")
    command = start_command(tmp_path)
    spec = command.spec.model_copy(update={"data_path": str(tmp_path / "data" / "secrets" / "redis-password")})
    command = command.model_copy(update={"spec": spec})
    # When its start arrives
    append, runner = await handled_alone(settings.model_copy(update={"node_name": "n1"}), bus, command)
    # Then it fails with the reason, and nothing ran
    assert isinstance(append.message, m.JobFailed) and append.message.reason == "path_outside_roots"
    assert "data_path" in append.message.message and "the service's own files" in append.message.message
    assert runner.runs == {} and not (settings.runs_dir / "job-1").exists()


async def test_a_stop_that_overtakes_its_start_cancels_the_job_without_running_it(bus: Bus, tmp_path: Path) -> None:
    async with running(bus, tmp_path) as runner:
        # Given a stop handled before its job's start (the start failed once and waits for a retry)
        await runner.handle(deliver(m.StopJob(job_id="job-1", attempt=1)))
        # When the start is retried
        [append] = await runner.handle(deliver(start_command(tmp_path)))  # type: ignore[misc]
    # Then the job is reported cancelled and nothing was started
    assert isinstance(append.message, m.JobCancelled) and append.message.attempt == 1
    assert runner.runs == {}
    assert not await bus.redis.exists(bus.keys.run("job-1", 1))


async def test_a_redelivered_start_adopts_the_process_it_already_started(bus: Bus, tmp_path: Path) -> None:
    # Given the attempt's process already runs (the runner died before recording it)
    env = {**os.environ, TAG_VARIABLE: "job-1:1"}
    already = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
    try:
        async with running(bus, tmp_path) as runner:
            # When its start is delivered again
            outcome = await runner.handle(deliver(start_command(tmp_path)))
            # Then the runner reports and supervises that process instead of starting a second one
            assert isinstance(outcome, Outcome)
            [append] = outcome.appends
            assert isinstance(append.message, m.JobStarted) and append.message.pid == already.pid
            assert runner.runs[("job-1", 1)].record.pgid == already.pid
            assert not (runner.settings.runs_dir / "job-1" / "attempt-1" / "stdout.log").exists()
    finally:
        os.killpg(already.pid, signal.SIGKILL)
        already.wait()


def test_progress_rows_become_progress_fields() -> None:
    row = {
        "loss": 2.5,
        "grad_norm": math.nan,
        "learning_rate": 1e-4,
        "token_acc": 0.25,
        "epoch": 0.5,
        "global_step/max_steps": "5/20",
        "elapsed_time": "1m 5s",
        "remaining_time": "3m",
        "train_speed(s/it)": 0.2,
        "eval_loss": math.inf,
        "eval_token_acc": 0.3,
    }
    fields = progress_fields(row)
    assert fields is not None
    assert (fields["step"], fields["max_steps"], fields["percent"]) == (5, 20, 25.0)
    assert fields["grad_norm"] is None  # not finite: not valid JSON for browsers
    assert (fields["elapsed_s"], fields["remaining_s"]) == (65.0, 180.0)
    assert fields["eval"] == {"eval_token_acc": 0.3}
    closing = progress_fields({"train_runtime": 3.0, "global_step/max_steps": "20/20"})
    assert closing is not None and (closing["step"], closing["percent"], closing["loss"]) == (20, 100.0, None)
    assert progress_fields({"loss": 1.0}) is None
    assert parse_duration_s("2h 3m 4s") == 7384.0 and parse_duration_s("soon") is None


@pytest.mark.parametrize(
    ("exit_code", "stderr", "reason"),
    [
        (1, ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"], "oom"),
        (1, ["ValueError: remaining_argv: ['--bogus', '1']"], "bad_argument"),
        (1, ["FileNotFoundError: Dataset /data/x.jsonl does not exist"], "dataset_not_found"),
        (1, ["OSError: Qwen/Nope is not a local folder and is not a valid model identifier"], "model_not_found"),
        (-9, ["Train: 10%"], "killed"),
        (1, ["RuntimeError: something else"], "unknown"),
    ],
)
def test_failures_are_classified_from_exit_status_and_output(exit_code: int, stderr: list[str], reason: str) -> None:
    assert classify_failure(exit_code, stderr, stopped_by_us=False) == reason


@pytest.mark.parametrize(
    ("recording", "reason"),
    [
        ("stderr-local-dataset-missing.txt", "dataset_not_found"),
        ("stderr-hub-dataset-unreachable.txt", "dataset_not_found"),
        ("stderr-hub-model-unreachable.txt", "model_not_found"),
    ],
)
def test_recorded_ms_swift_failures_are_classified(recording: str, reason: str) -> None:
    # Real stderr of `swift sft` 4.6 on a machine without hub access (last lines, paths shortened).
    lines = (Path(__file__).parent / "data" / recording).read_text().splitlines()
    assert classify_failure(1, lines, stopped_by_us=False) == reason


MODEL_ARGV = ["swift", "sft", "--model", "org/model", "--dataset", "/data/train.jsonl"]
DATASET_ARGV = ["swift", "sft", "--model", "/models/tiny", "--dataset", "AI-ModelScope/coco#20"]


@pytest.mark.parametrize(
    ("recording", "argv", "use_hf", "message"),
    [
        (
            "stderr-hub-model-unreachable.txt",
            MODEL_ARGV,
            "0",
            "model 'org/model' could not be downloaded from ModelScope (modelscope.cn): the hub could not be reached",
        ),
        (
            "stderr-hub-dataset-unreachable.txt",
            DATASET_ARGV,
            "0",
            "dataset 'AI-ModelScope/coco#20' could not be downloaded from ModelScope (modelscope.cn):"
            " the hub could not be reached",
        ),
        (
            "stderr-hf-model-unreachable.txt",
            MODEL_ARGV,
            "1",
            "model 'org/model' could not be downloaded from Hugging Face (huggingface.co): the hub could not be reached",
        ),
        (
            "stderr-hf-dataset-unreachable.txt",
            DATASET_ARGV,
            "1",
            "dataset 'AI-ModelScope/coco#20' could not be downloaded from Hugging Face (huggingface.co):"
            " the hub could not be reached",
        ),
        (
            "stderr-hf-model-offline.txt",
            MODEL_ARGV,
            "1",
            "model 'org/model' could not be downloaded from Hugging Face (huggingface.co):"
            " offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)",
        ),
        (
            "stderr-hf-dataset-offline.txt",
            DATASET_ARGV,
            "1",
            "dataset 'AI-ModelScope/coco#20' could not be downloaded from Hugging Face (huggingface.co):"
            " offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)",
        ),
        ("stderr-local-dataset-missing.txt", ["swift", "sft", "--model", "/m", "--dataset", "/gone.jsonl"], "0", None),
    ],
)
def test_a_failed_download_says_in_one_line_which_hub_and_which_id(
    recording: str, argv: list[str], use_hf: str, message: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real stderr of `swift sft` 4.6 without hub access, from ModelScope and from Hugging Face
    for variable in ("HF_ENDPOINT", "MODELSCOPE_DOMAIN", "USE_HF"):
        monkeypatch.delenv(variable, raising=False)
    lines = (Path(__file__).parent / "data" / recording).read_text().splitlines()
    reason = classify_failure(1, lines, stopped_by_us=False)
    assert reason in ("model_not_found", "dataset_not_found")
    assert hub_failure_message(reason, lines, argv, {"USE_HF": use_hf}) == message
    # A mirror of the hub is named by its host
    if message and use_hf == "1":
        mirrored = hub_failure_message(reason, lines, argv, {"USE_HF": "1", "HF_ENDPOINT": "https://hf.example.org"})
        assert mirrored is not None and "from Hugging Face (hf.example.org)" in mirrored


async def test_gpus_are_released_only_once_nvml_lists_none_of_the_jobs_processes(bus: Bus, tmp_path: Path) -> None:
    # A stand-in for `swift`: a process that lives a moment (the mechanics under test are the
    # runner's, not ms-swift's).
    stand_in = tmp_path / "swift"
    stand_in.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(1.5)\n")
    stand_in.chmod(0o755)
    listed: list[set[int]] = []
    seen_after_exit = 3  # NVML keeps listing the job's process this many times after it is gone

    def probe(indices: list[int]) -> set[int]:
        nonlocal seen_after_exit
        assert indices == [0]
        job_pids = runner.runs[("job-1", 1)].pids
        if seen_after_exit:
            seen_after_exit -= 1
            listed.append(set(job_pids))
            return set(job_pids)
        return {1}  # someone else's process

    settings = load_settings(
        namespace=bus.keys.namespace,
        data_dir=tmp_path / "data",
        path_roots=str(tmp_path),
        node_name="n1",
        swift_bin=str(stand_in),
    )
    async with anyio.create_task_group() as tg:
        runner = Runner(settings, bus, tg, gpu_probe=probe)
        outcome = await runner.handle(deliver(start_command(tmp_path)))
        assert isinstance(outcome, Outcome) and outcome.committed is not None
        outcome.committed.set()
        with anyio.fail_after(30):
            while ("job-1", 1) in runner.runs:
                await anyio.sleep(0.05)
    assert seen_after_exit == 0 and all(listed)  # it waited through every listing of its processes
    [(_, final)] = await bus.redis.xrange(bus.keys.events)
    # The stand-in exits 0 without ms-swift's closing row: not a finished training.
    assert final["type"] == "job.failed" and '"reason":"killed"' in final["data"]


def test_webhook_urls_signatures_and_what_the_log_keeps_of_a_url() -> None:
    from services.webhooks import parse_targets, refused, shown, sign

    assert refused("https://example.org/hook", allow_loopback=False) is None
    assert (
        refused("http://[::1]:8080/hook", allow_loopback=False) == "a loopback address (ALLOW_LOOPBACK_WEBHOOKS is off)"
    )
    assert refused("http://127.0.0.1:8080/hook", allow_loopback=True) is None
    assert (
        refused("http://127.0.0.1:8000/api", allow_loopback=True, gateway=("127.0.0.1", 8000)) == "the gateway itself"
    )
    assert refused("gopher://example.org/", allow_loopback=True) == "must be an http(s) URL with a host"
    for metadata in ("http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://0.0.0.0:8080/"):
        assert refused(metadata, allow_loopback=True) == "a link-local, multicast or reserved address", metadata
    assert shown("https://user:pw@hooks.example.org:8443/a/b?token=s3cret") == "https://hooks.example.org:8443/a/b"
    expected = "sha256=" + __import__("hmac").new(b"k", b"{}", "sha256").hexdigest()
    assert sign("k", b"{}") == expected
    targets = parse_targets("https://a.example/x, slack:https://hooks.slack.com/y\nhttps://b.example/z")
    assert [(t.url, t.slack) for t in targets] == [
        ("https://a.example/x", False),
        ("https://hooks.slack.com/y", True),
        ("https://b.example/z", False),
    ]
