"""Processes run for jobs, by process group: found again by their environment tag, signalled,
waited for without polling (pidfds), stopped with a grace period. Shared by the runner and the
exporter."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess

import anyio
import psutil

from services.launch import TAG_VARIABLE

_REAP_WAIT_S = 0.05  # no notification tells when another process reaps its child


def find_running(tag: str) -> psutil.Process | None:
    """The session leader of an attempt's processes, should one still run (a start whose
    record never reached Redis before the runner died)."""
    for process in psutil.process_iter():
        try:
            if process.environ().get(TAG_VARIABLE) == tag and os.getpgid(process.pid) == process.pid:
                return process
        except (psutil.Error, ProcessLookupError):
            continue
    return None


def process_tree(pid: int) -> set[int]:
    """A process and all its descendants (torchrun's workers, dataloader workers)."""
    try:
        root = psutil.Process(pid)
        return {pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.Error:
        return set()


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def group_members(pgid: int) -> list[tuple[int, bool]]:
    """The processes of a process group, each with whether it has exited (a zombie not yet
    reaped by its parent, which still counts as a member)."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid:
                members.append((process.pid, process.info["status"] == psutil.STATUS_ZOMBIE))
        except (psutil.Error, ProcessLookupError):
            continue
    return sorted(members, key=lambda member: member[1])  # running ones first


async def wait_group_exit(pgid: int, timeout_s: float) -> bool:
    """Wait until no process of the group is left: a running one wakes us through a pidfd when it
    exits; an exited one only has to be reaped by its parent, which takes a moment."""
    with anyio.move_on_after(timeout_s):
        while members := await anyio.to_thread.run_sync(group_members, pgid):
            pid, exited = members[0]
            if exited:
                await anyio.sleep(_REAP_WAIT_S)
            else:
                await wait_exit(pid, None)
        return True
    return False


async def wait_exit(pid: int, process: subprocess.Popen[bytes] | None) -> int | None:
    """Wait for a process to exit without polling (a pidfd becomes readable); its exit code when
    it is our child. An adopted process is not: its status went to whoever reaped it."""
    if process is not None and process.poll() is not None:
        return process.returncode  # reaped already, before the service's main started again
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return process.wait() if process else None
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)
    return process.wait() if process else None


async def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM a process group, SIGKILL it after the grace period, and wait until none of its
    processes is left."""
    signal_group(pgid, signal.SIGTERM)
    signal_group(pgid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
    if not await wait_group_exit(pgid, grace_s):
        signal_group(pgid, signal.SIGKILL)
        await wait_group_exit(pgid, math.inf)
