#!/usr/bin/env bash
# Build the Kubernetes binaries the cluster tests run (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl; kubelet for the real node, see
# realnode.py) from the k8s.io/kubernetes Go module pinned in k8s-build/go.mod, into a
# cache folder OUTSIDE the checkout keyed by version:
#
#   ${QTUNE_CACHE_DIR:-$HOME/.cache/qtune}/k8s/<version>/bin/
#
# Idempotent: binaries already present (and runnable) are not rebuilt; when only some are
# missing (e.g. kubelet, added later), only those are built.
# Prints the bin folder on the last line of stdout.
#
# Env:
#   QTUNE_CACHE_DIR      cache root (default ~/.cache/qtune)
#   QTUNE_K8S_REBUILD=1  force a rebuild
#   QTUNE_BUILD_NICE     niceness of the go build (default 10: the machine is shared)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mod_dir="$here/k8s-build"
version="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3; exit}
                $1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ {print $2; exit}' "$mod_dir/go.mod")"
if [[ -z "$version" ]]; then
  echo "build.sh: cannot read the k8s.io/kubernetes version from $mod_dir/go.mod" >&2
  exit 1
fi
cache_root="${QTUNE_CACHE_DIR:-$HOME/.cache/qtune}"
bin_dir="$cache_root/k8s/$version/bin"
tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)

log() { printf '[build.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

have_all() {
  local t
  for t in "${tools[@]}"; do
    [[ -x "$bin_dir/$t" ]] || return 1
  done
  "$bin_dir/kubectl" version --client >/dev/null 2>&1 || return 1
}

start=$SECONDS
if [[ "${QTUNE_K8S_REBUILD:-0}" != "1" ]] && have_all; then
  log "Kubernetes $version binaries present in $bin_dir (build skipped, 0s)"
  echo "$bin_dir"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: the Go toolchain (go) is required" >&2; exit 1; }
log "building Kubernetes $version with $(go version) into $bin_dir"

# Use the machine's toolchain (never download another one); modules come from the
# configured module proxy and are verified against k8s-build/go.sum.
export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS="-buildvcs=false -mod=readonly"

minor="${version#v1.}"; minor="${minor%%.*}"
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

t0=$SECONDS
(cd "$mod_dir" && go mod download)
log "module download: $((SECONDS - t0))s"

mkdir -p "$cache_root/k8s"
tmp_dir="$(mktemp -d "$cache_root/k8s/.build.XXXXXX")"
trap 'rm -rf "$tmp_dir"' EXIT

# Build only what is missing (all of them with QTUNE_K8S_REBUILD=1).
build=()
for t in "${tools[@]}"; do
  [[ "${QTUNE_K8S_REBUILD:-0}" != "1" && -x "$bin_dir/$t" ]] || build+=("$t")
done
if ((${#build[@]} == ${#tools[@]})); then
  targets=(tool)
else
  targets=("${build[@]/#/k8s.io/kubernetes/cmd/}")
fi
t0=$SECONDS
(cd "$mod_dir" && nice -n "${QTUNE_BUILD_NICE:-10}" go build -trimpath -ldflags "$ldflags" -o "$tmp_dir/" "${targets[@]}")
log "go build (${build[*]}): $((SECONDS - t0))s"

mkdir -p "$bin_dir"
for t in "${build[@]}"; do
  mv -f "$tmp_dir/$t" "$bin_dir/$t"
done
"$bin_dir/kube-apiserver" --version >&2
log "total: $((SECONDS - start))s"
echo "$bin_dir"
