"""Cluster pools: what the operator and its pool pods tell each other, through object storage.

Pool pods hold no Kubernetes credentials: the operator writes each member's
assignments, the member writes its heartbeat. Each object has exactly one writer,
so no compare-and-swap is needed (S3 has none to offer).

    pools/<pool>/members/<member>/assignments.json   Assignments  (operator writes)
    pools/<pool>/members/<member>/heartbeat.json     Heartbeat    (the member writes)

A member runs exactly the shards in its assignments (and aborts a running one that
left them); the operator re-makes the assignment of a member that is gone (its Job
ended or vanished) or whose heartbeat went stale.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


def member_prefix(pool: str, member: str) -> str:
    return f"pools/{pool}/members/{member}/"


def members_prefix(pool: str) -> str:
    return f"pools/{pool}/members/"


def assignments_key(pool: str, member: str) -> str:
    return member_prefix(pool, member) + "assignments.json"


def heartbeat_key(pool: str, member: str) -> str:
    return member_prefix(pool, member) + "heartbeat.json"


class ShardRef(BaseModel):
    project: str
    batch_id: str
    shard: int
    # Bumped for every new assignment of the shard: a member never reruns a shard it
    # already reported for the same epoch.
    epoch: int = 0

    @property
    def key(self) -> str:
        return f"{self.batch_id}:{self.shard}:{self.epoch}"


class Assignments(BaseModel):
    version: int = 0  # bumped on every write; echoed back by the heartbeat
    shards: list[ShardRef] = Field(default_factory=list)
    aborted: list[str] = Field(default_factory=list)  # batch ids: abort, do not just drop


class ShardReport(BaseModel):
    finished: bool
    aborted: bool = False
    completed: int = 0
    failed: int = 0
    error: str | None = None


class Heartbeat(BaseModel):
    member: str
    at: float  # Unix time of this write
    loaded: bool = False  # the engine is loaded (one engine load per member)
    applied_version: int = -1  # the assignments version this member acted on
    running: list[str] = Field(default_factory=list)  # ShardRef keys
    done: dict[str, ShardReport] = Field(default_factory=dict)  # ShardRef key -> outcome
    exiting: bool = False  # idle for its idle period: takes no more work
