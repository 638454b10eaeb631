"""Webhooks, as OpenAI sends them: batch.completed|failed|expired|cancelled events,
signed the Standard Webhooks way, so `openai.OpenAI().webhooks.unwrap(body, headers,
secret=...)` verifies them unchanged.

    body     {"object": "event", "id": "evt_...", "type": "batch.completed",
              "created_at": 1700000000, "data": {"id": "batch_..."}}
    headers  webhook-id: <event id>, webhook-timestamp: <unix seconds, at sending>,
             webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>
    secret   whsec_<base64 key>; the key is the base64-decoded part after whsec_

Endpoints are per project, kept in a JSON file (single node: <data_dir>/webhooks.json,
written by `vbatch webhooks add`; cluster: the same file from a Secret). Only http(s)
URLs whose host resolves to public addresses are accepted (loopback, private,
link-local and other special ranges are refused unless allow_private), checked when
added and again before every delivery.

`WebhookEvents.on_saved` is the BatchEvents listener: a batch that just ended puts
one delivery per endpoint of its project into a durable outbox (core.webhook_outbox);
the deliverer sends them with retries. The driver never waits on a receiver.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from vbatch.core.metrics import just_ended
from vbatch.core.schemas import BatchRecord, BatchStatus

log = logging.getLogger("vbatch.webhooks")

EVENT_TYPES = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.FAILED: "batch.failed",
    BatchStatus.EXPIRED: "batch.expired",
    BatchStatus.CANCELLED: "batch.cancelled",
}


class WebhookURLRefused(ValueError):
    """The URL is not one vbatch will send to (scheme, host, or address)."""


# --- signing ---------------------------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    if not secret.startswith("whsec_"):
        raise ValueError("webhook secrets start with 'whsec_'")
    return base64.b64decode(secret[len("whsec_") :])


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()


def signed_headers(secret: str, msg_id: str, body: bytes, *, now: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if now is None else now
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


def event_for(record: BatchRecord, *, now: int) -> dict:
    """The event of a batch that ended. The id is derived from the batch and its
    status, so the same ending always makes the same event (receivers dedupe on it)."""
    digest = hashlib.sha256(f"{record.id}:{record.status.value}".encode()).hexdigest()[:32]
    return {
        "object": "event",
        "id": f"evt_{digest}",
        "type": EVENT_TYPES[record.status],
        "created_at": now,
        "data": {"id": record.id},
    }


def event_body(event: dict) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


# --- where events may go ---------------------------------------------------------------


def _refused_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def check_url(url: str, *, allow_private: bool) -> None:
    """Raise WebhookURLRefused unless url is http(s) to a host whose every resolved
    address is public (any address when allow_private)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookURLRefused(f"webhook URLs must be http or https, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise WebhookURLRefused("webhook URL has no host")
    if parts.username or parts.password:
        raise WebhookURLRefused("webhook URLs must not carry credentials")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookURLRefused(f"webhook host {parts.hostname!r} does not resolve: {exc}") from None
    for *_, sockaddr in infos:
        if _refused_address(sockaddr[0]):
            raise WebhookURLRefused(
                f"webhook host {parts.hostname!r} resolves to {sockaddr[0]}, a loopback/private/link-local "
                "address (set VBATCH_WEBHOOK_ALLOW_PRIVATE=true to allow)"
            )


# --- endpoints -------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    id: str
    project: str
    url: str
    secret: str
    created_at: int


class EndpointStore:
    """Endpoints in one JSON file: {"endpoints": [{id, project, url, secret, created_at}]}.
    Re-read when the file changes (a Secret update reaches a running operator)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._endpoints: list[Endpoint] = []

    def _read(self) -> list[Endpoint]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                raw = json.loads(self.path.read_text(encoding="utf-8") or "{}")
                self._endpoints = [Endpoint(**e) for e in raw.get("endpoints", [])]
                self._stamp = stamp
            return list(self._endpoints)

    def for_project(self, project: str) -> list[Endpoint]:
        return [e for e in self._read() if e.project == project]

    def all(self) -> list[Endpoint]:
        return self._read()

    def add(self, project: str, url: str, *, allow_private: bool) -> Endpoint:
        check_url(url, allow_private=allow_private)
        endpoint = Endpoint(id=f"we_{secrets.token_hex(12)}", project=project, url=url, secret=new_secret(),
                            created_at=int(time.time()))
        self._write([*self._read(), endpoint])
        return endpoint

    def remove(self, endpoint_id: str) -> bool:
        current = self._read()
        kept = [e for e in current if e.id != endpoint_id]
        self._write(kept)
        return len(kept) != len(current)

    def _write(self, endpoints: list[Endpoint]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # secrets: owner only
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"endpoints": [asdict(e) for e in endpoints]}, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)


# --- the listener ----------------------------------------------------------------------


class WebhookEvents:
    """Turns batches that ended into outbox deliveries (quick: one durable write each)."""

    def __init__(self, endpoints: EndpointStore, outbox) -> None:
        self.endpoints = endpoints
        self.outbox = outbox

    def on_saved(self, before: BatchRecord | None, after: BatchRecord) -> None:
        if not just_ended(before, after) or after.status not in EVENT_TYPES:
            return
        targets = self.endpoints.for_project(after.project)
        if not targets:
            return
        event = event_for(after, now=int(time.time()))
        for endpoint in targets:
            self.outbox.put(event, endpoint.id)
