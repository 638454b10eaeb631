"""The shard runtime: what differs between the two ways of running a batch's shards.

The one driver (`vbatch.core.driver`) asks the state machine what is next and carries
it out; whenever that means running or stopping shards it goes through this protocol.
Two implementations: local worker processes (single node) and Kubernetes (cluster).
A fake one drives the driver's scenario tests.

Every method is idempotent and cheap enough to call on every round: the driver keeps
no state between rounds, so after a restart it simply calls them again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from vbatch.core.schemas import BatchRecord


@dataclass(frozen=True)
class ShardsSeen:
    """What a runtime knows of a launched batch's shards.

    `failed` are shards past the retry budget (they will not run again);
    `holders` names who runs or ran each shard (a pod, a worker slot), for
    `kubectl describe batch` and the logs; `attempts` counts failed tries per shard.
    """

    succeeded: frozenset[int] = frozenset()
    failed: frozenset[int] = frozenset()
    holders: Mapping[int, str] = field(default_factory=dict)
    attempts: Mapping[int, int] = field(default_factory=dict)


class ShardRuntime(Protocol):
    def run(self, record: BatchRecord) -> None:
        """Make sure every shard of this launched batch that has not ended is running
        or queued to run (shard objects are already written; `record.shard_count` says
        how many). Called every round while the batch is in progress."""

    def observe(self, record: BatchRecord) -> ShardsSeen:
        """Which shards ended, succeeded or failed for good."""

    def stop(self, record: BatchRecord) -> bool:
        """Stop this batch's shards (cancel, expiry): in-flight requests are aborted and
        what finished is flushed to parts; other batches keep running. True once none
        of its shards runs any more, i.e. every part that will ever exist is written."""

    def release(self, record: BatchRecord) -> bool:
        """The batch ended: drop what the runtime holds for it (bookkeeping, a Job).
        True once nothing of it remains that could still write to its working data."""
