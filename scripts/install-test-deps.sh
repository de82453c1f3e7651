#!/usr/bin/env bash
# Debian packages the browser test of report.html needs (tests/test_report_browser.py): headless
# Chromium and its WebDriver. Idempotent; skips quietly (exit 0) without root or apt, and the
# test then skips with the reason.
set -euo pipefail

PACKAGES=(chromium chromium-driver)

# shellcheck source=scripts/apt-install.sh
. "$(dirname "$0")/apt-install.sh"
apt_install install-test-deps "${PACKAGES[@]}"
