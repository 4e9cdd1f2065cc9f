"""The OpenAPI document describes every route the gateway serves, validates as OpenAPI 3.1, and
the interactive docs come with their assets from the gateway itself, open without a key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.routing import Mount, Route

from events.bus import Bus
from services.config import load_settings
from services.gateway.app import create_app
from services.gateway.projection import Projection

KEYS = "root:admin:root-key-0123456789ab"


@pytest.fixture
async def gateway(bus: Bus, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    settings = load_settings(namespace=bus.keys.namespace, data_dir=tmp_path / "data", api_keys=KEYS)
    app = create_app(settings, bus, Projection(bus, bus.redis))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        yield client, app


def served(routes: list[object], prefix: str = "") -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Mount) and route.routes:
            found |= served(list(route.routes), prefix + route.path)
        elif isinstance(route, Route) and route.include_in_schema:  # not the docs, nor the dashboard
            found |= {(method.lower(), prefix + route.path) for method in route.methods or () if method != "HEAD"}
    return found


async def test_the_document_is_valid_and_covers_every_route(gateway: tuple[httpx.AsyncClient, object]) -> None:
    client, app = gateway
    response = await client.get("/openapi.json")  # open: no key
    assert response.status_code == 200
    document = response.json()
    validate(document)
    described = {(method, path) for path, operations in document["paths"].items() for method in operations}
    assert described == served(app.routes)  # type: ignore[attr-defined]
    created = document["paths"]["/api/v1/training/jobs"]["post"]
    assert created["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert "422" in created["responses"] and "401" in created["responses"]
    spec = document["components"]["schemas"]["LanguageModelJob"]
    assert {"model_path", "data_path", "train_params", "priority"} <= set(spec["properties"])


async def test_the_docs_and_their_assets_are_served_offline_without_a_key(
    gateway: tuple[httpx.AsyncClient, object],
) -> None:
    client, _ = gateway
    page = await client.get("/docs")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from elsewhere
    for asset in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css"):
        response = await client.get(f"/docs/assets/{asset}")
        assert response.status_code == 200 and len(response.content) > 1000, asset
    assert (await client.get("/api/v1/training/jobs")).status_code == 401
