#!/usr/bin/env bash
# Install cecai-converter from the action's own checkout into a venv under RUNNER_TEMP and put it on PATH.
# Usage: install.sh PACKAGE_ROOT EXTRAS   (EXTRAS: "" or "local"); inputs arrive as arguments, never expanded by YAML.
set -euo pipefail
root="$1"
extras="${2:-}"
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
