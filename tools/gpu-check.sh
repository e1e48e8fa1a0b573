#!/usr/bin/env bash
# Speed check on a GPU machine: ddpm's training step and DDIM sampling next to the PyTorch
# baseline (the same UNet step), on the same card in one run. Compare ratios, never absolute
# numbers from different cards or runs.
#
# Prepare here (the GPU machine has no Rust toolchain):
#   bash tools/gpu-prepare.sh path/to/torch_unet_bench.py
# Run there, from the folder holding .gpu/ (OUT: where results go), in parts:
#   OUT=/tmp/out bash .gpu/gpu-check.sh 1   # CUDA tests, the targets: ddpm vs PyTorch
#   OUT=/tmp/out bash .gpu/gpu-check.sh 2   # the levers one by one, channels-last, sampling
#   OUT=/tmp/out bash .gpu/gpu-check.sh 3   # a short `ddpm train` with a resume
#   OUT=/tmp/out bash .gpu/gpu-check.sh 4   # imagenet64/256: ddpm vs PyTorch, checkpointing, batch
# or all three at once (about ten minutes): OUT=/tmp/out bash .gpu/gpu-check.sh
# Back here, the tables of docs/results.md: python3 tools/gpu_table.py /tmp/out/summary.txt
set -uo pipefail
part=${1:-all}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
TL=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
log=$out/results-$part.txt
# Each command gets a time limit (LIMIT seconds, 120 unless set), so that one hang costs only
# its own minutes, and its exit status is logged.
run() {
    echo "+ $*" | tee -a "$log"
    timeout -k 5 "${LIMIT:-120}" "$@" 2>>"$out/stderr-$part.txt" | tee -a "$log"
    echo "rc=${PIPESTATUS[0]}" | tee -a "$log"
}
ddpm=$here/ddpm
base=$here/torch_unet_bench.py
ddim=$here/torch_ddim_bench.py
# Training step, cifar10 preset, batch 128, 32x32. CUDA graphs and the fused GroupNorm+SiLU
# kernels are on by default on CUDA (`auto`); `eager` turns both off.
train() { run "$ddpm" bench train --preset cifar10 --batch 128 --device cuda --warmup 10 --steps 50 "$@"; }
eager=(--cuda-graph false --fused-norm-silu false)
torch_train() { run python3 "$base" --device cuda --batch 128 --warmup 10 --steps 50 "$@"; }
# DDIM-50 on 1,024 images at 32x32, f32 with TF32 on both sides (ddpm samples in f32).
sample() { run "$ddpm" bench sample --preset cifar10 --batch 256 --num 1024 --sample-steps 50 --precision tf32 --device cuda "$@"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
date -u | tee -a "$log"
if [[ $part == 1 || $part == all ]]; then
    # The tests that need a CUDA device: fused kernels against libtorch's ops, CUDA graphs and
    # fused kernels against eager training. Then the targets, eager and with the defaults.
    LIMIT=180 run "$here/ddpm-tests" --ignored --test-threads 1
    train --precision tf32 "${eager[@]}"
    torch_train --precision f32 --tf32
    train --precision tf32
    train --precision bf16 "${eager[@]}"
    torch_train --precision bf16
    LIMIT=240 torch_train --precision bf16 --compile
    train --precision bf16
    train --precision bf16-pure
fi
if [[ $part == 2 || $part == all ]]; then
    # Sampling, then each lever alone: bf16 without autocast's per-op casts, fused
    # GroupNorm+SiLU, CUDA graphs, channels-last memory order.
    sample --fused-norm-silu false
    sample
    run python3 "$ddim" --unet-script "$base" --device cuda --batch 256 --num 1024 --sample-steps 50 --precision f32 --tf32
    train --precision fp16
    # Without the post-hoc EMA profiles (two more EMA updates per step by default).
    train --precision bf16-pure --ema-snapshot-every 0
    train --precision bf16-pure "${eager[@]}"
    train --precision bf16-pure --cuda-graph false
    train --precision bf16-pure --fused-norm-silu false
    train --precision tf32 --fused-norm-silu false
    train --precision bf16-pure --channels-last --fused-norm-silu false
    train --precision bf16 --channels-last --cuda-graph false
    torch_train --precision bf16 --channels-last
fi
if [[ $part == 4 || $part == all ]]; then
    # The networks for large images, bf16, one card: img/s and peak memory with and without
    # activation checkpointing, and the largest batch that fits.
    large() { run "$ddpm" bench train --device cuda --precision bf16 --warmup 3 --steps 10 --ema-snapshot-every 0 "$@"; }
    large --preset imagenet64 --batch 64
    large --preset imagenet64 --batch 64 --activation-checkpointing
    large --preset imagenet256 --batch 8
    large --preset imagenet256 --batch 8 --activation-checkpointing
    # The same networks in PyTorch (the parameter counts agree), bf16 autocast, eager.
    adm() { run python3 "$here/torch_adm_bench.py" --device cuda --precision bf16 --warmup 3 --steps 10 "$@"; }
    adm --preset imagenet64 --batch 64
    adm --preset imagenet64 --batch 64 --checkpointing
    adm --preset imagenet256 --batch 8
    adm --preset imagenet256 --batch 8 --checkpointing
    run "$ddpm" bench train --device cuda --precision bf16 --ema-snapshot-every 0 --preset imagenet256 --find-batch --batch 8
    run "$ddpm" bench train --device cuda --precision bf16 --ema-snapshot-every 0 --preset imagenet256 --find-batch --batch 8 --activation-checkpointing
fi
if [[ $part == 3 || $part == all ]]; then
    # End to end on the GPU: a short run on the bundled digits (the levers on by default), a
    # grid, then a resume that must continue from the checkpoint.
    runs=$(mktemp -d)
    run "$ddpm" train --preset mnist --device cuda --precision bf16-pure --steps 600 --stop-at 300 \
        --sample-every 300 --sample-num 64 --sample-steps 50 --checkpoint-every 300 \
        --log-every 100 --out "$runs/gpu"
    run "$ddpm" train --resume "$runs/gpu" --device cuda
    cp "$runs/gpu/samples/latest.png" "$out/gpu-grid.png" 2>/dev/null
    tail -n 3 "$runs/gpu/metrics.jsonl" | tee -a "$log"
    # The whole training loop at the cifar10 preset's size (the digits as 32x32 RGB): its img/s
    # against `bench train --precision tf32`, which times the step alone on one batch.
    run "$ddpm" train --preset cifar10 --device cuda --precision tf32 --steps 300 --log-every 100 \
        --sample-every 0 --out "$runs/c10"
    tail -n 2 "$runs/c10/metrics.jsonl" | tee -a "$log"
fi
grep -h RESULT "$out"/results-*.txt > "$out/summary.txt"
