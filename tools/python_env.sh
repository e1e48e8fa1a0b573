#!/usr/bin/env bash
# A Python for the tool scripts (tools/*.py): a venv beside the project's torch 2.11 (which it
# sees, not copies) with numpy, pillow, safetensors, matplotlib, diffusers, tensorboard and webdataset. Made once per machine and
# user, like tools/setup.sh; prints the interpreter's path.
#   py=$(bash tools/python_env.sh) && $py tools/class_agreement.py runs/demo
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/tools/setup.sh" >&2
cache=${DDPM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm}
venv=$cache/tools-venv
exec 9>"$cache/.tools-venv.lock"
flock 9
packages="diffusers==0.42.1 numpy pillow safetensors matplotlib tensorboard webdataset"
if [ ! -x "$venv/bin/python" ]; then
  echo "Making the tool scripts' Python in $venv (once per machine)..." >&2
  python3 -m venv "$venv"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  torch_site=$(cd -P "$root/.libtorch/.." && pwd)
  echo "$torch_site" > "$site/ddpm_torch.pth"
fi
# The packages installed are recorded: a list that grows installs what is new.
if [ "$(cat "$venv/.packages" 2>/dev/null)" != "$packages" ]; then
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $packages >&2
  echo "$packages" > "$venv/.packages"
fi
echo "$venv/bin/python"
