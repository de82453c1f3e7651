#!/usr/bin/env bash
# apt_install NAME PACKAGE...: install the Debian packages that are missing. Idempotent; skips
# quietly (returns 0) without apt or root, saying what to install by hand. Sourced by the
# install-*-deps.sh scripts.
apt_install() {
    local name=$1
    shift
    local packages=("$@")
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$name: apt-get not found; install ${packages[*]} with your package manager" >&2
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "$name: not root; run: sudo apt-get install -y ${packages[*]}" >&2
        return 0
    fi
    local missing=() pkg
    for pkg in "${packages[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        echo "$name: already installed: ${packages[*]}"
        return 0
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
