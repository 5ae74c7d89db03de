#!/usr/bin/env bash
# One prepared device check (issue 18), at most GPU_CHECK_SECONDS (default 400) on one GPU:
#   0. how long the imports take on that machine (torch, CUDA start, pyro, arviz, pyro_lvm...);
#   1. the CUDA tests (pytest -m cuda);
#   2. training throughput on CUDA at batch 100 and 1000 for ELBO, IWAE-5 and IWAE-50:
#      fit eager and graph-captured (DLVM and a user's pair), Pyro's SVI, the hand-written loop
#      eager and graph-captured, as ratios in one run;
#   3. evaluation throughput at K = 5000;
#   4. time-boxed binarized-MNIST fits (ELBO and IWAE-5, Burda et al.'s network, graph-captured)
#      with their test NLL beside the published 88.71 / 87.63.
# Results land as text/JSON tables in OUT_DIR (default: $OUT, else ./gpu-check-out); SUMMARY.md
# there collects them. Every step has its own time limit, a failing step does not stop the
# others (its exit status is in SUMMARY.md), and a step whose limit no longer fits in what is
# left of GPU_CHECK_SECONDS is skipped (said in SUMMARY.md). Each step's status and last lines
# also go to stdout as it ends, so a caller killed at its own limit still sees how far it got.
# The interpreter is $PYTHON, else `python`, else `python3` (some GPU images have only python3).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#
# --dry-run runs the same steps on the CPU with tiny sizes (the test suite does this) to check
# the script itself; its numbers mean nothing.
set -uo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT_DIR="$(mkdir -p "${1:-${OUT:-./gpu-check-out}}" && cd "${1:-${OUT:-./gpu-check-out}}" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
SUMMARY="$OUT_DIR/SUMMARY.md"
PY="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET="${GPU_CHECK_SECONDS:-400}"
LIMIT_IMPORTS=60

if [[ $DRY == 1 ]]; then
  DEVICE=cpu
  TRAIN="--smoke --threads 1"
  EVAL="--smoke --threads 1"
  MNIST="--smoke --threads 1"
  TESTS=(--collect-only -q -m cuda)
  LIMIT_TESTS=120; LIMIT_TRAIN=180; LIMIT_EVAL=120; LIMIT_MNIST=180
  BUDGET="${GPU_CHECK_SECONDS:-900}"
  BATCHES=(100)
else
  DEVICE=cuda
  TRAIN="--steps 200 --steps-large 50 --repeats 3"
  EVAL="--rows 1000 --num-samples 5000 --repeats 2"
  MNIST="--architecture burda --epochs ${MNIST_EPOCHS:-3280} --time-limit ${MNIST_SECONDS:-85} --eval-rows 2000 --eval-samples 5000 --no-progress"
  TESTS=(-q -m cuda -p no:cacheprovider)
  LIMIT_TESTS=75; LIMIT_TRAIN=80; LIMIT_EVAL=45; LIMIT_MNIST=120
  BATCHES=(100 1000)
fi

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)$( [[ $DRY == 1 ]] && echo ' (dry run on the CPU: numbers mean nothing)')"
  echo
  echo '```'
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 2**30:.0f} GiB", "| CUDA", torch.version.cuda)
else:
    print("device: no CUDA device")
EOF
  echo '```'
} > "$SUMMARY"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, keep its output, note its status
  local name=$1 limit=$2; shift 2
  if (( SECONDS + limit > BUDGET )); then
    printf '\n## %s: skipped (its %s s limit does not fit in the %s s left of GPU_CHECK_SECONDS)\n' \
      "$name" "$limit" "$((BUDGET - SECONDS))" >> "$SUMMARY"
    echo "$name: skipped (budget)"
    return
  fi
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1
  local rc=$?
  local status="ok"
  [[ $rc == 124 || $rc == 137 ]] && status="time limit ($limit s)"
  # the benchmarks exit 1 when a target is missed (their output says which), or on an error
  [[ $rc != 0 && $status == ok ]] && status="exit $rc (a target missed or an error: see below)"
  { echo; echo "## $name: $status in $((SECONDS - t0)) s"; echo; echo '```';
    tail -n 40 "$OUT_DIR/$name.txt"; echo '```'; } >> "$SUMMARY"
  echo "$name: $status ($((SECONDS - t0)) s)"
  tail -n 8 "$OUT_DIR/$name.txt" | sed 's/^/    /'
}

# shellcheck disable=SC2016
step imports "$LIMIT_IMPORTS" "$PY" -u -c '
import time; t0 = time.perf_counter()
def mark(what): print(f"{time.perf_counter() - t0:7.1f} s  {what}", flush=True)
import torch; mark(f"import torch {torch.__version__}")
torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu"); mark("first tensor on the device")
import pyro; mark(f"import pyro {pyro.__version__}")
import matplotlib.pyplot; mark("import matplotlib.pyplot")
import arviz; mark(f"import arviz {arviz.__version__}")
import sklearn.decomposition; mark("import sklearn.decomposition")
import pyro_lvm, pyro_lvm.studies.runner, pyro_lvm.reports; mark("import pyro_lvm (+ runner, reports)")
'

step cuda_tests "$LIMIT_TESTS" "$PY" -m pytest "${TESTS[@]}"
for b in "${BATCHES[@]}"; do
  # shellcheck disable=SC2086
  step "train_b$b" "$LIMIT_TRAIN" "$PY" benchmarks/train_throughput.py --device "$DEVICE" \
      --batch-size "$b" --objectives elbo iwae_5 iwae_50 \
      --sides fit_dlvm fit_dlvm_graph fit_user fit_user_graph pyro_svi hand hand_graph \
      --json "$OUT_DIR/train_b$b.json" $TRAIN
done
# shellcheck disable=SC2086
step eval_k5000 "$LIMIT_EVAL" "$PY" benchmarks/eval_throughput.py --device "$DEVICE" $EVAL
for objective in elbo iwae; do
  # shellcheck disable=SC2086
  step "mnist_$objective" "$LIMIT_MNIST" "$PY" benchmarks/mnist_nll.py --device "$DEVICE" \
      --objective "$objective" --cuda-graph --out "$OUT_DIR/mnist_$objective" $MNIST
done
echo "summary: $SUMMARY"
