#!/usr/bin/env bash
# Build the `helm` CLI the install tests use from its Go module (helm.sh/helm/v3, pinned below),
# into a cache folder OUTSIDE the checkout keyed by version:
#
#   ${QTUNE_CACHE_DIR:-$HOME/.cache/qtune}/helm/<version>/helm
#
# `go install module/cmd/helm@version` builds with the module's own go.mod and go.sum, i.e. exactly
# the dependency set of that Helm release, verified against the Go checksum database.
# Idempotent: a helm already present (and reporting the pinned version) is not rebuilt.
# Prints the path of the helm binary on the last line of stdout.
#
# Env:
#   QTUNE_CACHE_DIR       cache root (default ~/.cache/qtune)
#   QTUNE_HELM_VERSION    override the pinned version (default below)
#   QTUNE_HELM_REBUILD=1  force a rebuild
#   QTUNE_BUILD_NICE      niceness of the go build (default 10: the machine is shared)
set -euo pipefail

version="${QTUNE_HELM_VERSION:-v3.22.0}"
module="helm.sh/helm/v3"
cache_root="${QTUNE_CACHE_DIR:-$HOME/.cache/qtune}"
out_dir="$cache_root/helm/$version"
helm="$out_dir/helm"

log() { printf '[build_helm.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

start=$SECONDS
if [[ "${QTUNE_HELM_REBUILD:-0}" != "1" && -x "$helm" ]] \
   && [[ "$("$helm" version --template '{{.Version}}' 2>/dev/null)" == "$version" ]]; then
  log "helm $version present in $out_dir (build skipped, 0s)"
  echo "$helm"
  exit 0
fi

command -v go >/dev/null || { echo "build_helm.sh: the Go toolchain (go) is required" >&2; exit 1; }
log "building helm $version with $(go version) into $out_dir"

# The machine's toolchain (never download another one); modules from the configured proxy.
export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS="-buildvcs=false"

t0=$SECONDS
go mod download "$module@$version"
mod_dir="$(go mod download -json "$module@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
# Kubernetes version Helm reports as its default capabilities (as Helm's Makefile derives it).
client_go="$(awk '$1 == "k8s.io/client-go" {print $2; exit}' "$mod_dir/go.mod")"   # v0.<minor>.<patch>
k8s_minor="$(echo "$client_go" | cut -d. -f2)"
log "module download: $((SECONDS - t0))s (k8s.io/client-go $client_go)"

ldflags="-s -w -X $module/internal/version.version=$version -X $module/internal/version.gitTreeState=clean"
for pkg in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X $module/$pkg.k8sVersionMajor=1 -X $module/$pkg.k8sVersionMinor=$k8s_minor"
done

mkdir -p "$cache_root/helm"
tmp_dir="$(mktemp -d "$cache_root/helm/.build.XXXXXX")"
trap 'rm -rf "$tmp_dir"' EXIT

t0=$SECONDS
GOBIN="$tmp_dir" nice -n "${QTUNE_BUILD_NICE:-10}" go install -trimpath -ldflags "$ldflags" "$module/cmd/helm@$version"
log "go install $module/cmd/helm@$version: $((SECONDS - t0))s"

mkdir -p "$out_dir"
mv -f "$tmp_dir/helm" "$helm"
"$helm" version >&2
log "total: $((SECONDS - start))s"
echo "$helm"
