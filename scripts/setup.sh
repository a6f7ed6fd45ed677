#!/usr/bin/env bash
# Installs what Ferry's tests, demo and benchmarks need on Debian 12, and prepares the
# kernel (FUSE). Idempotent: when everything is already there it only checks and says so.
set -euo pipefail

pkgs=(fuse3 sshfs openssh-server openssh-client sqlite3 iproute2 iputils-ping bc xz-utils git python3 perl procps psmisc util-linux)
missing=()
for p in "${pkgs[@]}"; do
    if ! dpkg -s "$p" >/dev/null 2>&1; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
    echo "setup: installed ${missing[*]}"
else
    echo "setup: packages already installed (${pkgs[*]})"
fi

if [ ! -e /dev/fuse ]; then
    echo "setup: /dev/fuse missing; loading the fuse module"
    modprobe fuse
fi
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is still missing; Ferry's /... cannot be mounted" >&2; exit 1; }

# Bigger FUSE requests (FUSE-NOTES.md): read when a mount is made, so set it before.
limit=/proc/sys/fs/fuse/max_pages_limit
if [ -w "$limit" ]; then
    want=4096
    have=$(cat "$limit")
    if [ "$have" -lt "$want" ]; then
        echo "$want" > "$limit"
        echo "setup: fs.fuse.max_pages_limit raised from $have to $want"
    else
        echo "setup: fs.fuse.max_pages_limit is $have"
    fi
fi

# The super-root's mountpoint (mounted inside each node's own mount namespace).
if [ ! -d /... ]; then
    mkdir -p /...
    echo "setup: created /..."
fi
echo "setup: done"
