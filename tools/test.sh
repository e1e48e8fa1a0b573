#!/usr/bin/env bash
# Runs the test suite from a fresh clone: installs libtorch once per machine, then cargo test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
cargo test --release "$@"
