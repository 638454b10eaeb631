"""The image and release-check scripts: lint-clean, and honest about where they ran."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (Debian: shellcheck)")
def test_shell_scripts_are_shellcheck_clean():
    assert SCRIPTS
    done = subprocess.run(["shellcheck", "-x", *(str(p.relative_to(ROOT)) for p in SCRIPTS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kind_check_stops_without_a_docker_engine(tmp_path):
    """Where `docker info` fails, it says why and exits before touching anything."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("docker", "kind", "kubectl", "helm"):
        (fake / tool).write_text("#!/bin/sh\nexit 1\n")
        (fake / tool).chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "kind-check.sh")], capture_output=True, text=True,
                          timeout=60, env={"PATH": f"{fake}:/usr/bin:/bin"})
    assert done.returncode == 3
    assert "needs a running Docker engine" in done.stderr
    text = (ROOT / "scripts" / "kind-check.sh").read_text()
    assert "NOT been run" in text  # the script never claims it ran here


def test_build_script_refuses_an_unknown_image(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build-images.sh"), "nonsense"], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "CONTAINER_ENGINE": "docker",
                                                       "HOME": str(tmp_path)})
    assert done.returncode == 2 and "unknown image 'nonsense'" in done.stderr
