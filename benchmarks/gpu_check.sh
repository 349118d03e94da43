#!/usr/bin/env bash
# The GPU path in one run: the test suite on the device, every notebook with the tiny model,
# and the benchmarks in bf16 (eager and compiled) and fp16 (what a T4 would use), all written
# to one report file.
#
#     bash benchmarks/gpu_check.sh [REPORT]        # default: gpu-report.txt
#
# Settings (environment variables):
#   STEPS="tests notebooks benchmarks"  which parts to run
#   SIZES=base,large                    architectures for the inference benchmark (tiny: tests)
#   BATCHES=1,8,64,256                  batch sizes for the throughput table
#   TRAIN_BATCH=16                      samples per LoRA training step
#   QUICK=0                             1: the inference reports as a smoke run (one timing
#                                       per figure, no warm-up unless compiled, the seed loop
#                                       cut short; how it is tested)
#   INSTALL=1                           pip install the package and its pinned dependencies
#                                       (never torch); 0 to skip
#   WHEELS=DIR                          install from these wheel files only (a machine
#                                       without a package index)
#
# Run it from the repository root on a machine with a CUDA GPU and its own torch (it never
# installs torch). Without a GPU it runs the same steps on the CPU and says so, which is how
# it is tested (tests/test_benchmarks.py, with SIZES=tiny). Each step's exit code is recorded;
# the script fails if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
report=$(realpath -m "${1:-gpu-report.txt}")
PY=${PYTHON:-python3}
STEPS=${STEPS:-tests notebooks benchmarks}
SIZES=${SIZES:-base,large}
BATCHES=${BATCHES:-1,8,64,256}
TRAIN_BATCH=${TRAIN_BATCH:-16}
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
: >"$report"

note() { printf '%s\n' "$*" | tee -a "$report"; }
step() {  # step NAME COMMAND...: run it, append its output and exit code to the report
  local name=$1
  shift
  note "" "## $name" "\$ $*"
  local started=$SECONDS
  "$@" >>"$report" 2>&1
  local status=$?
  note "-> exit $status after $((SECONDS - started)) s"
  [ "$status" -eq 0 ] || failed+=("$name")
}
wants() { [[ " $STEPS " == *" $1 "* ]]; }
failed=()

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "No torch in $PY: install the build for this machine first." >&2
  exit 2
fi
device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
note "# florence-notebooks GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
[ "$device" = cuda ] || note "No CUDA device here: every step runs on the CPU instead."
if [ "${INSTALL:-1}" = 1 ]; then
  if [ -n "${WHEELS:-}" ]; then
    step "install (wheels in $WHEELS)" "$PY" -m pip install -q --no-index --find-links "$WHEELS" \
      -e ".[dev]" -c constraints.txt
  else
    step "install" "$PY" -m pip install -q -e ".[dev]" -c constraints.txt
  fi
fi
"$PY" - >>"$report" 2>&1 <<'EOF'
import platform

import torch
import transformers

print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
          f"compute capability {props.major}.{props.minor}, CUDA {torch.version.cuda}, "
          f"native bf16: {torch.cuda.is_bf16_supported(including_emulation=False)}")
EOF

export FLORENCE_TEST_DEVICE=$device
if wants tests; then
  step "tests on $device" "$PY" -m pytest tests -q -p no:cacheprovider -x
fi
if wants notebooks; then
  step "notebooks (tiny model, device auto)" \
    "$PY" -m pytest notebooks --nbval-lax --nbval-current-env -q -p no:cacheprovider
fi
if wants benchmarks; then
  first=${SIZES%%,*}
  step "inference, bf16, eager ($SIZES)" "$PY" benchmarks/inference_speed.py --device "$device" \
    --dtype bf16 --architectures "$SIZES" --batches "$BATCHES" "${quick[@]}"
  step "inference, bf16, compiled ($first)" "$PY" benchmarks/inference_speed.py \
    --device "$device" --dtype bf16 --compile --architectures "$first" --batches "$BATCHES" \
    "${quick[@]}"
  step "inference, fp16 as on a T4, eager ($first)" "$PY" benchmarks/inference_speed.py \
    --device "$device" --dtype fp16 --architectures "$first" --batches "$BATCHES" \
    "${quick[@]}"
  step "training, LoRA (frozen + cached), batch $TRAIN_BATCH ($first)" "$PY" \
    benchmarks/training_speed.py --device "$device" --architecture "$first" --settings LoRA \
    --batch "$TRAIN_BATCH" --steps 3
fi

note "" "# Summary"
if [ ${#failed[@]} -eq 0 ]; then
  note "every step passed on $device"
else
  note "failed on $device: ${failed[*]}"
  exit 1
fi
