"""Queue estimates: simulated from running jobs' ETA or time limit and queued jobs' expected
durations; unknown when nothing says how long something takes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from events import messages as m
from events.estimates import estimate_queue
from events.policy import Policy
from events.quotas import Limit, Quotas
from tests.examples import LM
from tests.test_state import Log, node

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def submit(log: Log, job_id: str, priority: int = 5, actor: str | None = None, **spec: object) -> None:
    full = LM.model_validate({**LM.model_dump(), "priority": priority, **spec})
    log.add(m.JobAccepted(job_id=job_id, spec=full, at=NOW, actor=actor), m.JobQueued(job_id=job_id, position=1))


def run(log: Log, job_id: str, gpu: int, *, remaining_s: float | None = None) -> None:
    log.add(
        m.JobScheduled(job_id=job_id, node="n1", gpu_ids=[gpu], attempt=1),
        m.JobStarted(
            job_id=job_id, attempt=1, node="n1", pid=1, pgid=1, run_dir="/r", argv=[], cuda_visible_devices="", at=NOW
        ),
    )
    if remaining_s is not None:
        log.add(
            m.JobProgress(job_id=job_id, attempt=1, step=1, max_steps=10, percent=10, remaining_s=remaining_s, at=NOW)
        )


def test_waits_follow_running_etas_then_queued_time_limits_in_order() -> None:
    log = Log()
    log.add(node(gpus=2))
    submit(log, "r0")
    run(log, "r0", 0, remaining_s=100)
    submit(log, "r1")
    run(log, "r1", 1, remaining_s=300)
    submit(log, "q1", priority=9, time_limit_s=50)  # GPU 0 frees at 100 s; q1 holds it until 150
    submit(log, "q2", priority=5)  # then GPU 0 again at 150, before GPU 1 at 300
    estimates = estimate_queue(log.state, NOW)
    assert estimates["q1"].start_in_s == 100
    # q2 has no time limit and no history, but it only needs a GPU: GPU 0 is free again at 150
    assert estimates["q2"].start_in_s == 150


def test_a_running_job_without_eta_or_limit_makes_waits_behind_it_unknown() -> None:
    log = Log()
    log.add(node(gpus=1))
    submit(log, "r0")
    run(log, "r0", 0)
    submit(log, "q1")
    estimate = estimate_queue(log.state, NOW)["q1"]
    assert estimate.start_in_s is None and "r0" in estimate.basis


def test_past_runs_of_the_same_model_give_the_expected_duration() -> None:
    log = Log()
    log.add(node(gpus=1))
    for i, minutes in enumerate((10, 20, 30)):
        submit(log, f"past{i}")
        run(log, f"past{i}", 0)
        log.add(
            m.JobSucceeded(job_id=f"past{i}", attempt=1, exit_code=0, run_dir="/r", at=NOW + timedelta(minutes=minutes))
        )
    submit(log, "r0", time_limit_s=60)
    run(log, "r0", 0)
    submit(log, "q1")  # median of past runs: 20 min
    submit(log, "q2")
    estimates = estimate_queue(log.state, NOW)
    assert estimates["q1"].start_in_s == 60
    assert estimates["q2"].start_in_s == 60 + 20 * 60


def test_every_job_behind_an_unknown_start_is_unknown_for_a_reason_that_fits_its_request() -> None:
    # Given a node with 2 GPUs, one held by a job with no ETA, the other by a job with a time limit
    log = Log()
    log.add(node(gpus=2))
    submit(log, "r0")
    run(log, "r0", 0)
    submit(log, "r1", time_limit_s=100)
    run(log, "r1", 1)
    # And behind a two-GPU job (blocked by r0), one-GPU and two-GPU jobs and one no GPU can hold
    submit(log, "head", priority=9, gpu_count=2)
    for job_id, gpus in (("one-a", 1), ("two", 2), ("one-b", 1), ("four", 4)):
        submit(log, job_id, gpu_count=gpus)
    estimates = estimate_queue(log.state, NOW)
    # Then all of them are unknown, each naming what it waits on, and the queue lists them all
    assert "r0" in estimates["head"].basis
    assert all(estimates[j].start_in_s is None for j in ("one-a", "two", "one-b", "four"))
    # (one GPU: the best, GPU 1, frees at a known time, but the head, ahead of it, starts first)
    assert estimates["one-a"].basis == (
        "unknown: it starts after job head, ahead of it in the queue, whose start is not known"
    )
    assert estimates["one-a"] == estimates["one-b"]
    assert "job r0 ahead of it" in estimates["two"].basis
    assert estimates["four"].basis == "unknown: no node in service has enough GPUs it could use"
    assert list(estimates) == ["head", "one-a", "two", "one-b", "four"] and len(estimates) == 5
    # And a job queued after the estimate was made is answered too; one that is not queued is not
    submit(log, "late", gpu_count=1)
    assert estimates["late"] == estimates["one-a"]
    assert estimates.get("r0") is None and estimates.get("nobody") is None


def test_a_job_that_needs_a_node_out_of_service_is_unknown_and_holds_up_no_estimate() -> None:
    # Given node n1 (one GPU, busy for 100 s) in service and node s up in the log but silent
    log = Log()
    log.add(node(gpus=1), node("s", gpus=1))
    submit(log, "r0")
    run(log, "r0", 0, remaining_s=100)
    submit(log, "pinned", priority=9, node="s")
    submit(log, "next", priority=5, time_limit_s=60)
    # When the scheduler estimates with the nodes it offers GPUs of
    estimates = estimate_queue(log.state, NOW, gpus={"n1": log.state.nodes["n1"].gpus})
    # Then the job pinned to s is unknown, and the one behind it starts when n1's GPU frees
    assert estimates["pinned"].basis == "unknown: no node in service has enough GPUs it could use"
    assert estimates["next"].start_in_s == 100
    # (counting every node up in the log, the pinned job would start at once on s)
    assert estimate_queue(log.state, NOW)["pinned"].start_in_s == 0


def test_a_gpu_in_use_by_another_process_frees_at_no_known_time() -> None:
    # Given two GPUs: GPU 0 used by someone else's process, GPU 1 ours for 100 s more
    log = Log()
    log.add(node(gpus=2))
    submit(log, "r1")
    run(log, "r1", 1, remaining_s=100)
    submit(log, "pair", priority=9, gpu_count=2)
    submit(log, "one", priority=5, time_limit_s=60)
    # Then the pair's start is unknown, for that process; nothing behind it is invented either
    estimates = estimate_queue(log.state, NOW, foreign={"n1/0"})
    assert estimates["pair"].basis == "unknown: GPU n1/0 is in use by another's processes"
    assert estimates["one"].start_in_s is None
    # (without that reading, GPU 0 would be counted free now: the pair would start in 100 s)
    assert estimate_queue(log.state, NOW)["pair"].start_in_s == 100


def test_a_job_asking_for_memory_no_gpu_can_free_holds_up_no_estimate() -> None:
    # Given one idle GPU that can free 24,000 MB at most (the driver keeps the rest)
    log = Log()
    log.add(node(gpus=1))
    submit(log, "greedy", priority=9, min_gpu_memory_mb=24_476)
    submit(log, "next", priority=5, time_limit_s=60)
    freeable = {"n1": [gpu.model_copy(update={"memory_total_mb": 24_000}) for gpu in log.state.nodes["n1"].gpus]}
    # Then the greedy job is unknown, and the job behind it starts now
    estimates = estimate_queue(log.state, NOW, gpus=freeable)
    assert estimates["greedy"].basis == "unknown: no node in service has enough GPUs it could use"
    assert estimates["next"].start_in_s == 0


def test_a_job_that_may_preempt_is_estimated_to_start_when_its_victim_may_be_preempted() -> None:
    # Given a low-priority job with no ETA on the only GPU, started 100 s ago
    log = Log()
    log.add(node(gpus=1))
    submit(log, "low", priority=1)
    run(log, "low", 0)
    submit(log, "urgent", priority=9)
    submit(log, "peer", priority=1)  # as low as the running one: it may preempt no one
    later = NOW + timedelta(seconds=100)
    policy = Policy(preemption=True, preempt_min_runtime_s=300)
    # Then the urgent job starts once the victim has run its minimum, 200 s from now
    estimates = estimate_queue(log.state, later, policy=policy)
    assert estimates["urgent"].start_in_s == 200
    assert "preempting" in estimates["urgent"].basis
    # and without preemption its start is not known (the running job has no ETA)
    assert estimate_queue(log.state, later)["urgent"].start_in_s is None
    # and the job that may not preempt waits behind it, for a time nothing tells
    assert estimates["peer"].start_in_s is None
    # A non-preemptible victim gives no such promise
    log2 = Log()
    log2.add(node(gpus=1))
    submit(log2, "low", priority=1, preemptible=False)
    run(log2, "low", 0)
    submit(log2, "urgent", priority=9)
    assert estimate_queue(log2.state, later, policy=policy)["urgent"].start_in_s is None


def test_a_job_over_its_gpu_quota_says_so_and_holds_up_no_one() -> None:
    log = Log()
    log.add(node(gpus=2), m.QuotasChanged(quotas=Quotas(users={"bob": Limit(gpus=1)})))
    submit(log, "r0", actor="bob", time_limit_s=600)
    run(log, "r0", 0)
    submit(log, "bob2", actor="bob", priority=9)
    submit(log, "alice1", actor="alice")
    estimates = estimate_queue(log.state, NOW)
    assert estimates["bob2"].start_in_s is None
    assert "quota" in estimates["bob2"].basis and "bob" in estimates["bob2"].basis
    assert estimates["alice1"].start_in_s == 0


def test_a_gang_job_starts_when_its_last_node_is_free() -> None:
    # Given two nodes of one GPU, busy for 100 s and 300 s
    log = Log()
    log.add(node("n1", gpus=1), node("n2", gpus=1))
    for job_id, name, remaining in (("r1", "n1", 100), ("r2", "n2", 300)):
        submit(log, job_id)
        log.add(
            m.JobScheduled(job_id=job_id, node=name, gpu_ids=[0], attempt=1),
            m.JobStarted(
                job_id=job_id, attempt=1, node=name, pid=1, pgid=1, run_dir="/r", argv=[], cuda_visible_devices=""
            ),
            m.JobProgress(job_id=job_id, attempt=1, step=1, max_steps=10, remaining_s=remaining, at=NOW),
        )
    # When a job on two nodes waits, and one on a single node behind it
    submit(log, "gang", nodes=2, time_limit_s=60)
    submit(log, "single", priority=1)
    estimates = estimate_queue(log.state, NOW)
    # Then the gang starts once both nodes are free, and the other job after it
    assert estimates["gang"].start_in_s == 300
    assert estimates["single"].start_in_s == 360
