# The gateway and operator image (one image, two commands: `vbatch serve`, `vbatch operator`).
# Build from the repository root:  docker build -f images/gateway.Dockerfile -t ghcr.io/vbatch/vbatch:0.1.0 .
# `make images` builds it with Docker or Podman (scripts/build-images.sh); where no registry
# is reachable, scripts/bootstrap-base-image.sh makes the base from Debian's packages.
# Pinned to the Python minor and Debian release the project supports; pin a digest for
# byte-for-byte reproducible builds, or point BASE_IMAGE at your registry's mirror.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS build
# How pip reaches the package index (a mirror, a proxy's CA): build-stage only, so none of
# it reaches the runtime image or its history. A CA bundle comes in as the build secret
# `ca-bundle` (mounted for the RUN step only, never copied into a layer).
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package build needs, so editing tests or docs does not bust the cache.
COPY pyproject.toml README.md* ./
COPY cli ./cli
COPY core ./core
COPY api ./api
COPY operator ./operator
COPY worker ./worker
# A self-contained venv, copied whole into the runtime stage without the build tooling.
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python -m venv /opt/venv && /opt/venv/bin/pip install .

FROM ${BASE_IMAGE}
# A fixed numeric uid/gid: the chart runs as 10001 and runAsNonRoot can only verify numbers.
RUN groupadd --gid 10001 vbatch \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin vbatch
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
EXPOSE 8000
# Exec form: SIGTERM reaches vbatch itself, which shuts down cleanly.
ENTRYPOINT ["vbatch"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
