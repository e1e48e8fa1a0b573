#!/usr/bin/env bash
# Speed check on a GPU machine: ddpm's training step and DDIM sampling next to the PyTorch
# baseline (the same UNet step), on the same card in one run. Compare ratios, never absolute
# numbers from different cards or runs.
#
# Prepare here (the GPU machine has no Rust toolchain):
#   bash tools/gpu-prepare.sh path/to/torch_unet_bench.py
# Run there, from the folder holding .gpu/ (OUT: where results go):
#   OUT=/tmp/out bash .gpu/gpu-check.sh
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
TL=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
log=$out/results.txt
run() { echo "+ $*" | tee -a "$log"; "$@" 2>>"$out/stderr.txt" | tee -a "$log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
date -u | tee -a "$log"
ddpm=$here/ddpm
base=$here/torch_unet_bench.py
# The tests that need a CUDA device (CUDA graphs against eager steps, ...).
run "$here/ddpm-tests" --ignored --test-threads 1
# Training step, cifar10 preset, batch 128, 32x32: ddpm and the PyTorch baseline.
train() { run "$ddpm" bench train --preset cifar10 --batch 128 --device cuda --warmup 10 --steps 50 "$@"; }
torch_train() { run python3 "$base" --device cuda --batch 128 --warmup 10 --steps 50 "$@"; }
train --precision tf32
torch_train --precision f32 --tf32
train --precision bf16
torch_train --precision bf16
torch_train --precision bf16 --compile
train --precision fp16
# The levers: bf16 without autocast's per-op casts, fused GroupNorm+SiLU kernels, the forward
# and backward pass replayed as a CUDA graph, channels-last memory order.
train --precision bf16-pure
train --precision bf16-pure --fused-norm-silu
train --precision bf16-pure --fused-norm-silu --cuda-graph
train --precision bf16 --fused-norm-silu --cuda-graph
train --precision tf32 --fused-norm-silu --cuda-graph
train --precision tf32 --cuda-graph
train --precision bf16-pure --channels-last --cuda-graph
train --precision bf16 --channels-last
torch_train --precision bf16 --channels-last
# Sampling: DDIM-50 on 1,024 images at 32x32, against the same network in PyTorch, both f32 with
# TF32 (ddpm samples in f32 whatever the training precision).
ddim=$here/torch_ddim_bench.py
run "$ddpm" bench sample --preset cifar10 --batch 256 --num 1024 --sample-steps 50 --precision tf32 --device cuda
run "$ddpm" bench sample --preset cifar10 --batch 256 --num 1024 --sample-steps 50 --precision tf32 --fused-norm-silu --device cuda
run python3 "$ddim" --unet-script "$base" --device cuda --batch 256 --num 1024 --sample-steps 50 --precision f32 --tf32
grep RESULT "$log" > "$out/summary.txt"
