"""The cluster benchmark at a tiny size: the real scheduler and gateway, four emulated nodes, 50
jobs over REST (gangs and cancels among them). Every job must end, and the log's invariants must
hold (no GPU held by two attempts, one state per job, no submission lost)."""

from __future__ import annotations

from tests.benchmarks.bench_cluster import Config, run


def test_a_tiny_cluster_runs_every_job_to_its_end_without_holding_a_gpu_twice() -> None:
    # Given four nodes of 8 GPUs, and 50 jobs of every shape (two-node gangs included), some of
    # them cancelled while they hold GPUs
    config = Config(
        nodes=4,
        jobs=50,
        warmup=5,
        probes=5,
        concurrency=8,
        heartbeat_s=0.5,
        time_scale=0.01,
        cancels=0.1,
        idle_s=1.0,
        drain_timeout_s=60.0,
    )
    # When the benchmark runs them through the real scheduler and gateway
    result = run(config)
    # Then every submission was taken, and every job ended
    assert not result.refused, result.refused
    assert len([s for s in result.sent if s.job_id]) == config.jobs
    assert result.died == "", result.died
    assert result.unfinished == [], result.scheduler_log
    assert sum(result.outcomes.values()) == config.jobs
    assert result.outcomes["completed"] + result.outcomes["cancelled"] == config.jobs, result.outcomes
    # And gangs ran, and running jobs were stopped as their runners were told
    assert result.gangs_started > 0
    assert result.stops_answered > 0
    assert result.nodes_lost == []
    # And the log's invariants hold, and the gateway's state is the log's fold
    assert result.audit_code == 0, result.audit_said
