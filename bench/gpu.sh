#!/usr/bin/env bash
# One prepared run of the GPU benchmarks at real shapes with random weights (no downloads):
#   stage 1 at GPT-2-small shapes (d 768, 12 layers, V 50257, 32768 latents, window 1024),
#   stage 2 at 69m shapes (CoCoMix d 512 vs matched NTP, bf16, fused AdamW, MFU),
#   SAE decode/train step at GPT-2-small SAE shapes, storage read rates.
# Usage on a CUDA machine: `bash bench/gpu.sh [OUTDIR]`; each script's output goes to OUTDIR/<name>.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/out}}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$out/device.txt" || exit 1
pip install -q -e . >/dev/null 2>&1 || true
run() { local name=$1; shift; echo "== $name: $*"; timeout "${BENCH_TIMEOUT:-240}" "$@" 2>&1 | tee "$out/$name.txt"; }
run extract python bench/extract.py --gpu-shapes --device cuda
run pretrain python bench/pretrain.py --gpu-shapes
run sae python bench/sae.py --full
run storage python bench/storage.py
