"""File expiry on both stores: expires_after, 404 once past expires_at, the sweeper."""

from __future__ import annotations

import time

import pytest
from vbatch.core import expiry
from vbatch.core.errors import InvalidRequest, NotFound
from vbatch.core.file_index import EXPIRY_PREFIX
from vbatch.core.files import FileService, file_key
from vbatch.core.schemas import FilePurpose


def test_parse_expires_after():
    ok = {"anchor": "created_at", "seconds": 3600}
    assert expiry.parse_expires_after(ok, param="p", min_seconds=3600) == 3600
    assert expiry.parse_expires_after({"anchor": "created_at", "seconds": "7200"}, param="p", min_seconds=1) == 7200
    assert expiry.parse_expires_after(None, param="p", min_seconds=1) is None
    bad = [
        ({"anchor": "last_active_at", "seconds": 3600}, "p.anchor"),
        ({"seconds": 3600}, "p.anchor"),
        ({"anchor": "created_at"}, "p.seconds"),
        ({"anchor": "created_at", "seconds": 3599}, "p.seconds"),
        ({"anchor": "created_at", "seconds": 2592001}, "p.seconds"),
        ({"anchor": "created_at", "seconds": True}, "p.seconds"),
        ({"anchor": "created_at", "seconds": 1.5}, "p.seconds"),
        ({"anchor": "created_at", "seconds": 3600, "x": 1}, "p"),
        ("3600", "p"),
    ]
    for value, param in bad:
        with pytest.raises(InvalidRequest) as caught:
            expiry.parse_expires_after(value, param="p", min_seconds=3600)
        assert caught.value.param == param, value


def test_defaults_are_thirty_days_for_inputs_and_results(object_store):
    files = FileService(object_store)
    upload = files.create("p", [b"{}\n"], filename="a", purpose=FilePurpose.BATCH)
    result = files.create("p", [b"{}\n"], filename="b", purpose=FilePurpose.BATCH_OUTPUT)
    assert upload.expires_at == upload.created_at + 30 * 86400
    assert result.expires_at == result.created_at + 30 * 86400
    chosen = files.create("p", [b"{}\n"], filename="c", purpose=FilePurpose.BATCH, expires_after_seconds=3600)
    assert chosen.expires_at == chosen.created_at + 3600
    assert files.set_expiry("p", chosen.id, 7200).expires_at == chosen.created_at + 7200
    assert files.get("p", chosen.id).expires_at == chosen.created_at + 7200


def test_expired_files_are_404_at_once_and_swept_later(object_store):
    files = FileService(object_store)
    short = files.create("p", [b"{}\n"], filename="a", purpose=FilePurpose.BATCH, expires_after_seconds=1)
    long = files.create("p", [b"{}\n"], filename="b", purpose=FilePurpose.BATCH, expires_after_seconds=3600)
    moved = files.create("p", [b"{}\n"], filename="c", purpose=FilePurpose.BATCH, expires_after_seconds=1)
    files.set_expiry("p", moved.id, 3600)  # its first expiry entry is now stale
    deleted = files.create("p", [b"{}\n"], filename="d", purpose=FilePurpose.BATCH, expires_after_seconds=1)
    files.delete("p", deleted.id)
    later = time.time() + 2
    assert expiry.sweep(files, now=time.time() - 10) == 0  # nothing due yet
    time.sleep(max(0.0, short.expires_at - time.time()) + 0.05)
    for call in (lambda: files.get("p", short.id), lambda: files.open("p", short.id), lambda: files.delete("p", short.id)):
        with pytest.raises(NotFound) as caught:
            call()
        assert caught.value.code == "file_not_found"
    assert short.id not in [f.id for f in files.list("p")[0]]
    assert object_store.exists(file_key("p", short.id))  # not swept yet: only hidden

    assert expiry.sweep(files, now=later) == 2  # the short one, and the deleted one's audit record
    for f in (short, deleted):
        assert not object_store.exists(file_key("p", f.id)) and not object_store.exists(file_key("p", f.id) + ".json")
    assert {f.id for f in files.list("p")[0]} == {long.id, moved.id}
    remaining = object_store.list_page(EXPIRY_PREFIX)
    assert len(remaining) == 2 and all(long.id in k or moved.id in k for k in remaining)
    assert expiry.sweep(files, now=later) == 0  # idempotent
