"""Where a job's paths point, by one rule for the gateway, the dry run and the runner.

A relative local path is resolved against one base, ``DATA_DIR``, and stored absolute and
resolved, so that the check, the dry run and ``swift`` (whose working directory is the run
directory) all mean the same file. Whether ``org/name`` is a local path or a hub id is decided
by `is_local`. Every local path must resolve inside the allowed roots (``PATH_ROOTS``); the runner
checks again at launch, since a directory may have been swapped for a symlink in between.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events.params import DeployJob
from services.errors import ServiceError
from services.swift_flags import PATH_KINDS, Kind, kind_of

# A hub id as ModelScope and Hugging Face write them, with an optional `#N` sample count.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*(#\d+)?$")
# ms-swift's `dataset#N`: N rows of it. The path is what comes before.
_SAMPLE = re.compile(r"#\d+$")
# A relative value ending in one of these names a file, even when it looks like `org/name`.
FILE_SUFFIXES = frozenset(
    {".arrow", ".bin", ".csv", ".gguf", ".json", ".jsonl", ".parquet", ".pt", ".pth", ".safetensors", ".tsv", ".txt"}
    | {".yaml", ".yml"}
)


class Refused(ServiceError, ValueError):
    """A value that cannot be placed; the message says why."""


class PathOutsideRoots(ServiceError, ValueError):
    """At launch: a path of the job no longer resolves inside the roots (or never could)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def is_local(value: str, base: Path) -> bool:
    """A local path, not a hub id: absolute or home-relative, `./` or `../`, a file suffix
    (`data/train.jsonl`), more than one `/` (`models/qwen/v2`), or present under ``base``.
    What remains (`Qwen/Qwen2.5-7B-Instruct`, `AI-ModelScope/coco#20000`) is a hub id."""
    if value.startswith(("/", "~", "./", "../")) or value in (".", ".."):
        return True
    return Path(value).suffix.lower() in FILE_SUFFIXES or value.count("/") > 1 or exists(base / value)


def exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to be a path names nothing
        return False


def resolve(value: str, base: Path) -> Path:
    """The path a local value names, relative ones under ``base``, with symlinks followed."""
    try:
        path = Path(value).expanduser()
        return (base / path).resolve()  # an absolute `path` replaces `base`
    except (RuntimeError, OSError, ValueError) as exc:  # unknown ~user, name too long, NUL byte
        raise Refused(f"not a usable path: {exc}") from exc


def inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def why_refused(path: Path, roots: Sequence[Path], private: Sequence[Path] = ()) -> str | None:
    """Why a job may not use a resolved path, or None: it must be inside one of the roots, and
    inside none of the service's own folders (``private``: its secrets, Redis's files, the
    log's archives), which may lie inside a root."""
    own = next((folder for folder in private if path.is_relative_to(folder)), None)
    if own is not None:
        return f"{path} is inside {own}, the service's own files: no job may use them"
    if not inside(path, roots):
        return f"{path} is outside the allowed roots ({', '.join(str(root) for root in roots)})"
    return None


@dataclass(frozen=True)
class Placed:
    value: str  # as `swift` gets it: a local path made absolute and resolved; anything else as given
    paths: tuple[Path, ...] = ()  # the local paths it names, resolved: each must be inside the roots


def _local(value: str, base: Path, *, sample: bool = False) -> Placed:
    """A local path, resolved. ms-swift reads `path#N` as N rows of `path` (in dataset names and
    cached datasets) when no file is named `path#N`: so what precedes a '#' is checked too."""
    path = resolve(value, base)
    if "#" not in value:
        return Placed(str(path), (path,))
    stem, _, rows = value.rpartition("#")
    head = resolve(stem, base)
    if sample and rows.isdigit():  # keep `#N` for ms-swift, after the resolved path
        return Placed(f"{head}#{rows}", (head, path))
    return Placed(str(path), (path, head))


def place(kind: Kind, value: str, base: Path) -> Placed:
    """Where a value of this kind points. Raises Refused for a value that is neither a usable
    local path nor what the kind otherwise allows."""
    if kind is Kind.path:
        return _local(value, base)
    if kind is Kind.text:  # ms-swift reads a value ending in .txt as a file
        return _local(value, base) if value.endswith(".txt") else Placed(value)
    if kind is Kind.json:
        if value.lstrip().startswith(("{", "[")) or _is_json(value):
            return Placed(value)
        if "/" in value or value.startswith("~") or Path(value).suffix.lower() in FILE_SUFFIXES:
            return _local(value, base)
        return Placed(value)  # a name such as `auto` or `fsdp2`
    if kind is Kind.source:
        return _source(value, base)
    return Placed(value)


def _is_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _source(value: str, base: Path) -> Placed:
    sample = _SAMPLE.search(value)
    if is_local(value[: sample.start()] if sample else value, base):
        # ms-swift reads `path:subset` and `hub::id` in a dataset name, and `swift deploy` reads
        # `name=path` in adapters: such a value would open another path than the one checked.
        if ":" in value or "=" in value:
            raise Refused("a local path may not contain ':' or '=' (ms-swift reads path:subset and name=path)")
        return _local(value, base, sample=True)
    if HUB_ID.match(value) and ".." not in value:
        return Placed(value)
    raise Refused("neither a local path (absolute, or relative to DATA_DIR) nor a hub id such as org/name")


def params_field(spec: Any) -> str:
    return "deploy_params" if isinstance(spec, DeployJob) else "train_params"


def spec_values(spec: Any) -> Iterator[tuple[str, Kind, str]]:
    """Each value of a job that may name a local path: (field, kind, value)."""
    for field, kind in (("model_path", Kind.source), ("data_path", Kind.source), ("output_dir", Kind.path)):
        value = getattr(spec, field, None)
        if value:
            yield field, kind, value
    params = getattr(spec, params_field(spec))
    for flag, value in sorted(params.extra_args.items()):
        flag_kind = kind_of(flag)
        if flag_kind in PATH_KINDS:
            yield f"{params_field(spec)}.extra_args.{flag}", flag_kind, _text(value)


def _text(value: object) -> str:
    # As `swift` will get it on its command line (see services.launch).
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def check_spec_paths(spec: Any, roots: Sequence[Path], base: Path, private: Sequence[Path] = ()) -> None:
    """Raise PathOutsideRoots naming the first value of the job whose path resolves outside the
    roots now, at launch (or into the service's own folders)."""
    for field, kind, value in spec_values(spec):
        try:
            placed = place(kind, value, base)
        except Refused as exc:
            raise PathOutsideRoots(field, str(exc)) from exc
        for path in placed.paths:
            if reason := why_refused(path, roots, private):
                raise PathOutsideRoots(field, _named(value, path, reason))


def _named(value: str, path: Path, reason: str) -> str:
    return reason if str(path) == value else f"{value} resolves to {reason}"


def make_dir_inside(path: Path, roots: Sequence[Path], field: str, private: Sequence[Path] = ()) -> None:
    """Create a directory, then check where it was made: a parent swapped for a symlink between
    the check and the creation is caught before anything is written into it."""
    path.mkdir(parents=True, exist_ok=True)
    made = path.resolve()
    if reason := why_refused(made, roots, private):
        raise PathOutsideRoots(field, _named(str(path), made, reason))
