"""`vbatch serve`: the gateway, wired for the configured mode.

Single-node (the default): SQLite batch store under the data dir, local or S3
storage, and the one driver (`vbatch.core.driver`) with the local shard runtime
running worker subprocesses on this machine (`operator.local_executor`).
Cluster: Batch custom resources as the store; the operator does the running.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import time
from collections.abc import Collection
from pathlib import Path

from vbatch.core.config import Settings

log = logging.getLogger("vbatch.serve")


def settings_for(data_dir: Path | None, **overrides: object) -> Settings:
    settings = Settings()
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    if overrides:
        settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    return settings


def resolve_engine(requested: str) -> str:
    if requested in ("echo", "vllm"):
        return requested
    if importlib.util.find_spec("vllm") is not None:
        return "vllm"
    raise SystemExit(
        "vLLM is not installed, so there is no inference engine. Install vbatch with vLLM "
        "(`make install`), or pass --engine echo to try the API with the echo TEST engine."
    )


def served_models(settings: Settings, engine: str) -> Collection[str] | None:
    """The catalog's model ids; None (any id) for the echo test engine."""
    if engine == "echo":
        return None
    from vbatch.core.catalog import load_catalog
    from vbatch.worker.models import DEMO_MODEL_ID, prepare_demo_model

    catalog = load_catalog(settings.model_catalog, settings.data_dir)
    if settings.batch_store == "sqlite" and DEMO_MODEL_ID in catalog.ids() and settings.model_catalog is None:
        prepare_demo_model(settings.data_dir / "models")  # once; cached afterwards
    return catalog.ids()


def gpu_count() -> int:
    """NVIDIA GPUs this process may use, without importing torch (~200 MB) into the gateway."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    driver = Path("/proc/driver/nvidia/gpus")
    if driver.is_dir():
        return len(list(driver.iterdir()))
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def listed_models(settings: Settings) -> tuple[list[str], int]:
    """What GET /v1/models lists: the catalog's ids (also with the echo test engine,
    which answers any id), and when the catalog was written."""
    from vbatch.core.catalog import load_catalog

    catalog = load_catalog(settings.model_catalog, settings.data_dir)
    path = settings.model_catalog
    created = int(path.stat().st_mtime) if path is not None and path.exists() else int(time.time())
    return catalog.ids(), created


def build_services(settings: Settings, engine: str, slots: int | None = None):
    """(services, background): background has start()/stop() (executor, sweeper,
    webhook deliverer), or is None in cluster mode (the operator runs those)."""
    from vbatch.api.services import NoopRunner, Services
    from vbatch.core.files import FileService
    from vbatch.core.keys import KeyStore
    from vbatch.core.storage import open_store

    store = open_store(settings)
    files = FileService(store, upload_retention_seconds=settings.limits.upload_retention_seconds,
                        output_retention_seconds=settings.output_retention_seconds)
    keys = KeyStore(settings.api_keys_file or settings.data_dir / "api_keys")
    keys.check()  # odd project ids in the key file stop start-up (InvalidKeyFile, a ValueError)
    model_ids, created = listed_models(settings)
    if settings.batch_store == "kubernetes":
        from vbatch.operator.cr_store import KubeBatchStore

        # The gateway gets the operator's store of Batch resources: cli is where rooms meet.
        batches = KubeBatchStore.from_settings(settings, store)
        return Services(settings=settings, files=files, batches=batches, keys=keys,
                        runner=NoopRunner(), served_models=served_models(settings, engine),
                        model_ids=model_ids, models_created=created), None

    from vbatch.core.operations import build_operations
    from vbatch.core.sqlite_store import SqliteBatchStore
    from vbatch.operator.local_executor import LocalExecutor

    models = served_models(settings, engine)
    batches = SqliteBatchStore(settings.data_dir / "batches.sqlite3")
    operations = build_operations(settings, files, batches, cluster=False)
    executor = LocalExecutor(
        settings=settings, store=store, files=files, batches=batches, served_models=models,
        engine=engine, slots=slots or max(1, gpu_count()),
        events=operations.events,  # every save the driver makes: metrics and webhooks listen
    )
    services = Services(settings=settings, files=files, batches=batches, keys=keys, runner=executor, served_models=models,
                        model_ids=model_ids, models_created=created)
    return services, Background([executor, operations])


class Background:
    """Threads beside the gateway, started and stopped together."""

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def start(self) -> None:
        for part in self.parts:
            part.start()

    def stop(self) -> None:
        for part in reversed(self.parts):
            part.stop()


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from vbatch.api.app import create_app
    from vbatch.api.http_protocol import server_config
    from vbatch.core.janitor import Janitor

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = settings_for(args.data_dir)
    if settings.batch_store == "kubernetes":
        # The gateway runs no engine in a cluster (worker pods do): it only needs the
        # catalog's model ids to validate inputs ("echo" accepts any id, for tests).
        engine = args.engine or settings.engine
    else:
        engine = resolve_engine(args.engine or settings.engine)
    settings = settings.model_copy(update={"engine": engine})
    if engine == "echo":
        log.warning("serving with the ECHO TEST ENGINE: answers echo the prompt; this is not inference")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        services, background = build_services(settings, engine, args.slots)
    except ValueError as exc:  # configuration mistakes: say which, no traceback
        raise SystemExit(f"vbatch serve: {exc}") from None
    # Temporaries of writes killed mid-way (a crash, kill -9): removed before serving, then periodically.
    # And input copies of batches whose creation was killed before the batch existed.
    janitor = Janitor(services.files.store, max_age_seconds=settings.tmp_max_age_seconds,
                      interval_seconds=settings.tmp_cleanup_interval_seconds,
                      batch_exists=lambda project, batch_id: services.batches.get(project, batch_id) is not None)
    janitor.start()
    if background is not None:
        background.start()
    try:
        config = server_config(create_app(services), settings, host=args.host, port=args.port,
                               log_level=args.log_level, access_log=False)
        uvicorn.Server(config).run()
    finally:
        janitor.stop()
        if background is not None:
            background.stop()
    return 0
