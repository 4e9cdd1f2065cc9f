"""Supervising one attempt of one job: spawn `swift` in its own session, stream its output and
progress into Redis, stop it on request, and report how it ended.

The process writes to files in the run directory, not to pipes, so it survives a runner restart;
the run record in Redis (pid, process group, run dir) lets a new runner adopt it (see
:mod:`services.runner.record`).

(A little over 400 lines: one attempt's life, from watching it to saying how it ended, is one
object whose parts share its state.)
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog
import watchfiles

from events import messages as m
from events.bus import Append, Bus
from events.codec import progress_id
from services import metrics
from services.processes import process_tree, signal_group, wait_exit, wait_group_exit
from services.runner.progress import (
    JsonlTail,
    LineTail,
    classify_failure,
    final_metrics,
    hub_failure_message,
    progress_fields,
    read_rows,
    tail_lines,
)
from services.runner.record import CHILDREN, RunRecord, fact_id, find_version_dir, recorded_command
from services.swift import failure_message

log = structlog.get_logger("runner")

GpuProbe = Callable[[list[int]], set[int]]  # GPU indices -> pids NVML lists on them
_Lines = tuple[list[str], int]  # a log file's new lines, and the offset after them
_Progress = tuple[list[m.Message], int, list[str], bool]  # see JobRun._progress

GPU_RELEASE_TIMEOUT_S = 30.0
STDERR_TAIL_LINES = 30
CLASSIFY_LINES = 300
GROUP_EXIT_TIMEOUT_S = 15.0  # after the wrapper exits, how long the rest of its group may linger
_NVML_CHECK_S = 0.25  # NVML has no change notification: it is asked again after this long
READY_PROBE_S = 0.5  # how often a starting server's /v1/models is asked whether it is ready
PROGRESS_ROWS_PER_COMMIT = 500  # a long backlog of rows (a runner away for hours) goes in parts


class JobRun:
    """One attempt of one job, from spawn (or adoption) to its final fact.

    Output lines, progress facts and the read offsets are stored in one transaction, so a runner
    that adopts the job after a crash continues exactly where the last one stopped.
    """

    def __init__(
        self,
        bus: Bus,
        record: RunRecord,
        *,
        log_maxlen: int,
        stop_grace_s: float,
        saved: Mapping[str, str] | None = None,
        process: subprocess.Popen[bytes] | None = None,
        gpu_probe: GpuProbe | None = None,
    ) -> None:
        saved = saved or {}
        self.bus = bus
        self.record = record
        # Held, so that only we reap it and its exit code is ours; a job adopted after the
        # service's main started again finds the handle of the process that started it.
        self.process = process or CHILDREN.get(record.pid)
        self.gpu_probe = gpu_probe
        self.pids: set[int] = set()  # every process of the job seen so far
        self.log_maxlen = log_maxlen
        self.stop_grace_s = stop_grace_s
        self.committed = anyio.Event()  # set once job.started is known to be in the log
        self.stop_reason: str | None = None
        self.stop_requested = anyio.Event()
        self.stop_deadline: float | None = None  # (monotonic) the end of a requested stop's grace period
        # One pump at a time (the supervision's, and a deploy's as it starts serving): each reads
        # from the stored offsets, and advances them once what it read is stored.
        self._pumping = anyio.Lock()
        self.stdout = LineTail(Path(record.run_dir) / "stdout.log", int(saved.get("stdout_offset", 0)))
        self.stderr = LineTail(Path(record.run_dir) / "stderr.log", int(saved.get("stderr_offset", 0)))
        self.rows = JsonlTail(Path(saved.get("jsonl_path", "")), int(saved.get("jsonl_offset", 0)))
        self.version_dir: Path | None = Path(saved["jsonl_path"]).parent if saved.get("jsonl_path") else None
        self.checkpoints: list[str] = json.loads(saved.get("checkpoints", "[]"))
        self.last_train: dict[str, Any] | None = None  # the progress fields of the last training row
        self.serving = saved.get("serving") == "1"
        self.ready = self.serving  # the server answered /v1/models
        self.last_request = time.monotonic()  # a deploy's: when it last served (or started serving)
        if saved.get("stop_reason"):  # a stop asked of a runner that died before the job ended
            self.stop_reason = saved["stop_reason"]
            self.stop_deadline = time.monotonic() + stop_grace_s
            self.stop_requested.set()

    def common(self) -> dict[str, Any]:
        return {"job_id": self.record.job_id}

    @property
    def run_key(self) -> str:
        return self.bus.keys.run(self.record.job_id, self.record.attempt, self.record.rank)

    async def request_stop(self, reason: str) -> None:
        """SIGTERM the whole group (a checkpoint is saved), SIGKILL after the grace period."""
        if self.stop_reason is not None:
            return
        # Recorded first: a runner that adopts the job after a crash knows why it ends.
        await self.bus.redis.hset(self.run_key, "stop_reason", reason)
        self.stop_reason = reason
        self.stop_deadline = time.monotonic() + self.stop_grace_s
        self.stop_requested.set()
        log.info("stopping job", job_id=self.record.job_id, reason=reason)
        signal_group(self.record.pgid, signal.SIGTERM)

    async def _await_ready(self, exited: anyio.Event) -> None:
        """A deploy job is serving once its OpenAI-compatible API lists its models."""
        async with httpx.AsyncClient(timeout=2) as client:
            while not exited.is_set():
                try:
                    if (await client.get(f"{self.record.endpoint}/models")).status_code == 200:
                        self.ready = True
                        await self.pump()
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                await anyio.sleep(READY_PROBE_S)

    async def _idle_deploy(self) -> None:
        """Stop a deploy that has served no request for its idle timeout (counted from when it
        started serving, or its last request as its server logged it)."""
        assert self.record.idle_timeout_s is not None
        while True:
            await anyio.sleep(min(5.0, self.record.idle_timeout_s / 4))
            if not self.serving:
                self.last_request = time.monotonic()
            elif time.monotonic() - self.last_request >= self.record.idle_timeout_s:
                await self.request_stop("idle")
                return

    async def _time_limit(self) -> None:
        assert self.record.time_limit_s is not None
        await anyio.sleep(max(0.0, self.record.started_at + self.record.time_limit_s - time.time()))
        await self.request_stop("timeout")

    async def _escalate(self, exited: anyio.Event) -> None:
        await self.stop_requested.wait()
        with anyio.move_on_after(self.stop_grace_s):
            await exited.wait()
        if not exited.is_set():
            log.warning("grace period over; killing", job_id=self.record.job_id)
            signal_group(self.record.pgid, signal.SIGKILL)

    async def supervise(self) -> None:
        await self.committed.wait()
        exited = anyio.Event()
        exit_code: int | None = None

        async def waiter() -> None:
            nonlocal exit_code
            exit_code = await wait_exit(self.record.pid, self.process)
            exited.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(self._escalate, exited)
            if self.record.time_limit_s is not None:
                tg.start_soon(self._time_limit)
            if self.record.deploy and not self.serving:
                tg.start_soon(self._await_ready, exited)
            if self.record.deploy and self.record.idle_timeout_s is not None:
                tg.start_soon(self._idle_deploy)
            await self.pump()
            async for _ in watchfiles.awatch(
                self.record.run_dir,
                self.record.output_dir,
                stop_event=exited,
                debounce=300,
                step=50,
                rust_timeout=1000,
                yield_on_timeout=True,  # also wake now and then, should a change go unnoticed
            ):
                await self.pump()
            tg.cancel_scope.cancel()
        await self.finish(exit_code)

    async def pump(self, *, final: bool = False) -> None:
        """Store new output lines, progress facts and checkpoints, with the new offsets."""
        async with self._pumping:
            with metrics.PUMP_SECONDS.time():
                while await self._pump_once(final=final):
                    pass  # more logged rows than one commit takes

    async def _pump_once(self, *, final: bool) -> bool:
        """One commit of what is new; whether logged rows are left for another."""
        if self.gpu_probe is not None and not final:
            self.pids |= await anyio.to_thread.run_sync(process_tree, self.record.pid)
        # The files are read in a worker thread: a long backlog (a runner back after hours) would
        # hold the event loop while it is read and parsed.
        (out, out_end), (err, err_end), (progress, rows_end, checkpoints, more) = await anyio.to_thread.run_sync(
            self._read, final
        )
        lines = [("stdout", line) for line in out] + [("stderr", line) for line in err]
        if self.record.deploy and any(_SERVED.search(line) for _, line in lines):
            self.last_request = time.monotonic()
        facts: list[m.Message] = []
        serving = self.serving
        if self.record.deploy and not serving and self.ready:
            serving = True
            facts.append(m.JobServing(attempt=self.record.attempt, endpoint=self.record.endpoint, **self.common()))
        facts += progress
        if not lines and not facts and rows_end == self.rows.offset:
            return False
        logs_key = self.bus.keys.logs(self.record.job_id, self.record.rank)
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            for fd, line in lines:
                pipe.xadd(logs_key, {"fd": fd, "line": line[:8192]}, maxlen=self.log_maxlen, approximate=True)
            if facts:
                await self.bus.append_events(facts, client=pipe)
            pipe.hset(
                self.run_key,
                mapping={
                    "stdout_offset": out_end,
                    "stderr_offset": err_end,
                    "jsonl_path": str(self.rows.path) if self.version_dir else "",
                    "jsonl_offset": rows_end,
                    "checkpoints": json.dumps(checkpoints),
                    "serving": "1" if serving else "0",
                },
            )
            await pipe.execute()
        self.stdout.offset, self.stderr.offset, self.rows.offset = out_end, err_end, rows_end
        self.checkpoints, self.serving = checkpoints, serving
        return more

    def _read(self, final: bool) -> tuple[_Lines, _Lines, _Progress]:
        """What the attempt's files hold after the offsets: stdout's and stderr's lines, and its
        progress (see _progress). Blocking: run in a worker thread."""
        return self.stdout.peek(final=final), self.stderr.peek(final=final), self._progress()

    def _progress(self) -> _Progress:
        """Progress and checkpoint facts since the last pump, the new offset, all checkpoints,
        and whether rows were left for the next commit. Every row ms-swift logged is a fact of
        its own, in the order it was written: the loss curve, the timeline and replay show each
        step."""
        if self.record.deploy or self.record.rank:
            return [], self.rows.offset, self.checkpoints, False  # a gang job's rank 0 reports its progress
        if self.version_dir is None:
            before = recorded_command(self.record).get("version_dirs_before", [])
            self.version_dir = find_version_dir(Path(self.record.output_dir), self.record.started_at, before)
            if self.version_dir is None:
                return [], self.rows.offset, self.checkpoints, False
            self.rows = JsonlTail(self.version_dir / "logging.jsonl")
        facts: list[m.Message] = []
        rows, end = self.rows.peek(PROGRESS_ROWS_PER_COMMIT)
        for row in rows:
            fields = progress_fields(row)
            if fields is None:
                continue
            if "train_runtime" in row:
                # The closing row: the run's last step. It repeats a step logged already unless
                # max_steps is not a multiple of logging_steps; then the job's progress reaches
                # that step, with the metrics of the last training row carried over.
                if self.last_train is None or fields["step"] <= self.last_train["step"]:
                    continue
                fields.update({name: self.last_train[name] for name in _TRAIN_METRICS})
            elif "loss" in row:
                self.last_train = fields
                # A training row is its step's only one: the id derived from the step is unique,
                # and the log need not store it.
                fields["id"] = progress_id(self.record.job_id, self.record.attempt, fields["step"])
            elif self.last_train is not None and self.last_train["step"] == fields["step"]:
                # An evaluation row follows the training row of its step and has no training
                # metrics: carried over, the job's progress keeps its loss beside the eval loss.
                fields.update({name: self.last_train[name] for name in _TRAIN_METRICS})
            facts.append(m.JobProgress(attempt=self.record.attempt, **fields, **self.common()))
        checkpoints = list(self.checkpoints)
        for ckpt in sorted(self.version_dir.glob("checkpoint-*"), key=_step_of):
            # trainer_state.json is written last: the checkpoint is complete.
            if str(ckpt) not in checkpoints and (ckpt / "trainer_state.json").exists():
                checkpoints.append(str(ckpt))
                facts.append(
                    m.CheckpointSaved(attempt=self.record.attempt, step=_step_of(ckpt), path=str(ckpt), **self.common())
                )
        return facts, end, checkpoints, len(rows) == PROGRESS_ROWS_PER_COMMIT

    async def _gpus_released(self) -> None:
        """Where NVML can tell, wait (bounded) until the job's GPUs list none of its processes:
        the driver may hold a context for a moment after a process is gone."""
        gpus = [int(i) for i in self.record.gpus.split(",") if i.strip().isdigit()]
        if self.gpu_probe is None or not gpus or not self.pids:
            return
        with anyio.move_on_after(GPU_RELEASE_TIMEOUT_S):
            while await anyio.to_thread.run_sync(self.gpu_probe, gpus) & self.pids:
                await anyio.sleep(_NVML_CHECK_S)
            return
        log.warning("the job's GPUs still list its processes; releasing them anyway", job_id=self.record.job_id)

    async def finish(self, exit_code: int | None) -> None:
        """Wait until no process of the job remains, then report how it ended."""
        linger = GROUP_EXIT_TIMEOUT_S
        if self.stop_deadline is not None:
            # The `swift` wrapper dies at once on SIGTERM while the trainer it started saves its
            # checkpoint: the group has the rest of the stop's grace period for that, and no
            # more (a gang's rank whose peer is gone hangs in a collective until killed).
            linger = max(0.0, self.stop_deadline - time.monotonic())
        if not await wait_group_exit(self.record.pgid, linger):
            log.warning("processes of the job outlived it; killing the group", job_id=self.record.job_id)
            signal_group(self.record.pgid, signal.SIGKILL)
            await wait_group_exit(self.record.pgid, math.inf)
        await self._gpus_released()
        await self.pump(final=True)
        final = await anyio.to_thread.run_sync(self.outcome, exit_code)
        # The final fact has a fixed id: reporting it twice (a crash before the record is deleted)
        # appends it once.
        await self.bus.commit([Append(self.bus.keys.events, final)], dedupe_id=f"fact:{final.id}")
        metrics.RUNS_ENDED.labels(outcome=final.type).inc()
        await self.bus.redis.delete(self.run_key)
        CHILDREN.forget(self.record.pid)
        log.info("job ended", job_id=self.record.job_id, outcome=final.type, exit_code=exit_code)

    def outcome(self, exit_code: int | None) -> m.Message:
        common = {"id": fact_id(self.record, "final"), "attempt": self.record.attempt, **self.common()}
        # Enough lines for a whole traceback to classify the failure; the event keeps the last ones.
        stderr = tail_lines(Path(self.record.run_dir) / "stderr.log", CLASSIFY_LINES)
        stderr_tail = stderr[-STDERR_TAIL_LINES:]
        failed = {"exit_code": exit_code, "stderr_tail": stderr_tail, **common}
        if self.record.rank:
            return self._rank_ended(exit_code, stderr, common)
        outcome = self._outcome(exit_code, stderr, failed, common)
        if self.record.nodes > 1 and self.stop_reason is None and isinstance(outcome, (m.JobFailed, m.JobLost)):
            # A gang job's rank 0 that failed by itself fails the attempt as a whole, which the
            # scheduler stops everywhere and retries (its other ends are the job's)
            reason = outcome.reason if isinstance(outcome, m.JobFailed) else m.NodeLossReason.RUNNER_LOST
            return m.RankEnded(
                rank=0,
                node=self.record.node,
                exit_code=exit_code,
                failed=True,
                reason=reason,
                message=outcome.message,
                stderr_tail=stderr_tail,
                **common,
            )
        return outcome

    def _rank_ended(self, exit_code: int | None, stderr: list[str], common: dict[str, Any]) -> m.RankEnded:
        """A gang job's rank other than 0: ended as told (or with the job), or failed by itself,
        which fails the attempt as a whole."""
        ended = {"rank": self.record.rank, "node": self.record.node, "exit_code": exit_code, **common}
        if self.stop_reason is not None or exit_code == 0:
            return m.RankEnded(**ended)
        return m.RankEnded(
            failed=True,
            reason=classify_failure(exit_code, stderr, stopped_by_us=False)
            if exit_code is not None
            else m.NodeLossReason.RUNNER_LOST,
            message=failure_message(stderr) or f"exited with code {exit_code}",
            stderr_tail=stderr[-STDERR_TAIL_LINES:],
            **ended,
        )

    def _outcome(
        self, exit_code: int | None, stderr: list[str], failed: dict[str, Any], common: dict[str, Any]
    ) -> m.Message:
        if self.stop_reason == "cancel":
            last = self.checkpoints[-1] if self.checkpoints else None
            return m.JobCancelled(exit_code=exit_code, last_checkpoint=last, **common)
        if self.stop_reason == "timeout":
            return m.JobFailed(reason=m.FailureReason.TIMEOUT, message="time limit reached", **failed)
        if self.stop_reason == "idle":
            what = "served no request" if self.record.deploy else "kept its GPUs idle"
            return m.JobFailed(
                reason=m.FailureReason.IDLE, message=f"stopped: it {what} for its idle timeout", **failed
            )
        rows = read_rows(self.rows.path) if self.version_dir else []
        last_row = next((row for row in reversed(rows) if "last_model_checkpoint" in row), None)
        given_up_for = self.stop_reason if self.stop_reason in ("preempt", "suspend") else None
        gave_up = given_up_for is not None
        if given_up_for is not None and not _trained_to_the_end(rows, last_row):
            # It gave up its GPUs (unless it had just finished): it goes on from the checkpoint
            # it saved on the way out, or its last one. ms-swift closes a run stopped this way as
            # it closes a finished one (the closing row, exit 0), so only the steps tell them apart.
            last = self.checkpoints[-1] if self.checkpoints else None
            step = _step_of(Path(last)) if last else None
            return m.JobStopped(exit_code=exit_code, last_checkpoint=last, step=step, reason=given_up_for, **common)
        if self.record.deploy and (exit_code == 0 or exit_code is None):
            return m.JobFailed(reason=m.FailureReason.UNKNOWN, message="the server exited", **failed)
        if last_row is not None and (exit_code in (0, None) or gave_up):
            # (a stop that came as it finished killed the `swift` wrapper: its exit status says nothing)
            return m.JobSucceeded(
                exit_code=0,
                run_dir=str(self.version_dir or self.record.output_dir),
                final=final_metrics(rows),
                last_checkpoint=last_row.get("last_model_checkpoint")
                or (self.checkpoints[-1] if self.checkpoints else None),
                **common,
            )
        if exit_code == 0:
            # ms-swift exits 0 after a SIGTERM too (it saves a checkpoint): without its closing row
            # the training did not finish, and nobody here asked it to stop.
            return m.JobFailed(
                reason=m.FailureReason.KILLED, message="stopped from outside before training finished", **failed
            )
        # One line (the exception a traceback ends with); the traceback stays in stderr_tail.
        message = failure_message(stderr)
        if exit_code is None:
            # The job ended while no runner watched it: the cause is unknown, the attempt lost to
            # the infrastructure. The scheduler retries it or fails it.
            return m.JobLost(message=message, **common)
        reason = classify_failure(exit_code, stderr, stopped_by_us=False)
        command = recorded_command(self.record)
        message = hub_failure_message(reason, stderr, command["argv"], command["env"]) or message
        return m.JobFailed(reason=reason, message=message or f"exited with code {exit_code}", **failed)


# A request the deploy's server logged (uvicorn's access log): it is in use
_SERVED = re.compile(r'"(POST|GET) /v1/(chat/completions|completions|embeddings)')

_TRAIN_METRICS = ("loss", "grad_norm", "learning_rate", "token_acc", "train_speed_s_per_it")


def _trained_to_the_end(rows: list[dict[str, Any]], last_row: dict[str, Any] | None) -> bool:
    """Whether the run's closing row says it reached its last step (max_steps, as its training
    rows give it); unknown counts as not."""
    if last_row is None:
        return False
    for row in reversed(rows):
        step, _, total = str(row.get("global_step/max_steps", "")).partition("/")
        if step.isdigit() and total.isdigit():
            reached = last_row.get("global_step")
            return (reached if isinstance(reached, int) else int(step)) >= int(total)
    return False


def _step_of(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1
