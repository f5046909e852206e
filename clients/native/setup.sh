#!/usr/bin/env bash
# Install the Debian packages the native client builds with (idempotent: installs only what is missing).
#   clients/native/setup.sh            # the host's own build
#   clients/native/setup.sh --arm64    # and an aarch64 cross build run under qemu-user (adds Debian's arm64 architecture)
# Needs root (or sudo) and a reachable Debian mirror; CI runs it before building.
set -euo pipefail

PACKAGES=(cmake g++ make pkg-config protobuf-compiler libprotobuf-dev libcurl4-openssl-dev libssl-dev)
ARM64=(g++-aarch64-linux-gnu qemu-user libprotobuf-dev:arm64 libcurl4-openssl-dev:arm64 libssl-dev:arm64)
if [ "${1:-}" = "--arm64" ]; then
    PACKAGES+=("${ARM64[@]}")
elif [ -n "${1:-}" ]; then
    echo "setup.sh: unknown argument '$1' (allowed: --arm64)" >&2
    exit 2
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup.sh: all build packages are installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup.sh: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
echo "setup.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if [[ " ${missing[*]} " == *":arm64 "* ]] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $SUDO dpkg --add-architecture arm64
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
