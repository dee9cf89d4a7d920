#!/usr/bin/env bash
# Build Kueue's manager (the `kueue` binary of sigs.k8s.io/kueue/cmd/kueue) from the Go module
# pinned in kueue-build/go.mod, into a cache folder OUTSIDE the checkout keyed by version, and copy
# what a cluster admin installs from the module (config/components/crd: the CRDs and their
# conversion-webhook patches; config/components/webhook: the webhook configurations) next to it:
#
#   ${QTUNE_CACHE_DIR:-$HOME/.cache/qtune}/kueue/<version>/bin/kueue
#   ${QTUNE_CACHE_DIR:-$HOME/.cache/qtune}/kueue/<version>/config/{crd,webhook}/
#
# Idempotent: nothing is done when both are there (0 s). Prints the version folder on the last
# line of stdout. The plane (kueue.py) runs it when Kueue is asked for and not built yet.
#
# Env:
#   QTUNE_CACHE_DIR        cache root (default ~/.cache/qtune)
#   QTUNE_KUEUE_REBUILD=1  force a rebuild
#   QTUNE_BUILD_NICE       niceness of the go build (default 10: the machine is shared)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mod_dir="$here/kueue-build"
version="$(awk '$1 == "require" && $2 == "sigs.k8s.io/kueue" {print $3; exit}
                $1 == "sigs.k8s.io/kueue" && $2 ~ /^v0\./ {print $2; exit}' "$mod_dir/go.mod")"
if [[ -z "$version" ]]; then
  echo "build_kueue.sh: cannot read the sigs.k8s.io/kueue version from $mod_dir/go.mod" >&2
  exit 1
fi
cache_root="${QTUNE_CACHE_DIR:-$HOME/.cache/qtune}"
out_dir="$cache_root/kueue/$version"
rebuild="${QTUNE_KUEUE_REBUILD:-0}"

log() { printf '[build_kueue.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

start=$SECONDS
have_bin() { [[ "$rebuild" != "1" && -x "$out_dir/bin/kueue" ]]; }
have_config() { [[ "$rebuild" != "1" && -f "$out_dir/config/webhook/manifests.yaml" ]] \
                  && compgen -G "$out_dir/config/crd/bases/*.yaml" >/dev/null; }
if have_bin && have_config; then
  log "Kueue $version present in $out_dir (build skipped, 0s)"
  echo "$out_dir"
  exit 0
fi

command -v go >/dev/null || { echo "build_kueue.sh: the Go toolchain (go) is required" >&2; exit 1; }

# The machine's toolchain (never another one); modules from the configured module proxy,
# verified against kueue-build/go.sum.
export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS="-buildvcs=false -mod=readonly"

# The Kueue module itself (its manifests); go build fetches the rest of the build list.
(cd "$mod_dir" && go mod download sigs.k8s.io/kueue)
src="$(cd "$mod_dir" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"

mkdir -p "$cache_root/kueue"
tmp_dir="$(mktemp -d "$cache_root/kueue/.build.XXXXXX")"
trap 'rm -rf "$tmp_dir"' EXIT
mkdir -p "$out_dir/bin"

if ! have_bin; then
  log "building Kueue $version with $(go version) into $out_dir"
  pkg=sigs.k8s.io/kueue/pkg/version
  ldflags="-s -w -X $pkg.GitVersion=$version -X $pkg.BuildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  t0=$SECONDS
  (cd "$mod_dir" && nice -n "${QTUNE_BUILD_NICE:-10}" go build -trimpath -ldflags "$ldflags" \
    -o "$tmp_dir/kueue" sigs.k8s.io/kueue/cmd/kueue)
  log "go build (kueue): $((SECONDS - t0))s"
  mv -f "$tmp_dir/kueue" "$out_dir/bin/kueue"
fi

if ! have_config; then
  mkdir -p "$tmp_dir/config"
  cp -r "$src/config/components/crd" "$src/config/components/webhook" "$tmp_dir/config/"
  chmod -R u+w "$tmp_dir/config"
  rm -rf "$out_dir/config"
  mv "$tmp_dir/config" "$out_dir/config"
fi
log "total: $((SECONDS - start))s"
echo "$out_dir"
