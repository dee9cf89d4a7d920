#!/usr/bin/env bash
# Build the container images the real node needs (see realnode.py), without any registry:
#
#   pause    Kubernetes' build/pause/linux/pause.c from the pinned k8s.io/kubernetes module,
#            compiled with `gcc -static` (the pod sandbox image)
#   busybox  Debian's busybox-static with a symlink per applet in /bin (the test image)
#
# each as an OCI archive in ${QTUNE_CACHE_DIR:-$HOME/.cache/qtune}/images/, named after its
# content (pause.c's sha256, busybox's package version + binary sha256): an archive that is
# already there is not rebuilt (0 s). Images are made with `buildah from scratch`, exported with
# `buildah push ... oci-archive:` and removed from buildah's storage again.
#
# Prints one line per image on stdout: `<name> <archive path> <image reference>`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${QTUNE_CACHE_DIR:-$HOME/.cache/qtune}"
out_dir="$cache_root/images"
log() { printf '[build_images.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

version="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3; exit}
                $1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ {print $2; exit}' "$here/k8s-build/go.mod")"
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly"
mod_root="$(go env GOMODCACHE)/k8s.io/kubernetes@$version"
if [[ ! -f "$mod_root/build/pause/linux/pause.c" ]]; then
  (cd "$here/k8s-build" && go mod download k8s.io/kubernetes)
fi
pause_c="$mod_root/build/pause/linux/pause.c"
pause_tag="$(awk -F'[ ?=]+' '$1 == "TAG" {print $2; exit}' "$mod_root/build/pause/Makefile")"
pause_sum="$(sha256sum "$pause_c" | cut -c1-12)"
busybox_bin=/bin/busybox
busybox_ver="$(dpkg-query -W -f='${Version}' busybox-static)"; busybox_ver="$(tr -c 'A-Za-z0-9.\n-' '-' <<<"${busybox_ver#*:}")"
busybox_sum="$(sha256sum "$busybox_bin" | cut -c1-12)"

mkdir -p "$out_dir"
work="$(mktemp -d "$out_dir/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# build_image NAME REF ARCHIVE ROOTFS_DIR ENTRYPOINT_JSON
build_image() {
  local name=$1 ref=$2 archive=$3 rootfs=$4 entrypoint=$5 c t0=$SECONDS
  c="$(buildah from scratch)"
  buildah copy --quiet "$c" "$rootfs/" / >/dev/null
  buildah config --entrypoint "$entrypoint" --env PATH=/bin --os linux --arch amd64 \
    --label "io.qtune.test-image=$name" "$c"
  buildah commit --quiet "$c" "$ref" >/dev/null
  buildah rm "$c" >/dev/null
  buildah push --quiet "$ref" "oci-archive:$work/$name.tar:$ref" >/dev/null
  buildah rmi "$ref" >/dev/null
  mv -f "$work/$name.tar" "$archive"
  log "built $ref -> $archive ($((SECONDS - t0))s)"
}

pause_ref="qtune.test/pause:$pause_tag"
pause_archive="$out_dir/pause-$pause_tag-$pause_sum.oci.tar"
if [[ ! -s "$pause_archive" ]]; then
  command -v buildah >/dev/null || { echo "build_images.sh: buildah is required" >&2; exit 1; }
  mkdir -p "$work/pause"
  gcc -Os -static -DVERSION="$pause_tag" -o "$work/pause/pause" "$pause_c"
  build_image pause "$pause_ref" "$pause_archive" "$work/pause" '["/pause"]'
fi
echo "pause $pause_archive $pause_ref"

busybox_ref="qtune.test/busybox:$busybox_ver"
busybox_archive="$out_dir/busybox-$busybox_ver-$busybox_sum.oci.tar"
if [[ ! -s "$busybox_archive" ]]; then
  command -v buildah >/dev/null || { echo "build_images.sh: buildah is required" >&2; exit 1; }
  root="$work/busybox"
  mkdir -p "$root/bin" "$root/tmp" "$root/etc"
  cp "$busybox_bin" "$root/bin/busybox"
  for applet in $("$busybox_bin" --list); do
    [[ "$applet" == busybox ]] || ln -sf busybox "$root/bin/$applet"
  done
  printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\nnonroot:x:65532:65532:nonroot:/:/bin/sh\n' \
    >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\nnonroot:x:65532:\n' >"$root/etc/group"
  chmod 1777 "$root/tmp"
  build_image busybox "$busybox_ref" "$busybox_archive" "$root" '["/bin/sh"]'
fi
echo "busybox $busybox_archive $busybox_ref"
