"""Benchmark: a page of `GET /v1/files` with 20,000 files vs with 20 (S3 backend on nanio).

    .venv/bin/python bench/listing.py [--files 20000] [--rounds 30]

Starts nanio (an S3-protocol server) on loopback and fills two projects of one bucket
with the file service (`FileService.create`, as uploads do): `big` with --files files,
`small` with 20. nanio keeps a bucket as a folder, so by default the files are created
by a FileService over that folder (the same objects, minutes faster to seed on a small
machine); `--fill s3` creates them through S3 instead. Every timed call goes through S3. Then, interleaved in each round, it times a page of 20 (the
first page of each, and a page after a cursor in the middle of `big`) with
`FileService.list`, which reads the per-project index. The figure is the median page
time of `big` over that of `small` (1.0 = independent of the project's size); the
storage requests per page are counted too (the same for both: one listing and one read
per file of the page). nanio answers a listing by scanning the index folder (S3 and
MinIO seek to `start-after`), which is what is left of the project's size in the time.
For scale, the listing before the index read every File object of the project: timed
over 2,000 of `big`'s and scaled to all of them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

PAGE = 20


def _fill(files, project: str, n: int, threads: int = 8) -> list[str]:
    from vbatch.core.schemas import FilePurpose

    def one(i: int) -> str:
        return files.create(project, [b'{"n": %d}\n' % i], filename=f"f{i}.jsonl", purpose=FilePurpose.BATCH).id

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


SCAN_SAMPLE = 2_000


def _full_scan(files, project: str) -> tuple[float, int]:
    """What GET /v1/files did before the index: list the project's files and read every
    File object. Returns (seconds for the listing + SCAN_SAMPLE reads, File objects)."""
    import orjson

    t0 = time.perf_counter()
    keys = [k for k in files.store.list(f"projects/{project}/files/") if k.endswith(".json")]
    for key in keys[:SCAN_SAMPLE]:
        orjson.loads(files.store.get_bytes(key))
    return time.perf_counter() - t0, len(keys)


class _Counting:
    """The store, counting the requests a page costs."""

    def __init__(self, store) -> None:
        self._store, self.calls = store, 0

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if callable(attr):
            def counted(*args, **kwargs):
                self.calls += 1
                return attr(*args, **kwargs)
            return counted
        return attr


def run(tmpdir: str | Path, files_n: int = 20_000, rounds: int = 30, fill: str = "folder") -> dict:
    from s3server import NanioServer
    from vbatch.core.files import FileService
    from vbatch.core.storage.s3 import S3ObjectStore

    tmp = Path(tmpdir)
    s3 = NanioServer(tmp / "nanio-data")
    s3.start()
    try:
        info = s3.info
        store = S3ObjectStore(info.endpoint, "vbatch-bench-list", info.access_key, info.secret_key, retry_seconds=10)
        files = FileService(store)
        store.list_page("none/")  # creates the bucket
        seeder = files
        if fill == "folder":
            from vbatch.core.storage.local import LocalObjectStore

            seeder = FileService(LocalObjectStore(Path(info.data_dir) / store.bucket))
        t0 = time.perf_counter()
        big = _fill(seeder, "big", files_n)
        small = _fill(seeder, "small", PAGE)
        fill_s = time.perf_counter() - t0
        print(f"  filled {files_n} + {PAGE} files in {fill_s:.0f} s", file=sys.stderr, flush=True)
        for project in ("big", "small"):
            files.list(project, limit=PAGE)  # marks the index ready (a new project's first listing)
        cursor = big[len(big) // 2]  # a full page follows it (small has only one page)
        first = {"big": [], "small": []}
        middle = {"big": []}
        for _ in range(rounds):
            for project in ("small", "big"):
                assert len(files.list(project, limit=PAGE)[0]) == PAGE
                first[project].append(_timed(lambda p=project: files.list(p, limit=PAGE)))
            middle["big"].append(_timed(lambda: files.list("big", limit=PAGE, after=cursor)))
        counting = _Counting(store)
        counted = FileService(counting)
        requests = {}
        for project in ("big", "small"):
            counted.list(project, limit=PAGE)  # its in-memory "index ready" mark
            counting.calls = 0
            counted.list(project, limit=PAGE)
            requests[project] = counting.calls
        scan_s, scanned = _full_scan(files, "big")
        scan_s *= scanned / min(scanned, SCAN_SAMPLE)
    finally:
        s3.stop()
    med = {k: {p: statistics.median(v[p]) for p in v} for k, v in (("first", first), ("middle", middle))}
    return {
        "files": files_n, "page": PAGE, "rounds": rounds, "fill": fill, "fill_seconds": round(fill_s, 1),
        "page_ms_small": round(med["first"]["small"] * 1000, 2), "page_ms_big": round(med["first"]["big"] * 1000, 2),
        "middle_page_ms_big": round(med["middle"]["big"] * 1000, 2),
        "file_list_page_big_vs_small": round(med["first"]["big"] / med["first"]["small"], 3),
        "file_list_middle_page_big_vs_small": round(med["middle"]["big"] / med["first"]["small"], 3),
        "requests_per_page_big": requests["big"], "requests_per_page_small": requests["small"],
        "full_scan_seconds_big": round(scan_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fill", choices=["folder", "s3"], default="folder")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        r = run(tmp, args.files, args.rounds, args.fill)
    print(f"page of {r['page']}: {r['page_ms_big']} ms with {r['files']} files, {r['page_ms_small']} ms with {r['page']}")
    print(f"ratio: {r['file_list_page_big_vs_small']} (first page), {r['file_list_middle_page_big_vs_small']} (middle page)")
    print(f"storage requests per page: {r['requests_per_page_big']} vs {r['requests_per_page_small']}")
    print(f"before the index, listing read every File object: ~{r['full_scan_seconds_big']} s")


if __name__ == "__main__":
    main()
