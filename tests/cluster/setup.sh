#!/usr/bin/env bash
# Prepare a (fresh Debian) machine for the cluster tests, then build the Kubernetes binaries.
#
#   bash tests/cluster/setup.sh
#
# Installs with apt-get what is missing: etcd-server (etcd 3.4, which the pinned
# kube-apiserver accepts), prometheus, prometheus-pushgateway, openssl, util-linux (unshare,
# taskset, mount), procps; for the real node (realnode.py): containerd, runc,
# containernetworking-plugins, iptables, buildah, busybox-static, gcc + libc6-dev (static pause);
# the Python packages the plane and tests import if missing; then runs build.sh (which skips
# the build when the cached binaries exist) and build_images.sh (pause + busybox OCI archives,
# cached too). Services the Debian packages would start are not started: the plane runs its
# own instances on free ports (and the real node its own containerd).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
start=$SECONDS
log() { printf '[setup.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

debs=(etcd-server prometheus prometheus-pushgateway openssl util-linux procps)
debs+=(containerd runc containernetworking-plugins iptables iproute2 buildah busybox-static gcc
       libc6-dev)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  # Keep the packages' own services from starting (policy-rc.d, as in container images).
  created_policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"; then
    $sudo apt-get update -q
    $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  [[ -z "$created_policy" ]] || $sudo rm -f /usr/sbin/policy-rc.d
  # A postinst may still have started a daemon through systemd where systemd runs; the plane
  # does not need them. Stop them without failing where there is no systemd.
  for svc in etcd prometheus prometheus-pushgateway containerd; do
    $sudo systemctl stop "$svc" >/dev/null 2>&1 || true
  done
fi
log "Debian packages ready ($((SECONDS - start))s)"

python="${PYTHON:-python3}"
if ! "$python" -c "import kubernetes, prometheus_client, requests, yaml, pytest" 2>/dev/null; then
  log "installing Python packages for the cluster tests"
  "$python" -m pip install -q "kubernetes>=29" "prometheus-client>=0.20" "requests>=2.31" \
    "pyyaml>=6.0" "pytest>=8" "pytest-timeout>=2.3"
fi

bash "$here/build.sh" >/dev/null
bash "$here/build_images.sh" >/dev/null
log "setup done in $((SECONDS - start))s"
