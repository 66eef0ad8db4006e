#!/usr/bin/env bash
# A base image for machines that reach Debian's archive but no container registry (this
# project's own machines): Debian bookworm (Python 3.11, as python:3.11-slim-bookworm) bootstrapped
# with debootstrap and imported into podman as localhost/splitlm-base:bookworm. Root only.
#   deploy/container/local-base.sh && podman build --build-arg BASE=localhost/splitlm-base:bookworm ...
# About 3 minutes; run once (the image stays in podman's storage).
set -euo pipefail
tag=${1:-localhost/splitlm-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || { echo "local-base.sh: apt-get install debootstrap" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "$tag"
