#!/usr/bin/env bash
# Fills .gpu/ with what tools/gpu-check.sh runs on a GPU machine (which has no Rust toolchain):
# the release binary, the library's test binary (for the tests that need a CUDA device), the
# check script and the PyTorch baselines. Usage: bash tools/gpu-prepare.sh [path/to/torch_unet_bench.py]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
baseline=${1:-../shared/bench/torch_unet_bench.py}
cargo build --release
tests=$(cargo test --release --lib --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])')
mkdir -p .gpu
cp target/release/ddpm tools/gpu-check.sh tools/torch_ddim_bench.py tools/torch_adm_bench.py "$baseline" .gpu/
cp "$tests" .gpu/ddpm-tests
ls -la .gpu
