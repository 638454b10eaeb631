"""One project-id grammar everywhere (issue 12, case 4).

`vbatch keys create` refuses ids with path syntax (`../x`, `a//b`, `a/`, `a/files/b`),
a key file holding such an id stops `vbatch serve` with a clear start-up error (and
is never used at run time), storage keys cannot be built from one, and the CRD's
`spec.project` carries the same pattern.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from vbatch.core import layout
from vbatch.core.files import FileService, file_key
from vbatch.core.errors import PermissionDenied
from vbatch.core.keys import InvalidKeyFile, KeyStore, hash_key
from vbatch.core.projects import PROJECT_ID_PATTERN
from vbatch.core.storage.local import LocalObjectStore

ROOT = Path(__file__).resolve().parents[2]
BAD_IDS = ["../x", "a//b", "a/", "a/files/b", "p/files/sub", "", " a", "a b", "-a", ".a", "a" * 65, "a\\b", "ü"]
GOOD_IDS = ["p", "team.a_b-1", "A" * 64, "0project"]


def vbatch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VBATCH_API_KEYS_FILE"}
    return subprocess.run([sys.executable, "-m", "vbatch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("project", BAD_IDS)
def test_keys_create_refuses_ids_outside_the_grammar(tmp_path: Path, project: str) -> None:
    r = vbatch("keys", "create", f"--project={project}", "--data-dir", str(tmp_path))
    assert r.returncode != 0
    assert "invalid project id" in r.stderr and "letters, digits" in r.stderr, r.stderr
    assert r.stdout == ""  # no key printed
    assert not (tmp_path / "api_keys").exists() or (tmp_path / "api_keys").read_text() == ""


@pytest.mark.parametrize("project", GOOD_IDS)
def test_keys_create_accepts_ids_of_the_grammar(tmp_path: Path, project: str) -> None:
    r = vbatch("keys", "create", f"--project={project}", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip().splitlines()[-1]
    KeyStore(tmp_path / "api_keys").authenticate(key, project)


def test_a_key_file_with_odd_ids_stops_serve_at_start_up(tmp_path: Path) -> None:
    good = KeyStore(tmp_path / "api_keys")
    good.create("fine")
    with open(tmp_path / "api_keys", "a") as out:
        out.write(f"{hash_key('vb-odd')} p/files/sub\n")
    r = vbatch("serve", "--engine", "echo", "--data-dir", str(tmp_path), "--port", "0", timeout=60)
    assert r.returncode != 0
    assert "line 2" in r.stderr and "invalid project id 'p/files/sub'" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_odd_ids_in_a_key_file_are_never_used(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{hash_key('vb-odd')} a/files/b\n{hash_key('vb-ok')} ok\n")
    store = KeyStore(path)
    with pytest.raises(InvalidKeyFile, match="line 1"):
        store.check()
    with pytest.raises(PermissionDenied):
        store.authenticate("vb-odd", "a/files/b")
    store.authenticate("vb-ok", "ok")


@pytest.mark.parametrize("project", ["../x", "a//b", "a/", "a/files/b", ""])
def test_storage_keys_cannot_be_built_from_odd_ids(tmp_path: Path, project: str) -> None:
    files = FileService(LocalObjectStore(tmp_path))
    with pytest.raises(ValueError):
        file_key(project, "file-000000000000000000000000")
    with pytest.raises(ValueError):
        files.list(project)
    with pytest.raises(ValueError):
        files.create(project, [b"{}\n"], filename="x.jsonl", purpose="batch")
    with pytest.raises(ValueError):
        layout.shard_key(project, "batch_01J0000000000000000000000", 0)
    assert list(tmp_path.rglob("*")) == []


def test_the_crd_carries_the_same_pattern() -> None:
    for path in (ROOT / "crds" / "batches.vbatch.dev.yaml", ROOT / "charts" / "vbatch" / "crds" / "batches.vbatch.dev.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            project = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["project"]
            assert project["pattern"] == PROJECT_ID_PATTERN
            for bad in BAD_IDS:
                assert not re.fullmatch(project["pattern"], bad)
