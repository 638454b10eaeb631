"""The webhook outbox and its deliverer: at-least-once delivery that survives restarts.

A delivery is one event for one endpoint. It is written durably when the batch
ends (SQLite in single node, an object in object storage in a cluster) and removed
only when the receiver answered 2xx, or when it has been retried for
`webhook_retry_seconds` (backoff doubling from `webhook_backoff_seconds` up to an
hour). A deliverer restarted at any point sends what is still in the outbox, so a
receiver may see an event twice (same `webhook-id`), never zero times.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from vbatch.core.storage.base import ObjectNotFound, ObjectStore
from vbatch.core.webhooks import EndpointStore, WebhookURLRefused, check_url, event_body, signed_headers

log = logging.getLogger("vbatch.webhooks")

MAX_BACKOFF_SECONDS = 3600.0
OUTBOX_PREFIX = "webhooks/outbox/"


@dataclass
class Delivery:
    id: str  # <event id>.<endpoint id>
    event: dict
    endpoint_id: str
    attempts: int = 0
    next_at: float = 0.0
    first_at: float = 0.0


class Outbox(Protocol):
    def put(self, event: dict, endpoint_id: str) -> None:
        """Durably add (idempotent: the same event for the same endpoint is one delivery)."""
        ...

    def due(self, now: float, limit: int) -> list[Delivery]: ...

    def update(self, delivery: Delivery, previous_next_at: float) -> None:
        """Store a new attempt count and next_at (previous_next_at: what it was)."""
        ...

    def remove(self, delivery: Delivery) -> None: ...


def _delivery_id(event: dict, endpoint_id: str) -> str:
    return f"{event['id']}.{endpoint_id}"


class SqliteOutbox:
    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS deliveries (id TEXT PRIMARY KEY, event TEXT NOT NULL, endpoint_id TEXT NOT NULL,"
            " attempts INTEGER NOT NULL, next_at REAL NOT NULL, first_at REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_at)")
        self._lock = threading.Lock()

    def put(self, event: dict, endpoint_id: str) -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, 0, ?, ?)",
                (_delivery_id(event, endpoint_id), json.dumps(event), endpoint_id, now, now),
            )

    def due(self, now: float, limit: int) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, event, endpoint_id, attempts, next_at, first_at FROM deliveries"
                " WHERE next_at <= ? ORDER BY next_at LIMIT ?", (now, limit)
            ).fetchall()
        return [Delivery(r[0], json.loads(r[1]), r[2], r[3], r[4], r[5]) for r in rows]

    def update(self, delivery: Delivery, previous_next_at: float) -> None:
        with self._lock:
            self._db.execute("UPDATE deliveries SET attempts = ?, next_at = ? WHERE id = ?",
                             (delivery.attempts, delivery.next_at, delivery.id))

    def remove(self, delivery: Delivery) -> None:
        with self._lock:
            self._db.execute("DELETE FROM deliveries WHERE id = ?", (delivery.id,))

    def pending(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM deliveries").fetchone()[0]


class ObjectStoreOutbox:
    """One object per delivery under webhooks/outbox/ (cluster mode: survives any pod).
    Keys start with the time of the next attempt, so finding what is due lists only
    that: `<next_at ms>.<event id>.<endpoint id>.json`."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @staticmethod
    def _key(delivery: Delivery) -> str:
        return f"{OUTBOX_PREFIX}{int(delivery.next_at * 1000):015d}.{delivery.id}.json"

    def _write(self, delivery: Delivery) -> None:
        self.store.put_bytes(self._key(delivery), json.dumps(delivery.__dict__).encode())

    def put(self, event: dict, endpoint_id: str) -> None:
        now = time.time()
        self._write(Delivery(_delivery_id(event, endpoint_id), event, endpoint_id, 0, now, now))

    def due(self, now: float, limit: int) -> list[Delivery]:
        found: list[Delivery] = []
        for key in self.store.list_page(OUTBOX_PREFIX, limit=limit):
            if int(key[len(OUTBOX_PREFIX):].split(".", 1)[0]) > now * 1000:
                break  # in time order: the rest waits too
            try:
                found.append(Delivery(**json.loads(self.store.get_bytes(key))))
            except ObjectNotFound:
                continue  # delivered meanwhile
            except (ValueError, TypeError):
                log.error("unreadable webhook delivery %s removed", key)
                self.store.delete(key)
        return found

    def update(self, delivery: Delivery, previous_next_at: float) -> None:
        old = self._key(Delivery(delivery.id, {}, "", next_at=previous_next_at))
        self._write(delivery)  # first the new attempt time, then the old one goes
        if old != self._key(delivery):
            self.store.delete(old)

    def remove(self, delivery: Delivery) -> None:
        self.store.delete(self._key(delivery))


class Deliverer:
    """Sends due deliveries on a daemon thread; never raises into anyone."""

    def __init__(
        self, outbox: Outbox, endpoints: EndpointStore, *, allow_private: bool, retry_seconds: float,
        backoff_seconds: float, timeout_seconds: float, poll_seconds: float,
    ) -> None:
        self.outbox = outbox
        self.endpoints = endpoints
        self.allow_private = allow_private
        self.retry_seconds = retry_seconds
        self.backoff_seconds = backoff_seconds
        self.poll_seconds = poll_seconds
        self._client = httpx.Client(timeout=timeout_seconds, follow_redirects=False)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vbatch-webhooks", daemon=True)

    @classmethod
    def from_settings(cls, outbox: Outbox, endpoints: EndpointStore, settings) -> Deliverer:
        return cls(outbox, endpoints, allow_private=settings.webhook_allow_private,
                   retry_seconds=settings.webhook_retry_seconds, backoff_seconds=settings.webhook_backoff_seconds,
                   timeout_seconds=settings.webhook_timeout_seconds, poll_seconds=settings.webhook_poll_seconds)

    def start(self) -> Deliverer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._client.close()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:
                log.exception("webhook delivery round failed; retrying")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def deliver_due(self, limit: int = 50) -> int:
        """One round: try every due delivery once. Returns how many were delivered."""
        delivered = 0
        for delivery in self.outbox.due(time.time(), limit):
            if self._stop.is_set():
                break
            delivered += self._attempt(delivery)
        return delivered

    def _attempt(self, delivery: Delivery) -> bool:
        endpoint = next((e for e in self.endpoints.all() if e.id == delivery.endpoint_id), None)
        if endpoint is None:
            log.info("webhook %s: endpoint %s was removed; dropped", delivery.event["id"], delivery.endpoint_id)
            self.outbox.remove(delivery)
            return False
        problem: str
        try:
            check_url(endpoint.url, allow_private=self.allow_private)  # again: DNS may have changed
            body = event_body(delivery.event)
            response = self._client.post(endpoint.url, content=body,
                                         headers=signed_headers(endpoint.secret, delivery.event["id"], body))
            if 200 <= response.status_code < 300:
                self.outbox.remove(delivery)
                log.info("webhook %s delivered to %s", delivery.event["id"], endpoint.url)
                return True
            problem = f"HTTP {response.status_code}"
        except WebhookURLRefused as exc:
            problem = str(exc)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        self._retry_later(delivery, endpoint.url, problem)
        return False

    def _retry_later(self, delivery: Delivery, url: str, problem: str) -> None:
        now = time.time()
        previous = delivery.next_at
        delivery.attempts += 1
        if now - delivery.first_at >= self.retry_seconds:
            log.error("webhook %s to %s: giving up after %d attempts (%s)", delivery.event["id"], url,
                      delivery.attempts, problem)
            self.outbox.remove(delivery)
            return
        delay = min(self.backoff_seconds * 2 ** (delivery.attempts - 1), MAX_BACKOFF_SECONDS)
        delivery.next_at = now + delay * random.uniform(0.8, 1.2)  # spread retries of many events
        log.warning("webhook %s to %s failed (%s); attempt %d again in %.0f s", delivery.event["id"], url,
                    problem, delivery.attempts + 1, delivery.next_at - now)
        self.outbox.update(delivery, previous)
