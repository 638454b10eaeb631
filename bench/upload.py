"""Benchmark: gateway upload throughput and memory against a direct S3 put.

    .venv/bin/python bench/upload.py [--size-mb 200] [--rounds 3]

Starts nanio (an S3-protocol server) on loopback and a real `vbatch serve` subprocess
whose storage is that server (VBATCH_STORAGE=s3). Then, alternating in each round:
  (a) candidate: POST /v1/files (multipart, streamed by httpx) through the gateway,
      which streams the bytes into a multipart S3 upload (16 MiB parts);
  (b) baseline: minio `put_object` of the same file straight to the same server
      (same 16 MiB part size, minio's default 3 parallel part uploads).
MB/s is file size / wall-clock of the whole call. The gateway's peak RSS during its
uploads is read from the kernel (VmHWM, reset before each upload; sampled from
/proc if the reset is refused).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import MB, RssSampler, gateway, hwm_mb, reset_hwm, rss_mb, upload

PART_SIZE = 16 * MB
BUCKET = "vbatch-bench"


def write_file(path: Path, size_mb: float) -> int:
    """A valid batch JSONL of ~size_mb (4 KiB lines), just under the size."""
    line_head = b'{"custom_id":"u-%07d","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user","content":"'
    tail = b'"}]}}\n'
    pad = b"x" * (4096 - len(line_head % 0) - len(tail))
    lines = int(size_mb * MB) // 4096
    with open(path, "wb") as out:
        out.writelines(line_head % i + pad + tail for i in range(lines))
    return path.stat().st_size


def run(tmpdir: str | Path, size_mb: float = 200, rounds: int = 3) -> dict:
    from minio import Minio
    from s3server import NanioServer

    tmp = Path(tmpdir)
    path = tmp / "upload.jsonl"
    size = write_file(path, size_mb)
    s3 = NanioServer(tmp / "nanio-data")
    s3.start()
    try:
        info = s3.info
        env = {"VBATCH_STORAGE": "s3", "VBATCH_S3_ENDPOINT": info.endpoint, "VBATCH_S3_BUCKET": BUCKET,
               "VBATCH_S3_ACCESS_KEY": info.access_key, "VBATCH_S3_SECRET_KEY": info.secret_key,
               "VBATCH_LIMITS": f'{{"max_file_bytes": {max(size, 200 * MB) + MB}}}'}
        direct = Minio(info.endpoint, access_key=info.access_key, secret_key=info.secret_key, secure=False)
        if not direct.bucket_exists(BUCKET):
            direct.make_bucket(BUCKET)
        best = {"gateway": float("inf"), "direct": float("inf")}
        peaks: list[float] = []
        with gateway(tmp / "gw-data", engine="echo", env=env) as gw, gw.client() as client:
            pid = gw.process.pid
            client.get("/v1/files").raise_for_status()  # first request: imports and S3 client warm
            idle = rss_mb(pid)
            for r in range(rounds):
                can_reset = reset_hwm(pid)
                sampler = None if can_reset else RssSampler(pid)
                if sampler:
                    sampler.start()
                t0 = time.perf_counter()
                meta = upload(client, path)
                best["gateway"] = min(best["gateway"], time.perf_counter() - t0)
                peaks.append(hwm_mb(pid) if can_reset else sampler.stop())
                assert meta["bytes"] == size, meta
                client.delete(f"/v1/files/{meta['id']}").raise_for_status()

                t0 = time.perf_counter()
                with open(path, "rb") as handle:
                    direct.put_object(BUCKET, f"direct/{r}", handle, length=size, part_size=PART_SIZE)
                best["direct"] = min(best["direct"], time.perf_counter() - t0)
                direct.remove_object(BUCKET, f"direct/{r}")
                print(f"  round {r}: gateway {size / MB / best['gateway']:.0f} MB/s, direct {size / MB / best['direct']:.0f} "
                      f"MB/s (best so far), peak RSS {peaks[-1]:.0f} MB", file=sys.stderr, flush=True)
    finally:
        s3.stop()
        path.unlink(missing_ok=True)
    mb = size / MB
    return {
        "file_mb": round(mb, 1), "rounds": rounds,
        "gateway_mb_s": round(mb / best["gateway"], 1), "direct_put_mb_s": round(mb / best["direct"], 1),
        "upload_vs_direct_put": round(best["direct"] / best["gateway"], 3),
        "gateway_idle_rss_mb": round(idle, 1),
        "upload_peak_rss_mb": round(max(peaks), 1),
        "upload_rss_growth_mb": round(max(peaks) - idle, 1),
        "rss_method": "VmHWM" if can_reset else "sampled VmRSS",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        r = run(tmp, args.size_mb, args.rounds)
    print(f"file:    {r['file_mb']} MB")
    print(f"gateway: {r['gateway_mb_s']} MB/s   direct put: {r['direct_put_mb_s']} MB/s")
    print(f"ratio:   upload = {r['upload_vs_direct_put']}x of a direct put")
    print(f"memory:  gateway peak RSS {r['upload_peak_rss_mb']} MB (idle {r['gateway_idle_rss_mb']} MB, {r['rss_method']})")


if __name__ == "__main__":
    main()
