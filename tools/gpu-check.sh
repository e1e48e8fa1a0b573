#!/usr/bin/env bash
# Speed check on a GPU machine: ddpm's training step and DDIM sampling next to the PyTorch
# baseline (the same UNet step), on the same card in one run. Compare ratios, never absolute
# numbers from different cards or runs.
#
# Prepare here (the GPU machine has no Rust toolchain):
#   bash tools/gpu-prepare.sh path/to/torch_unet_bench.py
# Run there, from the folder holding .gpu/ (OUT: where results go), in two parts of about four
# minutes each, so that each fits one call with room for a rerun:
#   OUT=/tmp/out bash .gpu/gpu-check.sh 1   # CUDA tests, the targets: ddpm vs PyTorch
#   OUT=/tmp/out bash .gpu/gpu-check.sh 2   # the levers one by one, channels-last, sampling
# Back here, the README's tables: python3 tools/gpu_table.py /tmp/out/summary.txt
set -uo pipefail
part=${1:-all}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
TL=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
log=$out/results-$part.txt
run() { echo "+ $*" | tee -a "$log"; "$@" 2>>"$out/stderr-$part.txt" | tee -a "$log"; }
ddpm=$here/ddpm
base=$here/torch_unet_bench.py
ddim=$here/torch_ddim_bench.py
# Training step, cifar10 preset, batch 128, 32x32.
train() { run "$ddpm" bench train --preset cifar10 --batch 128 --device cuda --warmup 10 --steps 50 "$@"; }
torch_train() { run python3 "$base" --device cuda --batch 128 --warmup 10 --steps 50 "$@"; }
# DDIM-50 on 1,024 images at 32x32, f32 with TF32 on both sides (ddpm samples in f32).
sample() { run "$ddpm" bench sample --preset cifar10 --batch 256 --num 1024 --sample-steps 50 --precision tf32 --device cuda "$@"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
date -u | tee -a "$log"
if [[ $part == 1 || $part == all ]]; then
    # The tests that need a CUDA device: fused kernels against libtorch's ops, CUDA graphs and
    # fused kernels against eager training.
    run "$here/ddpm-tests" --ignored --test-threads 1
    train --precision tf32
    torch_train --precision f32 --tf32
    train --precision bf16
    torch_train --precision bf16
    torch_train --precision bf16 --compile
    train --precision bf16-pure --fused-norm-silu --cuda-graph
    train --precision tf32 --fused-norm-silu --cuda-graph
fi
if [[ $part == 2 || $part == all ]]; then
    # Each lever alone: bf16 without autocast's per-op casts, fused GroupNorm+SiLU, CUDA graphs,
    # channels-last memory order.
    train --precision fp16
    train --precision bf16-pure
    train --precision bf16-pure --fused-norm-silu
    train --precision bf16-pure --cuda-graph
    train --precision bf16 --fused-norm-silu --cuda-graph
    train --precision tf32 --cuda-graph
    train --precision bf16-pure --channels-last --cuda-graph
    train --precision bf16 --channels-last
    torch_train --precision bf16 --channels-last
    sample
    sample --fused-norm-silu
    run python3 "$ddim" --unet-script "$base" --device cuda --batch 256 --num 1024 --sample-steps 50 --precision f32 --tf32
fi
grep -h RESULT "$out"/results-*.txt > "$out/summary.txt"
