#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Install everything xdpzoot and its tests need on Debian/Ubuntu, as root.
# Idempotent: a second run only checks and returns quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(make python3-bpfcc libbpf1 python3-venv python3-pip iproute2 dnsmasq-base
      iperf3 ipset iptables nftables tcpdump iputils-ping ethtool bpftool
      freeradius-utils prometheus)
# Headers bcc compiles against: the running kernel's own package when it exists,
# otherwise the distribution's generic headers (linked below).
KVER=$(uname -r)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ! -e "/lib/modules/$KVER/build/Makefile" ] &&
   ! dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("__headers__")
fi

if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    hdr=()
    if [ ! -e "/lib/modules/$KVER/build/Makefile" ]; then
        if apt-cache show "linux-headers-$KVER" >/dev/null 2>&1; then
            hdr=("linux-headers-$KVER")
        else
            case "$(dpkg --print-architecture)" in
                amd64) hdr=(linux-headers-amd64) ;;
                arm64) hdr=(linux-headers-arm64) ;;
                *) hdr=("linux-headers-$(dpkg --print-architecture)") ;;
            esac
        fi
    fi
    pkgs=()
    for p in "${missing[@]}"; do [ "$p" != "__headers__" ] && pkgs+=("$p"); done
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" "${hdr[@]}" >/dev/null
    # prometheus is there for its binaries (promtool, and the server the metrics lab test
    # starts in a namespace of its own): the service the package starts is not needed.
    if [[ " ${pkgs[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
fi

# A kernel without its own headers package: give bcc a build tree made of
# the closest distribution headers (bcc looks in /lib/modules/$KVER/build).
if [ ! -e "/lib/modules/$KVER/build/Makefile" ]; then
    arch=$(dpkg --print-architecture)
    build=$(find /usr/src -maxdepth 1 -name "linux-headers-*-$arch" | sort -V | tail -n 1)
    common=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-common' | sort -V | tail -n 1)
    if [ -z "$build" ]; then
        echo "setup: no kernel headers found under /usr/src" >&2
        exit 1
    fi
    mkdir -p "/lib/modules/$KVER"
    ln -sfn "$build" "/lib/modules/$KVER/build"
    [ -n "$common" ] && ln -sfn "$common" "/lib/modules/$KVER/source"
    echo "setup: linked /lib/modules/$KVER/build -> $build"
fi

# The venv sees the distribution's bcc module.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
.venv/bin/python -c 'import bcc, pyroute2, click, msgpack, numpy, pyrad, prometheus_client'
echo "setup: ok"
