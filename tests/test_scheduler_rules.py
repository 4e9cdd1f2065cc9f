"""The scheduler's rules as pure functions: order, placement, free-means-free, cancel, export."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from events import messages as m
from events.bus import Append
from events.keys import Keys
from events.state import State
from services.scheduler import rules
from tests.examples import GPU, LM, started

KEYS = Keys("t")
LIMITS = rules.Limits(heartbeat_timeout_s=10, foreign_memory_threshold_mb=1024)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Cluster:
    """A state built from the facts the rules emit, as the scheduler's fold would build it."""

    def __init__(self, nodes: dict[str, int]) -> None:
        self.state = State()
        self.n = 0
        self.heartbeats: dict[str, m.NodeHeartbeat] = {}
        for name, count in nodes.items():
            self.heartbeat(name, count)
            self.fold([Append(KEYS.events, fact) for fact in rules.node_changes(self.state, self.heartbeats[name])])

    def heartbeat(self, name: str, count: int, used_mb: int = 0, at: datetime = NOW) -> None:
        gpus = [
            m.GpuSample(**GPU.model_copy(update={"index": i}).model_dump(), memory_used_mb=used_mb)
            for i in range(count)
        ]
        self.heartbeats[name] = m.NodeHeartbeat(node=name, simulated=True, gpus=gpus, at=at)

    def measure(self, name: str, used_mb: list[int], processes_mb: dict[int, int] | None = None) -> None:
        """A heartbeat of node ``name``: memory in use per GPU, and the processes NVML lists."""
        listed = processes_mb or {}
        gpus = [
            m.GpuSample(
                **GPU.model_copy(update={"index": i}).model_dump(),
                memory_used_mb=used,
                processes=[m.GpuProcess(pid=100 + i, used_memory_mb=listed[i])] if i in listed else [],
            )
            for i, used in enumerate(used_mb)
        ]
        self.heartbeats[name] = m.NodeHeartbeat(node=name, simulated=True, gpus=gpus, at=NOW)

    def fold(self, appends: list[Append]) -> list[m.Message]:
        commands = []
        for item in appends:
            if item.stream == KEYS.events:
                self.n += 1
                self.state.apply(f"{self.n}-0", item.message)
            else:
                commands.append(item.message)
        return commands

    def submit(self, job_id: str, priority: int = 5, gpus: int = 1, **request: object) -> list[m.Message]:
        spec = LM.model_validate({**LM.model_dump(), "priority": priority, "gpu_count": gpus, **request})
        command = m.SubmitJob(job_id=job_id, spec=spec, actor="alice")
        return self.fold(rules.submit(self.state, KEYS, command, self.heartbeats, LIMITS, NOW))

    def finish(self, job_id: str) -> list[m.Message]:
        job = self.state.jobs[job_id]
        self.fold(
            [
                Append(
                    KEYS.events,
                    started(job_id, job.attempt, job.node or "", ""),
                )
            ]
        )
        done = m.JobSucceeded(
            job_id=job_id, attempt=job.attempt, exit_code=0, run_dir="/r", last_checkpoint="/r/checkpoint-5"
        )
        self.fold([Append(KEYS.events, done)])
        return self.fold(rules.on_event(self.state, KEYS, self.heartbeats, LIMITS, NOW, done))

    def status(self, job_id: str) -> str:
        return self.state.jobs[job_id].status


def test_a_job_that_fits_is_accepted_queued_and_started_in_one_decision() -> None:
    cluster = Cluster({"a": 2})
    [start] = cluster.submit("j")
    assert isinstance(start, m.StartJob) and start.node == "a" and start.gpu_ids == [0] and start.attempt == 1
    assert cluster.status("j") == "scheduled"
    assert [cluster.state.jobs["j"].queue_position_at_submit] == [1]


def test_jobs_wait_in_priority_order_and_start_as_gpus_free() -> None:
    cluster = Cluster({"a": 1})
    cluster.submit("running")
    cluster.submit("low", priority=1)
    cluster.submit("high", priority=9)
    cluster.submit("high2", priority=9)
    assert [j.job_id for j in cluster.state.queue()] == ["high", "high2", "low"]
    [start] = [c for c in cluster.finish("running") if isinstance(c, m.StartJob)]
    assert start.job_id == "high"
    [start] = [c for c in cluster.finish("high") if isinstance(c, m.StartJob)]
    assert start.job_id == "high2"


def test_strict_order_a_big_job_at_the_head_blocks_smaller_ones_behind_it() -> None:
    cluster = Cluster({"a": 2})
    cluster.submit("one")  # holds GPU 0
    cluster.submit("big", priority=9, gpus=2)  # needs both: waits
    commands = cluster.submit("small", priority=1)  # would fit on GPU 1, but must not jump ahead
    assert commands == [] and cluster.status("small") == "queued"


def test_a_job_waiting_for_a_node_that_offers_no_gpus_holds_up_no_one_but_a_busy_gpu_does() -> None:
    # Given nodes a (gone quiet), b (its GPU used by someone else's process) and c (c/0 ours)
    cluster = Cluster({"a": 1, "b": 1, "c": 3})
    cluster.submit("one", node="c")
    cluster.heartbeat("a", 1, at=NOW - timedelta(seconds=60))
    cluster.heartbeat("b", 1, used_mb=5000)
    # When a high-priority job waits for node a, a lower one still starts on c
    assert cluster.submit("on-a", priority=9, node="a") == []
    [start] = cluster.submit("low", priority=1, node="c")
    assert (start.job_id, start.gpu_ids) == ("low", [1])
    # But one waiting for a busy GPU (another's process on b) holds back those behind it
    assert cluster.submit("on-b", priority=8, node="b") == []
    assert cluster.submit("low-c", priority=1, node="c") == []
    assert [j.job_id for j in cluster.state.queue()] == ["on-a", "on-b", "low-c"]
    # And once b's GPU is free, both start, in order
    cluster.heartbeat("b", 1)
    decided = cluster.fold(rules.schedule(cluster.state, KEYS, cluster.heartbeats, LIMITS, NOW, m.ProcessQueue()))
    assert [c.job_id for c in decided if isinstance(c, m.StartJob)] == ["on-b", "low-c"]


def test_memory_a_gpu_never_frees_holds_up_no_one_but_memory_a_process_uses_does() -> None:
    # Given idle GPUs, each with 400 MB kept by the driver (of 24,576 MB)
    cluster = Cluster({"a": 2})
    cluster.heartbeat("a", 2, used_mb=400)
    # When a job asks for more memory than any GPU can have free, it holds back no one
    assert cluster.submit("greedy", priority=9, min_gpu_memory_mb=24_476) == []
    [start] = cluster.submit("small", priority=1)
    assert start.job_id == "small"
    # But with another's process using 20,000 MB of GPU 0, a job that needs that memory on all
    # three GPUs waits for the process to end, and holds back the rest
    cluster = Cluster({"a": 3})
    cluster.measure("a", [20_400, 400, 400], {0: 20_000})
    assert cluster.submit("trio", priority=8, gpus=3, min_gpu_memory_mb=24_000) == []
    assert cluster.submit("later", priority=1) == []  # GPUs 1 and 2 are free, but the trio is first
    assert [j.job_id for j in cluster.state.queue()] == ["trio", "later"]
    # And a GPU our own job holds frees its job's memory, not the driver's: the greedy job waits
    # on no one there either
    cluster = Cluster({"a": 2})
    cluster.submit("r")
    cluster.measure("a", [20_400, 400], {0: 20_000})
    assert cluster.submit("greedy", priority=9, min_gpu_memory_mb=24_476) == []
    [start] = cluster.submit("small", priority=1)
    assert (start.job_id, start.gpu_ids) == ("small", [1])


def test_memory_used_by_processes_nvml_does_not_list_counts_as_freeable() -> None:
    # Given GPU 0 held by our job, whose 20,000 MB NVML does not attribute (MIG, containers)
    cluster = Cluster({"a": 2})
    cluster.submit("r")
    cluster.measure("a", [20_000, 0])
    # When a job needing 10,000 MB on both GPUs waits for it
    assert cluster.submit("h", priority=9, gpus=2, min_gpu_memory_mb=10_000) == []
    # Then it holds back a lower job that would take GPU 1
    assert cluster.submit("l", priority=1) == []
    assert [j.job_id for j in cluster.state.queue()] == ["h", "l"]


def test_a_gpu_just_left_by_our_job_still_counts_as_ours_until_the_next_heartbeat() -> None:
    # Given a 2-GPU node: R on GPU 0, a 2-GPU job H waiting behind it, and a lower job L
    cluster = Cluster({"a": 2})
    cluster.submit("r")
    cluster.submit("h", priority=9, gpus=2)
    cluster.measure("a", [20_000, 0])  # read while R still ran: GPU 0 reads as used
    # When R ends before the next heartbeat
    cluster.finish("r")
    # Then H still holds back L, which must not take GPU 1 away from it
    assert cluster.submit("l", priority=1) == []
    assert [j.job_id for j in cluster.state.queue()] == ["h", "l"]


def test_placement_prefers_the_node_that_leaves_fewest_gpus_idle() -> None:
    cluster = Cluster({"a": 4, "b": 2})
    [start] = cluster.submit("pair", gpus=2)
    assert (start.node, start.gpu_ids) == ("b", [0, 1])


def test_a_gpu_used_by_a_foreign_process_or_a_silent_node_is_offered_to_no_one() -> None:
    cluster = Cluster({"a": 1, "b": 1})
    cluster.heartbeat("a", 1, used_mb=5000)  # someone else's process on a's GPU
    cluster.heartbeat("b", 1, at=NOW - timedelta(seconds=60))  # b has gone quiet
    assert cluster.submit("j") == []
    assert cluster.status("j") == "queued"
    cluster.heartbeat("b", 1)
    [start] = cluster.fold(rules.schedule(cluster.state, KEYS, cluster.heartbeats, LIMITS, NOW, m.ProcessQueue()))
    assert start.node == "b"


def test_a_job_bigger_than_any_node_is_rejected_at_once() -> None:
    cluster = Cluster({"a": 2})
    assert cluster.submit("huge", gpus=3) == []
    job = cluster.state.jobs["huge"]
    assert job.status == "failed" and job.reason == "unsatisfiable" and "3 GPUs" in (job.message or "")


def test_a_repeated_submit_is_decided_once() -> None:
    cluster = Cluster({"a": 2})
    cluster.submit("j")
    command = m.SubmitJob(job_id="j", spec=LM)
    assert rules.submit(cluster.state, KEYS, command, cluster.heartbeats, LIMITS, NOW) == []


def test_cancel_of_a_queued_job_is_immediate_and_of_a_running_one_goes_to_its_runner() -> None:
    cluster = Cluster({"a": 1})
    cluster.submit("running")
    cluster.submit("waiting")
    assert cluster.fold(rules.cancel(cluster.state, KEYS, m.CancelJob(job_id="waiting"))) == []
    assert cluster.status("waiting") == "cancelled"
    [stop] = cluster.fold(rules.cancel(cluster.state, KEYS, m.CancelJob(job_id="running", actor="bob")))
    assert isinstance(stop, m.StopJob) and stop.attempt == 1 and stop.actor == "bob"
    assert cluster.state.jobs["running"].cancel_requested
    [again] = cluster.fold(rules.cancel(cluster.state, KEYS, m.CancelJob(job_id="running")))
    assert isinstance(again, m.StopJob)  # asked again: the stop is sent again, the fact is not


def test_a_completed_lora_job_is_exported_once() -> None:
    cluster = Cluster({"a": 1})
    cluster.submit("j")
    [export] = [c for c in cluster.finish("j") if isinstance(c, m.StartExport)]
    assert isinstance(export, m.StartExport) and export.output_dir == "/r/checkpoint-5-merged"
    assert cluster.state.jobs["j"].export.status == "pending"
    again = m.RequestExport(job_id="j")
    assert rules.export(cluster.state, KEYS, cluster.state.jobs["j"], again) == []


def mixed_cluster() -> Cluster:
    """Node a: two A100 of 40 GB; node b: one H100 of 80 GB with 60 GB free, one with 20 GB free."""
    cluster = Cluster({})
    specs = {
        "a": [("NVIDIA A100-SXM4-40GB", 40960, 40000), ("NVIDIA A100-SXM4-40GB", 40960, 39000)],
        "b": [("NVIDIA H100 80GB HBM3", 81920, 60000), ("NVIDIA H100 80GB HBM3", 81920, 20000)],
    }
    for name, gpus in specs.items():
        samples = [
            m.GpuSample(
                index=i, uuid=f"{name}-{i}", name=model, memory_total_mb=total, memory_used_mb=0, memory_free_mb=free
            )
            for i, (model, total, free) in enumerate(gpus)
        ]
        cluster.heartbeats[name] = m.NodeHeartbeat(node=name, simulated=False, gpus=samples, at=NOW)
        cluster.fold([Append(KEYS.events, f) for f in rules.node_changes(cluster.state, cluster.heartbeats[name])])
    return cluster


def test_requests_choose_model_memory_node_and_ids() -> None:
    cluster = mixed_cluster()
    [h100] = cluster.submit("h100", gpu_model="h100")
    assert (h100.node, h100.gpu_ids) == ("b", [0])  # the H100 with the most free memory
    [big] = cluster.submit("big", min_gpu_memory_mb=39500)
    assert (big.node, big.gpu_ids) == ("a", [0])  # only a/0 has 39.5 GB free (b/0 is taken)
    [pinned] = cluster.submit("pinned", node="b", gpu_ids=[1])
    assert (pinned.node, pinned.gpu_ids) == ("b", [1])
    assert cluster.submit("waits", node="b") == [] and cluster.status("waits") == "queued"


def test_placement_is_deterministic_for_the_same_state() -> None:
    decisions = {(*c.gpu_ids, c.node) for c in (mixed_cluster().submit("j")[0] for _ in range(5))}
    assert decisions == {(0, "b")}  # both nodes leave one idle: b/0 has the most free memory


def test_a_request_that_can_never_fit_is_rejected_with_the_reason() -> None:
    cluster = mixed_cluster()
    for job_id, request in [
        ("model", {"gpu_model": "V100"}),
        ("memory", {"min_gpu_memory_mb": 100_000}),
        ("count", {"gpus": 3}),
        ("node", {"node": "c"}),
        ("ids", {"node": "a", "gpu_ids": [5]}),
    ]:
        assert cluster.submit(job_id, **request) == []
        job = cluster.state.jobs[job_id]
        assert (
            job.status == "failed" and job.reason == "unsatisfiable" and "no node can ever give" in (job.message or "")
        )


def test_a_silent_node_is_lost_its_jobs_retried_from_their_checkpoint_or_failed() -> None:
    cluster = Cluster({"a": 2, "b": 2})
    cluster.submit("retried", node="a", max_retries=1)
    cluster.submit("failed", node="a")
    start_report = started("retried", 1, "a", "0")
    cluster.fold([Append(KEYS.events, start_report), Append(KEYS.events, started("failed", 1, "a", "1"))])
    cluster.fold([Append(KEYS.events, m.CheckpointSaved(job_id="retried", attempt=1, step=5, path="/r/checkpoint-5"))])
    heard = {"a": NOW - timedelta(seconds=60), "b": NOW}
    assert rules.lost_nodes(cluster.state, heard, LIMITS, NOW) == ["a"]
    stops = cluster.fold(rules.lose_node(cluster.state, KEYS, "a", m.ProcessQueue()))
    assert {(s.job_id, s.attempt) for s in stops if isinstance(s, m.StopJob)} == {("retried", 1), ("failed", 1)}
    assert not cluster.state.nodes["a"].up and cluster.state.allocations == {}
    assert cluster.state.jobs["failed"].status == "failed" and cluster.state.jobs["failed"].reason == "node_lost"
    retried = cluster.state.jobs["retried"]
    assert retried.status == "queued" and retried.retries == 1
    # The first attempt's process, stopped on its node, reports while the job waits: ignored
    late = m.JobFailed(job_id="retried", attempt=1, reason="killed", message="stopped from outside")
    cluster.fold([Append(KEYS.events, late), Append(KEYS.events, m.JobCancelled(job_id="retried", attempt=1))])
    assert retried.status == "queued" and retried.reason is None and cluster.state.stale_reports == 2
    # It needs node a: it waits; when a comes back (a new epoch), it runs again from its checkpoint
    assert cluster.fold(rules.schedule(cluster.state, KEYS, cluster.heartbeats, LIMITS, NOW, m.ProcessQueue())) == []
    cluster.fold([Append(KEYS.events, f) for f in rules.node_changes(cluster.state, cluster.heartbeats["a"])])
    assert cluster.state.nodes["a"].epoch == 2
    [start] = cluster.fold(rules.schedule(cluster.state, KEYS, cluster.heartbeats, LIMITS, NOW, m.ProcessQueue()))
    assert (start.attempt, start.resume_from) == (2, "/r/checkpoint-5")
    # A late report of the first attempt is ignored
    cluster.fold([Append(KEYS.events, m.JobSucceeded(job_id="retried", attempt=1, exit_code=0, run_dir="/r"))])
    assert cluster.state.jobs["retried"].status == "scheduled" and cluster.state.stale_reports == 3


def test_an_attempt_lost_while_no_runner_watched_is_retried_while_retries_are_left_then_failed() -> None:
    cluster = Cluster({"a": 1})
    cluster.submit("j", max_retries=1)
    cluster.fold([Append(KEYS.events, started("j", 1, "a", "0"))])
    # When the runner reports attempt 1 lost, the scheduler queues the job again, and starts it
    lost = m.JobLost(job_id="j", attempt=1, message="Killed")
    cluster.fold([Append(KEYS.events, lost)])
    assert cluster.state.jobs["j"].status == "running"  # until the scheduler decides
    assert cluster.fold(rules.react(cluster.state, KEYS, lost)) == []  # facts only: job.requeued
    job = cluster.state.jobs["j"]
    assert (job.status, job.retries) == ("queued", 1)
    [start] = cluster.fold(rules.schedule(cluster.state, KEYS, cluster.heartbeats, LIMITS, NOW, lost))
    assert (start.job_id, start.attempt) == ("j", 2)
    # A repeated report of attempt 1 changes nothing; attempt 2 lost with no retries left fails it
    assert rules.react(cluster.state, KEYS, lost) == []
    cluster.fold([Append(KEYS.events, started("j", 2, "a", "0"))])
    lost_again = m.JobLost(job_id="j", attempt=2)
    cluster.fold([Append(KEYS.events, lost_again)])
    cluster.fold(rules.react(cluster.state, KEYS, lost_again))
    assert (job.status, job.reason, job.message) == (
        "failed",
        "runner_lost",
        "the job ended while no runner watched it",
    )
    assert cluster.state.allocations == {}


def test_a_node_whose_runner_went_silent_is_lost_while_its_monitor_still_reports() -> None:
    cluster = Cluster({"a": 1, "b": 1})
    cluster.submit("retried", node="a", max_retries=1)
    cluster.submit("failed", node="b")
    cluster.fold(
        [Append(KEYS.events, started("retried", 1, "a", "0")), Append(KEYS.events, started("failed", 1, "b", "0"))]
    )
    timeout = timedelta(seconds=LIMITS.node_timeout_s)
    monitors = {"a": NOW, "b": NOW}
    # A runner never heard from, or heard lately, is not lost; one silent past the timeout is,
    # unless its node's monitor is silent too (then the node is lost as a whole)
    assert rules.lost_runners(cluster.state, {"a": NOW}, monitors, LIMITS, NOW) == []
    silent = {"a": NOW - timeout * 2, "b": NOW - timeout * 2}
    quiet_b = {"a": NOW, "b": NOW - timeout}
    assert rules.lost_runners(cluster.state, silent, quiet_b, LIMITS, NOW) == ["a"]
    assert rules.lost_runners(cluster.state, silent, monitors, LIMITS, NOW) == ["a", "b"]
    for node in ("a", "b"):
        cluster.fold(rules.lose_node(cluster.state, KEYS, node, m.ProcessQueue(), "runner_lost"))
    retried, failed = cluster.state.jobs["retried"], cluster.state.jobs["failed"]
    assert (retried.status, retried.retries) == ("queued", 1)
    assert (failed.status, failed.reason, failed.message) == (
        "failed",
        "runner_lost",
        "its runner stopped sending heartbeats",
    )
    assert not cluster.state.nodes["a"].up and cluster.state.allocations == {}
    assert rules.runner_silent("a", silent, LIMITS, NOW) and not rules.runner_silent("a", {}, LIMITS, NOW)


def test_backfill_starts_a_short_job_only_when_it_ends_before_the_blocked_one_could_start() -> None:
    backfilling = rules.Limits(heartbeat_timeout_s=10, foreign_memory_threshold_mb=1024, backfill=True)
    graceful = rules.Limits(
        heartbeat_timeout_s=10, foreign_memory_threshold_mb=1024, backfill=True, backfill_margin_s=30
    )
    for limits, expected in ((LIMITS, []), (backfilling, ["short", "tight"]), (graceful, ["short"])):
        cluster = Cluster({"a": 3})
        cluster.submit("running")  # GPU 0, ends in 600 s by its progress ETA
        start_report = started("running", 1, "a", "0")
        eta = m.JobProgress(job_id="running", attempt=1, step=1, max_steps=10, percent=10, remaining_s=600, at=NOW)
        cluster.fold([Append(KEYS.events, start_report), Append(KEYS.events, eta)])
        cluster.submit("big", priority=9, gpus=3)  # blocked until GPU 0 frees: in 600 s
        cluster.submit("long", priority=1, time_limit_s=3600)  # would outlast that: never backfilled
        cluster.submit("short", priority=1, time_limit_s=300)  # ends before: backfilled when allowed
        # ends 10 s before, unless stopping it at its limit may take 30 s more
        cluster.submit("tight", priority=1, time_limit_s=580)
        cluster.submit("unlimited", priority=1)  # no time limit: never backfilled
        decided = cluster.fold(rules.schedule(cluster.state, KEYS, cluster.heartbeats, limits, NOW, m.ProcessQueue()))
        assert [c.job_id for c in decided if isinstance(c, m.StartJob)] == expected


def test_a_held_job_is_never_scheduled_until_released_and_then_keeps_its_submit_order() -> None:
    # Given one GPU, busy, and a held job submitted before two queued ones of its priority
    cluster = Cluster({"a": 1})
    cluster.submit("busy")
    assert cluster.submit("held", hold=True) == []
    cluster.submit("second")
    cluster.submit("third")
    assert cluster.status("held") == "held"
    assert [job.job_id for job in cluster.state.queue()] == ["second", "third"]
    # When it is released
    release = m.ReleaseJob(job_id="held", actor="alice")
    [queued] = rules.release(cluster.state, KEYS, release)
    assert isinstance(queued.message, m.JobQueued)
    assert (queued.message.position, queued.message.behind_job_id) == (1, None)
    cluster.fold([queued])
    # Then it waits ahead of the jobs submitted after it, and starts when the GPU frees
    assert [job.job_id for job in cluster.state.queue()] == ["held", "second", "third"]
    [start] = [c for c in cluster.finish("busy") if isinstance(c, m.StartJob)]
    assert start.job_id == "held"
    # And releasing a job that is not held does nothing
    assert rules.release(cluster.state, KEYS, release) == []


def test_a_held_job_can_be_cancelled() -> None:
    cluster = Cluster({"a": 1})
    cluster.submit("held", hold=True)
    [cancelled] = rules.cancel(cluster.state, KEYS, m.CancelJob(job_id="held", actor="bob"))
    cluster.fold([cancelled])
    assert cluster.status("held") == "cancelled"
