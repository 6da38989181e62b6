#!/usr/bin/env bash
# Installs the Debian packages carapace needs; does nothing when all are present.
set -euo pipefail
PACKAGES=(qemu-system-x86 linux-image-amd64 busybox-static crun python3.11 python3-venv
          iproute2 iptables cpio make
          containerd runc containernetworking-plugins
          docker.io podman conmon procps)
missing=()
for p in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
