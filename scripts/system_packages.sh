#!/usr/bin/env bash
# Install the machine packages of requirements/system.txt (the one list; see its header).
#
#   source scripts/system_packages.sh && install_system_packages local [cluster]
#
# Installs what is missing only (idempotent, no-op in well under a second when all is there).
# Debian packages go in with their services kept from starting (policy-rc.d, as in container
# images): the test plane runs its own etcd, Prometheus, Pushgateway and containerd on free ports.

_system_list="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/requirements/system.txt"

# system_sources GROUP...: the `source` column (apt:NAME, pip:REQ) of the given groups.
system_sources() {
  local groups=" $* "
  awk -v groups="$groups" '$1 !~ /^#/ && NF >= 2 && index(groups, " " $1 " ") {print $2}' "$_system_list"
}

install_system_packages() {
  local sudo="" source missing_apt=() pip_reqs=()
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  while read -r source; do
    case "$source" in
      apt:*)
        dpkg-query -W -f='${Status}' "${source#apt:}" 2>/dev/null | grep -q "install ok installed" \
          || missing_apt+=("${source#apt:}") ;;
      pip:*) pip_reqs+=("${source#pip:}") ;;
      *) echo "requirements/system.txt: unknown source '$source' (apt:NAME or pip:REQUIREMENT)" >&2; return 2 ;;
    esac
  done < <(system_sources "$@")
  if ((${#missing_apt[@]})); then
    echo "setup: installing Debian packages: ${missing_apt[*]}" >&2
    local created_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
      $sudo chmod +x /usr/sbin/policy-rc.d
      created_policy=1
    fi
    # a fresh machine's package lists may be missing or stale: update before installing
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
    [[ -z "$created_policy" ]] || $sudo rm -f /usr/sbin/policy-rc.d
    # where systemd runs, a postinst may still have started a daemon the plane does not need
    local svc
    for svc in etcd prometheus prometheus-pushgateway containerd; do
      $sudo systemctl stop "$svc" >/dev/null 2>&1 || true
    done
  fi
  if ((${#pip_reqs[@]})); then
    python3 -m pip install -q --disable-pip-version-check "${pip_reqs[@]}"
  fi
}
