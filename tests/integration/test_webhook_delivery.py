"""Webhook delivery to a loopback receiver: retried with backoff while it is down,
delivered once it is up, kept across a restart of the deliverer, verified with the
openai SDK's unwrap. Both outboxes (SQLite, object storage)."""

from __future__ import annotations

import json
import time

import openai
import pytest
from s3server import free_port
from vbatch.core import state
from vbatch.core.schemas import BatchStatus
from vbatch.core.webhook_outbox import Deliverer, ObjectStoreOutbox, SqliteOutbox
from vbatch.core.webhooks import EndpointStore, WebhookEvents
from webhook_receiver import WebhookReceiver


def _ended_batch(project: str):
    record = state.new_batch(project=project, input_file_id="file-" + "a" * 24, endpoint="/v1/chat/completions",
                             completion_window="24h", metadata=None, total=1, model="m", window_seconds=60, now=1)
    finalizing = state.transition(record, BatchStatus.FINALIZING, 2)
    return finalizing, state.transition(finalizing, BatchStatus.COMPLETED, 3)


def _deliverer(outbox, endpoints, **kw):
    kw = {"allow_private": True, "retry_seconds": 3600, "backoff_seconds": 0.2, "timeout_seconds": 2,
          "poll_seconds": 0.05} | kw
    return Deliverer(outbox, endpoints, **kw)


@pytest.fixture(params=["sqlite", "object_store"])
def make_outbox(request, tmp_path, local_store):
    if request.param == "sqlite":
        return lambda: SqliteOutbox(tmp_path / "outbox.sqlite3")
    return lambda: ObjectStoreOutbox(local_store)


def _wait(predicate, seconds=15.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_receiver_that_is_down_gets_the_event_later_even_after_a_restart(tmp_path, make_outbox):
    receiver = WebhookReceiver(free_port())  # down
    endpoints = EndpointStore(tmp_path / "webhooks.json")
    endpoint = endpoints.add("p", receiver.url, allow_private=True)
    outbox = make_outbox()
    before, after = _ended_batch("p")
    WebhookEvents(endpoints, outbox).on_saved(before, after)

    first = _deliverer(outbox, endpoints).start()
    assert _wait(lambda: outbox.due(time.time() + 3600, 10)[0].attempts >= 2)  # retried with backoff
    pending = outbox.due(time.time() + 3600, 10)[0]
    assert pending.next_at > time.time() - 1  # waits before the next attempt
    first.stop()  # the deliverer goes away with the event undelivered

    receiver.start()
    try:
        second = _deliverer(make_outbox(), endpoints).start()  # a new process, same outbox
        try:
            assert receiver.arrived.wait(15)
        finally:
            second.stop()
    finally:
        receiver.stop()
    headers, body = receiver.received[0]
    event = openai.OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=endpoint.secret)
    assert event.type == "batch.completed" and event.data.id == after.id
    assert headers["webhook-id"] == json.loads(body)["id"]
    assert outbox.due(time.time() + 10**6, 10) == []  # delivered: gone from the outbox


def test_a_failing_receiver_is_retried_until_the_retry_period_ends(tmp_path, make_outbox):
    receiver = WebhookReceiver(free_port(), status=500).start()
    try:
        endpoints = EndpointStore(tmp_path / "webhooks.json")
        endpoints.add("p", receiver.url, allow_private=True)
        outbox = make_outbox()
        WebhookEvents(endpoints, outbox).on_saved(*_ended_batch("p"))
        deliverer = _deliverer(outbox, endpoints, retry_seconds=0.6).start()
        try:
            assert _wait(lambda: outbox.due(time.time() + 10**6, 10) == [])  # dropped after the period
        finally:
            deliverer.stop()
    finally:
        receiver.stop()
    assert receiver.received == []


def test_private_targets_are_refused_at_delivery_when_not_allowed(tmp_path, make_outbox):
    receiver = WebhookReceiver(free_port()).start()
    try:
        endpoints = EndpointStore(tmp_path / "webhooks.json")
        endpoints.add("p", receiver.url, allow_private=True)  # added while allowed
        outbox = make_outbox()
        WebhookEvents(endpoints, outbox).on_saved(*_ended_batch("p"))
        deliverer = _deliverer(outbox, endpoints, allow_private=False)
        deliverer.deliver_due()
        deliverer.stop()
    finally:
        receiver.stop()
    assert receiver.received == []
    assert outbox.due(time.time() + 10**6, 10)[0].attempts == 1  # kept for a retry, never sent
