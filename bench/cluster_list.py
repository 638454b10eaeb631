"""Benchmark: one page of `GET /v1/batches` in cluster mode, 20 vs N batches in the project.

    .venv/bin/python bench/cluster_list.py [--batches 2000] [--rounds 20]

Runs the Kubernetes API emulator (tests/support/kube) over HTTP and the index on S3
(nanio on loopback, as the chart runs on S3/MinIO), fills one project with `small` (20) and then `batches` Batch resources (each
indexed as the gateway does), and times in the same run, alternating:
(a) `KubeBatchStore.list_page(limit=20)` — the index page plus one labelled list call;
(b) the baseline it replaced: list every Batch of the project with the label selector
(paged with limit/continue), sort newest first, cut the page.
Reported: time of a page at N batches / at 20 batches, for (a) and (b). O(page) means
(a) stays near 1 while (b) grows with N. (The emulator filters label selectors by
scanning, as the API server's watch cache does; what grows in (b) is the transfer and
decoding of every Batch.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))

import kubernetes  # noqa: E402
from kube.fixtures import KubeCluster  # noqa: E402
from vbatch.core import state  # noqa: E402
from vbatch.core.batch_resource import LABEL_PROJECT, project_label, record_from_resource, resource_from_record  # noqa: E402
from s3server import NanioServer  # noqa: E402
from vbatch.core.storage.s3 import S3ObjectStore  # noqa: E402
from vbatch.operator.cr_store import KubeBatchStore  # noqa: E402

PROJECT, PAGE = "bench", 20


def add_batches(cluster: KubeCluster, store: KubeBatchStore, n: int) -> None:
    for _ in range(n):
        record = state.new_batch(project=PROJECT, input_file_id="file-" + "a" * 24, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"k": "v"}, total=3, model="m",
                                 window_seconds=3600, now=int(time.time()))
        body = resource_from_record(record, cluster.namespace)
        status = body.pop("status")
        store.index.add(PROJECT, record.id)
        cluster.create(body, status=status)


def baseline_page(store: KubeBatchStore) -> list:
    records = [record_from_resource(o) for o in store._list(f"{LABEL_PROJECT}={project_label(PROJECT)}")]
    records.sort(key=lambda r: r.id, reverse=True)
    return records[:PAGE]


def timed(fn, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def run(tmp: Path, *, batches: int = 2000, rounds: int = 20) -> dict:
    s3 = NanioServer(tmp / "nanio-data")
    s3.start()
    cluster = KubeCluster(tmp / "kubeconfig").start()
    try:
        cluster.load_crds()
        api = kubernetes.config.new_client_from_config(str(cluster.kubeconfig))
        info = s3.info
        objects = S3ObjectStore(info.endpoint, "bench-index", info.access_key, info.secret_key, secure=False,
                                region=info.region)
        store = KubeBatchStore(api, cluster.namespace, objects)
        times: dict[int, dict[str, float]] = {}
        have = 0
        for n in (PAGE, batches):
            add_batches(cluster, store, n - have)
            have = n
            expected = [r.id for r in baseline_page(store)]
            assert [r.id for r in store.list_page(PROJECT, after=None, limit=PAGE)[0]] == expected
            index_t = baseline_t = 0.0
            for _ in range(2):  # alternate, so drift hits both alike
                index_t += timed(lambda: store.list_page(PROJECT, after=None, limit=PAGE), rounds)
                baseline_t += timed(lambda: baseline_page(store), max(3, rounds // 4))
            times[n] = {"index_page_s": index_t / 2, "list_all_page_s": baseline_t / 2}
        api.close()
    finally:
        cluster.stop()
        s3.stop()
    small, big = times[PAGE], times[batches]
    return {
        "batches": batches,
        "page": PAGE,
        "times": times,
        "index_page_growth": big["index_page_s"] / small["index_page_s"],
        "list_all_page_growth": big["list_all_page_s"] / small["list_all_page_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp), batches=args.batches, rounds=args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
