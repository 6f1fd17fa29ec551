#!/usr/bin/env bash
# One prepared run of the GPU benchmarks at real shapes with random weights (no downloads):
#   stage 1 at GPT-2-small shapes (d 768, 12 layers, V 50257, 32768 latents, window 1024),
#   stage 2 at 69m shapes (CoCoMix d 512 vs matched NTP, bf16, fused AdamW, MFU),
#   KD samples in the extract pass and every pretrain method vs NTP (69m shapes),
#   lm-eval harness loglikelihood vs a plain forward (69m shapes),
#   SAE decode/train step at GPT-2-small SAE shapes, storage read rates,
#   and a CUDA smoke run of the shipped FSDP config (bf16 mixed precision, NCCL, 1 process: a small
#   quickstart chain makes the inputs, then `pretrain` under FSDP, killed and resumed).
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
run extract-kd python bench/extract.py --gpu-shapes --device cuda --kd-samples 32 --only-kd
run pretrain-methods python bench/pretrain.py --gpu-shapes --methods --rounds 5
run eval python bench/eval.py --gpu-shapes
run sae python bench/sae.py --full
run storage python bench/storage.py

# FSDP on CUDA: the CPU suite runs the FSDP path through a shim (tests/stage2_pretrain/fsdp_on_cpu.py);
# this runs it for real. Tiny inputs from a shortened quickstart, then 40 steps, then --resume to 60.
fsdp() {
  local ws="$out/fsdp-ws" run="$out/fsdp-run"
  rm -rf "$ws" "$run"
  cocomix quickstart --workspace "$ws" --corpus-mb 0.5 --teacher-steps 100 --student-steps 20 --sae-tokens 200000 || return 1
  local q="$ws/quickstart" launch=(accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m cocomix.pipeline.cli)
  "${launch[@]}" pretrain --size tiny --tokens "$q/tokens" --targets "$q/targets" --out "$run" --max-steps 40 --save-every 20 --eval-every 20 || return 1
  "${launch[@]}" pretrain --size tiny --tokens "$q/tokens" --targets "$q/targets" --out "$run" --max-steps 60 --save-every 20 --eval-every 20 --resume || return 1
  python -c "import sys; from cocomix.stage2_pretrain.model import CoCoMixForCausalLM as M; M.from_pretrained(sys.argv[1]); print('fsdp checkpoint loads')" "$run/final"
}
echo "== fsdp: accelerate launch --config_file configs/accelerate/fsdp.yaml (CUDA)"
fsdp 2>&1 | tee "$out/fsdp.txt"
