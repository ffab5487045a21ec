#!/usr/bin/env bash
# Install cecai-converter from the action's own checkout into a venv under RUNNER_TEMP and put it on PATH.
# Usage: install.sh PACKAGE_ROOT [BACKEND]   BACKEND local installs the [local] extra, docker the [docker] extra,
# empty the base package (plan, publish). Inputs arrive as arguments, never expanded by YAML.
set -euo pipefail
root="$1"
case "${2:-}" in
  local)
    extras="local"
    # torch's CPU build: PyPI's default Linux x86-64 wheel is the multi-GB CUDA one, and the converter needs no GPU.
    export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
    ;;
  docker) extras="docker" ;;
  "") extras="" ;;
  *) echo "::error title=cecai-converter: bad input::backend must be local or docker, got '$2'" >&2; exit 2 ;;
esac
python="${INPUT_PYTHON:-python3}"
venv="${RUNNER_TEMP:-/tmp}/cecai-converter-venv"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
spec="$root"
if [[ -n "$extras" ]]; then
  spec="$root[$extras]"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$spec"
echo "$venv/bin" >> "$GITHUB_PATH"
"$venv/bin/cecai-convert" --version
