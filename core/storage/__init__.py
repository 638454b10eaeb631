"""Object storage: one protocol, two implementations (local directory, S3/MinIO)."""

from __future__ import annotations

from vbatch.core.config import Settings
from vbatch.core.storage.base import ObjectNotFound, ObjectStore


def open_store(settings: Settings) -> ObjectStore:
    """The object store the settings name."""
    if settings.storage == "s3":
        from vbatch.core.storage.s3 import S3ObjectStore

        return S3ObjectStore(
            endpoint=settings.s3_endpoint,
            bucket=settings.s3_bucket,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
            retry_seconds=settings.s3_retry_seconds,
        )
    from vbatch.core.storage.local import LocalObjectStore

    return LocalObjectStore(settings.storage_dir)


__all__ = ["ObjectNotFound", "ObjectStore", "open_store"]
