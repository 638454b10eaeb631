"""The single-node batch store (durable, paginated, safe against lost cancels),
API keys (hashed at rest, per project, revocable) and the package layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from vbatch.core import state
from vbatch.core.batch_store import StaleRecord
from vbatch.core.errors import Conflict, PermissionDenied
from vbatch.core.keys import KeyStore
from vbatch.core.schemas import BatchStatus
from vbatch.core.sqlite_store import SqliteBatchStore

REPO = Path(__file__).resolve().parents[2]


def new(project="p", **kw):
    return state.new_batch(project=project, input_file_id="file-" + "a" * 24, endpoint="/v1/chat/completions",
                           completion_window="24h", metadata=kw.get("metadata"), total=1, model="m", window_seconds=60, now=1)


def test_records_survive_reopen_and_stay_in_their_project(tmp_path):
    db = tmp_path / "b.sqlite3"
    store = SqliteBatchStore(db)
    record = new(metadata={"team": "x"})
    store.create(record)
    store.close()
    reopened = SqliteBatchStore(db)
    got = reopened.get("p", record.id)
    assert got is not None and got.metadata == {"team": "x"} and got.status == BatchStatus.IN_PROGRESS
    assert reopened.get("other", record.id) is None
    assert [r.id for r in reopened.unfinished()] == [record.id]


def test_pagination_newest_first(tmp_path):
    store = SqliteBatchStore(tmp_path / "b.sqlite3")
    ids = []
    for _ in range(25):
        record = new()
        store.create(record)
        ids.append(record.id)
    store.create(new(project="q"))
    seen, after = [], None
    while True:
        page, more = store.list_page("p", after=after, limit=10)
        seen += [r.id for r in page]
        if not more:
            break
        after = page[-1].id
    assert seen == sorted(ids, reverse=True)


def test_a_driver_cannot_overwrite_a_cancel(tmp_path):
    store = SqliteBatchStore(tmp_path / "b.sqlite3")
    record = new()
    store.create(record)
    driver_copy = store.get("p", record.id)
    cancelled = store.request_cancel("p", record.id)
    assert cancelled.status == BatchStatus.CANCELLING
    driver_copy.request_counts.completed = 1
    with pytest.raises(StaleRecord):
        store.save(driver_copy)
    assert store.get("p", record.id).status == BatchStatus.CANCELLING
    fresh = store.get("p", record.id)
    store.save(state.transition(fresh, BatchStatus.CANCELLED, 5))
    with pytest.raises(Conflict):
        store.request_cancel("p", record.id)
    assert store.request_cancel("p", "batch_01JABCDEFGHJKMNPQRSTVWXYZ0") is None


def test_keys_are_hashed_scoped_and_revocable(tmp_path):
    keys = KeyStore(tmp_path / "api_keys")
    key = keys.create("alpha")
    other = keys.create("beta")
    assert key not in (tmp_path / "api_keys").read_text()  # only the hash at rest
    keys.authenticate(key, "alpha")
    with pytest.raises(PermissionDenied):
        keys.authenticate(key, "beta")  # a key is granted for one project
    with pytest.raises(PermissionDenied):
        keys.authenticate("vb-not-a-key", "alpha")
    assert keys.revoke(key)
    with pytest.raises(PermissionDenied):
        keys.authenticate(key, "alpha")
    keys.authenticate(other, "beta")


def test_keys_cli_prints_the_key_alone_on_the_last_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vbatch.cli", "keys", "create", "--project", "demo", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    key = out.stdout.strip().splitlines()[-1]
    KeyStore(tmp_path / "api_keys").authenticate(key, "demo")


def test_import_operator_is_still_the_standard_library():
    # -S: no site hooks that import `operator` early and would hide a shadowing
    # package; '' first on sys.path, as `python -m ...` run from the repo root has it.
    for cwd in (REPO, REPO / "tests"):
        out = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, ''); import operator; print(operator.__file__)"],
                             cwd=cwd, capture_output=True, text=True, check=True)
        assert "vbatch" not in out.stdout and str(REPO) not in out.stdout, out.stdout
        ran = subprocess.run([sys.executable, "-m", "json.tool", "--help"], cwd=cwd, capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
    out = subprocess.run([sys.executable, "-c", "import vbatch.operator.local_executor as m; print(m.__name__)"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "vbatch.operator.local_executor"


def test_core_imports_no_web_kopf_or_vllm_code():
    code = ("import sys, pkgutil, importlib, vbatch.core as c\n"
            "for m in pkgutil.walk_packages(c.__path__, 'vbatch.core.'): importlib.import_module(m.name)\n"
            "print(sorted(n for n in ('fastapi','starlette','kopf','vllm','uvicorn') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_counting_gpus_does_not_load_torch_into_the_gateway():
    code = "import sys; from vbatch.cli.serve import gpu_count; gpu_count(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in __import__("os").environ.items() if k != "CUDA_VISIBLE_DEVICES"})
    assert out.stdout.strip() == "False"
