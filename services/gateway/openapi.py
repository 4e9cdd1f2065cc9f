"""The API described as OpenAPI 3.1, generated from the pydantic models the gateway validates
and answers with (:mod:`services.gateway.views`), and interactive docs (Swagger UI) whose assets
the gateway serves itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import swagger_ui
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from events.params import DeployJob, LanguageModelJob, MultiModalJob
from events.quotas import Quotas
from services.gateway import views as v

SWAGGER_ASSETS = Path(swagger_ui.__file__).parent / "static"

SSE = "text/event-stream"  # a live stream, not a JSON body


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # under the API prefix
    tag: str
    summary: str
    answers: dict[int, type[BaseModel] | str]  # status -> its body's model, or SSE
    errors: tuple[int, ...] = ()  # the error statuses it can answer with, besides 401
    body: type[BaseModel] | str | None = None  # the request body's model, or a component's name
    parameters: tuple[dict[str, Any], ...] = ()
    open: bool = False  # needs no key


def _query(name: str, schema: dict[str, Any], description: str, *, repeat: bool = False) -> dict[str, Any]:
    if repeat:
        schema = {"type": "array", "items": schema}
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _int(low: int, high: int, default: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": low, "maximum": high}
    return schema if default is None else {**schema, "default": default}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


_ENTRY_ID = {"type": "string", "pattern": r"^\d{1,20}-\d{1,20}$"}
_RESUME = (
    _query("since", _ENTRY_ID, "replay from after this entry id (as Last-Event-ID does)"),
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "schema": _ENTRY_ID,
        "description": "resume after this entry id (sent by browsers on reconnecting)",
    },
)
_LIST = (
    _query("status", _ref("JobStatus"), "only jobs with this status"),
    _query("task_type", _ref("TaskType"), "only jobs of this task type"),
    _query("priority", _int(0, 10), "only jobs of this priority"),
    _query("owner", {"type": "string"}, "only jobs submitted by this user"),
    _query("depends_on", {"type": "string"}, "only jobs that depend on this job (depends_on or source_job_id)"),
    _query("sweep_id", {"type": "string"}, "only the jobs of this sweep"),
    _query("page", _int(1, 1_000_000, 1), "1-based page (ignored with cursor)"),
    _query("size", _int(1, 500, 50), "jobs per page"),
    _query("cursor", {"type": "string"}, "the next_cursor of the previous page"),
)
_TYPES = _query("type", {"type": "string"}, "event types; job.* for a prefix (repeatable)", repeat=True)
_AUDIT_ID = {"type": "string", "pattern": r"^\d{1,20}(-\d{1,20})?$"}
_AUDIT = (
    _query("job_id", {"type": "string"}, "only this job's entries"),
    _TYPES,
    _query("since", {"type": "string"}, "from this time: ISO 8601, or an age such as 1h"),
    _query("until", {"type": "string"}, "up to this time: ISO 8601, or an age such as 10m"),
    _query("limit", _int(1, 10_000, 500), "entries per page"),
    _query("cursor", _AUDIT_ID, "the next_cursor of the previous page"),
    _query("after_id", _AUDIT_ID, "entries after this id"),
    _query("until_id", _AUDIT_ID, "entries up to this id"),
)
_EVENTS = (_query("job_id", {"type": "string"}, "only this job's events"), _TYPES, *_RESUME)
_TAIL = (_query("tail", _int(1, 10_000, 200), "the last N lines"),)
_RANK = (_query("rank", _int(0, 1023, 0), "a gang job's rank whose lines to show"),)
_STREAM_TAIL = (_query("tail", _int(0, 10_000, 200), "start with the last N lines (unless resuming)"), *_RESUME)
_TASK_TYPE = (_query("task_type", {**_ref("TaskType"), "default": "multimodal"}, "the task type"),)
_COMMAND = (404, 409, 503)  # a command on a job: no such job, not in its state, or not sent

# fmt: off
_OPERATIONS: list[Operation] = [
    Operation("post", "/training/jobs", "jobs", "Submit a job (or a dry run)",
              {202: v.JobCreated, 200: v.DryRun}, (400, 413, 422, 429, 503), body="JobSpec"),
    Operation("get", "/training/jobs", "jobs", "List jobs, newest first", {200: v.JobList}, (400,), parameters=_LIST),
    Operation("delete", "/training/jobs", "jobs", "Delete every finished job", {202: v.DeletedFinished}, (503,)),
    Operation("get", "/training/jobs/{job_id}", "jobs", "A job", {200: v.JobView}, (404,)),
    Operation("delete", "/training/jobs/{job_id}", "jobs", "Delete a finished job", {202: v.CommandAccepted}, _COMMAND),
    Operation("get", "/training/jobs/{job_id}/progress", "jobs", "A job's progress", {200: v.JobProgress}, (404,)),
    Operation("get", "/training/jobs/{job_id}/logs", "jobs", "A job's output lines",
              {200: v.JobLogs}, (400, 404, 503), parameters=(*_TAIL, *_RANK)),
    Operation("get", "/training/jobs/{job_id}/events", "jobs", "A job's history from the log",
              {200: v.JobEvents}, (404, 503)),
    Operation("get", "/training/jobs/{job_id}/timeline", "jobs", "A job's life, in sentences",
              {200: v.Timeline}, (404, 503)),
    Operation("get", "/training/jobs/{job_id}/command", "jobs", "The command line a job runs",
              {200: v.JobCommand}, (404,)),
    Operation("get", "/training/jobs/{job_id}/stream", "streams",
              "A job's events, live (SSE: event = its type, data = its JSON envelope, id = its entry id)",
              {200: SSE}, (400, 404), parameters=_RESUME),
    Operation("get", "/training/jobs/{job_id}/logs/stream", "streams",
              "A job's output lines, live (SSE: event log, data {fd, line}, id = the line's entry id)",
              {200: SSE}, (400, 404), parameters=(*_STREAM_TAIL, *_RANK)),
    Operation("post", "/training/jobs/{job_id}/cancel", "jobs", "Cancel a job", {202: v.CommandAccepted}, _COMMAND),
    Operation("post", "/training/jobs/{job_id}/stop", "jobs", "Cancel a job (alias)", {202: v.CommandAccepted}, _COMMAND),
    Operation("post", "/training/jobs/{job_id}/start", "jobs", "Release a held job", {202: v.CommandAccepted}, _COMMAND),
    Operation("post", "/training/jobs/{job_id}/export", "jobs", "Export (merge) a LoRA job",
              {202: v.CommandAccepted}, _COMMAND),
    Operation("post", "/training/jobs/{job_id}/suspend", "jobs",
              "Suspend a running training job (checkpoint, free its GPUs, hold it)", {202: v.CommandAccepted}, _COMMAND),
    Operation("post", "/training/jobs/{job_id}/resume", "jobs", "Queue a suspended job again in its place",
              {202: v.CommandAccepted}, _COMMAND),
    Operation("post", "/training/sweeps", "sweeps", "Start a sweep: one job per point of a grid over train_params",
              {202: v.SweepSubmitted}, (400, 413, 415, 422, 503), body=v.SweepRequest),
    Operation("get", "/training/sweeps", "sweeps", "Sweeps, newest first", {200: v.SweepList}),
    Operation("get", "/training/sweeps/{sweep_id}", "sweeps", "A sweep's points, their results and the best one",
              {200: v.SweepView}, (404,)),
    Operation("post", "/training/sweeps/{sweep_id}/cancel", "sweeps", "Cancel every job of a sweep that has not ended",
              {202: v.SweepCancelled}, (404, 503)),
    Operation("get", "/training/queue", "queue", "Queued jobs in start order, with estimates", {200: v.Queue}),
    Operation("get", "/training/queue/{job_id}/status", "queue", "One job's place in the queue",
              {200: v.QueueStatus}, (404,)),
    Operation("patch", "/training/queue/{job_id}", "queue", "Change a queued job's priority",
              {202: v.CommandAccepted}, (400, 404, 409, 413, 422, 503), body=v.PriorityChange),
    Operation("delete", "/training/queue/{job_id}", "queue", "Remove a job from the queue",
              {202: v.CommandAccepted}, _COMMAND),
    Operation("post", "/training/queue/process", "queue", "Force a scheduling pass", {202: v.ProcessRequested}, (503,)),
    Operation("get", "/training/queue/processor/status", "queue", "The scheduler's leader and lease",
              {200: v.ProcessorStatus}, (503,)),
    Operation("get", "/training/events/stream", "streams",
              "Every event, live (SSE: event = its type, data = its JSON envelope, id = its entry id)",
              {200: SSE}, (400,), parameters=_EVENTS),
    Operation("get", "/training/gpus", "cluster", "Nodes and GPUs, and who holds each", {200: v.Gpus}),
    Operation("get", "/training/gpus/stream", "streams", "Nodes and GPUs, live (SSE: event gpus, data as GET /gpus)",
              {200: SSE}),
    Operation("get", "/training/system/status", "cluster", "Nodes, Redis, consumers, jobs by status",
              {200: v.SystemStatus}, (503,)),
    Operation("get", "/training/health", "cluster", "Whether Redis and every process type are live",
              {200: v.Health, 503: v.Degraded}, open=True),
    Operation("get", "/training/supported-types", "jobs", "Task types", {200: v.SupportedTypes}),
    Operation("get", "/training/params/default", "jobs", "Defaults of a task type",
              {200: v.DefaultParams}, (400,), parameters=_TASK_TYPE),
    Operation("get", "/audit/events", "audit", "The history, with filters and a cursor (admin)",
              {200: v.AuditEvents}, (400, 403, 503), parameters=_AUDIT),
    Operation("get", "/audit/state", "audit", "The state this gateway folded from the log (admin)",
              {200: v.FoldedState}, (403,)),
    Operation("get", "/admin/quotas", "sharing", "The quota table in force (admin)", {200: v.QuotaTable}, (403,)),
    Operation("put", "/admin/quotas", "sharing", "Replace the quota table (admin)",
              {200: v.QuotasApplied, 202: v.QuotasApplied}, (400, 403, 413, 422, 503), body=Quotas),
    Operation("get", "/usage", "sharing", "GPU usage and limits per user and team (yours; an admin's: all)",
              {200: v.UsageReport}),
    Operation("post", "/auth/token", "auth", "A short-lived token for browsers' streams", {200: v.Token}),
    Operation("delete", "/auth/token", "auth", "Sign a browser out (removes the token's cookie)", {200: v.SignedOut}),
    Operation("get", "/auth/me", "auth", "Who you are", {200: v.Me}),
]
# fmt: on
_JOB_SPECS: list[type[BaseModel]] = [LanguageModelJob, MultiModalJob, DeployJob]
_ERRORS = {
    400: "a malformed parameter, header or body",
    401: "no or a wrong API key or token",
    403: "needs the admin role; or a write sent from another origin (cross_origin)",
    404: "no such job (or not one of yours)",
    409: "does not apply to the job's state",
    413: "body over the size limit",
    415: "the body is not declared as JSON (Content-Type: application/json)",
    421: "addressed to a name (Host) this gateway does not answer to",
    422: "invalid input, naming the fields",
    429: "over a quota (quota_exceeded): the limit of jobs waiting at once",
    503: "the event log (Redis) is unavailable: retry shortly",
}
_OK = {200: "ok", 202: "accepted", 503: "not healthy: what is missing"}
_ACCEPTED = {"/admin/quotas": "accepted, not in force yet: the scheduler has not decided within the wait"}


def _edge_errors(op: Operation) -> tuple[int, ...]:
    """What any operation may meet at the gateway's edge (:mod:`services.gateway.edges`): a Host
    it does not answer to (all but the health check), a write from another origin, a body that
    is not JSON."""
    found: tuple[int, ...] = () if op.path == "/training/health" else (421,)
    if op.method in ("post", "put", "patch", "delete"):
        found += (403,)
    if op.body:
        found += (415,)
    return found


def _content(model: type[BaseModel] | str) -> dict[str, Any]:
    if model == SSE:
        return {SSE: {"schema": {"type": "string", "description": "server-sent events, until the client leaves"}}}
    name = model if isinstance(model, str) else model.__name__
    return {"application/json": {"schema": _ref(name)}}


def models() -> list[type[BaseModel]]:
    """Every model the document names: the job specs and the error first, then the rest."""
    found: list[type[BaseModel]] = [*_JOB_SPECS, v.Error]
    for op in _OPERATIONS:
        for model in (op.body, *op.answers.values()):
            if isinstance(model, type) and model not in found:
                found.append(model)
    return found


def _closed_patterns(node: Any) -> None:
    """A map whose keys must match a pattern (a quota table's names) refuses other keys, as the
    model does: JSON Schema lets them through unless it says so."""
    if isinstance(node, dict):
        if "patternProperties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _closed_patterns(value)
    elif isinstance(node, list):
        for value in node:
            _closed_patterns(value)


def _components(node: Any) -> None:
    """A field read as a plain map but checked as a component (a sweep's job: a JobSpec) is
    documented as that component."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, dict) and "x-component" in value:
                node[key] = {
                    **_ref(value["x-component"]),
                    **({"description": value["description"]} if "description" in value else {}),
                }
            else:
                _components(value)
    elif isinstance(node, list):
        for value in node:
            _components(value)


def document(prefix: str) -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(model, "serialization") for model in models()], ref_template="#/components/schemas/{model}"
    )
    defs = schemas.get("$defs", {})
    _closed_patterns(defs)
    _components(defs)
    # The job specs first: the dashboard's form takes the first schema whose task_type names a type.
    components = {model.__name__: defs[model.__name__] for model in _JOB_SPECS}
    components["JobSpec"] = {
        "oneOf": [_ref(model.__name__) for model in _JOB_SPECS],
        "discriminator": {"propertyName": "task_type"},
    }
    components |= {name: schema for name, schema in defs.items() if name not in components}
    paths: dict[str, dict[str, Any]] = {}
    for op in _OPERATIONS:
        responses: dict[str, Any] = {
            str(status): {
                "description": _ACCEPTED.get(op.path, _OK[status]) if status == 202 else _OK[status],
                "content": _content(model),
            }
            for status, model in op.answers.items()
        }
        for status in sorted({*op.errors, *(() if op.open else (401,)), *_edge_errors(op)}):
            responses[str(status)] = {"description": _ERRORS[status], "content": _content(v.Error)}
        operation: dict[str, Any] = {"tags": [op.tag], "summary": op.summary, "responses": responses}
        parameters = list(op.parameters)
        for name in ("job_id", "sweep_id"):
            if f"{{{name}}}" in op.path:
                parameters.insert(0, {"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
        if parameters:
            operation["parameters"] = parameters
        if op.body:
            operation["requestBody"] = {"required": True, "content": _content(op.body)}
        if op.open:
            operation["security"] = []
        paths.setdefault(f"{prefix}{op.path}", {})[op.method] = operation
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
