"""Runner overhead benchmark: prints numbers, asserts nothing.

    python -m tests.benchmarks.bench_runner [--runs 5] [--steps 30]

The same LoRA run of the tiny demo model, started by hand as a bare `swift sft` (the argument list
and environment the system itself would use, from a dry run) and through the system (submit over
REST, until its `job.succeeded` is in the log), interleaved run by run (each first every other run). Prints, per run and as
ranges: the wall time of each (the bare run from spawn to exit; the system's from the submit's
answer to the succeeded entry), the overhead of the system in per cent, and the runner's own CPU
seconds and resident memory while it supervises the run (sampled every 50 ms; idle: before any job).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from services.demo.tinymodel import build_demo_assets
from tests.conftest import RedisServer
from tests.system import System, job_body

TIMEOUT_S = 300


def bare_run(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=TIMEOUT_S
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"bare swift sft exited {done.returncode}")
    return elapsed


def system_run(system: System, body: dict[str, object]) -> tuple[float, str]:
    """Seconds from the submit to the job's job.succeeded entry (the time Redis gave it)."""
    submitted = time.time()
    answer = httpx.post(f"{system.base}/jobs", json=body, timeout=30)
    answer.raise_for_status()
    job_id = answer.json()["job_id"]
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        job = httpx.get(f"{system.base}/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("completed", "failed", "cancelled"):
            if job["status"] != "completed":
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('message')}")
            events = httpx.get(f"{system.base}/jobs/{job_id}/events", timeout=30).json()["events"]
            ended = next(e for e in events if e["type"] == "job.succeeded")
            return int(ended["entry_id"].split("-")[0]) / 1000 - submitted, job_id
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id} did not end within {TIMEOUT_S} s")


class Sampler:
    """The runner's resident memory, sampled until stopped: its peak."""

    def __init__(self, process: psutil.Process) -> None:
        self.process, self.peak, self.stopped = process, 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stopped.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


def span(values: list[float], unit: str, digits: int = 2) -> str:
    return (
        f"{min(values):.{digits}f}-{max(values):.{digits}f}{unit} (median {statistics.median(values):.{digits}f}{unit})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = build_demo_assets(root / "demo")
        server = RedisServer(root / "redis")
        server.start()
        system = System(server.url, root / "system", SIMULATED_GPUS="1", LOG_LEVEL="WARNING")
        system.start()
        try:
            system.wait_healthy()
            runner = psutil.Process(system.processes["runner"].pid)
            time.sleep(2)  # settled: imports done, first heartbeats out
            idle_rss = runner.memory_info().rss
            body = {**job_body(assets, max_steps=args.steps, save_steps=args.steps), "auto_export": False}
            dry = httpx.post(f"{system.base}/jobs", json={**body, "dry_run": True}, timeout=60).json()
            env = {**system.env, **dry["env"]}
            bare_dir = root / "bare"
            argv = list(dry["argv"])
            argv[argv.index("--output_dir") + 1] = str(bare_dir)
            argv[0] = str(Path(sys.executable).with_name("swift"))
            bare_dir.mkdir()
            print(
                f"machine: {os.cpu_count()} CPUs; tiny model, LoRA, {args.steps} steps, OMP_NUM_THREADS="
                f"{env.get('OMP_NUM_THREADS')}; runner idle RSS {idle_rss / 2**20:.1f} MB"
            )
            print(
                f"{'run':>3}  {'bare':>7}  {'system':>7}  {'overhead':>8}  {'runner CPU':>10}  {'runner peak RSS':>15}"
            )
            bare_times, system_times, overheads, cpus, peaks = [], [], [], [], []
            for run in range(1, args.runs + 1):
                # Alternately first: neither gets the warmer start every time
                if run % 2:
                    bare = bare_run(argv, env, bare_dir)
                before = runner.cpu_times()
                with Sampler(runner) as sampler:
                    through, _ = system_run(system, body)
                after = runner.cpu_times()
                if not run % 2:
                    bare = bare_run(argv, env, bare_dir)
                cpu = (after.user + after.system) - (before.user + before.system)
                overhead = 100 * (through - bare) / bare
                bare_times.append(bare)
                system_times.append(through)
                overheads.append(overhead)
                cpus.append(cpu)
                peaks.append(sampler.peak / 2**20)
                print(
                    f"{run:>3}  {bare:>6.2f}s  {through:>6.2f}s  {overhead:>7.1f}%  {cpu:>9.2f}s  "
                    f"{sampler.peak / 2**20:>12.1f} MB"
                )
        finally:
            system.stop()
            system.kill_jobs()
            server.stop()
    print(f"bare swift sft:        {span(bare_times, ' s')}")
    print(f"through the system:    {span(system_times, ' s')}")
    print(f"overhead:              {span(overheads, ' %', 1)}  (target <= 5 %)")
    print(f"runner CPU per run:    {span(cpus, ' s')}")
    above = [peak - idle_rss / 2**20 for peak in peaks]
    print(f"runner RSS above idle: {span(above, ' MB', 1)}  (target <= 50 MB; idle {idle_rss / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
