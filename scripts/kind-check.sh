#!/usr/bin/env bash
# The release check on a real Kubernetes cluster (kind), for a maintainer's machine with a
# Docker engine, kind, kubectl and helm. It has NOT been run on the project's development
# or CI machines: they have no Docker engine, and kind needs one. What it does there is
# proven piece by piece by the image tests (tests/e2e/images, run in CI with Podman): the
# same images, the same chart values, the same quickstart through the openai SDK.
#
#   make kind-check          (KEEP_CLUSTER=1 keeps the cluster for a look around)
#
# Steps: create a kind cluster; build the images (make images) and load them into it;
# install MinIO for storage; helm install the chart with the CPU worker image and an echo
# model (no GPU, no weights to fetch); run the quickstart through the openai SDK; show
# `kubectl get batches`; delete the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${KIND_CLUSTER:-vbatch-check}"
NAMESPACE=vbatch
IMAGE_REPO="${IMAGE_REPO:-ghcr.io/vbatch}"
IMAGE_TAG="${IMAGE_TAG:-0.1.0}"
MINIO_IMAGE="${MINIO_IMAGE:-quay.io/minio/minio:RELEASE.2025-04-22T22-12-26Z}"
PYTHON="${PYTHON:-.venv/bin/python}"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "kind-check needs $tool on PATH" >&2; exit 3; }
done
if ! docker info >/dev/null 2>&1; then
  echo "kind-check needs a running Docker engine (kind runs its nodes as Docker containers)." >&2
  echo "None here: on the project's development and CI machines the image tests run instead (make test-images)." >&2
  exit 3
fi

cleanup() {
  if [[ -z "${KEEP_CLUSTER:-}" ]]; then kind delete cluster --name "$CLUSTER"; fi
}
trap cleanup EXIT

echo "== kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s

echo "== images"
CONTAINER_ENGINE=docker IMAGE_REPO="$IMAGE_REPO" IMAGE_TAG="$IMAGE_TAG" scripts/build-images.sh gateway worker-cpu
kind load docker-image --name "$CLUSTER" "$IMAGE_REPO/vbatch:$IMAGE_TAG" "$IMAGE_REPO/vbatch-worker-cpu:$IMAGE_TAG"

echo "== MinIO (storage) and its bucket"
kubectl create namespace "$NAMESPACE"
kubectl -n "$NAMESPACE" create secret generic vbatch-minio \
  --from-literal=VBATCH_S3_ACCESS_KEY=vbatch --from-literal=VBATCH_S3_SECRET_KEY=vbatch-check-secret
kubectl -n "$NAMESPACE" run minio --image="$MINIO_IMAGE" --port=9000 \
  --env=MINIO_ROOT_USER=vbatch --env=MINIO_ROOT_PASSWORD=vbatch-check-secret \
  --command -- sh -c 'mkdir -p /data/vbatch && minio server /data'
kubectl -n "$NAMESPACE" expose pod minio --port=9000
kubectl -n "$NAMESPACE" wait --for=condition=Ready pod/minio --timeout=180s

echo "== helm install (CPU worker image, echo engine)"
helm install vbatch charts/vbatch -n "$NAMESPACE" --wait --timeout 5m \
  --set storage.endpoint="minio.$NAMESPACE.svc.cluster.local:9000" \
  --set storage.existingSecret=vbatch-minio \
  --set gateway.image.repository="$IMAGE_REPO/vbatch" --set gateway.image.tag="$IMAGE_TAG" \
  --set operator.image.repository="$IMAGE_REPO/vbatch" --set operator.image.tag="$IMAGE_TAG" \
  --set worker.image.repository="$IMAGE_REPO/vbatch-worker-cpu" --set worker.image.tag="$IMAGE_TAG" \
  --set worker.image.pullPolicy=Never --set worker.shmSizeLimit=256Mi \
  --set 'gateway.extraEnv[0].name=VBATCH_ENGINE' --set 'gateway.extraEnv[0].value=echo' \
  --set 'operator.extraEnv[0].name=VBATCH_ENGINE' --set 'operator.extraEnv[0].value=echo' \
  --set worker.extraEnv.VBATCH_ENGINE=echo \
  | tee /tmp/vbatch-kind-install.txt
API_KEY="$(grep -o 'VBATCH_API_KEY=vb-[A-Za-z0-9]*' /tmp/vbatch-kind-install.txt | head -1 | cut -d= -f2)"
[[ -n "$API_KEY" ]] || { echo "no API key in the install notes" >&2; exit 1; }

echo "== quickstart through the openai SDK"
kubectl -n "$NAMESPACE" port-forward svc/vbatch-gateway 18000:8000 >/dev/null &
forward=$!
trap 'kill "$forward" 2>/dev/null || true; cleanup' EXIT
sleep 3
VBATCH_URL=http://127.0.0.1:18000/v1 VBATCH_API_KEY="$API_KEY" "$PYTHON" - <<'PY'
import io, json, os, time
from openai import OpenAI

client = OpenAI(base_url=os.environ["VBATCH_URL"], api_key=os.environ["VBATCH_API_KEY"],
                default_headers={"x-project-id": "default"})
lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": "demo", "messages": [{"role": "user", "content": f"hello {i}"}]}} for i in range(8)]
data = "".join(json.dumps(line) + "\n" for line in lines).encode()
uploaded = client.files.create(file=("quickstart.jsonl", io.BytesIO(data)), purpose="batch")
batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
deadline = time.monotonic() + 600
while batch.status not in {"completed", "failed", "expired", "cancelled"}:
    assert time.monotonic() < deadline, f"batch still {batch.status}"
    time.sleep(3)
    batch = client.batches.retrieve(batch.id)
print(batch.id, batch.status, batch.request_counts)
assert batch.status == "completed" and batch.request_counts.completed == 8, batch
out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(8))
PY

echo "== kubectl get batches"
kubectl -n "$NAMESPACE" get batches
echo "kind-check passed"
