"""A real S3-protocol server for tests: `nanio` (PyPI) run as a subprocess on loopback.

nanio keeps buckets as folders under --data-dir, so stopping and restarting a
server on the same data dir and port keeps every object: fault tests use
`stop()` / `start()` (or `restart()`) to take storage away mid-run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "vbatch-test"
SECRET_KEY = "vbatch-test-secret-key"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Info:
    """What a client needs; `endpoint` is host:port as minio expects it."""

    endpoint: str
    access_key: str
    secret_key: str
    data_dir: Path
    region: str = "us-east-1"
    secure: bool = False


class NanioServer:
    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.log_path = self.data_dir.parent / f"nanio-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def info(self) -> S3Info:
        return S3Info(
            endpoint=f"127.0.0.1:{self.port}",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            data_dir=self.data_dir,
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._recover_after_crash()
        env = os.environ | {"NANIO_ACCESS_KEY": ACCESS_KEY, "NANIO_SECRET_KEY": SECRET_KEY}
        env.pop("NANIO_OPTIONS_FILE", None)  # credentials must come from the two vars above
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "nanio", "serve",
                    "--host", "127.0.0.1",
                    "--port", str(self.port),
                    "--data-dir", str(self.data_dir),
                    "--log-level", "warning",
                    "--no-access-log",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a test's Ctrl-C must not kill it half-way
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/"
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"nanio exited at start; log:\n{self._log_tail()}")
            try:
                urllib.request.urlopen(url, timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # unsigned request refused (403): it is serving
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nanio did not answer within {timeout}s; log:\n{self._log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the data dir stays."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None

    def _recover_after_crash(self) -> None:
        """What a real S3 server does when it starts after a crash: drop its own
        half-written temporaries. nanio writes an object's metadata sidecar through one
        fixed temporary name (`<key>.json.tmp`, opened O_EXCL) and does not clean it at
        start, so one killed mid-write made every later PUT of that key fail (seen once
        in CI: a result part could never be written again)."""
        for stale in self.data_dir.glob("*/.nanio-meta/**/*.json.tmp"):
            stale.unlink(missing_ok=True)

    def kill(self) -> None:
        """Stop abruptly, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"


def make_s3_store(info: S3Info, bucket: str | None = None, **kwargs):
    from vbatch.core.storage.s3 import S3ObjectStore

    kwargs.setdefault("retry_seconds", 3.0)  # tests must not wait 30 s on a dead server
    kwargs.setdefault("part_size", 5 * 1024 * 1024)  # S3 minimum: multipart with little data
    return S3ObjectStore(
        endpoint=info.endpoint,
        bucket=bucket or f"t-{uuid.uuid4().hex[:20]}",
        access_key=info.access_key,
        secret_key=info.secret_key,
        secure=info.secure,
        region=info.region,
        **kwargs,
    )
