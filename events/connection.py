"""Redis clients, made in one place for every process and tool: to one server, or to whichever
server Redis Sentinel names the master of a set of replicas.

A URL names what to reach. ``redis://`` (``rediss://``, ``unix://``) is one server, as redis-py
reads it. Through Sentinel::

    redis+sentinel://[[user]:password@]host:port[,host:port...]/<master name>[/<db>]
        [?sentinel_password=...&sentinel_username=...]

where the hosts are the sentinels, the user and password are the master's (and its replicas'),
and ``sentinel_password``/``sentinel_username`` are the sentinels' own, when they require one.

A client through Sentinel asks the sentinels for the master's address each time it opens a
connection: after a failover, connections to the old master fail (or it refuses writes, once it
is a replica), the command is retried, and then fails with a ConnectionError until the sentinels
name the promoted replica; new connections go there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast, overload
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import redis
import redis.asyncio as aioredis
import redis.sentinel
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.typing import StreamRangeResponse

SENTINEL_SCHEME = "redis+sentinel"
MAX_CONNECTIONS = 64  # per client: commands beyond wait their turn
BLOCKING_READER_CONNECTIONS = 4
POOL_WAIT_S = 30  # how long a command waits for a free connection
# Through Sentinel the master may be on another host that dies without closing its connections:
# a connect or a reply that takes this long counts as the master gone (blocking readers allow
# their block time on top of it).
CONNECT_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 15.0
SENTINEL_TIMEOUT_S = 2.0  # each sentinel asked for the master's address


@dataclass(frozen=True)
class SentinelTarget:
    """A master as Sentinel knows it: the sentinels to ask, its name, and how to sign in."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def parse_sentinels(listed: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port,...`` (``[v6 address]:port`` too); raises ValueError, saying why."""
    found = []
    for item in (part.strip() for part in listed.split(",")):
        if not item:
            continue
        host, colon, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r} is not host:port")
        found.append((host, int(port)))
    if not found:
        raise ValueError("no sentinel listed")
    return tuple(found)


def sentinel_url(target: SentinelTarget) -> str:
    """The URL of a target (passwords quoted: they may hold '@', '/', ':' or '%')."""
    auth = ""
    if target.password or target.username:
        auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
    hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in target.sentinels)
    query = {
        name: value
        for name, value in (
            ("sentinel_username", target.sentinel_username),
            ("sentinel_password", target.sentinel_password),
        )
        if value
    }
    tail = f"?{urlencode(query)}" if query else ""
    return f"{SENTINEL_SCHEME}://{auth}{hosts}/{quote(target.master, safe='')}/{target.db}{tail}"


def parse_sentinel_url(url: str) -> SentinelTarget | None:
    """The target a ``redis+sentinel://`` URL names; None for any other URL. Raises ValueError
    for a malformed one."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if at else ("", "", "")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("a Sentinel URL's path is /<master name>[/<db>]")
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    unknown = set(query) - {"sentinel_password", "sentinel_username"}
    if unknown:
        raise ValueError(f"unknown Sentinel URL parameters: {', '.join(sorted(unknown))}")
    return SentinelTarget(
        sentinels=parse_sentinels(hosts),
        master=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
    )


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Connections to the master Sentinel names, at most ``max_connections`` of them: a burst of
    commands waits for a free one instead of failing."""


class _SentinelRedis(aioredis.Redis):
    """A client of the master through Sentinel; closing it closes its sentinel clients too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        try:
            await super().aclose(close_connection_pool)
        finally:
            if manager is not None:
                await manager.aclose()


def _sentinel_options(target: SentinelTarget) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
    }
    if target.sentinel_password:
        options["password"] = target.sentinel_password
    if target.sentinel_username:
        options["username"] = target.sentinel_username
    return options


def connect(url: str, *, block_ms: int | None = None) -> aioredis.Redis:
    """A client. A blocking reader gets its own, with a socket timeout above its block time.

    A command that meets a dropped connection (a pooled connection to a Redis that restarted, or
    to a master that failed over) is retried a few times; a longer outage raises, and the
    service restarts its work once Redis is back. A retried append may land twice only if Redis
    ran it and then died before replying; commits are deduplicated, and every reader tolerates a
    repeated progress or heartbeat entry.
    """
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3)
    options: dict[str, Any] = {"decode_responses": True, "retry": retry, "health_check_interval": 30}
    max_connections = BLOCKING_READER_CONNECTIONS if block_ms is not None else MAX_CONNECTIONS
    target = parse_sentinel_url(url)
    if target is None:
        if block_ms is not None:
            options.update(socket_timeout=block_ms / 1000 + 10)
        # A bounded pool that makes a burst of commands wait for a connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=POOL_WAIT_S, **options
        )
        return aioredis.Redis.from_pool(pool)
    options.update(
        db=target.db,
        username=target.username,
        password=target.password,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=REPLY_TIMEOUT_S + (block_ms / 1000 if block_ms is not None else 0),
        socket_keepalive=True,
    )
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=_sentinel_options(target))
    client: aioredis.Redis = sentinel.master_for(
        target.master,
        redis_class=_SentinelRedis,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        **options,
    )
    return client


def connect_sync(url: str) -> redis.Redis:
    """A synchronous client (for a forked child, or a tool with no event loop); bytes replies."""
    target = parse_sentinel_url(url)
    if target is None:
        return redis.Redis.from_url(url)
    sentinel = redis.sentinel.Sentinel(target.sentinels, sentinel_kwargs=_sentinel_options(target))
    client: redis.Redis = sentinel.master_for(
        target.master,
        db=target.db,
        username=target.username,
        password=target.password,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=REPLY_TIMEOUT_S,
    )
    return client


# --- replies of a client made by connect() ---
#
# Such a client decodes every reply (decode_responses=True): its strings are text. redis-py, which
# cannot tell a decoding client from another, annotates them as ``bytes | str``; these say which,
# and return the reply itself.


@overload
def text(reply: bytes | str) -> str: ...
@overload
def text(reply: bytes | str | None) -> str | None: ...
def text(reply: bytes | str | None) -> str | None:
    """A string reply of a decoding client (or None, where Redis has none)."""
    return cast("str | None", reply)


def text_hash(reply: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A hash (HGETALL) as a decoding client returns it: text fields and values."""
    return cast("dict[str, str]", reply)


def text_streams(reply: Any) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """What XREAD or XREADGROUP return to a decoding client: per stream read, its name and its
    entries, all text (an empty list when nothing arrived)."""
    return cast("list[tuple[str, list[tuple[str, dict[str, str]]]]]", reply or [])


def text_entries(reply: StreamRangeResponse | None) -> list[tuple[str, dict[str, str]]]:
    """A range of a stream (XRANGE, XREVRANGE) as a decoding client returns it: a list, empty when
    no entry is in the range, of (id, fields), all text."""
    return cast("list[tuple[str, dict[str, str]]]", reply)
