#!/usr/bin/env bash
# Debian packages the OCR feature and its tests need: the Tesseract binary, its English and
# Korean language packs, and fonts the tests render text with (Nanum for Hangul, DejaVu for Latin).
# Idempotent: packages already installed are skipped. Skips quietly (exit 0) without root or apt.
set -euo pipefail

PACKAGES=(tesseract-ocr tesseract-ocr-eng tesseract-ocr-kor fonts-nanum fonts-dejavu-core)

# shellcheck source=scripts/apt-install.sh
. "$(dirname "$0")/apt-install.sh"
apt_install install-ocr-deps "${PACKAGES[@]}"
