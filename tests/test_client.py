"""The `swift-trainer` client commands, end to end against a running system with API keys: submit
from flags and from a YAML file, watch to completion (its screen captured in a terminal, tmux),
logs, export, the listings, and exit codes that scripts can use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.demo.tinymodel import DemoAssets
from tests.conftest import RedisServer
from tests.system import TRAINING_TIMEOUT_S, System, running
from tests.test_dashboard import artifacts

pytestmark = pytest.mark.e2e
KEY = "client-key-0123456789"


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running(redis_server.url, tmp_path_factory.mktemp("client"), API_KEYS=f"carol:user:{KEY}") as system:
        yield system


def env(system: System) -> dict[str, str]:
    return {**os.environ, "SWIFT_TRAINER_URL": f"http://127.0.0.1:{system.port}", "SWIFT_TRAINER_API_KEY": KEY}


def cli(system: System, *args: str, code: int = 0, timeout_s: float = TRAINING_TIMEOUT_S) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env(system),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == code, (args, done.returncode, done.stdout, done.stderr)
    return done.stdout + done.stderr


def flags(assets: DemoAssets, steps: int) -> list[str]:
    return [
        "--task-type=language_model",
        f"--model={assets.model_dir}",
        f"--data={assets.dataset_path}",
        *("-p", "model_type=qwen2", "-p", "template=qwen2_5", "-p", "torch_dtype=float32"),
        *(
            "-p",
            f"max_steps={steps}",
            "-p",
            f"save_steps={steps}",
            "-p",
            "logging_steps=1",
            "-p",
            "learning_rate=0.005",
        ),
    ]


def test_submit_watch_logs_and_export_from_the_command_line(system: System, assets: DemoAssets) -> None:
    # Given a job submitted with flags
    created = json.loads(cli(system, "submit", *flags(assets, 12), "--name", "from-the-cli", "--json"))
    job_id = created["job_id"]
    assert created["status"] in ("scheduled", "running", "queued")
    # When it is watched in a terminal, to its end
    if shutil.which("tmux") is None:
        pytest.skip("no tmux (apt-get install tmux)")
    session = f"watch-{uuid.uuid4().hex[:8]}"
    command = f"{sys.executable} -m services.cli watch {job_id}; echo EXIT=$?; sleep 60"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "12", command],
        env={**env(system), "TERM": "xterm-256color"},
        check=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        deadline = time.monotonic() + TRAINING_TIMEOUT_S
        screen = ""
        while "EXIT=" not in screen and time.monotonic() < deadline:
            time.sleep(0.5)
            screen = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=True
            ).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    (artifacts() / "cli-watch.txt").write_text(screen)
    # Then the screen shows the bar at the last step with its loss and learning rate, and it exits 0
    assert "EXIT=0" in screen, screen
    assert "from-the-cli" in screen and "100%" in screen and "step 12/12" in screen, screen
    assert "loss " in screen and "lr " in screen and "completed" in screen, screen
    # And its output lines, its record and the listings agree
    assert "last_model_checkpoint" in cli(system, "logs", job_id, "--tail", "50")
    record = json.loads(cli(system, "show", job_id, "--json"))
    assert record["status"] == "completed" and record["export"]["status"] in ("pending", "running", "completed")
    assert "completed" in cli(system, "show", job_id)
    listed = json.loads(cli(system, "jobs", "--json", "--status", "completed"))
    assert job_id in [job["job_id"] for job in listed["jobs"]]
    assert job_id[:12] in cli(system, "jobs")
    assert "GPUs on 1 nodes" in cli(system, "gpus")
    assert "the queue is empty" in cli(system, "queue")


def test_a_job_file_an_export_and_a_failed_watch(system: System, assets: DemoAssets, tmp_path: Path) -> None:
    # Given a job described in a YAML file, without automatic export
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "task_type: language_model\n"
        f"model_path: {assets.model_dir}\n"
        f"data_path: {assets.dataset_path}\n"
        "auto_export: false\n"
        "train_params: {model_type: qwen2, template: qwen2_5, torch_dtype: float32, max_steps: 4, save_steps: 4}\n"
    )
    # When it is submitted and watched (a flag overrides the file)
    out = cli(system, "submit", str(job_file), "--name", "from-a-file", "--watch", "--json")
    job = json.loads(out[out.index("{") :])
    assert job["spec"]["name"] == "from-a-file" and job["status"] == "completed"
    assert job["export"]["status"] == "none"
    # Then it can be exported from the command line
    assert "export requested" in cli(system, "export", job["job_id"])
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while json.loads(cli(system, "show", job["job_id"], "--json"))["export"]["status"] != "completed":
        assert time.monotonic() < deadline, "the export did not complete"
        time.sleep(0.5)
    # And a job that fails makes watch exit 1, saying why
    failing = json.loads(
        cli(system, "submit", *flags(assets, 4), "--data", "no-such-org/no-such-set", "--hub", "huggingface", "--json")
    )
    said = cli(system, "watch", failing["job_id"], code=1)
    assert "failed (dataset_not_found)" in said and "Hugging Face" in said


def test_usage_errors_refusals_and_no_server_have_their_own_exit_codes(system: System, tmp_path: Path) -> None:
    for command in ("submit", "jobs", "show", "logs", "watch", "cancel", "queue", "gpus", "export", "deploy", "sweep"):
        assert "usage: swift-trainer" in cli(system, command, "--help")
    assert "required" in cli(system, "show", code=2)  # no job id: a usage error
    refused = cli(system, "submit", "--task-type=language_model", "--model=/nowhere", "--data=x.jsonl", code=1)
    assert "model_path" in refused  # the API's reason, in one line
    assert "no job" in cli(system, "show", "nope", code=1) or "not found" in cli(system, "show", "nope", code=1)
    wrong_key = subprocess.run(
        [sys.executable, "-m", "services.cli", "jobs"],
        env={**env(system), "SWIFT_TRAINER_API_KEY": "not-the-key-0123456789"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong_key.returncode == 1
    away = subprocess.run(
        [sys.executable, "-m", "services.cli", "jobs", "--url", "http://127.0.0.1:9"],
        env=env(system),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert away.returncode == 3
    assert away.stderr.count("\n") == 1 and "no server answers at http://127.0.0.1:9" in away.stderr
