"""Validating a job submission beyond its schema: paths inside the configured roots (relative
ones resolved against DATA_DIR and stored absolute), hub ids, the source of a deploy, extra
ms-swift flags by their reviewed kind; and the dry run of its command."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from cachetools import TTLCache, cached
from pydantic import TypeAdapter, ValidationError

from events.dependencies import no_export, will_export
from events.params import DeployJob, JobSpec, ModelHub, TaskType
from events.placement import never_fits
from events.records import ExportStatus, Job
from events.state import State
from services.gateway.auth import Principal
from services.gateway.errors import ApiError, validation_details
from services.launch import Launch, build_launch, flags_in
from services.paths import Placed, Refused, exists, params_field, place, spec_values, why_refused
from services.swift import accepted_flags
from services.swift_flags import Kind, kind_of, refusal

_SPEC: TypeAdapter[Any] = TypeAdapter(JobSpec)
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


# Submissions in a burst name the same few paths: each is resolved and checked once a second.
@cached(TTLCache(maxsize=4096, ttl=1.0))
def _where(
    kind: Kind, value: str, base: Path, roots: tuple[Path, ...], private: tuple[Path, ...]
) -> tuple[Placed, bool, str | None]:
    """Where a value points, whether its path exists, and why the first of its paths a job may
    not use is refused."""
    placed = place(kind, value, base)
    refused = next(filter(None, (why_refused(path, roots, private) for path in placed.paths)), None)
    return placed, bool(placed.paths) and exists(placed.paths[0]), refused


def parse_submission(
    body: Any,
    state: State,
    roots: list[Path],
    flags: dict[str, frozenset[str]] | None,
    who: Principal,
    *,
    base: Path,
    private: Sequence[Path] = (),
    allow_code_flags: bool = False,
    hub: ModelHub = ModelHub.modelscope,
) -> Submission:
    """The job as it will be stored. ``base`` is where relative paths start (DATA_DIR); code
    flags pass only for an admin, and only when ``allow_code_flags`` (ALLOW_CODE_FLAGS) is on;
    a job that names no hub is stored with ``hub`` (MODEL_HUB), so its record says where its
    hub ids come from."""
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
    if spec.hub is None:
        spec = spec.model_copy(update={"hub": hub})
    if isinstance(spec, DeployJob) and spec.source_job_id:
        spec = spec.model_copy(update={"model_path": _exported_model(spec.source_job_id, state, who)})
    problems = [
        _problem(f"depends_on.{index}", f"no job {job_id!r}")
        for index, job_id in enumerate(spec.depends_on)
        if _visible(state.jobs.get(job_id), who) is None
    ]
    problems += _check_extra_args(spec, flags, code_allowed=allow_code_flags and who.is_admin)
    spec, wrong_paths = _place_paths(spec, roots, base, private, skip={p["field"] for p in problems})
    problems += wrong_paths
    impossible = never_fits(spec, state)
    if impossible:
        problems.append(_problem("gpu_count", impossible))
    if problems:
        raise _invalid(problems)
    return Submission(spec, dry_run)


def _visible(job: Job | None, who: Principal) -> Job | None:
    """The job if the caller may name it. Another user's job is answered as one that never was
    (or was deleted): ids do not leak."""
    return job if job is not None and (who.is_admin or job.submitted_by == who.name) else None


def _exported_model(job_id: str, state: State, who: Principal) -> str:
    """The merged model of the job to deploy, or "" while its export is still to come (the
    deploy waits for it); a 422 when it will never have one."""
    source = _visible(state.jobs.get(job_id), who)
    if source is None:
        raise _invalid([_problem("source_job_id", f"no job {job_id!r}")])
    if source.export.status == ExportStatus.completed and source.export.path:
        return source.export.path
    if will_export(source):
        return ""
    raise _invalid([_problem("source_job_id", no_export(source))])


def _place_paths(
    spec: Any, roots: list[Path], base: Path, private: Sequence[Path], skip: set[str]
) -> tuple[Any, list[dict[str, str]]]:
    """The spec with every local path absolute and resolved, and the paths refused."""
    problems: list[dict[str, str]] = []
    updates: dict[str, str] = {}
    params = getattr(spec, params_field(spec))
    extra = dict(params.extra_args)
    prefix = f"{params_field(spec)}.extra_args."
    for field, kind, value in spec_values(spec):
        if field in skip:
            continue
        try:
            placed, exists, refused = _where(kind, value, base, tuple(roots), tuple(private))
        except Refused as exc:
            problems.append(_problem(field, str(exc)))
            continue
        if refused is not None:
            problems.append(_problem(field, refused))
        elif field in ("model_path", "data_path") and placed.paths and not exists:
            problems.append(_problem(field, f"no such file or directory: {value}"))
        elif field.startswith(prefix):
            if placed.value != value:  # else keep the value as typed (a number stays a number)
                extra[field.removeprefix(prefix)] = placed.value
        else:
            updates[field] = placed.value
    if extra != params.extra_args:
        updates[params_field(spec)] = params.model_copy(update={"extra_args": extra})
    return spec.model_copy(update=updates), problems


def _check_extra_args(
    spec: Any, flags: dict[str, frozenset[str]] | None, *, code_allowed: bool
) -> list[dict[str, str]]:
    params = getattr(spec, params_field(spec))
    if not params.extra_args:
        return []
    field = f"{params_field(spec)}.extra_args"
    command = _COMMANDS[spec.task_type]
    # The job's own flags are the ones not written `--flag=value` (only extra flags are).
    typed = flags_in([arg for arg in dry_run_launch(spec).argv if "=" not in arg])
    problems = []
    for flag in sorted(params.extra_args):
        if flags is not None and flag not in flags[command]:
            reason: str | None = f"not a flag of swift {command}"
        elif flag in typed and kind_of(flag) is not Kind.reserved:
            reason = "set by the job's own parameters; use those"
        else:
            reason = refusal(flag, code_allowed=code_allowed)
        if reason:
            problems.append(_problem(f"{field}.{flag}", reason))
    return problems


def dry_run_launch(
    spec: Any, job_id: str = "<job_id>", runs_dir: Path = Path("data/runs"), omp_num_threads: int = 1, rank: int = 0
) -> Launch:
    """The command as the runner will build it (of one rank, for a gang job). The GPU ids, a
    deploy job's port and torchrun's rendezvous are the ones allocated at start; here the first
    ones, or a placeholder, stand in for them."""
    launch = build_launch(
        spec,
        swift="swift",
        job_id=job_id,
        attempt=1,
        gpu_ids=list(range(spec.gpu_count)),
        runs_dir=runs_dir,
        omp_num_threads=omp_num_threads,
        port=8000 if isinstance(spec, DeployJob) else None,
        rank=rank,
        master_addr="<rank 0 node's NODE_ADDR>",
    )
    if "NPROC_PER_NODE" in launch.env:
        launch.env["MASTER_PORT"] = "<from RENDEZVOUS_PORT_RANGE>"
    return launch


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
