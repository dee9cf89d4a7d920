#!/usr/bin/env bash
# Run the README's two commands as a new user on a fresh machine would: in a new Debian root that
# shares nothing installed with this machine (no Debian package, Python package, Go module or build
# cache, no ~/.cache/qtune), on a clean clone of this repository's HEAD (committed work only). Each
# command's wall time and exit status are printed and written to <root>.log.
#
#   bash scripts/fresh_machine.sh [--root DIR] [--reuse] [--only 1|2]
#
#   --root DIR  where the new root lives (default /var/tmp/qtune-fresh); made with debootstrap
#   --reuse     keep an existing root and its caches: the commands then run WARM (a machine that ran
#               them before); without it the root is made anew and they run COLD
#   --only N    run only the README's first (set up and tune the example) or second (tests) command
#
# The root is what a new machine of this project's kind starts with, as far as the commands care:
# Debian 12 (bookworm, this machine's package sources), a Python 3.11 with pip first on PATH (a venv
# of Debian's python3.11, where the machine has pyenv's) and this machine's Go toolchain (a new
# machine has Go installed; the toolchain only, not its module or build caches). Everything else the
# commands need they must install themselves. The commands run as root (as CI does) in a private
# mount namespace whose root it is (pivot_root), with /proc, /sys and /dev of this machine, so the
# test plane's containerd, kubelet and cgroups work as on a machine of its own. Needs root and
# debootstrap (apt-get install debootstrap).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
root=/var/tmp/qtune-fresh
reuse=0
only=""
while (($#)); do
  case "$1" in
    --root) root="$2"; shift 2 ;;
    --reuse) reuse=1; shift ;;
    --only) only="$2"; shift 2 ;;
    *) echo "fresh_machine.sh: unknown argument $1 (--root DIR, --reuse, --only 1|2)" >&2; exit 2 ;;
  esac
done
[[ $(id -u) -eq 0 ]] || { echo "fresh_machine.sh: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "fresh_machine.sh: apt-get install debootstrap" >&2; exit 2; }
log_file="$root.log"
log() { printf '[fresh %(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$log_file" >&2; }

# The README's first two lines of its first code block are the two commands.
mapfile -t readme_commands < <(awk '/^```/{n++; next} n==1' "$repo/README.md" | head -2)
((${#readme_commands[@]} == 2)) || { echo "fresh_machine.sh: README.md does not start with two commands" >&2; exit 2; }

if ((!reuse)) || [[ ! -x "$root/opt/python/bin/python3" ]]; then
  rm -rf "$root"
  : >"$log_file"
  log "debootstrap bookworm into $root"
  start=$SECONDS
  debootstrap --variant=minbase \
    --include=python3.11,python3.11-venv,python3-distutils,ca-certificates,git,procps,curl,xz-utils,sudo \
    bookworm "$root" >>"$log_file" 2>&1
  # this machine's package sources and CA bundle (a TLS-intercepting proxy's CA, if any): its setup,
  # not anything installed
  cp /etc/apt/sources.list.d/*.sources "$root/etc/apt/sources.list.d/" 2>/dev/null && rm -f "$root/etc/apt/sources.list"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  chroot "$root" python3.11 -m venv /opt/python
  # the Go toolchain a new machine has (no GOPATH, no module or build cache)
  go_root="$(go env GOROOT)"
  mkdir -p "$root/usr/local" && cp -a "$go_root" "$root/usr/local/go"
  log "fresh root ready in $((SECONDS - start)) s ($(du -sh "$root" | cut -f1))"
fi

rm -rf "$root/root/qtune" "$root/root/shared"
git clone -q --no-hardlinks "$repo" "$root/root/qtune"
git -C "$root/root/qtune" log -1 --format='clean clone of %h %s' | tee -a "$log_file"
[[ -d "$repo/../shared" ]] && cp -r "$repo/../shared" "$root/root/shared"   # CI has shared/ beside the clone

run_in_root() {  # the command line, as a login on that machine would run it
  # pivot_root, not chroot: the new root is the root of its mount namespace, so a namespace entered
  # later with `nsenter --mount` (the test plane's real node) sees it too, not this machine's /
  unshare --mount --propagation private --fork bash -c '
    set -e
    root="$1"; shift
    mount --bind "$root" "$root"   # a mount point of its own (pivot_root needs it; so does buildah)
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs -o mode=755 tmpfs "$root/run"
    mkdir -p "$root/.old-root"
    cd "$root"
    pivot_root . .old-root
    umount -l /.old-root
    rmdir /.old-root
    exec /usr/bin/env -i HOME=/root USER=root LANG=C.UTF-8 TERM=dumb CI=true \
      PATH=/opt/python/bin:/usr/local/go/bin:/root/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
      REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt GIT_SSL_CAINFO=/etc/ssl/certs/ca-certificates.crt \
      bash -c "cd /root/qtune && $*"' run-in-root "$root" "$@"
}

state=$( ((reuse)) && echo warm || echo cold)
status=0
for n in 1 2; do
  [[ -z "$only" || "$only" == "$n" ]] || continue
  command="${readme_commands[$((n - 1))]}"
  log "command $n ($state): $command"
  start=$SECONDS
  set +e
  run_in_root "$command" 2>&1 | tee -a "$log_file" | tail -n 40
  rc=${PIPESTATUS[0]}
  set -e
  log "command $n ($state): exit $rc after $((SECONDS - start)) s"
  ((rc == 0)) || status=1
done
exit $status
