"""The leader lease: one scheduler decides at a time, and every decision carries its fencing token.

The lease is a key holding the instance's name with an expiry; taking it and drawing the next
fencing token happen in one script, so a winner paused between the two cannot come back with a
token below a newer leader's. The leader renews it every third of a lease and stops leading (the
task group it runs in is cancelled) the moment a renewal finds it gone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import redis.asyncio as aioredis
import structlog

from events.keys import Keys
from services.config import Settings
from services.errors import LostLeadership

log = structlog.get_logger("scheduler")

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

# Take the lease (or find it ours still, from before Redis dropped the connection) and the next
# fencing token in one step. Returns {token, 0}, or {0, ms the holder's lease has left}.
_ACQUIRE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif holder then
  return {0, redis.call('PTTL', KEYS[1])}
elseif not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0, 0}
end
return {redis.call('INCR', KEYS[2]), 0}
"""


@dataclass(frozen=True)
class Lease:
    token: int | None  # the next fencing token, if this instance holds the lease now
    left_ms: int  # otherwise: how long the holder's lease has left


async def take_lease(
    redis: aioredis.Redis, keys: Keys, instance: str, lease_ms: int, *, replicas: int = 0, timeout_ms: int = 0
) -> Lease:
    """The lease (taken, or still this instance's own) with the next fencing token, or how long
    the instance holding it has left. With ``replicas``, a token counts only once that many
    replicas hold it: a failover to one of them cannot hand the same token to a second leader
    (nor can a master cut off from its replicas hand out one of its own)."""
    if not replicas:
        token, left_ms = await redis.eval(_ACQUIRE_LUA, 2, keys.leader, keys.fence, instance, lease_ms)
        return Lease(int(token) or None, int(left_ms))
    async with redis.pipeline(transaction=False) as pipe:  # WAIT: on the script's connection
        pipe.eval(_ACQUIRE_LUA, 2, keys.leader, keys.fence, instance, lease_ms)
        pipe.wait(replicas, timeout_ms)
        (token, left_ms), confirmed = await pipe.execute()
    if int(token) and confirmed < replicas:
        log.warning("the lease is not on enough replicas; not leading yet", replicas=replicas, confirmed=confirmed)
        return Lease(None, lease_ms)  # looked at again a third of a lease from now
    return Lease(int(token) or None, int(left_ms))


async def keep_lease(redis: aioredis.Redis, settings: Settings, renewed: Callable[[], Awaitable[None]]) -> None:
    """Renew the lease every third of a lease, calling ``renewed`` after each renewal; raises
    LostLeadership once it has expired or another instance holds it."""
    renew = redis.register_script(_RENEW_LUA)
    while True:
        await anyio.sleep(settings.leader_lease_ms / 3000)
        if not await renew(keys=[settings.keys.leader], args=[settings.instance, settings.leader_lease_ms]):
            raise LostLeadership
        await renewed()


async def release_lease(redis: aioredis.Redis, keys: Keys, instance: str) -> None:
    """Give the lease up now (if still this instance's), so that a standby need not wait it out."""
    await redis.eval(_RELEASE_LUA, 1, keys.leader, instance)
