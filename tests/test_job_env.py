"""A job's process inherits the service's environment, but none of the service's secrets: a
dataset loader or a model's code runs what the job's user chose."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from services.launch import SECRET_VARIABLES, Launch
from services.runner.record import spawn
from tests.conftest import wait_for


def test_a_job_sees_none_of_the_services_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a runner whose environment holds Redis's password, the API keys and the signing key
    for name in SECRET_VARIABLES:
        monkeypatch.setenv(name, f"secret-{name.lower()}")
    monkeypatch.setenv("HF_HOME", "/models/hf")
    # When it starts a job's process
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    launch = Launch([sys.executable, "-c", dump], {"CUDA_VISIBLE_DEVICES": "0"}, tmp_path / "run", tmp_path / "out")
    _, process = spawn(launch, "job-1", 1, "n1")
    assert process.wait(timeout=30) == 0
    seen = wait_for(lambda: (tmp_path / "run" / "stdout.log").read_text(), 5, "the job's output")
    environ = json.loads(seen)
    # Then the job has the service's ordinary settings and its own, and no secret
    assert environ["HF_HOME"] == "/models/hf" and environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert not SECRET_VARIABLES & set(environ)
    assert not [value for value in environ.values() if value.startswith("secret-")]
