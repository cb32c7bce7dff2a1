#!/usr/bin/env bash
# The GPU session script (a lent H100/H200 has no network: deepspeed and its few missing
# dependencies travel as wheels in .whl/). Writes JSON results under $OUT (or ./gpu_results).
set -uo pipefail
OUT="${OUT:-gpu_results}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m benchmarks.gpu_checks "$OUT/gpu_checks.json" 2>&1 | grep -v -i "warn" | tee "$OUT/gpu_checks.log"
python3 benchmarks/train_throughput.py --device cuda --resolution 64 --channels 3 --precision bf16 \
  --batch 64 --steps 300 --warmup 20 --repeats 1 --json "$OUT/train_gpu_bf16.json" 2>&1 | grep -v -i "warn" | tee "$OUT/train_gpu.log"
python3 benchmarks/train_throughput.py --device cuda --resolution 64 --channels 3 --precision bf16 \
  --batch 256 --steps 300 --warmup 20 --repeats 1 --json "$OUT/train_gpu_bf16_b256.json" 2>&1 | grep -v -i "warn" | tee -a "$OUT/train_gpu.log"
for extra in "--precision fp32" "--precision bf16 --zero-stage 1"; do
  python3 benchmarks/train_throughput.py --device cuda --resolution 64 --channels 3 --batch 64 --steps 300 --warmup 20 \
    --repeats 1 $extra 2>&1 | grep -v -i "warn" | tee -a "$OUT/train_gpu.log"
done
