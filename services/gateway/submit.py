"""Validating a job submission beyond its schema: paths inside the configured roots, hub ids,
the source of a deploy, extra ms-swift flags; and the dry run of its command."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from cachetools import TTLCache, cached
from pydantic import TypeAdapter, ValidationError

from events.params import DeployJob, JobSpec, TaskType
from events.placement import never_fits
from events.state import ExportStatus, State
from services.gateway.auth import Principal
from services.gateway.errors import ApiError, validation_details
from services.launch import Launch, build_launch, flags_in
from services.swift import accepted_flags

_SPEC: TypeAdapter[Any] = TypeAdapter(JobSpec)
# A hub id as ModelScope and Hugging Face write them, with an optional `#N` sample count.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*(#\d+)?$")
_COMMANDS = {TaskType.language_model: "sft", TaskType.multimodal: "sft", TaskType.deploy: "deploy"}


@dataclass(frozen=True)
class Submission:
    spec: Any  # a JobSpec member
    dry_run: bool


def _problem(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def _invalid(problems: list[dict[str, str]]) -> ApiError:
    fields = ", ".join(sorted({p["field"] for p in problems}))
    return ApiError(422, "validation_error", f"invalid job: {fields}", problems)


def _is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path in (".", "..")


# Submissions in a burst name the same few paths: each is resolved and checked once a second.
@cached(TTLCache(maxsize=4096, ttl=1.0))
def _lookup(value: str, roots: tuple[Path, ...]) -> tuple[Path, bool, bool]:
    """The path resolved, whether it exists, and whether it is inside one of the roots."""
    resolved = Path(value).expanduser().resolve()
    return resolved, resolved.exists(), any(resolved.is_relative_to(root) for root in roots)


def check_path(field: str, value: str, roots: list[Path], *, must_exist: bool, hub_allowed: bool) -> str | None:
    """Why a path is refused, or None. Local paths must resolve inside one of the roots."""
    if not _is_local(value):
        if hub_allowed and _HUB_ID.match(value) and ".." not in value:
            return None
        return "neither a local path (absolute, or starting with ./) nor a hub id such as org/name"
    try:
        resolved, exists, inside = _lookup(value, tuple(roots))
    except (RuntimeError, OSError, ValueError) as exc:  # unknown ~user, name too long, NUL byte
        return f"not a usable path: {exc}"
    if not inside:
        return f"{resolved} is outside the allowed roots ({', '.join(str(r) for r in roots)})"
    if must_exist and not exists:
        return f"no such file or directory: {value}"
    return None


def parse_submission(
    body: Any, state: State, roots: list[Path], flags: dict[str, frozenset[str]] | None, who: Principal
) -> Submission:
    if not isinstance(body, dict):
        raise ApiError(
            422, "validation_error", "request body must be a JSON object", [_problem("body", "not an object")]
        )
    body = dict(body)
    body.setdefault("task_type", TaskType.multimodal.value)  # as the original tool did
    dry_run = body.pop("dry_run", False)
    if not isinstance(dry_run, bool):
        raise _invalid([_problem("dry_run", "must be true or false")])
    try:
        spec = _SPEC.validate_python(body)
    except ValidationError as exc:
        raise _invalid(validation_details(exc, drop_tags={t.value for t in TaskType})) from exc
    if isinstance(spec, DeployJob) and spec.source_job_id:
        spec = spec.model_copy(update={"model_path": _exported_model(spec.source_job_id, state, who)})
    problems = []
    for field, must_exist, hub in (("model_path", True, True), ("data_path", True, True), ("output_dir", False, False)):
        value = getattr(spec, field, None)
        reason = check_path(field, value, roots, must_exist=must_exist, hub_allowed=hub) if value else None
        if reason:
            problems.append(_problem(field, reason))
    problems += _check_extra_args(spec, flags)
    impossible = never_fits(spec, state)
    if impossible:
        problems.append(_problem("gpu_count", impossible))
    if problems:
        raise _invalid(problems)
    return Submission(spec, dry_run)


def _exported_model(job_id: str, state: State, who: Principal) -> str:
    source = state.jobs.get(job_id)
    # Another user's job is answered as one that never was (or was deleted): ids do not leak.
    if source is None or not (who.is_admin or source.submitted_by == who.name):
        raise _invalid([_problem("source_job_id", f"no job {job_id!r}")])
    if source.export.status != ExportStatus.completed or not source.export.path:
        raise _invalid(
            [_problem("source_job_id", f"job {job_id} has no exported model (export {source.export.status})")]
        )
    return source.export.path


def _check_extra_args(spec: Any, flags: dict[str, frozenset[str]] | None) -> list[dict[str, str]]:
    params = spec.deploy_params if isinstance(spec, DeployJob) else spec.train_params
    if not params.extra_args:
        return []
    field = f"{params_field(spec)}.extra_args"
    # The job's own flags are the ones not written `--flag=value` (only extra flags are).
    typed = flags_in([arg for arg in dry_run_launch(spec).argv if "=" not in arg])
    problems = []
    for flag in sorted(params.extra_args):
        if flag in typed:
            problems.append(_problem(f"{field}.{flag}", "set by the job's own parameters; use those"))
        elif flags is not None and flag not in flags[_COMMANDS[spec.task_type]]:
            problems.append(_problem(f"{field}.{flag}", f"not a flag of swift {_COMMANDS[spec.task_type]}"))
    return problems


def params_field(spec: Any) -> str:
    return "deploy_params" if isinstance(spec, DeployJob) else "train_params"


def dry_run_launch(
    spec: Any, job_id: str = "<job_id>", runs_dir: Path = Path("data/runs"), omp_num_threads: int = 1
) -> Launch:
    """The command as the runner will build it. The GPU ids, and a deploy job's port, are the
    ones allocated at start; here the first ones stand in for them."""
    return build_launch(
        spec,
        swift="swift",
        job_id=job_id,
        attempt=1,
        gpu_ids=list(range(spec.gpu_count)),
        runs_dir=runs_dir,
        omp_num_threads=omp_num_threads,
        port=8000 if isinstance(spec, DeployJob) else None,
    )


class SwiftFlags:
    """The installed ms-swift's flags, read once in a worker thread (it takes seconds)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._lock = anyio.Lock()
        self._loaded = False
        self._flags: dict[str, frozenset[str]] | None = None

    async def get(self) -> dict[str, frozenset[str]] | None:
        async with self._lock:
            if not self._loaded:
                self._flags = await anyio.to_thread.run_sync(accepted_flags, self.cache_dir)
                self._loaded = True
        return self._flags
