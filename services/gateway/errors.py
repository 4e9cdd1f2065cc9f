"""One JSON shape for every error: a stable machine code, a message and, for bad input, the
fields at fault."""

from __future__ import annotations

from typing import Any

import structlog
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from services.errors import ServiceError

log = structlog.get_logger("gateway")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    421: "misdirected_request",
    422: "validation_error",
    503: "unavailable",
}


class ApiError(ServiceError):
    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or []}}


def validation_details(exc: ValidationError, *, drop_tags: set[str] | None = None) -> list[dict[str, Any]]:
    """Field paths as users write them: the union's tag (the task type) is not part of the path."""
    details = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if str(p) not in (drop_tags or set())]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            # The discriminator's own error has no location: name the field it reads.
            tag = err.get("ctx", {}).get("discriminator", "").strip("'")
            loc = [*loc, tag] if tag else loc
        details.append({"field": ".".join(loc) or "body", "message": err["msg"], "type": err["type"]})
    return details


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.status)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _CODES.get(exc.status_code, "error")
    return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", path=request.url.path)
    return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)


async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable", path=request.url.path, error=str(exc))
    return JSONResponse(
        error_body("unavailable", "the event log is unavailable; retry shortly"),
        status_code=503,
        headers={"Retry-After": "2"},
    )
