"""Relative paths, as requests written for the original tool's API send them: resolved against
DATA_DIR, stored absolute (so the dry run, the runner and swift mean the same file) and held to
the roots; `org/name` hub ids stay hub ids."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from events import messages as m
from events.bus import Bus
from events.codec import decode
from services.config import load_settings
from services.gateway.app import create_app
from services.gateway.projection import Projection
from services.paths import is_local

# The original tool's README example, as its users send it.
ORIGINAL = {
    "model_path": "Qwen/Qwen2.5-VL-7B-Instruct",
    "data_path": "AI-ModelScope/LaTeX_OCR#20000",
    "output_dir": "output/training_001",
    "priority": 5,
    "train_params": {
        "num_epochs": 1,
        "batch_size": 1,
        "learning_rate": 1e-4,
        "vit_lr": 1e-5,
        "aligner_lr": 1e-5,
        "lora_rank": 8,
        "lora_alpha": 32,
        "gradient_accumulation_steps": 16,
        "eval_steps": 100,
        "save_steps": 100,
        "max_length": 8192,
    },
}


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DATA_DIR as configured by default, relative (`data`), from a working directory of the test's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


@pytest.fixture
async def api(bus: Bus, data: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(namespace=bus.keys.namespace, data_dir=Path("data"), path_roots=str(data))
    app = create_app(settings, bus, Projection(bus, bus.redis), swift_flags=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost/api/v1/training") as client:
        yield client


async def submitted(bus: Bus) -> Any:
    [(_, fields)] = await bus.redis.xrange(bus.keys.commands)
    command = decode(fields)
    assert isinstance(command, m.SubmitJob)
    return command.spec


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


async def test_the_original_readme_request_is_accepted_with_its_output_dir_under_data_dir(
    api: httpx.AsyncClient, bus: Bus, data: Path
) -> None:
    dry = await api.post("/jobs", json={**ORIGINAL, "dry_run": True})
    assert dry.status_code == 200, dry.text
    argv = dry.json()["argv"]
    assert option(argv, "--model") == "Qwen/Qwen2.5-VL-7B-Instruct"  # hub ids stay hub ids
    assert option(argv, "--dataset") == "AI-ModelScope/LaTeX_OCR#20000"
    assert option(argv, "--output_dir") == str(data.resolve() / "output" / "training_001")

    created = await api.post("/jobs", json=ORIGINAL)
    assert created.status_code == 202, created.text
    spec = await submitted(bus)
    assert spec.task_type == "multimodal"
    assert spec.output_dir == str(data.resolve() / "output" / "training_001")  # stored absolute
    assert (spec.model_path, spec.data_path) == (ORIGINAL["model_path"], ORIGINAL["data_path"])


async def test_relative_local_paths_are_resolved_against_data_dir_not_the_working_directory(
    api: httpx.AsyncClient, bus: Bus, data: Path, tmp_path: Path
) -> None:
    (data / "data").mkdir()
    (data / "data" / "train.jsonl").write_text("{}\n")
    (data / "rel.jsonl").write_text("{}\n")
    (data / "models" / "mine").mkdir(parents=True)
    (tmp_path / "only-here.jsonl").write_text("{}\n")  # in the working directory, not in DATA_DIR
    for data_path, stored in (("data/train.jsonl", data / "data" / "train.jsonl"), ("./rel.jsonl", data / "rel.jsonl")):
        body = {**ORIGINAL, "model_path": "models/mine", "data_path": data_path, "dry_run": True}
        response = await api.post("/jobs", json=body)
        assert response.status_code == 200, response.text
        argv = response.json()["argv"]
        # `models/mine` exists under DATA_DIR: a local directory, although it reads like org/name
        assert option(argv, "--model") == str(data.resolve() / "models" / "mine")
        assert option(argv, "--dataset") == str(stored.resolve())

    missing = await api.post("/jobs", json={**ORIGINAL, "data_path": "./only-here.jsonl"})
    assert missing.status_code == 422
    [problem] = missing.json()["error"]["details"]
    assert problem == {"field": "data_path", "message": "no such file or directory: ./only-here.jsonl"}
    assert await bus.redis.xlen(bus.keys.commands) == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"output_dir": "../escaped"}, "output_dir"),
        ({"data_path": "../../etc/passwd"}, "data_path"),
        ({"data_path": "data/missing.jsonl"}, "data_path"),  # a file suffix: local, and not there
        ({"model_path": "models/qwen/v2"}, "model_path"),  # two slashes: local, and not there
        ({"data_path": "ms::/etc/passwd"}, "data_path"),  # ms-swift would drop `ms::` and read the rest
    ],
)
async def test_relative_paths_that_leave_the_roots_or_name_nothing_are_refused(
    api: httpx.AsyncClient, bus: Bus, change: dict[str, str], field: str
) -> None:
    response = await api.post("/jobs", json={**ORIGINAL, **change})
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == [field]
    assert await bus.redis.xlen(bus.keys.commands) == 0


@pytest.mark.parametrize(
    ("value", "local"),
    [
        ("Qwen/Qwen2.5-VL-7B-Instruct", False),
        ("AI-ModelScope/LaTeX_OCR#20000", False),
        ("output/training_001", False),  # as a model or dataset: a hub id (output_dir is always a path)
        ("data/train.jsonl", True),
        ("./rel.jsonl", True),
        ("../up", True),
        ("/abs/path", True),
        ("~/home-relative", True),
        ("models/qwen/v2", True),
        ("present/here", True),  # exists under the base
    ],
)
def test_the_rule_that_tells_a_local_path_from_a_hub_id(tmp_path: Path, value: str, local: bool) -> None:
    (tmp_path / "present" / "here").mkdir(parents=True)
    assert is_local(value, tmp_path) is local


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("data_path", "secrets/redis-password"),  # the embedded Redis's password
        ("data_path", "redis/appendonlydir/appendonly.aof.1.incr.aof"),  # the log itself
        ("output_dir", "archive/mine"),  # the log's archives
        ("model_path", "secrets"),
    ],
)
async def test_the_services_own_files_are_refused_though_inside_a_root(
    api: httpx.AsyncClient, data: Path, field: str, value: str
) -> None:
    # Given DATA_DIR inside the roots, holding the service's secrets, Redis's files and archives
    for folder in ("secrets", "redis/appendonlydir", "archive"):
        (data / folder).mkdir(parents=True)
    (data / "secrets" / "redis-password").write_text("hunter2\n")
    (data / "redis" / "appendonlydir" / "appendonly.aof.1.incr.aof").write_text("*1\r\n")
    (data / "model").mkdir()
    (data / "train.jsonl").write_text("{}\n")
    body = {"task_type": "language_model", "model_path": "model", "data_path": "train.jsonl", field: value}
    # When a job names one of them
    response = await api.post("/jobs", json=body)
    # Then it is refused, naming the field, and the file's content is nowhere in the answer
    assert response.status_code == 422, response.text
    [problem] = response.json()["error"]["details"]
    assert problem["field"] == field and "the service's own files: no job may use them" in problem["message"]
    assert "hunter2" not in response.text
