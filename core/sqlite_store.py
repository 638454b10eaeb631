"""Single-node batch store: SQLite in WAL mode, durable when a call returns."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vbatch.core import state
from vbatch.core.batch_store import StaleRecord
from vbatch.core.errors import StorageError
from vbatch.core.schemas import TERMINAL_STATUSES, BatchRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id       TEXT PRIMARY KEY,
    project  TEXT NOT NULL,
    status   TEXT NOT NULL,
    revision INTEGER NOT NULL,
    data     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_project ON batches (project, id);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status);
"""
# Finished batches whose working data is still to be removed (see BatchRecord.cleanup_pending):
# a column, so the driver's round finds them without reading every record.
_CLEANUP_COLUMN = "ALTER TABLE batches ADD COLUMN cleanup_pending INTEGER NOT NULL DEFAULT 0"
_CLEANUP_INDEX = "CREATE INDEX IF NOT EXISTS batches_by_cleanup ON batches (cleanup_pending)"


# What the disk (full, read-only, gone, busy) makes SQLite raise; anything else
# (IntegrityError, ProgrammingError) is a bug and propagates as it is.
_DISK_ERRORS = (sqlite3.OperationalError, sqlite3.InternalError)


@contextlib.contextmanager
def _disk_errors(action: str) -> Iterator[None]:
    try:
        yield
    except _DISK_ERRORS as exc:
        raise StorageError(f"The batch store could not {action}: {exc}.") from exc
    except sqlite3.DatabaseError as exc:
        if type(exc) is not sqlite3.DatabaseError:  # e.g. IntegrityError: a bug
            raise
        raise StorageError(f"The batch store could not {action}: {exc}.") from exc  # "file is not a database"


class SqliteBatchStore:
    """Disk failures (full, read-only, I/O errors) raise StorageError: a 503 for the API,
    a retry for the executor; SQLite rolls the failed statement back, nothing half-done."""

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection behind a lock: SQLite serialises writers anyway, and the
        # gateway's thread pool and the executor thread both use it.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # answered means on disk
        self._db.executescript(_SCHEMA)
        if "cleanup_pending" not in {row[1] for row in self._db.execute("PRAGMA table_info(batches)")}:
            self._db.execute(_CLEANUP_COLUMN)  # a store written before the column existed
        self._db.execute(_CLEANUP_INDEX)
        self._lock = threading.Lock()

    @staticmethod
    def _decode(data: str, revision: int) -> BatchRecord:
        record = BatchRecord.model_validate_json(data)
        record.revision = str(revision)
        return record

    @staticmethod
    def _encode(record: BatchRecord) -> str:
        return record.model_dump_json(exclude={"revision"})

    def create(self, record: BatchRecord) -> None:
        with self._lock, _disk_errors("store the batch"):
            self._db.execute(
                "INSERT INTO batches (id, project, status, revision, data, cleanup_pending) VALUES (?, ?, ?, 1, ?, ?)",
                (record.id, record.project, record.status.value, self._encode(record), int(record.cleanup_pending)),
            )
        record.revision = "1"

    def get(self, project: str, batch_id: str) -> BatchRecord | None:
        with self._lock, _disk_errors("read the batch"):
            row = self._db.execute(
                "SELECT data, revision FROM batches WHERE id = ? AND project = ?", (batch_id, project)
            ).fetchone()
        return self._decode(*row) if row else None

    def list_page(self, project: str, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        # ULID ids sort by creation time, so id order is newest-first order.
        query = "SELECT data, revision FROM batches WHERE project = ?"
        args: list[object] = [project]
        if after is not None:
            query += " AND id < ?"
            args.append(after)
        query += " ORDER BY id DESC LIMIT ?"
        args.append(limit + 1)
        with self._lock, _disk_errors("list batches"):
            rows = self._db.execute(query, args).fetchall()
        records = [self._decode(*row) for row in rows[:limit]]
        return records, len(rows) > limit

    def save(self, record: BatchRecord) -> None:
        with self._lock, _disk_errors("save the batch"):
            cursor = self._db.execute(
                "UPDATE batches SET status = ?, revision = revision + 1, data = ?, cleanup_pending = ?"
                " WHERE id = ? AND revision = ?",
                (record.status.value, self._encode(record), int(record.cleanup_pending), record.id,
                 int(record.revision or 0)),
            )
            if cursor.rowcount != 1:
                raise StaleRecord(record.id)
        record.revision = str(int(record.revision or 0) + 1)

    def request_cancel(self, project: str, batch_id: str) -> BatchRecord | None:
        with self._lock, _disk_errors("cancel the batch"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT data, revision FROM batches WHERE id = ? AND project = ?", (batch_id, project)
                ).fetchone()
                if row is None:
                    self._db.execute("COMMIT")
                    return None
                current = self._decode(*row)
                moved = state.request_cancel(current, int(time.time()))  # may raise Conflict
                if moved is not current:
                    self._db.execute(
                        "UPDATE batches SET status = ?, revision = revision + 1, data = ? WHERE id = ?",
                        (moved.status.value, self._encode(moved), batch_id),
                    )
                    moved.revision = str(int(current.revision or 0) + 1)
                self._db.execute("COMMIT")
                return moved
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (disk full)
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    def unfinished(self) -> Iterator[BatchRecord]:
        """Batches not yet terminal, and finished ones whose clean-up is pending."""
        terminal = tuple(s.value for s in TERMINAL_STATUSES)
        marks = ",".join("?" * len(terminal))
        with self._lock, _disk_errors("list unfinished batches"):
            rows = self._db.execute(
                f"SELECT data, revision FROM batches WHERE status NOT IN ({marks}) OR cleanup_pending = 1 ORDER BY id",
                terminal,
            ).fetchall()
        return iter([self._decode(*row) for row in rows])

    def status_counts(self) -> dict[tuple[str, str | None], int]:
        """{(status, model): batches} over every project (the metrics gauge)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT status, json_extract(data, '$.model'), count(*) FROM batches GROUP BY 1, 2"
            ).fetchall()
        return {(status, model): n for status, model, n in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
