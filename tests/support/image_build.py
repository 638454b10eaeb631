"""The images under test, built once and reused: tagged by a digest of their build inputs.

`ensure_images()` builds (through scripts/build-images.sh, as `make images` does) only the
images whose tag is missing, bootstrapping the base first where it is not there (no
registry is reachable on the development and CI machines), and removes the test tags of
earlier inputs so storage stays bounded. Run as a script (`python tests/support/image_build.py`)
it does the same and prints what the builds cost: .ci/run calls it before the tests.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kube.kubelet import REPO, Engine  # noqa: E402

REPOSITORY = "localhost/vbatch-test"
# image -> (build-images.sh target, the files its content comes from)
SOURCES = ("pyproject.toml", "README.md", "cli", "core", "api", "operator", "worker", ".dockerignore")
IMAGES = {
    "gateway": ("gateway", ("images/gateway.Dockerfile", *SOURCES)),
    "worker-cpu": ("worker-cpu", ("images/worker-cpu.Dockerfile", "constraints-cpu.txt", *SOURCES)),
}
NAMES = {"gateway": "vbatch", "worker-cpu": "vbatch-worker-cpu"}


def inputs_digest(paths: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for rel in paths:
        root = REPO / rel
        files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root])
                       if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
        for path in files:
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def image_ref(image: str) -> str:
    return f"{REPOSITORY}/{NAMES[image]}:{inputs_digest(IMAGES[image][1])}"


def ensure_images(engine: Engine, images: tuple[str, ...] = ("gateway", "worker-cpu"),
                  *, report=print) -> dict[str, str]:
    refs = {image: image_ref(image) for image in images}
    env = {**os.environ, "CONTAINER_ENGINE": engine.name}
    missing = [image for image, ref in refs.items() if not engine.image_exists(ref)]
    if missing and engine.name == "podman" and not engine.image_exists(os.environ.get("BASE_IMAGE", "python:3.11-slim-bookworm")):
        started = time.monotonic()
        subprocess.run([str(REPO / "scripts" / "bootstrap-base-image.sh")], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        report(f"images: base bootstrapped with mmdebstrap in {time.monotonic() - started:.0f} s")
    for image in missing:
        repo, _, tag = refs[image].rpartition(":")
        started = time.monotonic()
        log = Path(tempfile.gettempdir()) / "vbatch-image-build.log"
        with open(log, "ab") as out:
            done = subprocess.run([str(REPO / "scripts" / "build-images.sh"), IMAGES[image][0]], cwd=REPO,
                                  env={**env, "IMAGE_REPO": REPOSITORY, "IMAGE_TAG": tag},
                                  stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"building {image} failed; see {log}:\n" + log.read_text(errors="replace")[-4000:])
        report(f"images: built {refs[image]} in {time.monotonic() - started:.0f} s")
    _remove_stale(engine, refs)
    return refs


def _remove_stale(engine: Engine, keep: dict[str, str]) -> None:
    """Test tags of earlier build inputs: each is a whole copy of a filesystem under vfs."""
    listed = engine.run("images", "--format", "{{.Repository}}:{{.Tag}}", check=False).stdout.split()
    stale = [ref for ref in listed if ref.startswith(REPOSITORY + "/") and ref not in keep.values()
             and any(ref.startswith(f"{REPOSITORY}/{NAMES[i]}:") for i in keep)]
    if stale:
        engine.run("rmi", *stale, check=False, timeout=600)
        engine.run("image", "prune", "-f", "--filter", "until=24h", check=False, timeout=600)


def main() -> int:
    engine = Engine.detect()
    if engine is None:
        print("images: neither a Docker engine nor podman here; the image tests will skip")
        return 0
    started = time.monotonic()
    refs = ensure_images(engine)
    print(f"images: ready in {time.monotonic() - started:.0f} s: {' '.join(refs.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
