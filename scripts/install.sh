#!/usr/bin/env bash
# Install mmcore with every extra the README uses (export, serve, tune, explain, mlflow), every plugin under
# plugins/ and (with --test) what the test suite needs, into ./.venv (or the active virtualenv / $VENV).
# The Dockerfile runs this same script.
#
#   bash scripts/install.sh              # mmcore + export, serve, tune, explain, mlflow + all plugins
#   bash scripts/install.sh --gpu        # the same with onnxruntime-gpu instead of onnxruntime (MMCORE_GPU=1 too)
#   bash scripts/install.sh --test       # + test extras, the fake test plugin, OCR and browser system packages
#   bash scripts/install.sh --dry-run    # print the pip commands instead of running them
#
# onnxruntime and onnxruntime-gpu install the same Python module and must never be installed together:
# each choice uninstalls the other build first.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
want_gpu=${MMCORE_GPU:-0}
dry_run=0
for arg in "$@"; do
    case "$arg" in
        --test) want_tests=1 ;;
        --gpu) want_gpu=1 ;;
        --dry-run) dry_run=1 ;;
        *) echo "usage: bash scripts/install.sh [--test] [--gpu] [--dry-run]" >&2; exit 2 ;;
    esac
done

run() {
    if [ "$dry_run" = 1 ]; then echo "$*"; else "$@"; fi
}

if [ "$dry_run" = 0 ] && [ -z "${VIRTUAL_ENV:-}" ] && [ "${MMCORE_SYSTEM_PYTHON:-0}" != "1" ]; then
    venv=${VENV:-.venv}
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
fi

pip_install() { run python -m pip install --disable-pip-version-check -q "$@"; }
pip_uninstall() { run python -m pip uninstall --disable-pip-version-check -q -y "$@"; }

# torch first: on x86_64 these releases come from the local disk (see README, "Install").
if ! python -c "import torch, torchvision" >/dev/null 2>&1 || [ "$dry_run" = 1 ]; then
    pip_install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi

plugins=()
for dir in plugins/*/; do
    [ -f "$dir/pyproject.toml" ] && plugins+=("-e" "$dir")
done

# the extras the README uses; serve-gpu is serve (and export) on onnxruntime-gpu
if [ "$want_gpu" = 1 ]; then
    extras="serve-gpu,tune,explain,mlflow,quality"
    runtime_not_wanted=onnxruntime
else
    extras="export,serve,tune,explain,mlflow,quality"
    runtime_not_wanted=onnxruntime-gpu
fi
if [ "$dry_run" = 1 ] || python -m pip show -q "$runtime_not_wanted" >/dev/null 2>&1; then
    pip_uninstall "$runtime_not_wanted"
fi

if [ "$want_tests" = 1 ]; then
    pip_install -e ".[test,$extras]" "${plugins[@]}" -e tests/fake-plugin
    run bash scripts/install-ocr-deps.sh
    run bash scripts/install-test-deps.sh
else
    pip_install -e ".[$extras]" "${plugins[@]}"
fi
[ "$dry_run" = 1 ] && exit 0
echo "installed: $(python -m mmcore --version) with $((${#plugins[@]} / 2)) plugins and the extras $extras into ${VIRTUAL_ENV:-system python}"
