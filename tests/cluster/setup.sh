#!/usr/bin/env bash
# Prepare a (fresh Debian) machine for the cluster tests, then build the Kubernetes binaries.
#
#   bash tests/cluster/setup.sh
#
# Installs what is missing of requirements/system.txt (etcd-server: etcd 3.4, which the pinned
# kube-apiserver accepts; prometheus, prometheus-pushgateway, openssl, util-linux, procps; for the
# real node (realnode.py): containerd, runc, containernetworking-plugins, iptables, buildah,
# busybox-static, gcc + libc6-dev for the static pause); the Python packages the plane and tests
# import if missing; then runs build.sh (which skips the build when the cached binaries exist),
# build_kueue.sh (Kueue's manager and manifests, cached the same way) and
# build_images.sh (pause + busybox OCI archives, cached too). Services the Debian packages would start are not started: the plane runs its
# own instances on free ports (and the real node its own containerd).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
start=$SECONDS
log() { printf '[setup.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# requirements/system.txt: the one list of machine packages (scripts/setup.sh and the tests'
# presence checks read it too)
source "$here/../../scripts/system_packages.sh"
install_system_packages local cluster
log "Debian packages ready ($((SECONDS - start))s)"

python="${PYTHON:-python3}"
if ! "$python" -c "import kubernetes, prometheus_client, requests, yaml, pytest" 2>/dev/null; then
  log "installing Python packages for the cluster tests"
  "$python" -m pip install -q "kubernetes>=29" "prometheus-client>=0.20" "requests>=2.31" \
    "pyyaml>=6.0" "pytest>=8" "pytest-timeout>=2.3"
fi

bash "$here/build.sh" >/dev/null
bash "$here/build_kueue.sh" >/dev/null   # Kueue for Plane(kueue=True) (kueue.py); cached like build.sh's
bash "$here/build_images.sh" >/dev/null
log "setup done in $((SECONDS - start))s"
