#!/usr/bin/env bash
# Installs libtorch 2.11.0 (from the PyPI torch wheel) once per user and machine, outside the clone,
# and links it into the checkout as `.libtorch`, which `.cargo/config.toml` hands to the build.
#
# Idempotent: a finished install is reused by every clone and every CI run on the machine.
# A user who already has libtorch 2.11 or torch 2.11 can skip the download:
#   LIBTORCH=/path/to/libtorch tools/setup.sh            (a libtorch folder: include/ and lib/)
#   DDPM_PYTHON=/path/to/python tools/setup.sh           (a Python whose torch is 2.11.0)
set -euo pipefail

TORCH_VERSION=2.11.0
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${DDPM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm}
venv=$cache/torch-$TORCH_VERSION

torch_dir_of() { "$1" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null; }
torch_version_of() { "$1" -c 'import torch; print(torch.__version__.split("+")[0])'; }

if [ -n "${LIBTORCH:-}" ]; then
  libtorch=$LIBTORCH
elif [ -n "${DDPM_PYTHON:-}" ]; then
  found=$(torch_version_of "$DDPM_PYTHON")
  [ "$found" = "$TORCH_VERSION" ] || { echo "error: $DDPM_PYTHON has torch $found, need $TORCH_VERSION" >&2; exit 1; }
  libtorch=$(torch_dir_of "$DDPM_PYTHON")
else
  mkdir -p "$cache"
  exec 9>"$cache/.torch-$TORCH_VERSION.lock"
  flock 9  # two clones setting up at once wait for one download
  if [ ! -f "$venv/.complete" ]; then
    echo "Installing torch==$TORCH_VERSION into $venv (about 4.6 GB, once per machine)..." >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
    touch "$venv/.complete"
  fi
  # Compile-time CUDA headers (host configuration, libcu++) that the wheel's CUDA runtime headers
  # need, so that the NCCL binding can be built; 3 MB. Without them ddpm uses Gloo on GPUs too.
  if [ ! -f "$venv/.cuda-headers-complete" ]; then
    if "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85"; then
      touch "$venv/.cuda-headers-complete"
    else
      echo "warning: could not install the CUDA headers; building without NCCL (Gloo serves GPUs too)" >&2
    fi
  fi
  libtorch=$(torch_dir_of "$venv/bin/python")
fi

for f in include/torch/script.h lib/libtorch_cpu.so; do
  [ -e "$libtorch/$f" ] || { echo "error: $libtorch is not a libtorch install (no $f)" >&2; exit 1; }
done
ln -sfn "$libtorch" "$root/.libtorch"
echo "libtorch: $libtorch" >&2
