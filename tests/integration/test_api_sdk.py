"""The official openai SDK against the gateway: nothing differs but base URL and headers."""

from __future__ import annotations

import io

import openai
import pytest
from api_server import QUICKSTART_JSONL, ApiServer, Tenant
from openai import OpenAI


@pytest.fixture
def client(api_server: ApiServer, tenant: Tenant) -> OpenAI:
    return OpenAI(
        base_url=f"{api_server.url}/v1",
        api_key=tenant.key,  # sent as Authorization: Bearer
        default_headers={"x-project-id": tenant.project},
        max_retries=0,
    )


def upload(client: OpenAI, data: bytes = QUICKSTART_JSONL, name: str = "input.jsonl"):
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch")


def create_batch(client: OpenAI, file_id: str, **kwargs):
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", **kwargs
    )


def test_upload_create_retrieve_cancel(client: OpenAI, api_server: ApiServer) -> None:
    f = upload(client)
    assert f.id.startswith("file-")
    assert (f.object, f.purpose, f.status, f.filename, f.bytes) == (
        "file",
        "batch",
        "processed",
        "input.jsonl",
        len(QUICKSTART_JSONL),
    )
    assert f.expires_at == f.created_at + 30 * 24 * 3600

    batch = create_batch(client, f.id, metadata={"job": "nightly"})
    assert batch.id.startswith("batch_")
    assert batch.status == "in_progress"
    assert batch.input_file_id == f.id
    assert batch.request_counts.total == 3
    assert batch.metadata == {"job": "nightly"}
    assert batch.model == "test-model"
    assert batch.id in api_server.runner.submitted_ids

    again = client.batches.retrieve(batch.id)
    assert again.model_dump() == batch.model_dump()

    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling"
    assert cancelled.cancelling_at is not None
    assert client.batches.retrieve(batch.id).status == "cancelling"
    assert batch.id in api_server.runner.cancelled_ids


def test_batches_list_auto_paginates_newest_first(client: OpenAI) -> None:
    f = upload(client)
    created = [create_batch(client, f.id).id for _ in range(23)]

    first_page = client.batches.list()
    assert len(first_page.data) == 20 and first_page.has_more

    seen = [b.id for b in client.batches.list()]  # iterating follows `after` across pages
    assert seen == list(reversed(created))

    small = [b.id for b in client.batches.list(limit=5)]
    assert small == seen


def test_files_list_content_delete(client: OpenAI) -> None:
    a = upload(client, name="a.jsonl")
    b = upload(client, name="b.jsonl")

    listed = client.files.list(purpose="batch")
    assert {x.id for x in listed} == {a.id, b.id}
    assert [x.id for x in client.files.list(order="asc")][0] in {a.id, b.id}

    assert client.files.content(a.id).content == QUICKSTART_JSONL
    assert client.files.retrieve(a.id).filename == "a.jsonl"

    deleted = client.files.delete(a.id)
    assert (deleted.id, deleted.deleted) == (a.id, True)
    with pytest.raises(openai.NotFoundError) as err:
        client.files.retrieve(a.id)
    assert err.value.code == "file_not_found"
    with pytest.raises(openai.NotFoundError):
        client.files.content(a.id)
    assert [x.id for x in client.files.list()] == [b.id]


def test_sdk_errors_are_typed(client: OpenAI, api_server: ApiServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("x.jsonl", io.BytesIO(QUICKSTART_JSONL)), purpose="fine-tune")
    assert err.value.code == "invalid_purpose"
    assert err.value.param == "purpose"

    with pytest.raises(openai.NotFoundError) as err:
        client.batches.retrieve("batch_01HZZZZZZZZZZZZZZZZZZZZZZZ")
    assert err.value.code == "batch_not_found"

    bad = upload(client, QUICKSTART_JSONL + b"{not json\n")
    with pytest.raises(openai.BadRequestError) as err:
        create_batch(client, bad.id)
    assert err.value.code == "invalid_json"
    assert "line 4" in err.value.message
    assert err.value.body["line"] == 4

    wrong_key = OpenAI(base_url=f"{api_server.url}/v1", api_key="vb-nope", max_retries=0,
                       default_headers={"x-project-id": "whatever"})
    with pytest.raises(openai.PermissionDeniedError):
        wrong_key.batches.list()
    no_project = OpenAI(base_url=f"{api_server.url}/v1", api_key="vb-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_project.batches.list()
