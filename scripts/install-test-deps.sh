#!/usr/bin/env bash
# Debian packages the browser test of report.html needs (tests/test_report_browser.py): headless
# Chromium and its WebDriver. Idempotent; skips quietly (exit 0) without root or apt, and the
# test then skips with the reason.
set -euo pipefail

PACKAGES=(chromium chromium-driver)

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: apt-get not found; install ${PACKAGES[*]} with your package manager" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: not root; run: sudo apt-get install -y ${PACKAGES[*]}" >&2
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-test-deps: already installed: ${PACKAGES[*]}"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
