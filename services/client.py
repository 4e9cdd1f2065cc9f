"""The `swift-trainer` commands that talk to a running system over its REST API: submit, jobs,
show, logs, watch, cancel, queue, gpus, export, deploy, sweep.

The server and key come from ``--url`` / ``--api-key`` or ``SWIFT_TRAINER_URL`` /
``SWIFT_TRAINER_API_KEY``. ``--json`` prints the API's JSON for scripts. Exit codes: 0 done, 1 the
job failed or was cancelled (``watch``) or the server refused the request, 2 a usage error, 3 no
server answered.

(A little over 400 lines: the parser and the eleven commands it dispatches to read best side by
side, each command a short function.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from services.errors import ServiceError

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
TERMINAL = {"completed", "failed", "cancelled"}
COMMANDS = ("submit", "jobs", "show", "logs", "watch", "cancel", "queue", "gpus", "export", "deploy", "sweep")


class Failed(ServiceError):
    """The request was refused, or what was asked for ended badly: exit 1 with this message."""


class Unreachable(ServiceError):
    """No server answered: exit 3."""


class Client:
    def __init__(self, url: str, api_key: str | None, timeout_s: float = 30) -> None:
        root = url.rstrip("/")
        self.api = root if root.endswith("/api/v1") else f"{root}{os.environ.get('API_PREFIX', '/api/v1')}"
        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=f"{self.api}/training", headers=headers, timeout=timeout_s)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"no server answers at {self.url} ({type(exc).__name__}: {exc})") from None
        if response.status_code >= 400:
            raise Failed(_error_text(response))
        return response.json()

    def stream(self, path: str, params: dict[str, Any] | None = None) -> Iterator[tuple[str, Any]]:
        """Server-sent events of a stream: (event, data as JSON), until the server closes it."""
        try:
            with (
                httpx.Client(headers=self.http.headers, timeout=httpx.Timeout(10, read=None)) as client,
                connect_sse(client, "GET", f"{self.http.base_url}{path.lstrip('/')}", params=params) as source,
            ):
                if source.response.status_code >= 400:
                    source.response.read()
                    raise Failed(_error_text(source.response))
                for sse in source.iter_sse():
                    if sse.event and sse.data:
                        yield sse.event, json.loads(sse.data)
        except httpx.TransportError as exc:
            raise Unreachable(f"no server answers at {self.url} ({type(exc).__name__}: {exc})") from None


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"
    details = "; ".join(f"{d.get('field')}: {d.get('message')}" for d in error.get("details", []) if d.get("field"))
    return f"{error.get('message')}" + (f" ({details})" if details and details not in error.get("message", "") else "")


# ---------------------------------------------------------------------------------------------
# Arguments


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("SWIFT_TRAINER_URL", DEFAULT_URL),
        help="the gateway (default: $SWIFT_TRAINER_URL or %(default)s)",
    )
    common.add_argument(
        "--api-key",
        default=os.environ.get("SWIFT_TRAINER_API_KEY"),
        help="an API key (default: $SWIFT_TRAINER_API_KEY)",
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON, for scripts")

    submit = sub.add_parser("submit", parents=[common], help="submit a job from flags or a YAML/JSON job file")
    submit.add_argument("file", nargs="?", type=Path, help="a job body as YAML or JSON (flags override it)")
    submit.add_argument("--task-type", choices=("language_model", "multimodal", "deploy"))
    submit.add_argument("--model", dest="model_path", help="model_path: a local path or a hub id")
    submit.add_argument("--data", dest="data_path", help="data_path: a local path or a hub id")
    submit.add_argument("--name")
    submit.add_argument("--priority", type=int)
    submit.add_argument("--gpus", dest="gpu_count", type=int, help="gpu_count")
    submit.add_argument("--hub", choices=("modelscope", "huggingface"))
    submit.add_argument("--depends-on", action="append", default=[], help="a job id it waits for (repeatable)")
    submit.add_argument(
        "--param",
        "-p",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a train_params value (repeatable; the value as JSON, else text)",
    )
    submit.add_argument("--watch", action="store_true", help="then watch it to its end (exit 1 if it fails)")

    jobs = sub.add_parser("jobs", parents=[common], help="list jobs, newest first")
    jobs.add_argument("--status")
    jobs.add_argument("--task-type")
    jobs.add_argument("--sweep", dest="sweep_id")
    jobs.add_argument("--limit", type=int, default=20)

    for name, text in (("show", "a job's record"), ("cancel", "cancel a job"), ("export", "export (merge) a LoRA job")):
        one = sub.add_parser(name, parents=[common], help=text)
        one.add_argument("job_id")

    logs = sub.add_parser("logs", parents=[common], help="a job's output lines")
    logs.add_argument("job_id")
    logs.add_argument("--tail", type=int, default=200)
    logs.add_argument("--follow", "-f", action="store_true", help="then print new lines as they come")
    logs.add_argument("--rank", type=int, default=0, help="a gang job's rank")

    watch = sub.add_parser(
        "watch", parents=[common], help="a live progress bar with loss, lr and ETA until the job ends"
    )
    watch.add_argument("job_id")

    sub.add_parser("queue", parents=[common], help="queued jobs in start order, with estimated starts")
    gpus = sub.add_parser("gpus", parents=[common], help="the cluster's GPUs by node (--local: read NVML here)")
    gpus.add_argument(
        "--local", action="store_true", help="read this machine's GPUs through NVML instead, as the gpu-monitor would"
    )

    deploy = sub.add_parser("deploy", parents=[common], help="serve a job's merged model (waits for its export)")
    deploy.add_argument("job_id", help="the training job whose exported model to serve")
    deploy.add_argument("--served-name", help="the model name clients ask for")
    deploy.add_argument("--watch", action="store_true", help="then wait until it serves and print its endpoint")

    sweep = sub.add_parser("sweep", parents=[common], help="a sweep's points and results")
    sweep.add_argument("sweep_id")


# ---------------------------------------------------------------------------------------------
# Commands


def run(args: argparse.Namespace) -> int:
    client = Client(args.url, args.api_key)
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return _COMMANDS[args.command](client, args, out)
    except Unreachable as exc:
        err.print(f"swift-trainer {args.command}: {exc}")
        return EXIT_UNREACHABLE
    except Failed as exc:
        err.print(f"swift-trainer {args.command}: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _print(out: Console, data: Any) -> None:
    out.print_json(json.dumps(data)) if out.is_terminal else print(json.dumps(data, indent=2))


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def job_body(args: argparse.Namespace) -> dict[str, Any]:
    """The body of a submit: the file's, then the flags over it."""
    body: dict[str, Any] = {}
    if args.file is not None:
        import yaml

        try:
            loaded = yaml.safe_load(args.file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise Failed(f"cannot read {args.file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise Failed(f"{args.file} holds no job (a mapping of its fields)")
        body = loaded
    for field in ("task_type", "model_path", "data_path", "name", "priority", "gpu_count", "hub"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.depends_on:
        body["depends_on"] = [*body.get("depends_on", []), *args.depends_on]
    params = dict(body.get("train_params") or {})
    for item in args.param:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise Failed(f"--param {item!r}: write NAME=VALUE")
        params[name] = _value(text)
    if params:
        body["train_params"] = params
    return body


def submit(client: Client, args: argparse.Namespace, out: Console) -> int:
    return _submitted(client, args, out, job_body(args))


def _submitted(client: Client, args: argparse.Namespace, out: Console, body: dict[str, Any]) -> int:
    """Submit a job, say so, and with ``--watch`` follow it to its end."""
    created = client.request("POST", "/jobs", json=body)
    if args.json and not args.watch:
        _print(out, created)
    elif not args.json:
        out.print(f"{created['job_id']}  {created['status']}: {created['message']}")
    return watch_job(client, created["job_id"], out, quiet=args.json) if args.watch else EXIT_OK


def jobs(client: Client, args: argparse.Namespace, out: Console) -> int:
    params = {"size": args.limit, "status": args.status, "task_type": args.task_type, "sweep_id": args.sweep_id}
    listing = client.request("GET", "/jobs", params={k: v for k, v in params.items() if v is not None})
    if args.json:
        _print(out, listing)
        return EXIT_OK
    table = Table("job", "name", "type", "status", "progress", "loss", "submitted", box=None, pad_edge=False)
    for job in listing["jobs"]:
        progress = job.get("progress") or {}
        step = f"{progress['step']}/{progress['max_steps']}" if progress.get("step") is not None else ""
        loss = f"{progress['loss']:.4g}" if progress.get("loss") is not None else ""
        table.add_row(
            job["job_id"][:12],
            job["spec"].get("name") or "",
            job["task_type"],
            job["status"],
            step,
            loss,
            job["submitted_at"][:19],
        )
    out.print(table)
    out.print(f"{len(listing['jobs'])} of {listing['total']}")
    return EXIT_OK


def show(client: Client, args: argparse.Namespace, out: Console) -> int:
    job = client.request("GET", f"/jobs/{args.job_id}")
    if args.json:
        _print(out, job)
        return EXIT_OK
    progress = job.get("progress") or {}
    rows = [
        ("job", job["job_id"]),
        ("name", job["spec"].get("name") or ""),
        ("type", job["task_type"]),
        ("status", job["status"] + (f" ({job['reason']}: {job['message']})" if job.get("reason") else "")),
        ("priority", str(job["priority"])),
        ("node / GPUs", f"{job.get('node') or '—'} {job.get('gpu_ids') or ''}"),
        (
            "progress",
            f"step {progress['step']}/{progress['max_steps']}, loss {progress.get('loss')}" if progress else "—",
        ),
        ("last checkpoint", job.get("last_checkpoint") or "—"),
        ("export", f"{job['export']['status']} {job['export'].get('path') or ''}"),
        ("endpoint", job.get("endpoint") or "—"),
        ("waiting on", ", ".join(job.get("waiting_on") or []) or "—"),
    ]
    table = Table(show_header=False, box=None, pad_edge=False)
    for name, value in rows:
        table.add_row(f"[bold]{name}[/bold]", value)
    out.print(table)
    return EXIT_OK


def logs(client: Client, args: argparse.Namespace, out: Console) -> int:
    if not args.follow:
        answer = client.request("GET", f"/jobs/{args.job_id}/logs", params={"tail": args.tail, "rank": args.rank})
        if args.json:
            _print(out, answer)
        else:
            for line in answer["lines"]:
                print(line["line"])
        return EXIT_OK
    for event, data in client.stream(f"/jobs/{args.job_id}/logs/stream", params={"tail": args.tail, "rank": args.rank}):
        if event == "log":
            print(json.dumps(data) if args.json else data["line"], flush=True)
    return EXIT_OK


def watch(client: Client, args: argparse.Namespace, out: Console) -> int:
    return watch_job(client, args.job_id, out, quiet=args.json)


def watch_job(client: Client, job_id: str, out: Console, *, quiet: bool = False) -> int:
    """Follow a job's events to its end: a progress bar with the step, loss, learning rate and the
    time left. 0 when it completed (or serves), 1 when it failed or was cancelled."""
    job = client.request("GET", f"/jobs/{job_id}")
    label = job["spec"].get("name") or job_id[:12]
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[step]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    status = job["status"]
    with Progress(*columns, console=out, transient=False, disable=quiet) as bar:
        task = bar.add_task(label, total=None, step="step —", loss="—", lr="—", status=status)
        if status not in TERMINAL and status != "serving":
            for event, data in client.stream(f"/jobs/{job_id}/stream"):
                payload = data.get("payload") or {}
                if event == "job.progress":
                    fields: dict[str, Any] = {
                        "status": "running",
                        "step": f"step {payload['step']}/{payload['max_steps']}",
                    }
                    if payload.get("loss") is not None:
                        fields["loss"] = f"{payload['loss']:.4g}"
                    if payload.get("learning_rate") is not None:
                        fields["lr"] = f"{payload['learning_rate']:.3g}"
                    bar.update(task, completed=payload["step"], total=payload["max_steps"], **fields)
                elif event in ("job.succeeded", "job.failed", "job.cancelled", "job.rejected", "job.serving"):
                    break
                else:
                    bar.update(task, status=event.removeprefix("job."))
        job = client.request("GET", f"/jobs/{job_id}")
        bar.update(task, status=job["status"])
    if quiet:
        _print(out, job)
    if job["status"] == "serving":
        out.print(f"{job_id} serves at {job['endpoint']}") if not quiet else None
        return EXIT_OK
    if job["status"] == "completed":
        if not quiet:
            out.print(f"{job_id} completed; last checkpoint {job.get('last_checkpoint')}")
        return EXIT_OK
    if not quiet:
        reason = f" ({job.get('reason')}): {job.get('message')}" if job.get("reason") else ""
        out.print(f"{job_id} {job['status']}{reason}")
    return EXIT_FAILED


def _command(path: str, what: str) -> Any:
    def run_one(client: Client, args: argparse.Namespace, out: Console) -> int:
        answer = client.request("POST", path.format(job_id=args.job_id))
        _print(out, answer) if args.json else out.print(f"{args.job_id}: {answer.get('message', what)}")
        return EXIT_OK

    return run_one


def queue(client: Client, args: argparse.Namespace, out: Console) -> int:
    answer = client.request("GET", "/queue")
    if args.json:
        _print(out, answer)
        return EXIT_OK
    table = Table("#", "job", "name", "priority", "GPUs", "estimated start", box=None, pad_edge=False)
    for entry in answer["queue"]:
        table.add_row(
            str(entry["position"]),
            entry["job_id"][:12],
            entry.get("name") or "",
            str(entry["priority"]),
            str(entry.get("gpu_count", "")),
            entry.get("estimated_start_at") or "unknown",
        )
    out.print(table if answer["queue"] else "the queue is empty")
    return EXIT_OK


def gpus(client: Client, args: argparse.Namespace, out: Console) -> int:
    answer = client.request("GET", "/gpus")
    if args.json:
        _print(out, answer)
        return EXIT_OK
    table = Table("node", "GPU", "name", "memory", "util", "status", "job", box=None, pad_edge=False)
    for node in answer["nodes"]:
        for gpu in node["gpus"]:
            used = gpu.get("memory_used_mb")
            memory = f"{used}/{gpu['memory_total_mb']} MB" if used is not None else f"{gpu['memory_total_mb']} MB"
            util = f"{gpu['utilization_pct']}%" if gpu.get("utilization_pct") is not None else ""
            table.add_row(
                node["node"],
                str(gpu["index"]),
                gpu["name"],
                memory,
                util,
                gpu["status"],
                (gpu.get("held_by") or "")[:12],
            )
    out.print(table)
    summary = answer["summary"]
    out.print(f"{summary['gpus']} GPUs on {summary['nodes']} nodes: {summary['free']} free, {summary['busy']} busy")
    return EXIT_OK


def deploy(client: Client, args: argparse.Namespace, out: Console) -> int:
    body: dict[str, Any] = {"task_type": "deploy", "source_job_id": args.job_id}
    if args.served_name:
        body["deploy_params"] = {"served_model_name": args.served_name}
    return _submitted(client, args, out, body)


def sweep(client: Client, args: argparse.Namespace, out: Console) -> int:
    answer = client.request("GET", f"/sweeps/{args.sweep_id}")
    if args.json:
        _print(out, answer)
        return EXIT_OK
    fields = list(answer["grid"])
    table = Table("job", *fields, "status", "step", "train loss", "eval loss", box=None, pad_edge=False)
    for point in answer["points"]:
        step = f"{point['step']}/{point['max_steps']}" if point.get("step") is not None else ""
        losses = [f"{point[k]:.4g}" if point.get(k) is not None else "" for k in ("train_loss", "eval_loss")]
        table.add_row(point["job_id"][:12], *(str(point["point"][f]) for f in fields), point["status"], step, *losses)
    out.print(table)
    if answer.get("best"):
        best = answer["best"]
        out.print(f"best: {best['job_id'][:12]} {best['point']} ({best['metric']} {best['value']:.4g})")
    return EXIT_OK


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace, Console], int]] = {
    "submit": submit,
    "jobs": jobs,
    "show": show,
    "logs": logs,
    "watch": watch,
    "cancel": _command("/jobs/{job_id}/cancel", "cancel requested"),
    "export": _command("/jobs/{job_id}/export", "export requested"),
    "queue": queue,
    "gpus": gpus,
    "deploy": deploy,
    "sweep": sweep,
}


if __name__ == "__main__":  # (python -m services.client is swift-trainer without the service commands)
    parser = argparse.ArgumentParser(prog="swift-trainer")
    add_commands(parser.add_subparsers(dest="command", required=True))
    sys.exit(run(parser.parse_args()))
