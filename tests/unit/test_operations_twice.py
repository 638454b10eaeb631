"""Two operator replicas (kopf peering) both run the expiry sweeper and the webhook
deliverer over the same object storage: both must be safe to run twice at once —
no delivery forked into copies or lost, no expired file left or live file removed."""

from __future__ import annotations

import threading
import time

import httpx
from vbatch.core import expiry
from vbatch.core.files import FileService
from vbatch.core.schemas import FilePurpose
from vbatch.core.storage.local import LocalObjectStore
from vbatch.core.webhook_outbox import OUTBOX_PREFIX, Deliverer, ObjectStoreOutbox
from vbatch.core.webhooks import EndpointStore

EVENT = {"object": "event", "id": "evt_1", "type": "batch.completed", "created_at": 1, "data": {"id": "batch_1"}}


class Receiver:
    """Answers `status`; with `together`, each send waits until the other replica's send
    of the same round arrived, so both listed the delivery before either wrote back."""

    def __init__(self) -> None:
        self.status = 500
        self.ids: list[str] = []
        self.together = threading.Barrier(2, timeout=10)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.ids.append(request.headers["webhook-id"])
        self.together.wait()
        return httpx.Response(self.status)


def replicas(tmp_path, receiver: Receiver) -> tuple[ObjectStoreOutbox, list[Deliverer]]:
    store = LocalObjectStore(tmp_path / "objects")
    endpoints = EndpointStore(tmp_path / "webhooks.json")
    endpoint = endpoints.add("p", "http://127.0.0.1:9/hook", allow_private=True)
    outbox = ObjectStoreOutbox(store)
    outbox.put(EVENT, endpoint.id)
    deliverers = []
    for _ in range(2):  # each replica its own outbox view and client over the same storage
        deliverer = Deliverer(ObjectStoreOutbox(store), endpoints, allow_private=True, retry_seconds=3600,
                              backoff_seconds=0.05, timeout_seconds=5, poll_seconds=60)
        deliverer._client = httpx.Client(transport=httpx.MockTransport(receiver))
        deliverers.append(deliverer)
    return outbox, deliverers


def run_round(deliverers: list[Deliverer]) -> None:
    threads = [threading.Thread(target=d.deliver_due) for d in deliverers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)


def entries(outbox: ObjectStoreOutbox) -> list[str]:
    return list(outbox.store.list(OUTBOX_PREFIX))


def test_two_deliverers_failing_the_same_attempt_keep_one_delivery(tmp_path):
    receiver = Receiver()
    outbox, deliverers = replicas(tmp_path, receiver)
    for attempt in range(1, 4):
        run_round(deliverers)
        assert len(receiver.ids) == 2 * attempt  # both replicas sent this attempt
        pending = outbox.due(time.time() + 3600, 10)
        assert len(entries(outbox)) == 1, entries(outbox)  # never forked into two retry schedules
        assert [d.attempts for d in pending] == [attempt]  # nor counted twice
        time.sleep(max(0.0, pending[0].next_at - time.time()) + 0.01)
    receiver.status = 200
    run_round(deliverers)
    assert entries(outbox) == []  # delivered: nothing left to send again
    assert set(receiver.ids) == {"evt_1"}  # every send is the same event (receivers dedupe on it)


def test_the_retry_schedule_depends_only_on_the_delivery(tmp_path):
    receiver = Receiver()
    outbox, (first, second) = replicas(tmp_path, receiver)
    (delivery,) = outbox.due(time.time(), 10)
    delivery.attempts = 3
    assert first.retry_at(delivery) == second.retry_at(delivery)
    later = [first.retry_at(type(delivery)(**{**delivery.__dict__, "attempts": n})) for n in range(1, 8)]
    assert later == sorted(later) and later[0] > delivery.first_at  # backoff: each attempt later than the last
    gaps = [b - a for a, b in zip(later, later[1:])]
    assert gaps[-1] > gaps[0] * 4  # and it grows (doubling, jittered)


def test_two_sweepers_at_once_remove_every_expired_file_once(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    files = FileService(store, upload_retention_seconds=3600)
    expiring = [files.create("p", iter([b"x\n"]), filename=f"{i}.jsonl", purpose=FilePurpose.BATCH,
                             expires_after_seconds=3600).id for i in range(30)]
    kept = files.create("p", iter([b"y\n"]), filename="kept.jsonl", purpose=FilePurpose.BATCH,
                        expires_after_seconds=30 * 24 * 3600).id
    later = time.time() + 7200
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            expiry.sweep(files, now=later)
        except BaseException as exc:  # surfaced below: a thread cannot raise into pytest
            errors.append(exc)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    left = list(store.list(""))
    assert [k for k in left if any(f in k for f in expiring)] == []  # bytes, File objects, index entries
    assert files.get("p", kept).id == kept
    assert expiry.sweep(files, now=later) == 0  # nothing left behind for a later sweep
