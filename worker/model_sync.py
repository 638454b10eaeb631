"""Models stored in S3: copy `s3://bucket/prefix` to a local directory once.

vLLM loads from a local directory, so a catalog entry whose path is an S3 prefix
is downloaded before the engine starts, into `<data_dir>/models/cache/`. The copy
goes to a temporary sibling first and is renamed into place with a completion
marker, so an interrupted download is never mistaken for a model; later workers
(and later shards in a long-lived worker) reuse it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path, PurePosixPath

from vbatch.core.config import Settings
from vbatch.core.storage.s3 import S3ObjectStore
from vbatch.core.catalog import ModelSpec

MARKER = ".vbatch-model-complete"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b/")."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket or not prefix.strip("/"):
        raise ValueError(f"model path {uri!r}: expected s3://bucket/prefix")
    return bucket, prefix.strip("/") + "/"


def local_copy_dir(spec: ModelSpec, cache_dir: Path) -> Path:
    # The URI is in the name, so pointing an id at new weights never reuses old ones.
    digest = hashlib.sha256(spec.path.encode()).hexdigest()[:12]
    return cache_dir / f"{spec.id}-{digest}"


def sync_remote_model(spec: ModelSpec, settings: Settings, cache_dir: Path) -> ModelSpec:
    """The same spec with `path` pointing at a complete local copy of its S3 prefix."""
    if not spec.is_remote:
        return spec
    target = local_copy_dir(spec, cache_dir)
    if not (target / MARKER).exists():
        bucket, prefix = parse_s3_uri(spec.path)
        store = S3ObjectStore(
            endpoint=settings.s3_endpoint, bucket=bucket, access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key, secure=settings.s3_secure, region=settings.s3_region,
        )
        _download(store, prefix, target, spec.path)
    return spec.model_copy(update={"path": str(target)})


def _download(store: S3ObjectStore, prefix: str, target: Path, uri: str) -> None:
    partial = target.with_name(f"{target.name}.partial-{secrets.token_hex(4)}")
    partial.mkdir(parents=True)
    try:
        count = 0
        for key in store.list(prefix):
            relative = PurePosixPath(key[len(prefix):])
            if relative.is_absolute() or ".." in relative.parts:
                raise ValueError(f"{uri}: refusing object key {key!r}")
            destination = partial.joinpath(*relative.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with destination.open("wb") as out:
                for chunk in store.get_stream(key):
                    out.write(chunk)
            count += 1
        if count == 0:
            raise FileNotFoundError(f"{uri}: no objects under that prefix")
        (partial / MARKER).write_text(uri + "\n")
        try:
            os.replace(partial, target)
        except OSError:
            # Another worker finished the same copy first: keep theirs.
            if not (target / MARKER).exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
