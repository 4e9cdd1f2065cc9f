"""Turning messages into Redis stream entries and back, with upcasting of older versions.

Two layouts of an entry. Both have ``type`` and ``job_id`` as their first fields (so readers can
filter without decoding; ``job_id`` is empty for a message of no job) and then ``data``:

- **Envelope** (every stream but the log; the log before compact entries): ``data`` is the JSON
  envelope ``{"type", "v", "id", "at", "source", "causation_id", "job_id", "actor",
  "payload": {...}}``. On the log it is followed by the chain's ``prev`` and ``hash`` (hex).
- **Compact** (the log, ``{st}:events``, written by :func:`encode_fact`): ``data`` is a JSON array
  ``[payload, id, source, actor, causation_id, v, at_text, empty_job]`` without its trailing
  defaults (``0``, ``""``, ``null``, ``null``, ``1``, absent, absent), then ``at``: the message's
  time in microseconds since the epoch, as a decimal integer (Redis keeps it as an 8-byte
  integer), then the chain's ``hash`` (see :mod:`events.audit`). An id of 32 hex digits
  (:func:`messages.new_id`) is written as its 16 bytes in URL-safe base64 (22 characters); the
  id a message of its type derives from its job and payload (:data:`DERIVED_IDS`: a training
  step's progress report, :func:`progress_id`) as ``0``; any other id as ``=`` and the id. A time
  not in UTC is written in ``at_text`` (ISO 8601) with an empty ``at``; a ``job_id`` that is the
  empty string (not none) has ``empty_job`` = ``""``. The payload is a JSON object, or, for the
  (type, version) pairs of :data:`POSITIONAL`, an array of its values in a fixed order without
  trailing defaults. ``type`` is the type's name, or for the most frequent types a short code
  (:data:`TYPE_CODES`; :func:`entry_type` reads either); ``type`` and ``job_id`` are never
  repeated inside ``data``.

Compact entries of the release before (every id stored, every type by name) read as they did.
A message decodes to the same value from either layout; :func:`decode` tells them apart by the
``at`` field. :func:`envelope_json` gives the envelope of an entry of either layout (what a client
of the event stream is sent).

(Just over 400 lines: both layouts and their upcasting are one format, kept in one place.)
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import from_json, to_json

from events.errors import EventsError
from events.messages import ENVELOPE_FIELDS, AnyMessage, Message, message_types

# An entry's fields: text from a client with decode_responses, bytes from one without (keys and
# values alike); redis-py annotates either as ``bytes | str``.
Fields = Mapping[str, bytes | str] | Mapping[bytes, bytes | str] | Mapping[bytes | str, bytes | str]
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_ADAPTER: TypeAdapter[Message] = TypeAdapter(AnyMessage)
_CURRENT_VERSION = {name: cls.model_fields["v"].default for name, cls in message_types().items()}
# (type, version) -> function turning that version's payload into the next version's.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class DecodeError(EventsError, ValueError):
    """An entry that is not a message this release understands; the reason says why."""


def upcaster(type_: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function that lifts ``type_`` payloads from ``from_version`` to the next one."""

    def register(fn: Upcaster) -> Upcaster:
        UPCASTERS[(type_, from_version)] = fn
        return fn

    return register


# --- the envelope layout ---


def encode(message: Message, source: str = "") -> dict[str, str]:
    """The envelope entry of a message; ``source`` names the sender when the message does not."""
    payload = message.model_dump(mode="json")
    envelope = {name: payload.pop(name) for name in ENVELOPE_FIELDS}
    if source and not envelope["source"]:
        envelope["source"] = source
    envelope["payload"] = payload
    return {
        "type": message.type,
        "job_id": message.job_id or "",
        "data": to_json(envelope).decode(),  # compact JSON, serialized in Rust
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _field(fields: Fields, name: str) -> bytes | str | None:
    lookup: Mapping[Any, bytes | str] = fields  # keys all text or all bytes
    value = lookup.get(name)
    if value is None and lookup and isinstance(next(iter(lookup)), bytes):
        value = lookup.get(name.encode())
    return value


def entry_type(fields: Fields) -> str:
    """The type an entry of either layout names (by its code, or by name); empty if none."""
    return type_name(_text(_field(fields, "type") or ""))


def decode(fields: Fields) -> Message:
    """The message of an entry of either layout."""
    raw = _field(fields, "data")
    if raw is None:
        raise DecodeError("entry has no 'data' field")
    try:
        data = from_json(raw)  # parsed in Rust
    except ValueError as exc:  # not JSON, or not UTF-8
        raise DecodeError(f"data is not JSON: {exc}") from exc
    at = _field(fields, "at")
    if at is None:
        return decode_envelope(data)
    return decode_compact(_text(_field(fields, "type") or ""), _text(_field(fields, "job_id") or ""), data, _text(at))


def decode_envelope(envelope: Any) -> Message:
    """A message from its parsed ``data`` envelope."""
    if not isinstance(envelope, dict) or not isinstance(envelope.get("payload"), dict):
        raise DecodeError("data is not an envelope with a payload object")
    type_ = envelope.get("type")
    if type_ not in _CURRENT_VERSION:
        raise DecodeError(f"unknown message type {type_!r}")
    payload = envelope.pop("payload")
    version = envelope.get("v", 1)
    current = _CURRENT_VERSION[type_]
    if not isinstance(version, int) or version < 1 or version > current:
        raise DecodeError(f"{type_} has unsupported version {version!r}")
    payload = _lift(type_, version, current, payload)
    envelope["v"] = current
    if "id" not in envelope or "at" not in envelope:  # defaults would differ at every read
        raise DecodeError(f"{type_} envelope lacks its id or time")
    if set(payload) & set(envelope):
        raise DecodeError("payload repeats envelope fields")
    try:
        return _ADAPTER.validate_python({**envelope, **payload})
    except ValidationError as exc:
        raise DecodeError(f"invalid {type_}: {exc.errors(include_url=False)}") from exc


def _lift(type_: str, version: int, current: int, payload: dict[str, Any]) -> dict[str, Any]:
    """A payload of an older version, upcast to the current one."""
    while version < current:
        lift = UPCASTERS.get((type_, version))
        if lift is None:
            raise DecodeError(f"no upcaster for {type_} v{version}")
        payload = lift(payload)
        version += 1
    return payload


def envelope_json(fields: Fields, message: Message | None = None) -> str:
    """The JSON envelope of an entry of either layout (what a client of the event stream is sent):
    as stored for an envelope entry, as :func:`encode` writes the message for a compact one.
    ``message``: the entry's message, if it was decoded already. Raises DecodeError for a compact
    entry that cannot be decoded."""
    at = _field(fields, "at")
    if at is None:
        raw = _field(fields, "data")
        if raw is None:
            raise DecodeError("entry has no 'data' field")
        return _text(raw)
    return encode(message if message is not None else decode(fields))["data"]


# --- the compact layout (the log) ---

# Short codes of the log's most frequent types, written in a compact entry's ``type`` in place of
# the name (11 bytes less per entry). A code has no dot, so no type's name is one. Readers of the
# field go through entry_type or type_name, and the fold's script in events.log knows the codes.
# Never change or reuse a code: entries keep it for good.
TYPE_CODES: dict[str, str] = {"job.progress": "p"}
_TYPE_OF_CODE = {code: name for name, code in TYPE_CODES.items()}
assert len(_TYPE_OF_CODE) == len(TYPE_CODES) and not any("." in code for code in _TYPE_OF_CODE)


def type_name(stored: str) -> str:
    """The name of the type an entry's ``type`` field holds (a code, or the name itself)."""
    return _TYPE_OF_CODE.get(stored, stored)


def progress_id(job_id: str, attempt: int, step: int) -> str:
    """The id of the report of a training step of a job's attempt. A trainer reports a step's
    training metrics once (transformers logs a step only past the last one it logged), so the
    runner gives a training row this id: unique, and the log need not store it."""
    return f"{job_id}-{attempt}-step{step}"


def _progress_id(job_id: str, payload: Mapping[str, Any]) -> str:
    attempt, step = payload.get("attempt"), payload.get("step")
    if type(attempt) is not int or type(step) is not int:
        raise DecodeError(f"job.progress derives its id from its attempt and step, not {attempt!r} and {step!r}")
    return progress_id(job_id, attempt, step)


# type -> the id a message of that type has unless it was given another, made from its job id and
# its payload as written; a compact entry writes such an id as 0. Never change a derivation (the
# entries that hold 0 would read as other ids); a version that renames its fields needs its own.
DERIVED_IDS: dict[str, Callable[[str, Mapping[str, Any]], str]] = {"job.progress": _progress_id}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_ZERO = timedelta(0)
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_REQUIRED = object()  # a positional value that is always written

# (type, version) -> the payload's fields in the order of its array, each with the value an
# absent trailing element stands for. Never change an existing layout: add a version. The first
# element of job.progress is its attempt, which the fold reads without decoding (events.log).
POSITIONAL: dict[tuple[str, int], tuple[tuple[str, Any], ...]] = {
    ("job.progress", 1): (
        ("attempt", _REQUIRED),
        ("step", _REQUIRED),
        ("max_steps", _REQUIRED),
        ("percent", _REQUIRED),
        ("loss", None),
        ("grad_norm", None),
        ("learning_rate", None),
        ("token_acc", None),
        ("epoch", None),
        ("elapsed_s", None),
        ("remaining_s", None),
        ("train_speed_s_per_it", None),
        ("eval", {}),
    ),
}
_POSITIONAL_NAMES = {key: frozenset(name for name, _ in layout) for key, layout in POSITIONAL.items()}
_POSITIONAL_ORDER = {key: tuple(name for name, _ in layout) for key, layout in POSITIONAL.items()}
_POSITIONAL_DEFAULTS = {key: tuple(default for _, default in layout) for key, layout in POSITIONAL.items()}


def _short_id(value: str) -> str:
    if len(value) == 32 and _HEX_ID.fullmatch(value):
        return base64.urlsafe_b64encode(bytes.fromhex(value))[:22].decode()
    return "=" + value


def _long_id(value: object) -> str:
    if type(value) is not str:
        raise DecodeError(f"id {value!r} is not a string")
    if len(value) == 22 and value[0] != "=":
        try:
            return binascii.a2b_base64(value.replace("-", "+").replace("_", "/") + "==", strict_mode=True).hex()
        except binascii.Error as exc:
            raise DecodeError(f"id {value!r} is not base64: {exc}") from exc
    if value.startswith("="):
        return value[1:]
    raise DecodeError(f"id {value!r} is neither 22 base64 characters nor '=' and an id")


def _trimmed(values: list[Any], defaults: tuple[Any, ...]) -> list[Any]:
    """Values without their trailing defaults (None, or an empty object)."""
    n = len(values)
    while n:
        value, default = values[n - 1], defaults[n - 1]
        if not (value is None if default is None else type(default) is dict and type(value) is dict and not value):
            break
        n -= 1
    return values[:n]


def encode_fact(message: Message, source: str = "") -> tuple[str, str, str, str]:
    """The compact entry of a fact for the log: its ``type``, ``job_id``, ``data`` and ``at``
    (the chain adds ``hash``); ``source`` names the sender when the message does not."""
    type_, version = message.type, message.v
    payload = message.model_dump(mode="json")
    for name in ENVELOPE_FIELDS:
        del payload[name]
    key = (type_, version)
    body: Any = payload
    if key in POSITIONAL and payload.keys() == _POSITIONAL_NAMES[key]:
        body = _trimmed([payload[name] for name in _POSITIONAL_ORDER[key]], _POSITIONAL_DEFAULTS[key])
    at = message.at
    if at.tzinfo is not None and at.utcoffset() == _ZERO:
        at_us, at_text = str((at - _EPOCH) // _MICROSECOND), None
    else:
        at_us, at_text = "", to_json(at).decode()[1:-1]
    causation, actor, job_id = message.causation_id, message.actor, message.job_id
    derive = DERIVED_IDS.get(type_) if job_id else None  # (a message of no job derives none)
    derived = derive is not None and message.id == derive(job_id or "", payload)
    data = [body, 0 if derived else _short_id(message.id), message.source or source]
    if actor is not None or causation is not None or version != 1 or at_text is not None or job_id == "":
        data += (actor, None if causation is None else _short_id(causation), version, at_text)
        if job_id == "":
            data.append("")
        while data[-1] is None or (len(data) == 6 and data[-1] == 1):
            data.pop()
    if data[-1] == "" and len(data) == 3:
        data.pop()
    if derived and len(data) == 2:
        data.pop()
    return TYPE_CODES.get(type_, type_), job_id or "", to_json(data).decode(), at_us


def _tails(layout: tuple[tuple[str, Any], ...]) -> list[tuple[dict[str, Any], tuple[str, ...]] | None]:
    """Per count of values given: the fields after them, with the values they stand for (those
    that are objects apart, to be made anew), or None where a required field would be missing."""
    tails: list[tuple[dict[str, Any], tuple[str, ...]] | None] = []
    for given in range(len(layout) + 1):
        rest = layout[given:]
        if any(default is _REQUIRED for _, default in rest):
            tails.append(None)
        else:
            objects = tuple(name for name, default in rest if type(default) is dict)
            tails.append(({name: default for name, default in rest if name not in objects}, objects))
    return tails


_POSITIONAL_TAILS = {key: _tails(layout) for key, layout in POSITIONAL.items()}
assert not any(_POSITIONAL_NAMES[key] & set(ENVELOPE_FIELDS) for key in POSITIONAL)


def _unpack(type_: str, version: int, values: list[Any]) -> dict[str, Any]:
    names = _POSITIONAL_ORDER.get((type_, version))
    if names is None:
        raise DecodeError(f"{type_} v{version} has no positional layout")
    payload = dict(zip(names, values, strict=False))
    if len(values) != len(names):
        if len(values) > len(names):
            raise DecodeError(f"{type_} v{version} has {len(values)} values for {len(names)} fields")
        tail = _POSITIONAL_TAILS[(type_, version)][len(values)]
        if tail is None:
            missing = next(
                name for name, default in POSITIONAL[(type_, version)][len(values) :] if default is _REQUIRED
            )
            raise DecodeError(f"{type_} v{version} lacks its {missing}")
        payload.update(tail[0])
        for name in tail[1]:
            payload[name] = {}
    return payload


def decode_compact(type_: str, job_id: str, data: Any, at: str) -> Message:
    """A message from a compact entry's fields (``data`` parsed; ``type_`` as stored: a code or
    a name)."""
    if type(data) is not list or not 1 <= len(data) <= 8:
        raise DecodeError("data is not a compact entry")
    type_ = _TYPE_OF_CODE.get(type_, type_)
    current = _CURRENT_VERSION.get(type_)
    if current is None:
        raise DecodeError(f"unknown message type {type_!r}")
    n = len(data)
    version = data[5] if n > 5 else 1
    if type(version) is not int or version < 1 or version > current:
        raise DecodeError(f"{type_} has unsupported version {version!r}")
    payload = data[0]
    positional = type(payload) is list
    if positional:
        payload = _unpack(type_, version, payload)
    elif type(payload) is not dict:
        raise DecodeError(f"{type_} payload is neither an object nor an array")
    if at:
        try:
            when: object = _EPOCH + int(at) * _MICROSECOND
        except (ValueError, OverflowError) as exc:
            raise DecodeError(f"at {at!r} is not a time in microseconds") from exc
        if n > 6 and data[6] is not None:
            raise DecodeError("entry has two times")
    elif n > 6 and type(data[6]) is str:
        when = data[6]
    else:
        raise DecodeError(f"{type_} entry lacks its time")
    if n > 7:
        if data[7] != "" or job_id:
            raise DecodeError("entry has two job ids")
        job: str | None = ""
    else:
        job = job_id or None
    short_id = data[1] if n > 1 else 0
    if short_id == 0 and type(short_id) is int:  # derived from the payload as written
        derive = DERIVED_IDS.get(type_)
        if derive is None or not job:
            raise DecodeError(f"{type_} entry lacks its id")
        long_id = derive(job, payload)
    else:
        long_id = _long_id(short_id)
    if version < current:
        payload, version, positional = _lift(type_, version, current, payload), current, False
    if not positional and not payload.keys().isdisjoint(ENVELOPE_FIELDS):
        raise DecodeError("payload repeats envelope fields")
    causation = data[4] if n > 4 else None
    message = {
        **payload,
        "type": type_,
        "v": version,
        "id": long_id,
        "at": when,
        "source": data[2] if n > 2 else "",
        "causation_id": None if causation is None else _long_id(causation),
        "job_id": job,
        "actor": data[3] if n > 3 else None,
    }
    try:
        return _ADAPTER.validate_python(message)
    except ValidationError as exc:
        raise DecodeError(f"invalid {type_}: {exc.errors(include_url=False)}") from exc


# --- upcasters: one per change of a payload's shape ---


@upcaster("job.queued", 1)
def _queued_names_the_job_ahead(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 names the job it was queued behind; a v1 entry did not record it."""
    return {**payload, "behind_job_id": None}
