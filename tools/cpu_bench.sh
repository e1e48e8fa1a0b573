#!/usr/bin/env bash
# CPU speed check: `ddpm bench train` next to the PyTorch baseline script on the same network
# (the tiny preset's UNet with 3 channels at 28x28, batch 64) and threads, alternating runs.
#   tools/cpu_bench.sh [rounds] [path/to/torch_unet_bench.py]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-3}
baseline=${2:-../shared/bench/torch_unet_bench.py}
python=$(readlink -f .libtorch)/../../../../bin/python
for _ in $(seq "$rounds"); do
  target/release/ddpm bench train --preset tiny --channels 3 --size 28 --batch 64 --device cpu --warmup 3 --steps 20 2>/dev/null
  "$python" "$baseline" --device cpu --ch 32 --ch-mult 1,2,2 --num-res-blocks 1 --attn-res "" --dropout 0 --size 28 --batch 64 --warmup 3 --steps 20 2>/dev/null | grep RESULT
done
