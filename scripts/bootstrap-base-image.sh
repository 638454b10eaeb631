#!/usr/bin/env bash
# Bootstraps the images' base (python:3.11-slim-bookworm) from Debian's packages, for
# machines that reach Debian's mirror but no container registry (the development and CI
# machines). It is a stand-in, not the upstream image: Debian bookworm's own Python 3.11
# (the minor the project supports) plus venv, CA certificates and the user tools the
# Dockerfiles use, tagged under the base's name so the Dockerfiles build unchanged with
# --pull=never. Where a registry is reachable, skip this: the build pulls the real base.
#
#   scripts/bootstrap-base-image.sh [TAG]      (default python:3.11-slim-bookworm)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/container-engine.sh
source scripts/container-engine.sh

TAG="${1:-python:3.11-slim-bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# What the Dockerfiles' RUN steps call: python / python3 -m venv, groupadd/useradd, pip's TLS.
PACKAGES="python3,python3-venv,python-is-python3,ca-certificates,passwd,libnuma1"

if "${ENGINE[@]}" image exists "$TAG" 2>/dev/null || "${ENGINE[@]}" image inspect "$TAG" >/dev/null 2>&1; then
  echo "base image $TAG is already there"
  exit 0
fi
command -v mmdebstrap >/dev/null || { echo "mmdebstrap is needed (apt-get install mmdebstrap)" >&2; exit 3; }

# --variant=minbase: essential packages and apt only; docs, man pages and apt lists are
# dropped as in the slim images. The tarball streams straight into the engine's import.
# ($1 in the hook is mmdebstrap's root directory, expanded by mmdebstrap, not here.)
# shellcheck disable=SC2016
mmdebstrap --variant=minbase --include="$PACKAGES" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  "$SUITE" - "$MIRROR" \
  | "${ENGINE[@]}" import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$TAG"
echo "bootstrapped $TAG from Debian $SUITE"
