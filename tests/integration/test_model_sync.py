"""Catalog models stored in S3 are copied to local disk once, completely or not at all."""

from __future__ import annotations

import pytest
from s3server import make_s3_store
from vbatch.core.config import Settings
from vbatch.core.catalog import ModelSpec
from vbatch.worker.model_sync import MARKER, parse_s3_uri, sync_remote_model

pytestmark = pytest.mark.s3

FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\x00" * 300_000, "tokenizer/vocab.json": b"{}"}


def settings_for(info, tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, s3_endpoint=info.endpoint, s3_access_key=info.access_key,
                    s3_secret_key=info.secret_key, s3_secure=info.secure)


def test_parse_s3_uri():
    assert parse_s3_uri("s3://models/llama/8b") == ("models", "llama/8b/")
    with pytest.raises(ValueError):
        parse_s3_uri("s3://models")


def test_a_remote_model_is_copied_once_and_reused(s3_info, tmp_path):
    store = make_s3_store(s3_info, bucket="models-a")
    for name, data in FILES.items():
        store.put_bytes(f"org/tiny/{name}", data)
    store.put_bytes("org/tiny-other/config.json", b"not mine")  # a sibling prefix is not copied
    spec = ModelSpec(id="tiny", path="s3://models-a/org/tiny")
    local = sync_remote_model(spec, settings_for(s3_info, tmp_path), tmp_path / "cache")
    root = tmp_path / "cache" / local.path.split("/")[-1]
    assert local.id == "tiny" and not local.is_remote
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} == set(FILES) | {MARKER}
    assert (root / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    # a second worker reuses the copy without touching storage
    store.delete_prefix("org/")
    again = sync_remote_model(spec, settings_for(s3_info, tmp_path), tmp_path / "cache")
    assert again.path == local.path


def test_an_empty_prefix_fails_and_leaves_no_partial_copy(s3_info, tmp_path):
    make_s3_store(s3_info, bucket="models-b").put_bytes("x/config.json", b"{}")
    spec = ModelSpec(id="ghost", path="s3://models-b/nothing-here")
    with pytest.raises(FileNotFoundError):
        sync_remote_model(spec, settings_for(s3_info, tmp_path), tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
