#!/usr/bin/env bash
# The GPU session script (a lent H100/H200 has no network: deepspeed and its few missing
# dependencies travel as wheels in .whl/). Writes results under $OUT (or ./gpu_results), most
# important first, each step under its own time limit so that one slow step cannot eat the rest:
#   penalty  penalty_cost.py eager at fp32/bf16, batch 64 to 1024: the penalty steps against
#            the reference on a GPU;
#   checks   tests/test_gpu.py (pytest -m gpu): R1 through DeepSpeed under bf16/bf16_autocast/fp16, ZeRO 0-2, against fp32;
#   train    train_throughput.py, bf16, bf16_autocast and fp32 at batch 64;
#   compile  penalty_cost.py with --compile: whether parallel.compile helps on a GPU.
# Usage: benchmarks/gpu_run.sh [SECTION ...]   (default: all four, in that order)
set -uo pipefail
OUT="${OUT:-gpu_results}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
quiet() { grep -v -i -e "warn" -e "^\s*$" || true; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
  date -u
} 2>&1 | quiet | tee "$OUT/gpu.txt"
for section in "${@:-penalty checks train compile}"; do for s in $section; do case "$s" in
  penalty)
    for spec in "fp32 64" "bf16 256" "fp32 1024" "bf16 1024"; do
      set -- $spec
      timeout 120 python3 -m benchmarks.penalty_cost --device cuda --precision "$1" --batch "$2" --rounds 5 \
        --steps 16 --json "$OUT/penalty_gpu_$1_b$2.json" 2>&1 | quiet >> "$OUT/log.txt"
      echo "penalty_cost $1 b$2: exit $?" | tee -a "$OUT/log.txt"
    done ;;
  checks)
    timeout 150 python3 -m pytest -q -s -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_checks.log" >> "$OUT/log.txt"
    echo "gpu checks: exit $?" | tee -a "$OUT/log.txt" ;;
  train)
    for precision in bf16 bf16_autocast fp32; do
      timeout 60 python3 -m benchmarks.train_throughput --device cuda --resolution 64 --channels 3 \
        --precision "$precision" --batch 64 --steps 300 --warmup 20 --repeats 1 2>&1 | quiet | tee -a "$OUT/train_gpu.log"
    done ;;
  compile)
    timeout 200 python3 -m benchmarks.penalty_cost --device cuda --batch 64 --rounds 5 --steps 32 --compile \
      --json "$OUT/penalty_gpu_fp32_b64_compile.json" 2>&1 | quiet >> "$OUT/log.txt"
    echo "penalty_cost --compile: exit $?" | tee -a "$OUT/log.txt" ;;
  *) echo "gpu_run.sh: unknown section '$s' (penalty, checks, train, compile)" >&2; exit 2 ;;
esac; done; done
grep -h -A5 '"ours_over_reference"' "$OUT"/penalty_gpu_*.json 2>/dev/null || true
