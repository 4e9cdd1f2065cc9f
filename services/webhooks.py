"""Webhooks: which URLs may be called, the body of a notification, its signature, and its delivery
with retries and back-off.

A delivery is a POST of JSON with ``X-Swift-Trainer-Event-Id`` (the notified event's id: the same
on every retry and redelivery, for receivers to drop duplicates), ``X-Swift-Trainer-Event`` (its
type) and ``X-Swift-Trainer-Signature: sha256=<hex>``, the HMAC-SHA256 of the body with
``WEBHOOK_SECRET``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt, wait_exponential

from events import messages as m
from events.records import Job

EVENT_ID_HEADER = "X-Swift-Trainer-Event-Id"
EVENT_TYPE_HEADER = "X-Swift-Trainer-Event"
SIGNATURE_HEADER = "X-Swift-Trainer-Signature"


@dataclass(frozen=True)
class Target:
    url: str
    slack: bool = False  # {"text": …}, as Slack's incoming webhooks take it


def parse_targets(text: str) -> list[Target]:
    """``WEBHOOK_URLS``: comma- or newline-separated URLs, each ``slack:`` prefixed for a Slack body."""
    targets = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if item:
            slack = item.startswith("slack:")
            targets.append(Target(item.removeprefix("slack:"), slack))
    return targets


def refused(url: str, *, allow_loopback: bool, gateway: tuple[str, int] | None = None) -> str | None:
    """Why a URL may not be called, or None. Only http(s) with a host; never a link-local,
    multicast or reserved address (cloud metadata services live there); not a loopback address
    (nor a name that resolves to one) unless ``allow_loopback``; never the gateway itself."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http(s) URL with a host"
    host = parts.hostname
    try:
        # (TCP's families are IPv4's and IPv6's: an address is the text of an IP address)
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        addresses = set()  # not resolvable now: delivery will fail and be recorded, not blocked here
    ips = [ipaddress.ip_address(a.split("%")[0]) for a in addresses]
    if any(
        ip.is_link_local or ip.is_multicast or ip.is_unspecified or (ip.is_reserved and not ip.is_loopback)
        for ip in ips
    ):
        # (169.254.169.254 is where clouds answer with a machine's credentials)
        return "a link-local, multicast or reserved address"
    loopback = host == "localhost" or any(ip.is_loopback for ip in ips)
    if loopback and not allow_loopback:
        return "a loopback address (ALLOW_LOOPBACK_WEBHOOKS is off)"
    if gateway is not None and port == gateway[1] and (loopback or host == gateway[0] or gateway[0] in addresses):
        return "the gateway itself"
    return None


def shown(url: str) -> str:
    """A URL as the log keeps it: no credentials, no query (tokens live there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def payload(event: m.Message, job: Job | None) -> dict[str, Any]:
    """The JSON a webhook gets: the event as the log has it, and the job in a few fields."""
    body: dict[str, Any] = {
        "event_id": event.id,
        "type": event.type,
        "at": event.at.isoformat(),
        "job_id": event.job_id,
    }
    body["event"] = event.payload()
    if job is not None:
        body["job"] = {
            "job_id": job.job_id,
            "name": job.spec.name,
            "task_type": job.spec.task_type.value,
            "status": job.status.value,
            "submitted_by": job.submitted_by,
            "reason": job.reason,
            "message": job.message,
            "export_path": job.export.path,
            "endpoint": job.endpoint,
            "sweep_id": job.sweep_id,
        }
    return body


def slack_text(event: m.Message, job: Job | None) -> str:
    name = (job.spec.name if job is not None else None) or (event.job_id or "")[:12]
    words = {
        "job.succeeded": "completed",
        "job.failed": "failed",
        "job.cancelled": "was cancelled",
        "export.completed": "was exported",
        "job.serving": "is serving",
    }.get(event.type, event.type)
    detail = ""
    if isinstance(event, m.JobFailed):
        detail = f" ({event.reason}): {event.message}"
    elif isinstance(event, m.ExportCompleted):
        detail = f": {event.path}"
    elif isinstance(event, m.JobServing):
        detail = f" at {event.endpoint}"
    return f"Swift Trainer: job {name} {words}{detail}"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def encode(target: Target, event: m.Message, job: Job | None) -> bytes:
    data = {"text": slack_text(event, job)} if target.slack else payload(event, job)
    return json.dumps(data, separators=(",", ":")).encode()


class Retry(Exception):
    """An answer worth trying again (5xx, 429), or none at all."""

    def __init__(self, status_code: int | None, error: str) -> None:
        super().__init__(error)
        self.status_code = status_code


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    status_code: int | None
    attempts: int
    error: str = ""


async def deliver(
    client: httpx.AsyncClient,
    target: Target,
    event: m.Message,
    body: bytes,
    secret: str,
    *,
    attempts: int,
    backoff_s: float,
) -> Outcome:
    """POST the body; again on a failure to connect, a timeout, 429 or 5xx, with exponential back-off,
    up to ``attempts`` times. Another 4xx is final: the receiver refused it."""
    headers = {
        "Content-Type": "application/json",
        EVENT_ID_HEADER: event.id,
        EVENT_TYPE_HEADER: event.type,
        SIGNATURE_HEADER: sign(secret, body),
        "User-Agent": "swift-trainer-notifier",
    }
    tried = 0
    last: Retry | None = None
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=backoff_s, max=30 * backoff_s),
            retry=retry_if_exception_type(Retry),
            reraise=False,
        ):
            with attempt:
                tried += 1
                try:
                    response = await client.post(target.url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    last = Retry(None, f"{type(exc).__name__}: {exc}"[:300])
                    raise last from None
                if response.status_code == 429 or response.status_code >= 500:
                    last = Retry(response.status_code, f"HTTP {response.status_code}")
                    raise last
                if response.status_code >= 300:
                    return Outcome(False, response.status_code, tried, f"HTTP {response.status_code}")
                return Outcome(True, response.status_code, tried)
    except RetryError:
        pass
    return Outcome(False, last.status_code if last else None, tried, str(last) if last else "not delivered")
