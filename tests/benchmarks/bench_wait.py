"""What waiting for a replica (``REDIS_WAIT_REPLICAS``) costs: prints numbers, asserts nothing.

    python -m tests.benchmarks.bench_wait [--sends 2000] [--posts 300] [--clients 16] [--rounds 1]

Runs a throwaway master and one replica (`redis-server --replicaof`, on loopback), then measures,
without and with ``WAIT 1``: the bus's append of a command (what the gateway does per command),
one at a time and from ``--clients`` concurrent callers (which share round trips, and so WAITs);
then ``POST /jobs`` through the real gateway, with the real scheduler and a gpu-monitor (no
runner: the jobs queue), one request at a time (latency, including the wait for the scheduler's
decision) and from ``--clients`` concurrent clients (accepted submissions per second).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import anyio
import httpx
import redis

from events import messages as m
from events.bus import Bus, connect
from events.keys import Keys
from services import embedded_redis
from tests.conftest import RedisServer, free_port, wait_for
from tests.system import System


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_replica(root: Path, master_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [*embedded_redis.server_argv(root, port), "--replicaof", "127.0.0.1", str(master_port)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, decode_responses=True)

    def synced() -> bool:
        try:
            return client.info("replication").get("master_link_status") == "up"
        except redis.ConnectionError:
            return False

    wait_for(synced, 30, "the replica to sync")
    client.close()
    return process, port


async def sends(url: str, wait: int, count: int, clients: int) -> str:
    client = connect(url)
    keys = Keys(f"w{uuid.uuid4().hex[:8]}")
    bus = Bus(client, keys, "bench")
    bus.replicate_commands(wait, 1000)
    command = m.ProcessQueue(actor="bench")
    try:
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            await bus.send(keys.commands, command)
            latencies.append((time.perf_counter() - start) * 1000)

        async def caller(n: int) -> None:
            for _ in range(n):
                await bus.send(keys.commands, command)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(clients):
                tg.start_soon(caller, count // clients)
        rate = (count // clients) * clients / (time.perf_counter() - start)
        await client.delete(keys.commands)
    finally:
        await client.aclose()
    return (
        f"one at a time p50 {percentile(latencies, 0.5):.3f} ms  p99 {percentile(latencies, 0.99):.3f} ms; "
        f"{clients} callers {rate:,.0f}/s"
    )


async def posts(base: str, body: dict[str, object], count: int, clients: int) -> str:
    async with httpx.AsyncClient(timeout=30) as http:
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            response = await http.post(f"{base}/jobs", json=body)
            assert response.status_code == 202, response.text
            latencies.append((time.perf_counter() - start) * 1000)

        async def client(n: int) -> None:
            for _ in range(n):
                response = await http.post(f"{base}/jobs", json=body)
                assert response.status_code == 202, response.text

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(clients):
                tg.start_soon(client, count // clients)
        rate = (count // clients) * clients / (time.perf_counter() - start)
    return (
        f"one at a time p50 {percentile(latencies, 0.5):.1f} ms  p99 {percentile(latencies, 0.99):.1f} ms; "
        f"{clients} clients {rate:,.0f} accepted/s"
    )


def has_node(base: str) -> bool:
    try:
        return bool(httpx.get(f"{base}/gpus", timeout=2).json()["nodes"])
    except httpx.TransportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--posts", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="measure each way this often, alternating")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        master = RedisServer(root / "master")
        master.start()
        replica, _ = start_replica(root / "replica", master.port)
        try:
            for wait in (0, 1) * args.rounds:
                print(
                    f"bus append of a command, WAIT {wait}: {anyio.run(sends, master.url, wait, args.sends, args.clients)}"
                )
            (root / "model").mkdir()
            (root / "data.jsonl").write_text("{}\n")
            body = {
                "task_type": "language_model",
                "model_path": str(root / "model"),
                "data_path": str(root / "data.jsonl"),
            }
            for round_, wait in enumerate((0, 1) * args.rounds):
                system = System(
                    master.url, root / f"system-{round_}", REDIS_WAIT_REPLICAS=str(wait), SIMULATED_GPUS="1"
                )
                system.start("scheduler", "gpu-monitor", "gateway")
                try:
                    wait_for(lambda base=system.base: has_node(base), 60, "the gateway and the node")
                    print(f"POST /jobs, WAIT {wait}: {anyio.run(posts, system.base, body, args.posts, args.clients)}")
                finally:
                    system.stop()
        finally:
            replica.terminate()
            replica.wait()
            master.stop()


if __name__ == "__main__":
    main()
