"""Reading a training run's progress from ms-swift's `logging.jsonl`, and classifying failures."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from events import messages as m

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
    """A finite number, else None: a NaN or infinite loss is not valid JSON for clients."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def progress_fields(row: dict[str, Any]) -> dict[str, Any] | None:
    """The fields of a job.progress event from one logging.jsonl row, or None if it has no step.
    (The closing row, with ``train_runtime``, gives the last step without training metrics.)"""
    step_text = row.get("global_step/max_steps")
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
        "eval": {k: v for k, v in ((k, _number(v)) for k, v in row.items() if k.startswith("eval_")) if v is not None},
    }


def final_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """A run's last values: the loss of its last training row, the eval_* metrics of its last
    evaluation, and ms-swift's mean training loss from its closing row."""
    final: dict[str, float] = {}
    for row in rows:
        if "train_runtime" in row:
            if (mean := _number(_float(row.get("train_loss")))) is not None:
                final["train_loss"] = mean
        elif "loss" in row and (loss := _number(_float(row["loss"]))) is not None:
            final["loss"] = loss
        evals = {
            k: _number(_float(v))
            for k, v in row.items()
            if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))
        }
        final.update({k: v for k, v in evals.items() if v is not None})
    return final


def _float(value: Any) -> Any:
    """ms-swift writes its metrics as strings in its log lines, as numbers in logging.jsonl."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return value


@dataclass
class JsonlTail:
    """The complete JSON lines appended to a file after ``offset``. Reading does not move the
    offset: the caller advances it once what it read is safely stored."""

    path: Path
    offset: int = 0

    def peek(self, max_rows: int | None = None) -> tuple[list[dict[str, Any]], int]:
        """The rows after the offset (at most ``max_rows`` lines of them) and the offset after
        the last line read."""
        data = _read_from(self.path, self.offset)
        complete = data[: data.rfind(b"\n") + 1]  # a half-written last line waits for the next read
        lines = complete.splitlines(keepends=True)
        if max_rows is not None:
            lines = lines[:max_rows]
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows, self.offset + sum(len(line) for line in lines)


@dataclass
class LineTail:
    """The complete text lines appended to a log file after ``offset`` (see JsonlTail)."""

    path: Path
    offset: int = 0

    def peek(self, *, final: bool = False) -> tuple[list[str], int]:
        data = _read_from(self.path, self.offset)
        if not final:
            data = data[: max(data.rfind(b"\n"), data.rfind(b"\r")) + 1]
        text = data.decode("utf-8", errors="replace")
        # tqdm redraws its bar with carriage returns: each redraw is a line of its own.
        return [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()], self.offset + len(data)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read()
    except FileNotFoundError:
        return b""


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON row of a file."""
    return JsonlTail(path).peek()[0]


def tail_lines(path: Path, count: int, *, max_bytes: int = 65536) -> list[str]:
    """The last ``count`` non-empty lines of a text file."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, 2) - max_bytes))
            data = handle.read()
    except FileNotFoundError:
        return []
    lines = [line for line in re.split(r"\r\n|\r|\n", data.decode("utf-8", errors="replace")) if line.strip()]
    return lines[-count:]


# A download that failed: the hub answered "no such repository", or could not be reached.
_HUB_FAILURE = re.compile(
    r"RepositoryNotFound|RevisionNotFound|EntryNotFound|NotExistError|modelscope_hub\.errors|"
    r"DownloadDeadline|Max retries exceeded|LocalEntryNotFound|404 Client Error|offline mode|OfflineModeIsEnabled",
    re.I,
)
_REASONS = [
    (m.FailureReason.OOM, re.compile(r"out of memory|OutOfMemoryError|CUDA error: out of memory|\bMemoryError", re.I)),
    (
        m.FailureReason.BAD_ARGUMENT,
        re.compile(r"remaining_argv|unrecognized arguments|error: argument|invalid choice", re.I),
    ),
    (
        m.FailureReason.DATASET_NOT_FOUND,
        re.compile(r"does not exist, dataset_id|DatasetNotFound|dataset.*(not found|does not exist)", re.I),
    ),
    (m.FailureReason.MODEL_NOT_FOUND, re.compile(r"is not a local folder|model.*(not found|does not exist)", re.I)),
]


# Why a download failed: the hub was not reached (or may not be: offline mode), or it answered that
# it has no such repository or file. Tried in this order: huggingface_hub's "not reached" is a
# LocalEntryNotFoundError.
_UNREACHABLE = re.compile(
    r"Max retries exceeded|NameResolution|Name or service not known|Connect(ion)?Error|Connection failed|"
    r"DownloadDeadline|timed out|LocalEntryNotFound|offline mode|Couldn't reach",
    re.I,
)
_NOT_THERE = re.compile(r"RepositoryNotFound|RevisionNotFound|EntryNotFound|NotExistError|404 Client Error", re.I)


def hub_failure_message(reason: str, stderr_tail: list[str], argv: list[str], env: dict[str, str]) -> str | None:
    """For a job that failed to download its model or dataset from a hub: one line naming the
    hub, the id and why, e.g. ``model 'org/name' could not be downloaded from ModelScope
    (modelscope.cn): the hub could not be reached``. None when the failure was not a download of
    a hub id (the exception's own line says more then)."""
    text = "\n".join(stderr_tail)
    flag = {"model_not_found": "--model", "dataset_not_found": "--dataset"}.get(reason)
    if flag is None or flag not in argv[:-1] or not _HUB_FAILURE.search(text):
        return None
    value = argv[argv.index(flag) + 1]
    if value.startswith(("/", "~", ".")):
        return None  # a local path: not a download
    if (env.get("USE_HF") or os.environ.get("USE_HF", "0")).lower() in ("1", "true", "yes"):
        name, host = "Hugging Face", _host(env, "HF_ENDPOINT", "huggingface.co")
    else:
        name, host = "ModelScope", _host(env, "MODELSCOPE_DOMAIN", "modelscope.cn")
    if re.search(r"offline mode|OfflineModeIsEnabled|outgoing traffic has been disabled", text, re.I):
        why = "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
    elif _UNREACHABLE.search(text):
        why = "the hub could not be reached"
    elif _NOT_THERE.search(text):
        why = "the hub has no such repository or file"
    else:
        why = "the download failed"
    return f"{flag.removeprefix('--')} {value!r} could not be downloaded from {name} ({host}): {why}"


def _host(env: dict[str, str], variable: str, default: str) -> str:
    """The host a hub's endpoint variable names (a URL or a bare domain), else the default."""
    value = env.get(variable) or os.environ.get(variable) or ""
    return urlsplit(value if "//" in value else f"//{value}").hostname or default


def classify_failure(exit_code: int | None, stderr_tail: list[str], *, stopped_by_us: bool) -> m.FailureReason:
    """A reason code for a failed run from its exit status and last output lines (give enough
    lines for the whole traceback: the frames tell a dataset download from a model's)."""
    text = "\n".join(stderr_tail)
    # Error messages, not the source lines a traceback quotes (indented).
    messages = "\n".join(line for line in stderr_tail if not line[:1].isspace())
    for reason, pattern in _REASONS:
        if pattern.search(messages):
            return reason
    if _HUB_FAILURE.search(text):
        # Which of ms-swift's loaders the failing download came from: the innermost frame.
        frames = [line for line in stderr_tail if line.lstrip().startswith('File "')]
        for frame in reversed(frames):
            if "swift/dataset/" in frame:
                return m.FailureReason.DATASET_NOT_FOUND
            if "swift/model/" in frame or "hub_utils" in frame:
                return m.FailureReason.MODEL_NOT_FOUND
    if exit_code is not None and (exit_code < 0 or exit_code in (137, 143)) and not stopped_by_us:
        return m.FailureReason.KILLED
    return m.FailureReason.UNKNOWN
