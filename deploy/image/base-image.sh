#!/usr/bin/env bash
# Makes a Debian bookworm base image with Python 3.11, for building deploy/image/Dockerfile
# where no registry can be pulled from: debootstrap (minbase + python3, python3-venv) into a
# folder, slimmed, imported into podman. Does nothing if the image exists.
#
#   deploy/image/base-image.sh [NAME]     # default localhost/multiserve-base:bookworm
#   podman build --build-arg BASE_IMAGE=localhost/multiserve-base:bookworm ...
#
# Needs root, debootstrap and podman (CONTAINERS_CONF=deploy/image/containers.conf on hosts
# without systemd). MIRROR overrides the Debian mirror.
set -euo pipefail
name=${1:-localhost/multiserve-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
if podman image exists "$name"; then
    echo "base image $name: already there"
    exit 0
fi
root=$(mktemp -d "${TMPDIR:-/tmp}/multiserve-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "base image $name: debootstrap bookworm into $root"
if ! debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" \
    >"$root.log" 2>&1; then
    tail -n 30 "$root.log" >&2
    echo "base image $name: debootstrap failed (log above)" >&2
    rm -f "$root.log"
    exit 1
fi
rm -f "$root.log"
# What an image never needs: package caches and lists, documentation, translations.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
tar -C "$root" -c . | podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase --include=python3,python3-venv bookworm" \
    - "$name" >/dev/null
echo "base image $name: $(podman image inspect --format '{{.Size}}' "$name") bytes"
