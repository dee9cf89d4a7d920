#!/usr/bin/env bash
# Install everything qtune, its examples and its tests need on a fresh Debian machine (idempotent).
#   bash scripts/setup.sh               everything, including the Kubernetes test control plane and helm
#   bash scripts/setup.sh --no-cluster  only what `qtune tune` and the examples need
set -euo pipefail
cd "$(dirname "$0")/.."
with_cluster=1
[ "${1:-}" = "--no-cluster" ] && with_cluster=0
[ "${QTUNE_SKIP_CLUSTER_SETUP:-0}" = "1" ] && with_cluster=0

# the machine packages: requirements/system.txt, the one list the tests' presence checks read too
# (the real image, scripts/build_image.py and tests/image, needs the cluster group's buildah,
# debootstrap and runc: cold ~2 min, warm ~1 min, no-op 0.4 s; 739 MB unpacked, 223 MB OCI archive)
source scripts/system_packages.sh
if [ "$with_cluster" = "1" ]; then install_system_packages local cluster; else install_system_packages local; fi

echo "setup: installing qtune with all extras (pip's cache serves repeat installs)"
python3 -m pip install -q --disable-pip-version-check -e ".[onnxruntime,torch,operator,examples,test]"

if [ "$with_cluster" = "1" ]; then
  echo "setup: building the Kubernetes test control plane (cached after the first build)"
  bash tests/cluster/setup.sh
  echo "setup: building helm for the chart tests (cached after the first build)"
  bash tests/install/build_helm.sh
fi
echo "setup: done"
