"""The notifier process: reads the log in its own consumer group and delivers webhooks, the
cluster's (``WEBHOOK_URLS``) and each job's own (``notify``), on a job's end, its export and a
deploy serving; each delivery is recorded in the log (``notification.delivered`` /
``notification.failed``, with the status code) in the same commit that acknowledges the event.

A notifier that dies after a POST and before that commit gets the event again and POSTs it again,
with the same event id: receivers drop duplicates by ``X-Swift-Trainer-Event-Id``. An event's
deliveries go out concurrently; a slow or unreachable receiver delays the notifier's next events
by at most its attempts' timeouts and back-off, and nothing but the notifier waits on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import anyio
import httpx
import redis.asyncio as aioredis
import structlog

from events import messages as m
from events import snapshot
from events.bus import Append, Bus, Entry, connect, entry_id_key
from events.codec import entry_type
from events.consumer import Delivery, GroupConsumer, ensure_group
from events.errors import IllegalTransition
from events.keys import NOTIFIER_GROUP
from events.log import catch_up
from events.params import NOTIFY_EVENTS
from events.state import State
from services.config import Settings
from services.webhooks import Outcome, Target, deliver, encode, parse_targets, refused, shown

log = structlog.get_logger("notifier")

NOTIFIED = frozenset(NOTIFY_EVENTS)
PASSED_OVER = frozenset({"job.progress", "job.checkpoint_saved"})  # most of the log: acknowledged unread


class _Notified(TypedDict):
    """What a delivery's fact says of the notified event and the webhook, either way it went."""

    id: str
    job_id: str | None
    causation_id: str
    event_id: str
    event_type: str
    url: str
    attempts: int


class Notifier:
    def __init__(self, settings: Settings, bus: Bus, client: httpx.AsyncClient) -> None:
        self.settings, self.bus, self.client = settings, bus, client
        self.state = State()  # for each job's own webhook, and its name and status in the body
        self.secret = settings.resolved_webhook_secret
        self.gateway = (settings.app_host, settings.app_port)
        self.targets = []
        for target in parse_targets(settings.webhook_urls):
            why = self.refused(target.url)
            if why is None:
                self.targets.append(target)
            else:
                log.error("WEBHOOK_URLS: a URL is left out", url=shown(target.url), reason=why)

    def refused(self, url: str) -> str | None:
        return refused(url, allow_loopback=self.settings.allow_loopback_webhooks, gateway=self.gateway)

    async def start(self) -> None:
        """Fold the log up to where the group will read from (it reads only what comes after it
        was first made: history is not notified)."""
        await ensure_group(self.bus.redis, self.bus.keys.events, NOTIFIER_GROUP, "$")
        groups = await self.bus.redis.xinfo_groups(self.bus.keys.events)
        position = next(g["last-delivered-id"] for g in groups if g["name"] == NOTIFIER_GROUP)
        self.state = await snapshot.load(self.bus)  # (one further along: what it covers is not folded twice)
        await catch_up(self.bus, self.state, until=str(position))

    async def handle(self, delivery: Delivery) -> Sequence[Append] | None:
        event = delivery.message
        if entry_id_key(delivery.entry_id) > entry_id_key(self.state.position):
            try:
                self.state.apply(delivery.entry_id, event)
            except IllegalTransition as exc:
                log.warning("log entry skipped", entry_id=delivery.entry_id, reason=str(exc))
                self.state.position = delivery.entry_id
        if event.type not in NOTIFIED:
            return None
        job = self.state.jobs.get(event.job_id or "")
        targets = list(self.targets)
        own = job.spec.notify if job is not None else None
        if own is not None and event.type in own.events:
            targets.append(Target(own.url, slack=own.format == "slack"))
        if not targets:
            return None
        outcomes: list[Outcome | None] = [None] * len(targets)

        async def one(index: int, target: Target) -> None:
            why = self.refused(target.url)  # again now: a name may resolve elsewhere than at submit
            if why is not None:
                outcomes[index] = Outcome(False, None, 0, f"refused: {why}")
                return
            body = encode(target, event, job)
            outcomes[index] = await deliver(
                self.client,
                target,
                event,
                body,
                self.secret,
                attempts=self.settings.webhook_attempts,
                backoff_s=self.settings.webhook_backoff_s,
            )

        async with anyio.create_task_group() as tg:
            for index, target in enumerate(targets):
                tg.start_soon(one, index, target)
        facts: list[Append] = []
        for index, (target, outcome) in enumerate(zip(targets, outcomes, strict=True)):
            assert outcome is not None
            common: _Notified = {
                "id": f"{event.id}-notified-{index}",
                "job_id": event.job_id,
                "causation_id": event.id,
                "event_id": event.id,
                "event_type": event.type,
                "url": shown(target.url),
                "attempts": outcome.attempts,
            }
            if outcome.delivered:
                fact: m.Message = m.NotificationDelivered(status_code=outcome.status_code or 0, **common)
            else:
                fact = m.NotificationFailed(status_code=outcome.status_code, error=outcome.error, **common)
                log.warning("notification not delivered", url=common["url"], notified=event.type, error=outcome.error)
            facts.append(Append(self.bus.keys.events, fact))
        return facts


def passed_over(entry: Entry) -> bool:
    return entry_type(entry.fields) in PASSED_OVER


async def main(settings: Settings, bus: Bus, redis: aioredis.Redis) -> None:
    reader = connect(settings.resolved_redis_url, block_ms=5000)
    timeout = httpx.Timeout(settings.webhook_timeout_s)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        notifier = Notifier(settings, bus, client)
        try:
            await notifier.start()
            consumer = GroupConsumer(
                bus,
                reader,
                [bus.keys.events],
                NOTIFIER_GROUP,
                f"notifier-{settings.node_name}",  # stable: a restart re-reads its own pending
                notifier.handle,
                block_ms=5000,
                claim_idle_ms=max(settings.claim_idle_ms, 120_000),  # deliveries retry for a while
                max_deliveries=settings.max_deliveries,
                group_start="$",
                skip=passed_over,
                count=20,
            )
            await consumer.run()
        finally:
            with anyio.CancelScope(shield=True):
                await reader.aclose()
