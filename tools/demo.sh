#!/usr/bin/env bash
# The main job: trains the tiny preset on the bundled MNIST subset, conditioned on the digit, and
# writes sample grids (a row per digit) into runs/demo/samples/ (latest.png is the newest).
# Extra arguments go to `ddpm train`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
cargo build --release
rm -rf runs/demo
exec target/release/ddpm train --out runs/demo --num-classes auto --guidance 2 "$@"
