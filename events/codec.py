"""Turning messages into Redis stream entries and back, with upcasting of older versions.

An entry has three fields: ``type`` and ``job_id`` (so readers can filter without decoding) and
``data``, the JSON envelope ``{"type", "v", "id", "at", "source", "causation_id", "job_id", "actor",
"payload": {...}}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import from_json, to_json

from events.messages import ENVELOPE_FIELDS, AnyMessage, Message, message_types

Fields = Mapping[bytes | str, bytes | str]
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_ADAPTER: TypeAdapter[Message] = TypeAdapter(AnyMessage)
_CURRENT_VERSION = {name: cls.model_fields["v"].default for name, cls in message_types().items()}
# (type, version) -> function turning that version's payload into the next version's.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class DecodeError(ValueError):
    """An entry that is not a message this release understands; the reason says why."""


def upcaster(type_: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function that lifts ``type_`` payloads from ``from_version`` to the next one."""

    def register(fn: Upcaster) -> Upcaster:
        UPCASTERS[(type_, from_version)] = fn
        return fn

    return register


def encode(message: Message, source: str = "") -> dict[str, str]:
    """The entry of a message; ``source`` names the sender when the message does not."""
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


def decode(fields: Fields) -> Message:
    raw = fields.get("data")
    if raw is None:
        raw = next((v for k, v in fields.items() if _text(k) == "data"), None)
    if raw is None:
        raise DecodeError("entry has no 'data' field")
    try:
        envelope = from_json(raw)  # parsed in Rust
    except ValueError as exc:  # not JSON, or not UTF-8
        raise DecodeError(f"data is not JSON: {exc}") from exc
    return decode_envelope(envelope)


def decode_envelope(envelope: Any) -> Message:
    """A message from its parsed ``data`` envelope."""
    if not isinstance(envelope, dict) or not isinstance(envelope.get("payload"), dict):
        raise DecodeError("data is not an envelope with a payload object")
    type_ = envelope.get("type")
    if type_ not in _CURRENT_VERSION:
        raise DecodeError(f"unknown message type {type_!r}")
    payload = envelope.pop("payload")
    version = envelope.get("v", 1)
    if not isinstance(version, int) or version < 1 or version > _CURRENT_VERSION[type_]:
        raise DecodeError(f"{type_} has unsupported version {version!r}")
    while version < _CURRENT_VERSION[type_]:
        lift = UPCASTERS.get((type_, version))
        if lift is None:
            raise DecodeError(f"no upcaster for {type_} v{version}")
        payload = lift(payload)
        version += 1
    envelope["v"] = version
    if "id" not in envelope or "at" not in envelope:  # defaults would differ at every read
        raise DecodeError(f"{type_} envelope lacks its id or time")
    if set(payload) & set(envelope):
        raise DecodeError("payload repeats envelope fields")
    try:
        return _ADAPTER.validate_python({**envelope, **payload})
    except ValidationError as exc:
        raise DecodeError(f"invalid {type_}: {exc.errors(include_url=False)}") from exc


# --- upcasters: one per change of a payload's shape ---


@upcaster("job.queued", 1)
def _queued_names_the_job_ahead(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 names the job it was queued behind; a v1 entry did not record it."""
    return {**payload, "behind_job_id": None}
