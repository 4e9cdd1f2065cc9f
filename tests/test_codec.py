"""The codec: every message type round-trips in both layouts (and any progress report, as a
property), bad entries are refused with a reason, old versions are upcast."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    assert codec.envelope_json(fields) == fields["data"]


def compact(message: m.Message, source: str = "") -> dict[str, str]:
    return dict(zip(("type", "job_id", "data", "at"), codec.encode_fact(message, source), strict=True))


@pytest.mark.parametrize("message", examples(), ids=lambda e: e.type)
def test_every_message_type_round_trips_as_a_compact_entry(message: m.Message) -> None:
    fields = compact(message)
    assert (codec.entry_type(fields), fields["job_id"]) == (message.type, message.job_id or "")
    assert fields["type"] == codec.TYPE_CODES.get(message.type, message.type)
    data = json.loads(fields["data"])
    assert message.type not in fields["data"] and (not message.job_id or message.job_id not in fields["data"])
    assert isinstance(data[0], dict | list) and len(data) <= 8
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    assert codec.decode(fields) == message
    assert codec.decode(raw) == message
    # And its envelope is the one the envelope layout stores
    assert codec.envelope_json(fields) == codec.envelope_json(fields, message) == codec.encode(message)["data"]


AT = datetime(2026, 12, 5, 2, 38, 50, 737426, tzinfo=UTC)


def test_a_progress_report_is_a_few_numbers_and_its_stamp() -> None:
    # Given a training step's progress report as a runner writes it (the id its job, attempt and
    # step make; its time; the metrics ms-swift left out)
    job_id = "f" * 32
    report = m.JobProgress(
        id=codec.progress_id(job_id, 2, 5),
        job_id=job_id,
        attempt=2,
        step=5,
        max_steps=94,
        percent=5.32,
        loss=1.95,
        at=AT,
    )
    assert report.id == f"{job_id}-2-step5"
    fields = compact(report, "runner@n1")
    # Then the type is a code; data holds the attempt first, the metrics up to the last given, 0
    # for the id (derived) and the source; the time is an integer of microseconds; nothing else
    assert fields == {
        "type": "p",
        "job_id": job_id,
        "data": '[[2,5,94,5.32,1.95],0,"runner@n1"]',
        "at": "1796438330737426",
    }
    assert codec.decode(fields) == report.model_copy(update={"source": "runner@n1"})
    assert codec.entry_type(fields) == codec.type_name("p") == "job.progress"
    # And without a source, data is the payload alone
    assert compact(report)["data"] == "[[2,5,94,5.32,1.95]]" and codec.decode(compact(report)) == report
    # And a report with another id (an evaluation row's is random) stores it, in base64
    evaluated = report.model_copy(update={"id": m.new_id(), "loss": None, "eval": {"eval_loss": 1.2}})
    short = base64.urlsafe_b64encode(bytes.fromhex(evaluated.id)).decode()[:22]
    data = json.loads(compact(evaluated, "runner@n1")["data"])
    # (an evaluation row keeps the metrics in between as nulls)
    assert data == [[2, 5, 94, 5.32, *[None] * 8, {"eval_loss": 1.2}], short, "runner@n1"]
    assert codec.decode(compact(evaluated)) == evaluated
    # And so does a report whose id would be derived from another step, attempt or job
    for other in (codec.progress_id(job_id, 2, 6), codec.progress_id(job_id, 1, 5), codec.progress_id("e" * 32, 2, 5)):
        moved = report.model_copy(update={"id": other})
        assert json.loads(compact(moved)["data"])[1] == "=" + other and codec.decode(compact(moved)) == moved


@pytest.mark.parametrize(
    "change",
    [
        {"id": "3ba1-1-started", "causation_id": "cmd-1"},  # ids that are not 32 hex digits
        {"id": "AB" * 16, "causation_id": "cd" * 15},
        {"id": "=" + "ab" * 16},
        {"job_id": ""},  # an empty job id is not none
        {"actor": "alice", "source": "scheduler@vm"},
        {"at": datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=2)))},  # not UTC
        {"at": datetime(2026, 1, 1, 1)},  # no time zone
        {"at": datetime(1969, 7, 20, 20, 17, 40, 5, tzinfo=UTC)},  # before the epoch
        {"at": datetime(2026, 1, 1, tzinfo=timezone(timedelta(0), "GMT"))},
        {"id": "j-1-step0", "job_id": ""},  # an id a progress report of no job cannot derive
        {"id": "j-1-step0", "job_id": None},
        {"id": "j-1-step0", "actor": "alice"},  # (a report's derived id, then more fields)
    ],
)
def test_what_a_compact_entry_cannot_shorten_it_keeps_as_it_is(change: dict[str, Any]) -> None:
    for message in (m.JobQueued(job_id="j", position=1, behind_job_id="k"), m.JobProgress(job_id="j", attempt=1)):
        changed = message.model_copy(update=change)
        back = codec.decode(compact(changed))
        assert back == changed
        assert codec.encode(back)["data"] == codec.encode(changed)["data"]  # to the character


def test_a_payload_that_does_not_fit_its_positional_layout_is_written_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given job.progress with a field its positional layout does not know (added without a version)
    names = codec._POSITIONAL_NAMES[("job.progress", 1)]
    monkeypatch.setitem(codec._POSITIONAL_NAMES, ("job.progress", 1), names | {"tokens_per_s"})
    report = m.JobProgress(job_id="j", attempt=1, step=3, max_steps=9, percent=33.33)
    # Then its payload is written as an object, and read back the same
    fields = compact(report)
    assert json.loads(fields["data"])[0] == report.payload()
    assert codec.decode(fields) == report


metrics = st.none() | st.floats(allow_nan=False, allow_infinity=False)
ids = st.sampled_from(["derived", "random", "other"])
sources = st.sampled_from(["", "runner@n1", "=x"]) | st.text(max_size=8)
times = st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-3))]) | st.none())


@given(
    job_id=st.sampled_from(["f" * 32, "j", "", None]) | st.text(min_size=1, max_size=6),
    attempt=st.integers(0, 2**40),
    step=st.integers(0, 2**40),
    made=ids,
    source=sources,
    actor=st.none() | st.text(max_size=5),
    causation=st.none() | st.sampled_from(["c" * 32, "cmd-1"]),
    at=times,
    loss=metrics,
    epoch=metrics,
    evaluated=st.dictionaries(st.sampled_from(["eval_loss", "eval_acc"]), st.floats(allow_nan=False), max_size=2),
)
def test_any_progress_report_round_trips_as_a_compact_entry(
    job_id: str | None,
    attempt: int,
    step: int,
    made: str,
    source: str,
    actor: str | None,
    causation: str | None,
    at: datetime,
    loss: float | None,
    epoch: float | None,
    evaluated: dict[str, float],
) -> None:
    # Given a progress report of any job (or none), with the id derived from its step, a random
    # id, or an id of the derived form that is not its own, any envelope and metrics
    made_id = {
        "derived": codec.progress_id(job_id or "", attempt, step),
        "random": m.new_id(),
        "other": codec.progress_id(job_id or "", attempt, step + 1),
    }[made]
    report = m.JobProgress(
        id=made_id,
        job_id=job_id,
        attempt=attempt,
        step=step,
        max_steps=step,
        percent=100.0,
        loss=loss,
        epoch=epoch,
        eval=evaluated,
        source=source,
        actor=actor,
        causation_id=causation,
        at=at,
    )
    # Then its compact entry reads back as the same report, and as the same envelope, to the
    # character; the id is left out exactly when it is the derived one of a report of a job
    fields = compact(report)
    assert codec.decode(fields) == report
    assert codec.envelope_json(fields) == codec.encode(report)["data"]
    data = json.loads(fields["data"])
    assert (len(data) == 1 or data[1] == 0) == (made == "derived" and bool(job_id))
    assert fields["type"] == "p" and codec.entry_type(fields) == "job.progress"


STAMPED = {"type": "job.queued", "job_id": "j", "at": "1796438330737426"}
ID = "A" * 22


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({**STAMPED, "data": "{not json"}, "not JSON"),
        ({**STAMPED, "data": '{"payload": {}}'}, "not a compact entry"),
        ({**STAMPED, "data": f'[{{"position":1}},"{ID}",1,2,3,4,5,6,7]'}, "not a compact entry"),
        ({**STAMPED, "type": "job.exploded", "data": f'[{{}},"{ID}"]'}, "unknown message type"),
        ({**STAMPED, "data": f'[{{"position":1}},"{ID}","",null,null,9]'}, "unsupported version"),
        ({**STAMPED, "data": f'[5,"{ID}"]'}, "neither an object nor an array"),
        ({**STAMPED, "data": f'[[1],"{ID}"]'}, "no positional layout"),
        ({**STAMPED, "data": '[{"position":1},"short"]'}, "neither 22 base64"),
        ({**STAMPED, "data": '[{"position":1},"AAAAAAAAAAAAAAAAAAAA!!"]'}, "not base64"),
        ({**STAMPED, "data": '[{"position":1},7]'}, "not a string"),
        ({**STAMPED, "at": "soon", "data": f'[{{"position":1}},"{ID}"]'}, "not a time"),
        ({**STAMPED, "at": "", "data": f'[{{"position":1}},"{ID}"]'}, "lacks its time"),
        ({**STAMPED, "data": f'[{{"position":1}},"{ID}","",null,null,2,"2026-01-01T00:00:00Z"]'}, "two times"),
        ({**STAMPED, "data": f'[{{"position":1}},"{ID}","",null,null,2,null,""]'}, "two job ids"),
        ({**STAMPED, "data": f'[{{"position":"first"}},"{ID}","",null,null,2]'}, "invalid job.queued"),
        ({**STAMPED, "type": "job.progress", "data": f'[[1,2,3,4,5,6,7,8,9,10,11,12,{{}},14],"{ID}"]'}, "14 values"),
        ({**STAMPED, "type": "job.progress", "data": f'[[1,2],"{ID}"]'}, "lacks its max_steps"),
        ({**STAMPED, "data": "[]"}, "not a compact entry"),
        ({**STAMPED, "data": '[{"position":1},0]'}, "job.queued entry lacks its id"),  # derives none
        ({**STAMPED, "data": '[{"position":1}]'}, "job.queued entry lacks its id"),
        ({**STAMPED, "type": "p", "job_id": "", "data": "[[1,2,3,4]]"}, "lacks its id"),  # of no job
        ({**STAMPED, "type": "p", "data": '[{"attempt":1,"step":"2"},0]'}, "derives its id"),
        ({**STAMPED, "type": "p", "data": "[[1,2,3,4],0.0]"}, "not a string"),
        ({**STAMPED, "type": "p", "data": "[[1,2,3,4],false]"}, "not a string"),
        ({**STAMPED, "type": "q", "data": "[[1,2,3,4],0]"}, "unknown message type 'q'"),
    ],
)
def test_bad_compact_entries_are_refused_with_a_reason(fields: dict[str, str], reason: str) -> None:
    with pytest.raises(codec.DecodeError, match=reason):
        codec.decode(fields)


def test_an_older_version_is_upcast_from_a_compact_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given job.queued v1 written compact (no version written: 1)
    v1 = {**STAMPED, "data": f'[{{"position":4}},"{ID}","scheduler@vm"]'}
    # Then it is read as v2, upcast
    queued = codec.decode(v1)
    assert isinstance(queued, m.JobQueued) and (queued.v, queued.position, queued.behind_job_id) == (2, 4, None)
    # And given job.progress at v2, where v1 gave the percent as a fraction, a v1 report written
    # with its positional layout is read by that layout, then upcast
    monkeypatch.setitem(codec._CURRENT_VERSION, "job.progress", 2)
    monkeypatch.setattr(codec, "UPCASTERS", {})
    codec.upcaster("job.progress", 1)(lambda p: {**p, "percent": 100 * p["percent"]})
    report = codec.decode({**STAMPED, "type": "job.progress", "data": f'[[1,5,94,0.25,1.5],"{ID}"]'})
    assert isinstance(report, m.JobProgress) and (report.v, report.step, report.percent) == (2, 5, 25.0)


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
