"""The API described as OpenAPI 3.1, generated from the pydantic models the gateway validates
and answers with, and interactive docs (Swagger UI) whose assets the gateway serves itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import swagger_ui
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from events.params import DeployJob, LanguageModelJob, MultiModalJob
from events.state import Job

SWAGGER_ASSETS = Path(swagger_ui.__file__).parent / "static"


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorInfo(BaseModel):
    code: str = Field(description="stable, for machines: job_not_found, validation_error, illegal_state, …")
    message: str
    details: list[ErrorDetail] = Field(description="the fields at fault, for bad input")


class Error(BaseModel):
    error: ErrorInfo


class JobView(Job):
    task_type: str
    queue_position: int | None = Field(description="1-based place in the queue; null when not queued")


class JobCreated(BaseModel):
    job_id: str
    status: str
    message: str
    queue_position: int | None
    estimated_wait_time: float | None = Field(description="seconds until the estimated start; null when unknown")
    command_position: str = Field(description="the submit command's entry in the commands stream")


class JobList(BaseModel):
    jobs: list[JobView]
    total: int
    page: int
    size: int
    next_cursor: str | None = Field(description="pass as cursor for the next page; null on the last")


class CommandAccepted(BaseModel):
    job_id: str
    status: str = Field(description="the job's status when the command was accepted")
    command_position: str
    message: str


_MODELS: list[type[BaseModel]] = [
    LanguageModelJob,
    MultiModalJob,
    DeployJob,
    Error,
    JobView,
    JobCreated,
    JobList,
    CommandAccepted,
]

# (method, path under the prefix, tag, summary, request model, {status: response model or None})
_OPERATIONS: list[tuple[str, str, str, str, str | None, dict[int, str | None]]] = [
    ("post", "/training/jobs", "jobs", "Submit a job (or a dry run)", "JobSpec", {202: "JobCreated", 200: None}),
    ("get", "/training/jobs", "jobs", "List jobs, newest first", None, {200: "JobList"}),
    ("delete", "/training/jobs", "jobs", "Delete every finished job", None, {202: None}),
    ("get", "/training/jobs/{job_id}", "jobs", "A job", None, {200: "JobView"}),
    ("delete", "/training/jobs/{job_id}", "jobs", "Delete a finished job", None, {202: "CommandAccepted"}),
    ("get", "/training/jobs/{job_id}/progress", "jobs", "A job's progress", None, {200: None}),
    ("get", "/training/jobs/{job_id}/logs", "jobs", "A job's output lines (?tail=N)", None, {200: None}),
    ("get", "/training/jobs/{job_id}/events", "jobs", "A job's history from the log", None, {200: None}),
    ("get", "/training/jobs/{job_id}/timeline", "jobs", "A job's life, in sentences", None, {200: None}),
    ("get", "/training/jobs/{job_id}/command", "jobs", "The command line a job runs", None, {200: None}),
    ("get", "/training/jobs/{job_id}/stream", "streams", "A job's events, live (SSE)", None, {200: None}),
    ("get", "/training/jobs/{job_id}/logs/stream", "streams", "A job's output lines, live (SSE)", None, {200: None}),
    ("post", "/training/jobs/{job_id}/cancel", "jobs", "Cancel a job", None, {202: "CommandAccepted"}),
    ("post", "/training/jobs/{job_id}/stop", "jobs", "Cancel a job (alias)", None, {202: "CommandAccepted"}),
    ("post", "/training/jobs/{job_id}/start", "jobs", "Release a held job", None, {202: "CommandAccepted"}),
    ("post", "/training/jobs/{job_id}/export", "jobs", "Export (merge) a LoRA job", None, {202: "CommandAccepted"}),
    ("get", "/training/queue", "queue", "Queued jobs in start order, with estimates", None, {200: None}),
    ("get", "/training/queue/{job_id}/status", "queue", "One job's place in the queue", None, {200: None}),
    ("patch", "/training/queue/{job_id}", "queue", "Change a queued job's priority", None, {202: "CommandAccepted"}),
    ("delete", "/training/queue/{job_id}", "queue", "Remove a job from the queue", None, {202: "CommandAccepted"}),
    ("post", "/training/queue/process", "queue", "Force a scheduling pass", None, {202: None}),
    ("get", "/training/queue/processor/status", "queue", "The scheduler's leader and lease", None, {200: None}),
    ("get", "/training/events/stream", "streams", "Every event, live (SSE)", None, {200: None}),
    ("get", "/training/gpus", "cluster", "Nodes and GPUs, and who holds each", None, {200: None}),
    ("get", "/training/gpus/stream", "streams", "Nodes and GPUs, live (SSE)", None, {200: None}),
    ("get", "/training/system/status", "cluster", "Nodes, Redis, consumers, jobs by status", None, {200: None}),
    (
        "get",
        "/training/health",
        "cluster",
        "Whether Redis and every process type are live",
        None,
        {200: None, 503: None},
    ),
    ("get", "/training/supported-types", "jobs", "Task types", None, {200: None}),
    ("get", "/training/params/default", "jobs", "Defaults of a task type (?task_type=)", None, {200: None}),
    ("get", "/audit/events", "audit", "The history, with filters and a cursor (admin)", None, {200: None}),
    ("get", "/audit/state", "audit", "The state this gateway folded from the log (admin)", None, {200: None}),
    ("post", "/auth/token", "auth", "A short-lived token for browsers' streams", None, {200: None}),
    ("delete", "/auth/token", "auth", "Sign a browser out (removes the token's cookie)", None, {200: None}),
    ("get", "/auth/me", "auth", "Who you are", None, {200: None}),
]
_OPEN = {"/training/health"}
_ERRORS = {400: "bad input", 401: "no or a wrong API key", 403: "not allowed for this role", 404: "no such job"}


def _content(model: str | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"$ref": f"#/components/schemas/{model}"} if model else {"type": "object"}
    return {"application/json": {"schema": schema}}


def document(prefix: str) -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(model, "serialization") for model in _MODELS], ref_template="#/components/schemas/{model}"
    )
    components = dict(schemas.get("$defs", {}))
    components["JobSpec"] = {
        "oneOf": [
            {"$ref": f"#/components/schemas/{name}"} for name in ("LanguageModelJob", "MultiModalJob", "DeployJob")
        ],
        "discriminator": {"propertyName": "task_type"},
    }
    paths: dict[str, dict[str, Any]] = {}
    for method, path, tag, summary, body, answers in _OPERATIONS:
        responses: dict[str, Any] = {
            str(status): {"description": "ok" if status < 300 else "unavailable", "content": _content(model)}
            for status, model in answers.items()
        }
        for status, why in _ERRORS.items():
            if status == 404 and "{job_id}" not in path:
                continue
            if status in (401, 403) and path in _OPEN:
                continue
            responses[str(status)] = {"description": why, "content": _content("Error")}
        if method in ("post", "patch", "delete"):
            responses["409"] = {"description": "does not apply to the job's state", "content": _content("Error")}
        operation: dict[str, Any] = {"tags": [tag], "summary": summary, "responses": responses}
        if "{job_id}" in path:
            operation["parameters"] = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
        if body:
            operation["requestBody"] = {"required": True, "content": _content(body)}
            responses["413"] = {"description": "body over the size limit", "content": _content("Error")}
            responses["422"] = {"description": "invalid job, naming the fields", "content": _content("Error")}
        if path in _OPEN:
            operation["security"] = []
        paths.setdefault(f"{prefix}{path}", {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Swift Trainer",
            "version": "1",
            "description": "Fine-tuning and deployment jobs on a pool of GPUs.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
    }


async def openapi_json(request: Request) -> JSONResponse:
    if not hasattr(request.app.state, "openapi"):
        request.app.state.openapi = document(request.app.state.settings.api_prefix)
    return JSONResponse(request.app.state.openapi)


_DOCS = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Swift Trainer API</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/docs/assets/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset], layout: "StandaloneLayout"});
  </script>
</body>
</html>
"""


async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(_DOCS)


def routes() -> list[Route | Mount]:
    return [
        Route("/openapi.json", openapi_json, methods=["GET"], include_in_schema=False),
        Route("/docs", docs, methods=["GET"], include_in_schema=False),
        Mount("/docs/assets", app=StaticFiles(directory=SWAGGER_ASSETS), name="docs-assets"),
    ]
