#!/usr/bin/env bash
# One GPU: every tiny recipe ~20 steps in bf16 under DDP (one rank: the plain model), FSDP
# (world 1) and compile; prints step time, torch.cuda.max_memory_allocated and throughput per
# mode and records them with the device name in bench/results/tiny_modes.json.
# Skips cleanly where no CUDA device is visible.
#   bash bench/gpu_smoke.sh [extra args for bench/tiny_modes.py, e.g. --steps 10]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke: no CUDA device visible; skipped"
    exit 0
fi
"$PYTHON" -c "import torch; print('gpu_smoke on', torch.cuda.get_device_name())"
exec "$PYTHON" bench/tiny_modes.py --steps 20 "$@"
