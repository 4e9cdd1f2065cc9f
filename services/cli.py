"""`swift-trainer`: run one process of the system, the embedded Redis, the demo, or a replay; or,
as a client of a running system, submit, list, watch and steer its jobs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog

from events.audit import Query
from events.times import parse_time
from services import client, embedded_redis, host_secrets
from services.config import ConfigError, Settings, effective, load_settings
from services.runtime import ServiceMain, configure_logging, serve


def _service(name: str) -> ServiceMain:
    # Imported on demand: each process loads only its own dependencies.
    if name == "gateway":
        from services.gateway.service import main
    elif name == "scheduler":
        from services.scheduler.service import main
    elif name == "gpu-monitor":
        from services.gpu_monitor.service import main
    elif name == "runner":
        from services.runner.service import main
    elif name == "exporter":
        from services.exporter.service import main
    elif name == "notifier":
        from services.notifier.service import main
    else:
        raise ValueError(name)
    return main


SERVICES = ("gateway", "scheduler", "gpu-monitor", "runner", "exporter", "notifier")


# uvloop where it is installed: the same asyncio, with a faster loop
EVENT_LOOP = {"use_uvloop": True} if importlib.util.find_spec("uvloop") else {}


def run_service(settings: Settings, name: str) -> None:
    configure_logging(settings, name)
    anyio.run(serve, settings, name, _service(name), backend_options=EVENT_LOOP)


def run_redis(settings: Settings) -> None:
    """Become the embedded Redis (exec, so signals reach it), or wait when Redis is external."""
    configure_logging(settings, "redis")
    log = structlog.get_logger()
    if not settings.embedded:
        log.info("an external Redis is configured; nothing to run", url=settings.redis_url_for_logs)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        return
    # The password every process of this DATA_DIR reads from the same file (or REDIS_PASSWORD)
    auth_config = embedded_redis.write_auth_config(
        host_secrets.secrets_dir(settings.data_dir) / "redis.conf", settings.embedded_redis_password
    )
    argv = embedded_redis.server_argv(
        settings.data_dir / "redis", settings.embedded_redis_port, auth_config=auth_config
    )
    log.info("starting embedded redis", argv=shlex.join(argv))
    os.execv(argv[0], argv)


def check_gpus() -> int:
    """Read the GPUs once through NVML and print what the gpu-monitor would report."""
    import pynvml

    from services.nvml import NvmlSource

    try:
        source = NvmlSource()
    except pynvml.NVMLError as exc:
        print(f"NVML is not available here ({exc}): the gpu-monitor would report a simulated inventory")
        return 1
    try:
        reading = source.sample()
    finally:
        source.close()
    print(json.dumps({"degraded": reading.degraded, "gpus": [g.model_dump() for g in reading.gpus]}, indent=2))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    print(f"{len(reading.gpus)} GPU(s) through NVML; CUDA_VISIBLE_DEVICES={visible!r}")
    return 0 if reading.gpus and not reading.degraded else 1


def run_demo(settings: Settings, root: Path) -> None:
    from services.demo.tinymodel import build_demo_assets
    from services.demo.tinyvl import build_vision_assets

    root = root.resolve()
    text, vision = build_demo_assets(root), build_vision_assets(root / "vision")
    url = f"http://{settings.app_host}:{settings.app_port}{settings.api_prefix}/training/jobs"
    print(f"Tiny language model:        {text.model_dir}\n  its dataset:              {text.dataset_path}")
    print(f"Tiny vision-language model: {vision.model_dir}\n  its dataset (with images): {vision.dataset_path}\n")
    print("Submit a LoRA fine-tuning job on the language model:\n")
    print(f"curl -s -X POST {url} -H 'Content-Type: application/json' -d '{json.dumps(text.job_request())}'\n")
    print("Or a multimodal one, on coloured squares (vision tower and aligner trained at their own rates):\n")
    print(f"curl -s -X POST {url} -H 'Content-Type: application/json' -d '{json.dumps(vision.job_request())}'\n")
    print(f"Then watch it live:  curl -N {url}/<job_id>/stream")


def print_config(settings: Settings, *, as_json: bool) -> None:
    rows = effective(settings)
    if as_json:
        print(json.dumps({name: {"value": value, "source": source} for name, value, source in rows}, indent=2))
        return
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        print(f"{name:<{width}}  {value}  ({source})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swift-trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} process")
    sub.add_parser("redis", help="run the embedded Redis (when no REDIS_URL/REDIS_HOST is set)")
    demo = sub.add_parser(
        "demo",
        help="build a tiny language and a tiny vision-language model with datasets offline; print how to train them",
    )
    demo.add_argument("--dir", type=Path, default=Path("demo"))
    client.add_commands(sub)
    config = sub.add_parser("config", help="print the settings a process started here reads (secrets hidden)")
    config.add_argument("--json", action="store_true", help="one JSON object: name -> value and source")
    rep = sub.add_parser("replay", help="print the history (archives and the live log) in order, or its fold")
    rep.add_argument("--job", help="only this job's entries (or, with --state, only its record)")
    rep.add_argument("--type", action="append", default=[], help="only this type (repeatable; 'job.*' for a prefix)")
    rep.add_argument("--since", help="appended at or after: ISO 8601 time, or a duration back (15m, 6h, 7d)")
    rep.add_argument("--until", help="appended at or before: ISO 8601 time, or a duration back")
    rep.add_argument("--after-id", default="0-0", help="entries after this entry id")
    rep.add_argument("--until-id", default="+", help="entries up to and including this entry id")
    rep.add_argument("--format", choices=("json", "table"), default="json", help="JSON lines, or a table to read")
    rep.add_argument("--follow", "-f", action="store_true", help="then keep printing new entries as they land")
    rep.add_argument("--state", action="store_true", help="print the state the fold rebuilds instead")
    rep.add_argument(
        "--commands",
        action="store_true",
        help="the commands stream instead of the log: every request as it was made, with who asked, "
        "also those that changed nothing",
    )
    aud = sub.add_parser("audit", help="check the log's hash chain, rebuild the state, or archive old entries")
    aud_sub = aud.add_subparsers(dest="audit_command", required=True)
    aud_sub.add_parser("verify", help="walk the archives and the log; report the first break of the chain")
    rebuild = aud_sub.add_parser("rebuild", help="fold the history and compare it with the running services")
    rebuild.add_argument("--gateway", help="the gateway's state URL (default: from APP_HOST, APP_PORT, API_PREFIX)")
    rebuild.add_argument(
        "--api-key",
        default=os.environ.get("SWIFT_TRAINER_API_KEY"),
        help="an admin's API key for the gateway (default: $SWIFT_TRAINER_API_KEY)",
    )
    aud_sub.add_parser("archive", help="apply the retention policy now: archive, then trim")
    inv = aud_sub.add_parser(
        "check",
        help="check the log's invariants (one state per job, no GPU held twice, no submission lost, …) "
        "and that the services' states equal its fold; exit 1 at the first violation",
    )
    inv.add_argument("--gateway", help="the gateway's state URL (default: from APP_HOST, APP_PORT, API_PREFIX)")
    inv.add_argument(
        "--api-key",
        default=os.environ.get("SWIFT_TRAINER_API_KEY"),
        help="an admin's API key for the gateway (default: $SWIFT_TRAINER_API_KEY)",
    )
    inv.add_argument(
        "--require-gateway",
        action="store_true",
        help="fail (exit 2) when no gateway answers, instead of checking without it",
    )
    args = parser.parse_args(argv)
    if args.command == "gpus" and args.local:
        return check_gpus()
    if args.command in client.COMMANDS:
        return client.run(args)

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"swift-trainer: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print_config(settings, as_json=args.json)
        return 0
    try:
        settings.configured_quotas  # noqa: B018 (read for its check: a bad QUOTAS table stops every process)
    except ConfigError as exc:
        print(f"swift-trainer: {exc}", file=sys.stderr)
        return 2
    if args.command == "gateway":
        from services.gateway.auth import check_startup

        try:
            check_startup(settings)
        except ConfigError as exc:
            print(f"swift-trainer gateway: {exc}", file=sys.stderr)
            return 2
    if args.command in ("replay", "audit"):
        configure_logging(settings, args.command)
        try:
            return anyio.run(_history_command, settings, args)
        except ValueError as exc:
            print(f"swift-trainer: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # the reader (head, less) went away
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    commands: dict[str, Callable[[], object]] = {
        "redis": lambda: run_redis(settings),
        "demo": lambda: run_demo(settings, args.dir),
    }
    command = commands.get(args.command) or (lambda: run_service(settings, args.command))
    try:
        command()
    except KeyboardInterrupt:
        return 130
    return 0


async def _history_command(settings: Settings, args: argparse.Namespace) -> int:
    from services import audit as commands

    if args.command == "audit":
        if args.audit_command == "verify":
            return await commands.verify(settings)
        if args.audit_command == "rebuild":
            return await commands.rebuild(settings, args.gateway, args.api_key)
        if args.audit_command == "check":
            return await commands.check(
                settings, args.gateway, args.api_key, gateway_required=args.require_gateway or bool(args.gateway)
            )
        return await commands.archive(settings)
    times: dict[str, int | None] = {}
    for option, text in (("--since", args.since), ("--until", args.until)):
        try:
            times[option] = parse_time(text) if text else None
        except ValueError as exc:  # main() prints it on one line
            raise ValueError(f"{option}: {exc}") from None
    q = Query(
        job_id=args.job,
        types=tuple(args.type),
        since_ms=times["--since"],
        until_ms=times["--until"],
        after=args.after_id,
        until=args.until_id,
    )
    await commands.replay(settings, q, args.format, args.follow, args.state, args.commands)
    return 0


if __name__ == "__main__":
    sys.exit(main())
