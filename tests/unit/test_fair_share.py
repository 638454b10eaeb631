"""Fair share: round-robin across projects first, then a project's batches."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vbatch.core.fair import FairQueue
from vbatch.worker.admission import Admission


def test_projects_alternate_however_many_batches_one_project_has():
    q: FairQueue[str] = FairQueue()
    for batch in ("a1", "a2", "a3"):
        for i in range(3):
            q.push("A", batch, f"{batch}.{i}")
    q.push("B", "b1", "b1.0")
    q.push("B", "b1", "b1.1")
    order = [q.pop() for _ in range(len(q))]
    assert order[:4] == ["a1.0", "b1.0", "a2.0", "b1.1"]
    # Within project A its batches take turns; within a batch, FIFO.
    assert [x for x in order if x.startswith("a")] == ["a1.0", "a2.0", "a3.0", "a1.1", "a2.1", "a3.1", "a1.2", "a2.2", "a3.2"]
    assert not q


@given(st.lists(st.tuples(st.sampled_from("pqr"), st.sampled_from("xyz"), st.integers()), max_size=40))
def test_every_pushed_item_comes_out_once_and_fifo_within_a_batch(items):
    q: FairQueue[tuple] = FairQueue()
    for n, (project, batch, value) in enumerate(items):
        q.push(project, project + batch, (project + batch, n))
    out = [q.pop() for _ in range(len(q))]
    assert sorted(out) == sorted((p + b, n) for n, (p, b, _) in enumerate(items))
    for key in {k for k, _ in out}:
        seq = [n for k, n in out if k == key]
        assert seq == sorted(seq)
    with pytest.raises(IndexError):
        q.pop()


def test_remove_batch_takes_only_that_batch():
    q: FairQueue[int] = FairQueue()
    for i in range(4):
        q.push("A", "a", i)
        q.push("B", "b", 10 + i)
    assert q.remove_batch("a") == [0, 1, 2, 3]
    assert len(q) == 4 and list(q) == [10, 11, 12, 13]


def test_admission_never_exceeds_its_budget_and_serves_projects_in_turn():
    async def scenario() -> tuple[int, list[str]]:
        admission = Admission(2)
        peak, in_use, order = 0, 0, []

        async def request(project: str, name: str) -> None:
            nonlocal peak, in_use
            await admission.acquire(project, project + "-batch")
            in_use += 1
            peak = max(peak, in_use)
            order.append(name)
            await asyncio.sleep(0.001)
            in_use -= 1
            admission.release()

        tasks = [asyncio.create_task(request("A", f"a{i}")) for i in range(6)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(request("B", f"b{i}")) for i in range(2)]
        await asyncio.gather(*tasks)
        return peak, order

    peak, order = asyncio.run(scenario())
    assert peak == 2
    # The first two went in at once; from then on B's two waiting requests alternate with A's.
    assert order[:2] == ["a0", "a1"] and order.index("b1") < order.index("a5")
    assert set(order[2:6]) >= {"b0", "b1"}


def test_a_cancelled_wait_holds_no_slot():
    async def scenario() -> int:
        admission = Admission(1)
        await admission.acquire("A", "a")
        waiter = asyncio.create_task(admission.acquire("B", "b"))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        admission.release()
        await asyncio.wait_for(admission.acquire("C", "c"), 1)
        return admission.in_flight

    assert asyncio.run(scenario()) == 1


def test_shards_held_at_once_share_one_window_budget():
    from vbatch.worker.admission import WindowShare

    share = WindowShare(100, floor=5, ceiling=40)
    assert share.bytes_each() == 40  # nobody holds one yet: the ceiling
    with share.held():
        assert share.bytes_each() == 40  # alone: a big window, capped
        with share.held(), share.held(), share.held():
            assert share.bytes_each() == 25  # four shards: a quarter each
            held = [share.held() for _ in range(30)]
            for h in held:
                h.__enter__()
            assert share.bytes_each() == 5  # 34 shards: never below the floor
            for h in held:
                h.__exit__(None, None, None)
    assert share.holders == 0
    with pytest.raises(ValueError):
        WindowShare(100, floor=0, ceiling=10)
