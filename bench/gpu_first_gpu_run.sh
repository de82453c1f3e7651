#!/bin/bash
# mmcore's first run on a lent GPU machine (no network, one GPU, 15 minutes of device time in all):
# every check in one script, in stages that each write their results under $OUT before the next
# starts, so a run cut off still reports. At most ~5 minutes on an H100 (--budget, seconds).
#
#   bash bench/gpu_first_gpu_run.sh                      # on the GPU machine, from the repository root
#   bash bench/gpu_first_gpu_run.sh --dry-run            # CPU check of the script here: tiny sizes, cpu (DRY_RUN=1 too)
#   bash bench/gpu_first_gpu_run.sh --only stack,disk    # some stages only (--budget SECONDS: 290, 870 in a dry run)
#
# Stages: install (the checkout + vendored wheels, no network), stack (GPU, torch, CUDA), disk (the
# token cache's write rate, bench/disk_rate.py), syncs (host syncs per step at full size,
# bench/sync_probe.py), train (bench/gpu_default_recipe.py: frozen fill, LoRA-6 and top-6 against
# the raw loop), run (an end-to-end `mmcore run`, one epoch, random weights, generated images), serve
# (bench/serve.py: a run served on CUDA). Results: $OUT/NN-stage.txt, $OUT/summary.txt, $OUT/owed.txt.
set -u
STAGES=(install stack disk syncs train run serve)
usage() { echo "usage: bash bench/gpu_first_gpu_run.sh [--dry-run] [--only STAGE,...] [--budget SECONDS]  (stages: ${STAGES[*]})"; }
DRY=${DRY_RUN:-0}
ONLY=""
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY=${2:-}; shift ;;
    --budget) BUDGET=${2:-}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_first_gpu_run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
for name in ${ONLY//,/ }; do
  case " ${STAGES[*]} " in
    *" $name "*) ;;
    *) echo "gpu_first_gpu_run.sh: --only: unknown stage '$name' (stages: ${STAGES[*]})" >&2; exit 2 ;;
  esac
done
# on the CPU a dry run's stages take longer than the GPU's (2 cores, nothing cached): 3x the time
SLOW=1
[ "$DRY" = 1 ] && SLOW=3
BUDGET=${BUDGET:-$((290 * SLOW))}
case "$BUDGET" in *[!0-9]*) echo "gpu_first_gpu_run.sh: --budget: a number of seconds (got '$BUDGET')" >&2; exit 2 ;; esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmcore-first-gpu-XXXXXX")
# the Python that runs everything: the GPU image's python3, or (a dry run here) the one given as $PYTHON
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MMCORE_CACHE_DIR="$WORK/cache"
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
START=$(date +%s)
: > "$OUT/summary.txt"
echo "first GPU run $(date -u +%FT%TZ), dry run $DRY, budget ${BUDGET}s, results in $OUT" | tee -a "$OUT/summary.txt"

# the checks that cannot be made on the lent machine (one GPU, its own torch, the CPU onnxruntime)
cat > "$OUT/owed.txt" <<'EOF'
Owed after this script (not checkable on the lent machine):
- bundle serving on onnxruntime-gpu (the image has the CPU onnxruntime: `mmcore serve BUNDLE --device cuda`)
- NCCL across GPUs: DDP per-GPU throughput (bench/gpu_default_recipe.py --modes ddp), SyncBatchNorm
  statistics across ranks, the cpu:gloo,cuda:nccl group end to end, the compiled DDP wrapper's overlap
- torch.compile with inductor at full size (minutes of compilation: bench/gpu_default_recipe.py --modes compile)
- the loader at full size with 16+ cores on real JPEG/PNG ads (bench/loader.py --format png)
- the same on the torch/CUDA versions users install (the image has torch 2.11 / CUDA 13)
EOF

index=0
stage() {  # stage NAME TIMEOUT COMMAND...: run COMMAND (a program or a function below) under the time left
  local name=$1 limit=$(($2 * SLOW)); shift 2
  index=$((index + 1))
  local file
  file=$(printf "%s/%02d-%s.txt" "$OUT" "$index" "$name")
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    echo "$name: not selected" >> "$OUT/summary.txt"
    return 0
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    echo "$name: skipped, ${left}s of the budget left" | tee -a "$OUT/summary.txt"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo; echo "=== $(date +%T) $name (at most ${limit}s)"
  local began
  began=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 \
    | grep --line-buffered -v -e "UserWarning" -e "warnings.warn" | tee "$file"
  local rc=${PIPESTATUS[0]}
  local said="rc=$rc"
  [ "$rc" = 124 ] && said="rc=124 (timed out after ${limit}s)"
  echo "$name: $said in $(($(date +%s) - began))s -> $(basename "$file")" | tee -a "$OUT/summary.txt"
  return "$rc"
}

install() {
  local site="$WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" \
    bench/gpu/wheels/*.whl . plugins/vision-siglip2 plugins/text-sentence-transformers plugins/vision-resnet || return 1
  echo "installed into $site: $(ls "$site" | grep -c dist-info) distributions"
}

stack() {
  if [ "$DRY" != 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
  fi
  "$PY" - <<'PY'
import os, platform, shutil, torch, transformers, peft
import mmcore
from mmcore.engine.runtime import autocast_dtype, describe_precision, resolve_device
device = resolve_device("auto")
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}, mmcore {mmcore.__version__} from {mmcore.__file__}")
print(describe_precision("auto", autocast_dtype("auto", device), device))
print(f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; free disk under /tmp: "
      f"{shutil.disk_usage('/tmp').free / 2**30:.0f} GiB")
from mmcore.plugins.manager import get_registry
registry = get_registry()
print("plugins:", ", ".join(sorted({r.package for r in registry.all()})))
PY
}

# the arguments of each benchmark: full size, or tiny on the CPU in a dry run
if [ "$DRY" = 1 ]; then
  SYNCS=(--tiny --cpu --batch 4 --steps 3 --workers 0 --modes head,lora6,frozen)
  TRAIN=(--dry-run --modes frozen,lora6,top6)
  export RUN_SET="--set vision.params.tiny=true --set text.params.tiny=true --set train.batch_size=8 --set data.num_workers=0"
  export IMAGES=32 SIZE=64
  DISK=(--dry-run); SERVE=(--requests 8 --concurrency 1,4 --tiny)
else
  SYNCS=(--batch 64 --steps 4 --workers 8 --modes lora6,frozen)
  TRAIN=(--modes frozen,lora6,top6 --images 1024 --steps 10 --repeats 2 --workers 8)
  export RUN_SET="--set train.batch_size=64 --set data.num_workers=8"
  export IMAGES=256 SIZE=384
  DISK=(--dir "$WORK" --gib 2); SERVE=(--requests 64 --concurrency 1,8,32)
fi
export DRY WORK

end_to_end() {
  "$PY" -c "from mmcore.commands.demo import make_demo_dataset as m; m('$WORK/run-data', n_train=$IMAGES, n_val=$((IMAGES / 4)), n_test=$((IMAGES / 4)), size=($SIZE, $SIZE))" || return 1
  "$PY" -m mmcore run recipes/siglip_labse_gmu.toml --out "$WORK/run" --quiet \
    --set "data.base_dir='$WORK/run-data'" --set vision.params.pretrained=false --set text.params.pretrained=false \
    --set train.epochs=1 --set logging.tensorboard=false $RUN_SET || return 1
  "$PY" - "$WORK/run" <<'PY'
import json, sys
results = json.load(open(f"{sys.argv[1]}/results.json"))
print({key: results.get(key) for key in ("precision", "train_batch", "feature_cache")})
print("test AUROC", results["test"]["at_0.5"].get("auroc"), "history", results["history"])
PY
}

export -f install stack end_to_end
if stage install 90 install && [ -d "$WORK/site/mmcore" ]; then
  export PYTHONPATH="$WORK/site:$REPO/bench/gpu/stub"  # the installed checkout, and the tokenizer stand-in
  export MMCORE_LOAD_PLUGINS=mmcore-vision-siglip2,mmcore-text-sentence-transformers,mmcore-vision-resnet
fi
stage stack 30 stack
stage disk 30 "$PY" bench/disk_rate.py "${DISK[@]}"
stage syncs 60 "$PY" bench/sync_probe.py "${SYNCS[@]}"
stage train 110 "$PY" bench/gpu_default_recipe.py "${TRAIN[@]}"
stage run 60 end_to_end
stage serve 50 "$PY" bench/serve.py --target run --work "$WORK/serve" --epochs 1 --set text.params.pretrained=false "${SERVE[@]}"
echo "done in $(($(date +%s) - START))s" | tee -a "$OUT/summary.txt"
cat "$OUT/owed.txt"
rm -rf "$WORK"
