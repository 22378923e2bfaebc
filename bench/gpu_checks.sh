#!/usr/bin/env bash
# Every GPU check in one script, for one H100 / H200 session of about ten minutes: the CUDA tests
# (tests marked `cuda`), then each GPU bench with short settings. Each part has its own time
# limit, so one that hangs or runs out of memory does not take the others with it; logs go to
# $OUT (or ./gpu-checks) as one file per part, figures for docs/benchmarks.md in their tails.
#
#   bash bench/gpu_checks.sh            # needs torch with CUDA and the package's dependencies
#   PYTHON=/path/to/python bash bench/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-gpu-checks}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

part() {  # part NAME SECONDS COMMAND...: run one check, log it, never stop the script
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s): $*"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  echo "   exit $?; last lines:"; tail -n 6 "$LOGS/$name.log" | sed 's/^/   /'
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 1
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
part cuda-tests 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_static_decode.py tests/test_compile.py \
  tests/test_fused_loss.py tests/test_hybrid_streams.py tests/test_bf16_training.py tests/test_attention.py
part train-0.5b 90 "$PY" bench/gpu_train_step.py --shape 0.5b --steps 8 --warmup 3 --budget 16384
part train-1.5b 120 "$PY" bench/gpu_train_step.py --shape 1.5b --steps 6 --warmup 2 --budget 16384
part generate 90 "$PY" bench/generate.py --device cuda --shape 0.5b --batches 1 8 --repeats 3
part loss-memory 45 "$PY" bench/loss_memory.py --tokens 16384 --hidden 1536 --dtype bf16
part compile 90 "$PY" bench/compile_train_step.py --device cuda --steps 10
part hybrid-streams 45 "$PY" bench/hybrid_streams.py --images 8 --steps 10
