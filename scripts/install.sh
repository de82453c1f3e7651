#!/usr/bin/env bash
# Install mmcore, every plugin under plugins/ and (with --test) what the test suite needs,
# into ./.venv (or the active virtualenv / $VENV). The Dockerfile runs this same script.
#
#   bash scripts/install.sh          # mmcore + all plugins
#   bash scripts/install.sh --test   # + test extras, the fake test plugin, OCR and browser system packages
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

if [ -z "${VIRTUAL_ENV:-}" ] && [ "${MMCORE_SYSTEM_PYTHON:-0}" != "1" ]; then
    venv=${VENV:-.venv}
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
fi

pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

# torch first: on x86_64 these releases come from the local disk (see README, "Install").
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
    pip_install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi

plugins=()
for dir in plugins/*/; do
    [ -f "$dir/pyproject.toml" ] && plugins+=("-e" "$dir")
done

if [ "$want_tests" = 1 ]; then
    pip_install -e ".[test]" "${plugins[@]}" -e tests/fake-plugin
    bash scripts/install-ocr-deps.sh
    bash scripts/install-test-deps.sh
else
    pip_install -e . "${plugins[@]}"
fi
echo "installed: $(python -m mmcore --version) with $((${#plugins[@]} / 2)) plugins into ${VIRTUAL_ENV:-system python}"
