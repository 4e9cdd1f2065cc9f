"""Reading a request's body: JSON declared as such, of a bounded size; and a job as submitted."""

from __future__ import annotations

from typing import Any

from pydantic_core import from_json
from starlette.requests import Request

from services.config import Settings
from services.gateway.auth import principal
from services.gateway.errors import ApiError
from services.gateway.submit import Submission, SwiftFlags, parse_submission
from services.webhooks import refused

MAX_BODY_BYTES = 1024 * 1024


def is_json(content_type: str | None) -> bool:
    """application/json, or a JSON-based type such as application/merge-patch+json."""
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", f"request body over {MAX_BODY_BYTES} bytes")
    # A page elsewhere can make a browser post text/plain or a form without asking first (no
    # preflight), but not application/json: a JSON endpoint takes JSON declared as such alone.
    if not is_json(request.headers.get("content-type")):
        raise ApiError(
            415,
            "unsupported_media_type",
            "the body must be JSON, sent with Content-Type: application/json",
            [{"field": "Content-Type", "message": f"got {request.headers.get('content-type', 'none')[:100]!r}"}],
        )
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "payload_too_large", f"request body over {MAX_BODY_BYTES} bytes")
    try:
        return from_json(body)  # parsed in Rust
    except ValueError as exc:  # not JSON, not UTF-8, or nested too deep
        raise ApiError(
            400, "invalid_json", f"request body is not JSON: {exc}", [{"field": "body", "message": str(exc)}]
        ) from exc


async def _swift_flags(request: Request, body: Any) -> dict[str, frozenset[str]] | None:
    """The installed ms-swift's flags, when a submission has extra flags to check."""
    if not isinstance(body, dict) or not any(
        isinstance(params, dict) and params.get("extra_args")
        for params in (body.get("train_params"), body.get("deploy_params"))
    ):
        return None
    flags: SwiftFlags = request.app.state.swift_flags
    return await flags.get()


async def submitted(request: Request, body: Any) -> Submission:
    """A job body as it will be stored, checked as every submission is (422 naming the field)."""
    settings: Settings = request.app.state.settings
    submission = parse_submission(
        body,
        request.app.state.projection.state,
        settings.roots,
        await _swift_flags(request, body),
        principal(request),
        base=settings.data_dir,
        private=settings.private_dirs,
        allow_code_flags=settings.allow_code_flags,
        hub=settings.model_hub,
    )
    notify = submission.spec.notify
    if notify is not None:
        gateway = (settings.app_host, settings.app_port)
        why = refused(notify.url, allow_loopback=settings.allow_loopback_webhooks, gateway=gateway)
        if why is not None:
            raise ApiError(422, "validation_error", f"notify.url: {why}", [{"field": "notify.url", "message": why}])
    return submission
