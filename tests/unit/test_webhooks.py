"""Webhook events and signatures as OpenAI's SDK expects them, and where they may go."""

from __future__ import annotations

import base64
import json
import socket

import openai
import pytest
from vbatch.core import state
from vbatch.core.schemas import BatchStatus
from vbatch.core.webhooks import (
    EndpointStore,
    WebhookEvents,
    WebhookURLRefused,
    check_url,
    event_body,
    event_for,
    new_secret,
    signed_headers,
)


def _batch(status=BatchStatus.COMPLETED):
    record = state.new_batch(project="p", input_file_id="file-" + "a" * 24, endpoint="/v1/chat/completions",
                             completion_window="24h", metadata=None, total=1, model="m", window_seconds=60, now=1)
    if status == BatchStatus.CANCELLED:
        return state.transition(state.request_cancel(record, 2), status, 3)
    if status == BatchStatus.EXPIRED:
        return state.transition(record, status, 3)
    return state.transition(state.transition(record, BatchStatus.FINALIZING, 2), status, 3)


@pytest.mark.parametrize("status", [BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED])
def test_the_openai_sdk_verifies_and_parses_our_events(status):
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    record = _batch(status)
    body = event_body(event_for(record, now=1_700_000_000))
    headers = signed_headers(secret, "evt_x", body)
    event = openai.OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=secret)
    assert event.type == f"batch.{status.value}" and event.data.id == record.id and event.object == "event"
    assert event.id.startswith("evt_") and event.created_at == 1_700_000_000
    assert set(json.loads(body)) == {"object", "id", "type", "created_at", "data"}
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="unused").webhooks.unwrap(body + b" ", headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=new_secret())


def test_the_same_ending_makes_the_same_event_id():
    record = _batch()
    assert event_for(record, now=1)["id"] == event_for(record, now=2)["id"]
    assert event_for(record, now=1)["id"] != event_for(_batch(BatchStatus.FAILED), now=1)["id"]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/x", "http://localhost:8080/", "http://10.1.2.3/", "http://192.168.0.1/", "http://172.16.5.4/",
     "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://[fe80::1]/", "http://[fc00::1]/",
     "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "http://100.64.0.1/", "http://224.0.0.1/"],
)
def test_private_targets_are_refused_unless_allowed(url):
    with pytest.raises(WebhookURLRefused):
        check_url(url, allow_private=False)
    check_url(url, allow_private=True)


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "example.com", "http://u:p@8.8.8.8/", "http:///x"])
def test_only_http_urls_with_a_host(url):
    with pytest.raises(WebhookURLRefused):
        check_url(url, allow_private=True)


def test_every_resolved_address_is_checked(monkeypatch):
    def resolve(host, port, **_):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(WebhookURLRefused, match="10.0.0.5"):
        check_url("https://mixed.example/hook", allow_private=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **_: resolve(host, port)[:1])
    check_url("https://public.example/hook", allow_private=False)


class _Outbox:
    def __init__(self):
        self.items = []

    def put(self, event, endpoint_id):
        self.items.append((event["type"], event["data"]["id"], endpoint_id))


def test_only_the_save_that_ends_a_batch_queues_events_for_its_project(tmp_path):
    endpoints = EndpointStore(tmp_path / "webhooks.json")
    mine = endpoints.add("p", "http://127.0.0.1:1/a", allow_private=True)
    endpoints.add("other", "http://127.0.0.1:1/b", allow_private=True)
    outbox = _Outbox()
    listener = WebhookEvents(endpoints, outbox)
    done = _batch()
    running = state.transition(done.model_copy(update={"status": BatchStatus.IN_PROGRESS}), BatchStatus.FINALIZING, 2)
    listener.on_saved(None, running)  # not terminal
    listener.on_saved(running, done)  # ends now
    listener.on_saved(done, done)  # saved again (clean-up): no second event
    assert outbox.items == [("batch.completed", done.id, mine.id)]
    assert (tmp_path / "webhooks.json").stat().st_mode & 0o077 == 0  # secrets: owner only
