"""`GET /audit/events`: the history over REST, with filters and cursors, against a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from events import messages as m
from events.bus import Bus, entry_id_key
from services.config import load_settings
from services.gateway.app import create_app
from services.gateway.projection import Projection
from tests.test_audit import fill


@pytest.fixture
async def api(bus: Bus, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data")
    app = create_app(settings, bus, Projection(bus, bus.redis))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost/api/v1/audit") as client:
        yield client


async def test_pages_through_the_history_with_a_cursor(api: httpx.AsyncClient, bus: Bus) -> None:
    ids = await fill(bus, 250, job_id="a")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/events", params=params)).json()
        seen += [event["entry_id"] for event in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    first = (await api.get("/events", params={"limit": "1"})).json()["events"][0]
    assert first["type"] == "job.progress" and first["payload"]["step"] == 0 and len(first["hash"]) == 27


async def test_filters_by_job_type_and_range(api: httpx.AsyncClient, bus: Bus) -> None:
    a = await fill(bus, 20, job_id="a")
    b = await fill(bus, 20, job_id="b")
    [cancelled] = await bus.append(bus.keys.events, m.JobCancelled(job_id="b", actor="alice"))

    async def ids(**params: str) -> list[str]:
        response = await api.get("/events", params=params)
        assert response.status_code == 200, response.text
        return [event["entry_id"] for event in response.json()["events"]]

    assert await ids(job_id="b") == [*b, cancelled]
    assert await ids(type="job.cancelled") == [cancelled]
    assert await ids(type="job.c*", job_id="a") == []
    assert await ids(after_id=a[9], until_id=b[0]) == [*a[10:], b[0]]
    since_ms, _ = entry_id_key(b[0])
    since = datetime.fromtimestamp(since_ms // 1000, UTC) + timedelta(milliseconds=since_ms % 1000)
    recent = await ids(since=since.isoformat())
    assert recent[-21:] == [*b, cancelled] and all(entry_id_key(i)[0] >= since_ms for i in recent)
    assert await ids(since="1h") == [*a, *b, cancelled]
    earlier = await ids(until=(since - timedelta(milliseconds=1)).isoformat())
    assert earlier == a[: len(earlier)] and all(entry_id_key(i)[0] < since_ms for i in earlier)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": "nope"}, "cursor"),
        ({"until_id": "99999999999999999999-1"}, "until_id"),  # over 64 bits: Redis would refuse it
        ({"cursor": "0-1", "after_id": "x"}, "after_id"),  # checked even when the cursor wins
        ({"since": "soon"}, "since"),
    ],
)
async def test_bad_parameters_are_400_naming_them(api: httpx.AsyncClient, params: dict[str, str], field: str) -> None:
    response = await api.get("/events", params=params)
    assert response.status_code == 400
    assert [d["field"] for d in response.json()["error"]["details"]] == [field]
