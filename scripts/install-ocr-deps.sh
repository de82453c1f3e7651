#!/usr/bin/env bash
# Debian packages the OCR feature and its tests need: the Tesseract binary, its English and
# Korean language packs, and fonts the tests render text with (Nanum for Hangul, DejaVu for Latin).
# Idempotent: packages already installed are skipped. Skips quietly (exit 0) without root or apt.
set -euo pipefail

PACKAGES=(tesseract-ocr tesseract-ocr-eng tesseract-ocr-kor fonts-nanum fonts-dejavu-core)

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-ocr-deps: apt-get not found; install ${PACKAGES[*]} with your package manager" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-ocr-deps: not root; run: sudo apt-get install -y ${PACKAGES[*]}" >&2
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-ocr-deps: already installed: ${PACKAGES[*]}"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
