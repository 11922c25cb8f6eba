#!/usr/bin/env bash
# The checks that need a GPU, as one script: run it on a machine with an NVIDIA GPU from the
# repository root. Results go to $OUT (default: gpu_check_out/); each step logs to its own file
# and the script goes on after a failed step, so one run shows everything.
#
#   NFNET_DATA_DIR=/path/to/cifar10 bash benchmarks/gpu_check.sh [quick|grid40|speed|candidates|jax]
#
# quick (default, ~10 min on one modern GPU):
#   1. the GPU is visible to TensorFlow;
#   2. an XLA-compiled fit of the tiny and report_resnet presets for 2 epochs in float32,
#      mixed_float16 and mixed_bfloat16 (the test accuracy and seconds per epoch land in
#      metrics.json), each exported and checked as for TF Serving (no XLA in the graph);
#   3. training throughput of the NF net and its BatchNorm twin, XLA on and off;
#   4. the GPU-only tests (XLA and mixed precision paths of the test suite).
# grid40: the report's study at its own 40 epochs per trial (12 trials), XLA on.
# speed: `--recipe speed` (cifar_speed_wider) for 3 seeds and its BatchNorm twin for 1, XLA on
#   (speed_recipe_gpu.json), and the training throughput of cifar_speed_wider and its twin in mixed_bfloat16,
#   XLA on and off.
# candidates: the speed recipe's next candidates over 3 seeds on TensorFlow, XLA on: each row of $ROWS (default:
#   wide_b128 wider_b128, the recipe at batch 128 on airbench95's widths and on its own network; the rows and
#   their flags are ROWS in benchmarks/speed_jax.py), into speed_recipe_gpu_<row>.json.
# jax: for a GPU machine with JAX and no TensorFlow. The speed recipe's runs trained by benchmarks/speed_jax.py
#   on the Keras JAX backend (XLA, mixed_bfloat16), 10 epochs, from the shards that
#   `python -m benchmarks.speed_jax prepare --out .gpudata` wrote, found under $GPU_DATA (default: .gpudata):
#   3 seeds of each row of $JAX_ROWS (default: wider_b128 recipe, the recipe on its network and on airbench94's;
#   the rows and their flags are ROWS in benchmarks/speed_jax.py), into speed_jax_gpu_<row>.json;
#   no seed starts after $STOP_AT (unix time; default: none); JAX's compilation cache in $JAX_CACHE (default:
#   /tmp/nfnet_jax_cache). Needs Keras importable (PYTHONPATH) and the repo on it.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-quick}"
case "$MODE" in
  quick|grid40|speed|candidates|jax) ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [quick|grid40|speed|candidates|jax]" >&2; exit 2 ;;
esac
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
status=0

step() {  # step NAME COMMAND...: runs COMMAND, logs to $OUT/NAME.log, records the exit status
  local name="$1"; shift
  local start; start=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}

: > "$OUT/summary.txt"
if [ "$MODE" = "jax" ]; then
  nvidia-smi > "$OUT/jax_runs.log" 2>&1
  "$PY" -c "import jax; g = jax.devices('gpu'); print(g); assert g" >> "$OUT/jax_runs.log" 2>&1 || status=1
else
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  step devices "$PY" -c "import tensorflow as tf; g = tf.config.list_physical_devices('GPU'); print(g); assert g"
fi

if [ "$MODE" = "quick" ]; then
  for preset in tiny report_resnet; do
    for precision in float32 mixed_float16 mixed_bfloat16; do
      name="fit_${preset}_${precision}"
      step "$name" "$PY" -m nfnet_keras.fit --preset "$preset" --epochs 2 --jit --precision "$precision" \
        --recipe fast --run-dir "$OUT/runs/$name" --export-name "$name" --export-dir "$OUT/saved_models" --quiet
    done
  done
  step throughput "$PY" -m benchmarks.throughput --variants nf,bn --batch-sizes 128,512 --xla on,off \
    --out-dir "$OUT" --tag gpu
  step gpu_tests "$PY" -m pytest -q -p no:cacheprovider tests/test_precision.py tests/test_wsconv.py \
    tests/test_export.py
elif [ "$MODE" = "grid40" ]; then
  step grid40 "$PY" -m nfnet_keras.tuner.grid --epochs 40 --jit --directory "$OUT/tuner_runs" \
    --project-name report_grid_40ep --quiet
elif [ "$MODE" = "speed" ]; then
  step speed_runs "$PY" -m benchmarks.speed_runs --seeds 0,1,2 --bn-seeds 0 --runs-dir "$OUT/speed_runs" \
    --out-dir "$OUT" --tag gpu -- --jit
  step speed_throughput "$PY" -m benchmarks.throughput --preset cifar_speed_wider --batch-sizes 512 --xla on,off \
    --precision mixed_bfloat16 --out-dir "$OUT" --tag cifar_speed_wider_gpu
elif [ "$MODE" = "candidates" ]; then
  for row in ${ROWS:-wide_b128 wider_b128}; do
    step "speed_$row" "$PY" -m benchmarks.speed_runs --seeds 0,1,2 --bn-seeds "" --runs-dir "$OUT/speed_$row" \
      --out-dir "$OUT" --row "$row" --tag "gpu_$row" -- --jit
  done
elif [ "$MODE" = "jax" ]; then
  # Each configuration trains its 3 seeds in one process (one import and data load); every seed is added to
  # speed_jax_gpu_TAG.json as it ends. One log for all: a lent machine returns only 8 files of $OUT.
  jax_run() {  # jax_run ROW: the row's flags are benchmarks/speed_jax.py's ROWS
    local row="$1" start rc
    start=$(date +%s)
    echo "=== $row seeds 0,1,2" >> "$OUT/jax_runs.log"
    "$PY" -m benchmarks.speed_jax run --data "${GPU_DATA:-.gpudata}" --seeds 0,1,2 --row "$row" --tag "gpu_$row" \
      --out-dir "$OUT" --compile-cache "${JAX_CACHE:-/tmp/nfnet_jax_cache}" ${STOP_AT:+--stop-at "$STOP_AT"} \
      >> "$OUT/jax_runs.log" 2>&1
    rc=$?
    echo "jax_$row: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || status=1
  }
  for row in ${JAX_ROWS:-wider_b128 recipe}; do
    jax_run "$row"
  done
fi
cat "$OUT/summary.txt"
exit $status
