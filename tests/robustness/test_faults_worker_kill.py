"""kill -9 executor-spawned workers at random points, over seeded trials.

The real LocalExecutor (worker subprocesses, echo engine with a per-token delay so
kills land mid-work). Each trial kills the running worker up to 3 times at random
moments (never the same shard more than twice, so no shard exhausts its 3 attempts);
after the batch completes every custom_id is in exactly one result file, no line is
duplicated, and counts and usage are exact.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

import orjson
import pytest
from local_node import Node, P
from vbatch.core import layout
from vbatch.core.schemas import BatchStatus

TRIALS = 6
KILLS_PER_TRIAL = 3
N = 36  # 3 shards of 12 (shard_target_requests=12)


def results_in_parts(node: Node, batch_id: str, shard: int) -> int:
    keys = node.store.list(layout.results_prefix(P, batch_id, shard))
    return sum(len(node.store.get_bytes(key).splitlines()) for key in keys)


def all_result_lines(node: Node, record) -> list[dict]:
    lines = []
    for file_id in (record.output_file_id, record.error_file_id):
        if file_id:
            _, chunks = node.files.open(P, file_id)
            raw = b"".join(chunks)
            assert raw.endswith(b"\n")  # whole lines only
            lines += [orjson.loads(line) for line in raw.splitlines()]
    return lines


@pytest.mark.timeout(240)
def test_random_sigkills_of_workers_lose_and_double_nothing(tmp_path) -> None:
    kills_that_landed_mid_shard = 0
    for trial in range(TRIALS):
        rng = random.Random(1000 + trial)
        # One warm worker runs all 3 shards at once, so every kill spends an attempt of
        # each: the retry budget must outlast the kills.
        node = Node(tmp_path / f"trial{trial}", echo_delay_per_token=0.04, shard_target_requests=12,
                    shard_max_attempts=KILLS_PER_TRIAL + 1)
        ex = node.executor()
        try:
            record = node.submit(N, words=None)  # replies of 1..8 words: 0.04..0.32 s each
            per_shard: Counter = Counter()
            kills = 0
            deadline = time.monotonic() + 60
            while kills < KILLS_PER_TRIAL and time.monotonic() < deadline:
                if node.batches.get(P, record.id).status != BatchStatus.IN_PROGRESS:
                    break
                slot = ex._slots[0]
                process, task = slot.process, slot.current
                if process is None or task is None or process.poll() is not None or per_shard[task.shard] >= 2:
                    time.sleep(0.01)
                    continue
                # A random point of this worker's run: anywhere from its start on, or
                # (more often) after it wrote its first part, so the kill interrupts
                # real work even on a slow, loaded machine.
                if rng.random() < 0.6:
                    wait_until = time.monotonic() + 5
                    while results_in_parts(node, record.id, task.shard) == 0 and time.monotonic() < wait_until:
                        time.sleep(0.01)
                    time.sleep(rng.uniform(0.0, 0.2))
                else:
                    time.sleep(rng.uniform(0.0, 0.5))
                if slot.process is process and slot.current == task and process.poll() is None:
                    os.kill(process.pid, signal.SIGKILL)
                    kills += 1
                    per_shard[task.shard] += 1
                    if 0 < results_in_parts(node, record.id, task.shard) < N // 3:
                        kills_that_landed_mid_shard += 1
            done = node.wait(record.id, {BatchStatus.COMPLETED, BatchStatus.FAILED}, timeout=90)
        finally:
            for e in node.running:
                e.stop()

        assert done.status == BatchStatus.COMPLETED, (trial, done.errors, per_shard)
        lines = all_result_lines(node, done)
        ids = Counter(line["custom_id"] for line in lines)
        assert ids == Counter(f"r{i}" for i in range(N)), f"trial {trial}: lost or doubled {ids}"
        assert len({line["id"] for line in lines}) == len(lines)  # no duplicated line
        assert done.request_counts.model_dump() == {"total": N, "completed": N, "failed": 0}
        assert done.usage.output_tokens == sum(i % 8 + 1 for i in range(N))
        for line in lines:  # each answer belongs to its own request
            i = int(line["custom_id"][1:])
            assert line["response"]["body"]["choices"][0]["message"]["content"] == " ".join([f"w{i}"] * (i % 8 + 1))
    # The kills must have interrupted real work, or this proves nothing.
    assert kills_that_landed_mid_shard >= TRIALS // 2, kills_that_landed_mid_shard
