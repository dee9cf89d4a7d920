#!/usr/bin/env bash
# Install everything qtune, its examples and its tests need on a fresh Debian machine (idempotent).
#   bash scripts/setup.sh               everything, including the Kubernetes test control plane and helm
#   bash scripts/setup.sh --no-cluster  only what `qtune tune` and the examples need
set -euo pipefail
cd "$(dirname "$0")/.."
with_cluster=1
[ "${1:-}" = "--no-cluster" ] && with_cluster=0
[ "${QTUNE_SKIP_CLUSTER_SETUP:-0}" = "1" ] && with_cluster=0

apt_packages=(dataset-fashion-mnist prometheus prometheus-pushgateway etcd-server openssl iproute2)
# the real image (scripts/build_image.py, tests/image): buildah builds it from a debootstrap'ed Debian base;
# cold ~2 min (base ~1 min), warm ~1 min, no-op 0.4 s; 739 MB unpacked, 223 MB OCI archive
[ "$with_cluster" = "1" ] && apt_packages+=(buildah debootstrap runc fuse-overlayfs)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "setup: installing qtune with all extras (pip's cache serves repeat installs)"
python3 -m pip install -q --disable-pip-version-check -e ".[onnxruntime,torch,operator,examples,test]"
python3 -m pip install -q --disable-pip-version-check -r requirements/lint.txt   # hadolint for the Dockerfile

if [ "$with_cluster" = "1" ]; then
  echo "setup: building the Kubernetes test control plane (cached after the first build)"
  bash tests/cluster/setup.sh
  echo "setup: building helm for the chart tests (cached after the first build)"
  bash tests/install/build_helm.sh
fi
echo "setup: done"
