"""What runs beside a driver to operate the service: the metrics of the work, the
expiry sweeper and the webhook deliverer. One builder for both ways of running,
so `vbatch serve` (single node) and `vbatch operator` (cluster) differ only in
where the webhook outbox lives (SQLite under the data dir / object storage).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vbatch.core import metrics
from vbatch.core.config import Settings
from vbatch.core.events import BatchEvents
from vbatch.core.expiry import Sweeper
from vbatch.core.files import FileService
from vbatch.core.webhook_outbox import Deliverer, ObjectStoreOutbox, SqliteOutbox
from vbatch.core.webhooks import EndpointStore, WebhookEvents

log = logging.getLogger("vbatch.operations")


def endpoints_path(settings: Settings):
    return settings.webhook_endpoints_file or settings.data_dir / "webhooks.json"


@dataclass
class Operations:
    events: BatchEvents
    sweeper: Sweeper
    deliverer: Deliverer
    endpoints: EndpointStore
    started: list[Any] = field(default_factory=list)

    def start(self) -> None:
        for part in (self.sweeper, self.deliverer):
            part.start()
            self.started.append(part)

    def stop(self) -> None:
        while self.started:
            self.started.pop().stop()


def build_operations(settings: Settings, files: FileService, batches: Any, *, cluster: bool) -> Operations:
    """Subscribe metrics and webhooks to a new BatchEvents (give it to the driver),
    export the batch-status gauge of `batches`, and prepare the background threads."""
    events = BatchEvents()
    metrics.install(events, batches)
    endpoints = EndpointStore(endpoints_path(settings))
    outbox = ObjectStoreOutbox(files.store) if cluster else SqliteOutbox(settings.data_dir / "webhooks.sqlite3")
    deliverer = Deliverer.from_settings(outbox, endpoints, settings)
    webhook_events = WebhookEvents(endpoints, outbox)

    def on_saved(before, after) -> None:
        webhook_events.on_saved(before, after)
        if after.status.is_terminal:
            deliverer.wake()  # send now rather than at the next poll

    events.subscribe(on_saved)
    sweeper = Sweeper(files, interval=settings.expiry_sweep_seconds)
    return Operations(events=events, sweeper=sweeper, deliverer=deliverer, endpoints=endpoints)
