#!/usr/bin/env bash
# Builds vbatch's container images with Docker or Podman, whichever the machine has.
#
#   scripts/build-images.sh [gateway] [worker-cpu] [worker]    (default: gateway worker-cpu)
#
#   gateway      images/gateway.Dockerfile     $IMAGE_REPO/vbatch:$IMAGE_TAG (gateway + operator)
#   worker-cpu   images/worker-cpu.Dockerfile  $IMAGE_REPO/vbatch-worker-cpu:$IMAGE_TAG
#   worker       images/worker.Dockerfile      $IMAGE_REPO/vbatch-worker:$IMAGE_TAG (GPU; its
#                base, vllm/vllm-openai, must be pullable)
#
# Settings (environment):
#   BASE_IMAGE        base of the gateway and CPU worker images (default python:3.11-slim-bookworm).
#                     Where no registry is reachable, make it first: scripts/bootstrap-base-image.sh
#   PIP_CERT / SSL_CERT_FILE  a CA bundle pip needs to reach the index (e.g. behind a TLS proxy):
#                     handed to the build as the secret `ca-bundle`, mounted for the pip steps
#                     only, never copied into an image.
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL (http/https), HTTP(S)_PROXY, NO_PROXY: passed through
#                     as build arguments of the steps that run pip (build stages only).
#   PIP_FIND_LINKS    a local directory of wheels (here: torch's CPU build), given to the CPU
#                     worker build as the `wheels` build context; when it holds torch, PyTorch's
#                     own index is not asked.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/container-engine.sh
source scripts/container-engine.sh

IMAGE_REPO="${IMAGE_REPO:-ghcr.io/vbatch}"
IMAGE_TAG="${IMAGE_TAG:-0.1.0}"
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim-bookworm}"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(gateway worker-cpu)
for target in "${targets[@]}"; do
  case "$target" in
    gateway|worker-cpu|worker) ;;
    *) echo "unknown image '$target' (gateway, worker-cpu, worker)" >&2; exit 2 ;;
  esac
done

common=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --layers)
ca="${PIP_CERT:-${SSL_CERT_FILE:-}}"
if [[ -n "$ca" && -s "$ca" ]]; then
  common+=(--secret "id=ca-bundle,src=$ca")
fi
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  value="${!var:-}"
  # A file:// index lives on this host, not in the build: leave it out.
  if [[ -n "$value" && "$value" != file:* ]]; then
    common+=(--build-arg "$var=$value")
  fi
done
# Use the base already here (pulled or bootstrapped); pull only when it is missing.
if "${ENGINE[@]}" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  [[ "$CONTAINER_ENGINE" == podman ]] && common+=(--pull=never)
else
  echo "base image $BASE_IMAGE is not here: pulling it (without a registry, run scripts/bootstrap-base-image.sh)" >&2
fi
if [[ "$CONTAINER_ENGINE" == docker ]]; then
  export DOCKER_BUILDKIT=1  # --secret and RUN --mount need BuildKit
fi

digest() {  # digest PATH...: one hash of the files' names and contents (caches, --no-deps layers)
  find "$@" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z \
    | xargs -0 sha256sum | sha256sum | cut -c1-16
}

build() {  # build DOCKERFILE IMAGE [extra args...]
  local file="$1" image="$2"
  shift 2
  local started=$SECONDS
  echo "== building $image from $file with $CONTAINER_ENGINE"
  "${ENGINE[@]}" build -f "$file" -t "$image" "${common[@]}" "$@" .
  echo "== built $image in $((SECONDS - started)) s"
}

for target in "${targets[@]}"; do
  case "$target" in
    gateway)
      build images/gateway.Dockerfile "$IMAGE_REPO/vbatch:$IMAGE_TAG" ;;
    worker-cpu)
      wheels="${PIP_FIND_LINKS:-}"
      extra=()
      if [[ -n "$wheels" && -d "$wheels" ]]; then
        compgen -G "$wheels/torch-2.13.0+cpu-*.whl" >/dev/null && extra+=(--build-arg TORCH_INDEX_URL=)
      else
        wheels="$(mktemp -d)"
        trap 'rmdir "$wheels"' EXIT
      fi
      build images/worker-cpu.Dockerfile "$IMAGE_REPO/vbatch-worker-cpu:$IMAGE_TAG" \
        --build-context "wheels=$wheels" "${extra[@]}" \
        --build-arg "LOCK_DIGEST=$(digest constraints-cpu.txt pyproject.toml)" \
        --build-arg "SOURCE_DIGEST=$(digest pyproject.toml README.md cli core api operator worker)" ;;
    worker)
      build images/worker.Dockerfile "$IMAGE_REPO/vbatch-worker:$IMAGE_TAG" ;;
    *)
      echo "unknown image '$target' (gateway, worker-cpu, worker)" >&2
      exit 2 ;;
  esac
done
# Superseded images of earlier builds (vfs keeps each as a full copy of the filesystem);
# a day's are kept, since the gateway's build stage is the cache of its pip step.
"${ENGINE[@]}" image prune -f --filter until=24h >/dev/null || true
