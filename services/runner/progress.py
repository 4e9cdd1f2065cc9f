"""Reading a training run's progress from ms-swift's `logging.jsonl`, and classifying failures."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])")
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration_s(text: object) -> float | None:
    """ms-swift writes durations such as ``0s``, ``1m 5s`` or ``2h 3m 4s``."""
    if isinstance(text, (int, float)):
        return float(text)
    if not isinstance(text, str):
        return None
    parts = _DURATION.findall(text)
    return sum(float(n) * _UNIT_S[u] for n, u in parts) if parts else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def progress_fields(row: dict[str, Any]) -> dict[str, Any] | None:
    """The fields of a job.progress event from one logging.jsonl row, or None if it has no step."""
    step_text = row.get("global_step/max_steps")
    if "train_runtime" in row:  # the closing summary row repeats the last step without its metrics
        return None
    if not isinstance(step_text, str) or "/" not in step_text:
        return None
    step, _, max_steps = step_text.partition("/")
    if not (step.strip().isdigit() and max_steps.strip().isdigit()):
        return None
    step_n, max_n = int(step), int(max_steps)
    return {
        "step": step_n,
        "max_steps": max_n,
        "percent": round(100.0 * step_n / max_n, 2) if max_n else 0.0,
        "loss": _number(row.get("loss")),
        "grad_norm": _number(row.get("grad_norm")),
        "learning_rate": _number(row.get("learning_rate")),
        "token_acc": _number(row.get("token_acc")),
        "epoch": _number(row.get("epoch")),
        "elapsed_s": parse_duration_s(row.get("elapsed_time")),
        "remaining_s": parse_duration_s(row.get("remaining_time")),
        "train_speed_s_per_it": _number(row.get("train_speed(s/it)")),
        "eval": {k: float(v) for k, v in row.items() if k.startswith("eval_") and _number(v) is not None},
    }


@dataclass
class JsonlTail:
    """Reads the complete lines appended to a file since the last read."""

    path: Path
    offset: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a half-written last line waits for the next read
        self.offset += len(complete)
        new = []
        for line in complete.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                new.append(row)
        self.rows.extend(new)
        return new


@dataclass
class LineTail:
    """Reads the complete text lines appended to a log file since the last read."""

    path: Path
    offset: int = 0

    def read_new(self, *, final: bool = False) -> list[str]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        if not final:
            data = data[: max(data.rfind(b"\n"), data.rfind(b"\r")) + 1]
        self.offset += len(data)
        text = data.decode("utf-8", errors="replace")
        # tqdm redraws its bar with carriage returns: each redraw is a line of its own.
        return [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


_REASONS = [
    ("oom", re.compile(r"out of memory|OutOfMemoryError|CUDA error: out of memory|MemoryError", re.I)),
    ("bad_argument", re.compile(r"remaining_argv|unrecognized arguments|error: argument|invalid choice", re.I)),
    (
        "dataset_not_found",
        re.compile(
            r"dataset.*(not found|does not exist|doesn't exist)|DatasetNotFound|No such file.*(jsonl|json|csv)", re.I
        ),
    ),
    (
        "model_not_found",
        re.compile(
            r"(model|repo).*(not found|does not exist|doesn't exist)|RepositoryNotFound|is not a local folder", re.I
        ),
    ),
]


def classify_failure(exit_code: int | None, stderr_tail: list[str], *, stopped_by_us: bool) -> str:
    """A reason code for a failed run from its exit status and last output lines."""
    text = "\n".join(stderr_tail)
    for reason, pattern in _REASONS:
        if pattern.search(text):
            return reason
    if exit_code is not None and (exit_code < 0 or exit_code in (137, 143)) and not stopped_by_us:
        return "killed"
    return "unknown"
