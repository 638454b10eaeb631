#!/usr/bin/env bash
# Sourced by the image scripts: picks the container engine and its flags.
#
# Docker where a Docker engine answers (`docker info`), else Podman. Podman gets the
# settings measured to work on the development and CI machines (root, no Docker engine):
# the vfs storage driver under one known directory (so `make images-clean` bounds and
# frees it), cgroupfs, and runc (crun fails on their hybrid cgroups). Override with
# CONTAINER_ENGINE=docker|podman and VBATCH_PODMAN_ROOT=<dir>.
# shellcheck shell=bash

VBATCH_PODMAN_ROOT="${VBATCH_PODMAN_ROOT:-/var/tmp/vbatch-podman}"

if [[ -z "${CONTAINER_ENGINE:-}" ]]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    CONTAINER_ENGINE=docker
  elif command -v podman >/dev/null 2>&1; then
    CONTAINER_ENGINE=podman
  else
    echo "neither a Docker engine nor podman is available (install podman and runc)" >&2
    exit 3
  fi
fi

# ENGINE is used by the scripts that source this file.
# shellcheck disable=SC2034
if [[ "$CONTAINER_ENGINE" == podman ]]; then
  ENGINE=(podman --root "$VBATCH_PODMAN_ROOT/storage" --runroot "$VBATCH_PODMAN_ROOT/run"
          --storage-driver vfs --cgroup-manager cgroupfs --runtime runc)
else
  ENGINE=(docker)
fi
export CONTAINER_ENGINE VBATCH_PODMAN_ROOT
