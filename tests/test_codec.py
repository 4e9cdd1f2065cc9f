"""The codec: every message type round-trips, bad entries are refused with a reason, old
versions are upcast."""

from __future__ import annotations

import json

import pytest

from events import codec
from events import messages as m
from tests.examples import examples


def test_examples_cover_every_message_type() -> None:
    assert {e.type for e in examples()} == set(m.message_types())


@pytest.mark.parametrize("message", examples(), ids=lambda e: e.type)
def test_every_message_type_round_trips(message: m.Message) -> None:
    fields = codec.encode(message)
    assert fields["type"] == message.type
    assert fields["job_id"] == (message.job_id or "")
    envelope = json.loads(fields["data"])
    assert set(envelope) == {*m.ENVELOPE_FIELDS, "payload"}
    # Byte fields, as a client without decode_responses reads them, decode the same.
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    assert codec.decode(fields) == message
    assert codec.decode(raw) == message


STAMP = {"v": 1, "id": "e1", "at": "2026-01-01T00:00:00Z"}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"x": "1"}, "no 'data' field"),
        ({"data": "{not json"}, "not JSON"),
        ({"data": "[1, 2]"}, "not an envelope"),
        ({"data": json.dumps({"type": "job.exploded", "v": 1, "payload": {}})}, "unknown message type"),
        ({"data": json.dumps({"type": "job.queued", "v": 9, "payload": {"position": 1}})}, "unsupported version"),
        ({"data": json.dumps({"type": "job.queued", "v": 2, "payload": {"position": 1}})}, "lacks its id or time"),
        ({"data": json.dumps({**STAMP, "type": "job.queued", "payload": {"position": "first"}})}, "invalid job.queued"),
        ({"data": json.dumps({**STAMP, "type": "job.queued", "payload": {"position": 1, "type": "x"}})}, "repeats"),
    ],
)
def test_bad_entries_are_refused_with_a_reason(fields: dict[str, str], reason: str) -> None:
    with pytest.raises(codec.DecodeError, match=reason):
        codec.decode(fields)


def test_an_older_version_is_upcast_on_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given job.queued at v2, where v1 called the field `place`
    monkeypatch.setitem(codec._CURRENT_VERSION, "job.queued", 2)
    monkeypatch.setattr(codec, "UPCASTERS", {})
    codec.upcaster("job.queued", 1)(lambda p: {"position": p.pop("place"), **p})
    old = {
        "type": "job.queued",
        "v": 1,
        "id": "e1",
        "at": "2026-01-01T00:00:00Z",
        "job_id": "j",
        "payload": {"place": 4},
    }
    # When a v1 entry is read
    message = codec.decode({"data": json.dumps(old)})
    # Then it arrives as the current version
    assert isinstance(message, m.JobQueued)
    assert (message.position, message.v, message.job_id) == (4, 2, "j")


def test_a_version_without_an_upcaster_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(codec._CURRENT_VERSION, "job.queued", 2)
    monkeypatch.setattr(codec, "UPCASTERS", {})
    old = {"type": "job.queued", "v": 1, "payload": {"position": 4}}
    with pytest.raises(codec.DecodeError, match="no upcaster"):
        codec.decode({"data": json.dumps(old)})
