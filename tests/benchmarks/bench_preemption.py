"""Preemption benchmark: prints numbers, asserts nothing.

    python -m tests.benchmarks.bench_preemption [--runs 3] [--gpus 1] [--stop-at 20]

Runs a throwaway redis-server and the whole system (real processes, the real `swift` CLI on the
tiny model built offline, ``--gpus`` simulated GPUs) with PREEMPTION=priority. Each run measures,
from the times of the log's entries:

- a preemption: a job of priority 1 on every GPU has trained ``--stop-at`` steps when a job of
  priority 9 needing those GPUs is submitted; from the decision (job.preempted) to the victim's
  processes gone (its job.stopped, with the checkpoint it saved on SIGTERM) to the urgent job's
  job.started;
- a plain cancel, beside it: a job on every GPU with another queued behind it is cancelled; from
  job.cancel_requested to job.cancelled to the next job's job.started on those GPUs.

Both stops go through the same SIGTERM and checkpoint (ms-swift's JIT checkpoint waits ~3 s
before it saves), so the two columns differ by what the decision adds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from services.demo.tinymodel import DemoAssets, build_demo_assets
from tests.conftest import RedisServer, wait_for
from tests.system import System

TIMEOUT_S = 300
ENDED = ("completed", "failed", "cancelled")


def submit(system: System, body: dict[str, Any]) -> str:
    response = httpx.post(f"{system.base}/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def body(assets: DemoAssets, *, priority: int, gpus: int, max_steps: int) -> dict[str, Any]:
    job = assets.job_request(max_steps=max_steps, save_steps=20, logging_steps=5)
    return {**job, "priority": priority, "gpu_count": gpus, "auto_export": False}


def history(system: System, job_id: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{system.base}/jobs/{job_id}/events").json()["events"])


def entry(system: System, job_id: str, event_type: str) -> dict[str, Any]:
    """The job's first entry of that type, once it is in the log."""

    def found() -> dict[str, Any] | None:
        return next((e for e in history(system, job_id) if e["type"] == event_type), None)

    return wait_for(found, TIMEOUT_S, f"{event_type} of {job_id}", interval_s=0.2)


def trained(system: System, job_id: str, step: int) -> None:
    def reached() -> bool:
        progress = httpx.get(f"{system.base}/jobs/{job_id}").json()["progress"]
        return progress is not None and progress["step"] >= step

    wait_for(reached, TIMEOUT_S, f"step {step} of {job_id}", interval_s=0.2)


def status(system: System, job_id: str) -> str:
    return str(httpx.get(f"{system.base}/jobs/{job_id}").json()["status"])


def cancel(system: System, *job_ids: str) -> None:
    """Cancel jobs and wait until each has ended: the next measure starts on an idle pool."""
    for job_id in job_ids:
        httpx.post(f"{system.base}/jobs/{job_id}/cancel")
    for job_id in job_ids:
        wait_for(lambda job_id=job_id: status(system, job_id) in ENDED, TIMEOUT_S, f"{job_id} to end", interval_s=0.2)


def seconds(later: dict[str, Any], earlier: dict[str, Any]) -> float:
    return (datetime.fromisoformat(later["at"]) - datetime.fromisoformat(earlier["at"])).total_seconds()


def preemption(system: System, assets: DemoAssets, gpus: int, stop_at: int) -> tuple[float, float, float, int]:
    victim = submit(system, body(assets, priority=1, gpus=gpus, max_steps=100_000))
    trained(system, victim, stop_at)
    urgent = submit(system, body(assets, priority=9, gpus=gpus, max_steps=4))
    started = entry(system, urgent, "job.started")
    preempted = entry(system, victim, "job.preempted")
    stopped = entry(system, victim, "job.stopped")
    assert preempted["payload"]["by_job_id"] == urgent
    cancel(system, victim, urgent)
    step = stopped["payload"]["step"] or 0
    return seconds(stopped, preempted), seconds(started, stopped), seconds(started, preempted), step


def plain_cancel(system: System, assets: DemoAssets, gpus: int, stop_at: int) -> tuple[float, float, float]:
    running = submit(system, body(assets, priority=5, gpus=gpus, max_steps=100_000))
    trained(system, running, stop_at)
    following = submit(system, body(assets, priority=5, gpus=gpus, max_steps=4))
    wait_for(lambda: status(system, following) == "queued", TIMEOUT_S, "the next job to be queued", interval_s=0.2)
    httpx.post(f"{system.base}/jobs/{running}/cancel")
    started = entry(system, following, "job.started")
    requested = entry(system, running, "job.cancel_requested")
    cancelled = entry(system, running, "job.cancelled")
    cancel(system, following)
    return seconds(cancelled, requested), seconds(started, cancelled), seconds(started, requested)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gpus", type=int, default=1, help="simulated GPUs, all used by the stopped job")
    parser.add_argument("--stop-at", type=int, default=20, help="the step the stopped job has reached")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = build_demo_assets(root / "demo")
        server = RedisServer(root / "redis")
        server.start()
        settings = {
            "PREEMPTION": "priority",
            "PREEMPT_MIN_RUNTIME_S": "0",
            "SIMULATED_GPUS": str(args.gpus),
            "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        }
        system = System(server.url, root / "system", **settings)
        system.start()
        rows = []
        try:
            system.wait_healthy()
            print(f"machine: {os.cpu_count()} CPUs; {args.gpus} simulated GPU(s); stop at step {args.stop_at}")
            print(
                f"{'run':>3}  {'preempted->stopped':>18}  {'stopped->started':>16}  {'preempted->started':>18}  "
                f"{'ckpt step':>9}  {'cancel->cancelled':>17}  {'cancelled->started':>18}  {'cancel->started':>15}"
            )
            for run in range(1, args.runs + 1):
                p_stop, p_start, p_total, step = preemption(system, assets, args.gpus, args.stop_at)
                c_stop, c_start, c_total = plain_cancel(system, assets, args.gpus, args.stop_at)
                rows.append((p_total, c_total))
                print(
                    f"{run:>3}  {p_stop:>17.2f}s  {p_start:>15.2f}s  {p_total:>17.2f}s  {step:>9}  "
                    f"{c_stop:>16.2f}s  {c_start:>17.2f}s  {c_total:>14.2f}s"
                )
        finally:
            system.stop()
            system.kill_jobs()
            server.stop()
    if rows:
        preempts, cancels = [r[0] for r in rows], [r[1] for r in rows]
        print(
            f"preemption decision -> urgent job started: {min(preempts):.2f}-{max(preempts):.2f} s; "
            f"cancel requested -> next job started: {min(cancels):.2f}-{max(cancels):.2f} s ({len(rows)} runs)"
        )


if __name__ == "__main__":
    main()
