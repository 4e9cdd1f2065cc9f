"""Notifications, end to end: a webhook receiver on loopback gets every notification of a job that
trains, exports and ends, signed, once per event id although the notifier is killed in the middle
of a delivery and restarted; an unreachable receiver is retried, recorded as failed, and holds up
nothing else; bad webhook URLs are refused at submit."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from services.demo.tinymodel import DemoAssets
from tests.conftest import RedisServer, free_port, wait_for
from tests.system import TRAINING_TIMEOUT_S, System, job_body, running

pytestmark = pytest.mark.e2e
SECRET = "webhook-secret-0123456789"


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every request; the first to /hang waits until released."""

    port: int = field(default_factory=free_port)
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    hanging: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self) -> ThreadingHTTPServer:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if self.path == "/hang" and not receiver.hanging.is_set():
                    receiver.hanging.set()
                    receiver.release.wait(60)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def received(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    server = receiver.serve()
    yield receiver
    receiver.release.set()
    server.shutdown()


@pytest.fixture(scope="module")
def system(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[System]:
    settings = {
        "WEBHOOK_URLS": f"{receiver.url('/cluster')},slack:{receiver.url('/slack')},http://127.0.0.1:9/closed",
        "WEBHOOK_SECRET": SECRET,
        "ALLOW_LOOPBACK_WEBHOOKS": "true",
        "WEBHOOK_ATTEMPTS": "3",
        "WEBHOOK_BACKOFF_S": "0.05",
    }
    with running(redis_server.url, tmp_path_factory.mktemp("notifier"), **settings) as system:
        yield system


def notifications(system: System, job_id: str) -> list[dict[str, Any]]:
    events = httpx.get(f"{system.base}/jobs/{job_id}/events").json()["events"]
    return [e for e in events if e["type"].startswith("notification.")]


def test_every_notification_arrives_signed_once_per_event_id_across_a_notifier_killed_mid_delivery(
    system: System, assets: DemoAssets, receiver: Receiver
) -> None:
    # Given a LoRA job with a webhook of its own (which hangs on its first delivery)
    notify = {"url": receiver.url("/hang"), "events": ["job.succeeded", "export.completed"]}
    body = {**job_body(assets, max_steps=4, save_steps=4), "notify": notify}
    job_id = httpx.post(f"{system.base}/jobs", json=body).json()["job_id"]
    # When the notifier is killed while the job's own receiver holds its first delivery
    assert receiver.hanging.wait(TRAINING_TIMEOUT_S), "no delivery reached the job's webhook"
    system.stop("notifier", sig=signal.SIGKILL)
    receiver.release.set()
    system.start("notifier")

    # Then, once the export is done, every receiver has every event it asked for
    def complete() -> bool:
        kinds = {(n["type"], n["payload"]["url"], n["payload"]["event_type"]) for n in notifications(system, job_id)}
        return len(kinds) == 2 * 3 + 2  # cluster, slack, closed: 2 events each; the job's own: 2

    wait_for(complete, TRAINING_TIMEOUT_S, "every notification to be recorded", interval_s=0.3)
    expected = {"job.succeeded", "export.completed"}
    for path in ("/cluster", "/slack", "/hang"):
        got = receiver.received(path)
        by_id: dict[str, set[str]] = {}
        for request in got:
            by_id.setdefault(request["headers"]["X-Swift-Trainer-Event-Id"], set()).add(
                request["headers"]["X-Swift-Trainer-Event"]
            )
        # once per event id (a redelivery repeats the id, for the receiver to drop it)
        assert sorted(t for types in by_id.values() for t in types) == sorted(expected), (path, by_id)
        for request in got:
            signature = "sha256=" + hmac.new(SECRET.encode(), request["body"], hashlib.sha256).hexdigest()
            assert hmac.compare_digest(request["headers"]["X-Swift-Trainer-Signature"], signature)
    assert len(receiver.received("/hang")) >= 3  # the held delivery was made again after the restart
    # And the bodies: the event with the job for JSON receivers, one line of text for Slack's
    cluster = [json.loads(r["body"]) for r in receiver.received("/cluster")]
    done = next(b for b in cluster if b["type"] == "job.succeeded")
    assert done["job_id"] == job_id and done["job"]["status"] in ("completed",) and done["event_id"]
    slack = [json.loads(r["body"]) for r in receiver.received("/slack")]
    assert set(slack[0]) == {"text"} and slack[0]["text"].startswith("Swift Trainer: job ")
    # And the log records each delivery once: delivered with its status code, or failed after its
    # attempts for the receiver nobody answers at
    recorded = notifications(system, job_id)
    delivered = [n for n in recorded if n["type"] == "notification.delivered"]
    failed = [n for n in recorded if n["type"] == "notification.failed"]
    assert len(delivered) == 6 and all(n["payload"]["status_code"] == 200 for n in delivered)
    assert len(failed) == 2 and all(n["payload"]["url"] == "http://127.0.0.1:9/closed" for n in failed)
    assert all(n["payload"]["attempts"] == 3 and n["payload"]["status_code"] is None for n in failed)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.org/hook", "http(s)"),
        ("file:///etc/passwd", "http(s)"),
        ("http:///nohost", "http(s)"),
    ],
)
def test_a_webhook_that_is_not_http_is_refused_at_submit(
    system: System, assets: DemoAssets, url: str, why: str
) -> None:
    answer = httpx.post(f"{system.base}/jobs", json={**job_body(assets), "notify": {"url": url}})
    assert answer.status_code == 422 and why in answer.text
    assert answer.json()["error"]["details"][0]["field"] == "notify.url"


def test_the_gateway_itself_is_refused_as_a_webhook(system: System, assets: DemoAssets) -> None:
    own = f"http://127.0.0.1:{system.port}/api/v1/training/jobs"
    answer = httpx.post(f"{system.base}/jobs", json={**job_body(assets), "notify": {"url": own}})
    assert answer.status_code == 422 and "the gateway itself" in answer.text
