#!/usr/bin/env bash
# Install cecai-converter from the action's own checkout into a venv under RUNNER_TEMP and put it on PATH.
# Usage: install.sh PACKAGE_ROOT [BACKEND [PAIR]]
#   BACKEND local installs the [local] extra, docker the [docker] extra, empty the base package (plan, publish).
#   PAIR (local only) picks the llama.cpp build flags of that pair's runtime (pairs.py); CMAKE_ARGS overrides them.
#   install.sh --wheel-key PACKAGE_ROOT PAIR   prints the cache key of the llama-cpp-python wheel (pin, arch, flags)
# The llama-cpp-python wheel is built once per pin, CPU architecture and flags into
# $CECAI_WHEEL_CACHE/<key> (default ~/.cache/cecai-converter/wheels/<key>), which the actions cache between runs.
# Inputs arrive as arguments, never expanded by YAML.
set -euo pipefail
python="${INPUT_PYTHON:-python3}"

wheel_key() {
  # The pin and the pair's flags come from the package (one table, pairs.py); only the stdlib is needed here.
  PYTHONPATH="$1/src${PYTHONPATH:+:$PYTHONPATH}" "$python" -m cecai_converter.runtime_build wheel-key "${2:-}"
}

if [[ "${1:-}" == "--wheel-key" ]]; then
  wheel_key "$2" "${3:-}"
  exit 0
fi

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
venv="${RUNNER_TEMP:-/tmp}/cecai-converter-venv"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
find_links=()
if [[ "$extras" == local ]]; then
  key="$(wheel_key "$root" "${3:-}")"
  wheels="${CECAI_WHEEL_CACHE:-$HOME/.cache/cecai-converter/wheels}/$key"
  mkdir -p "$wheels"
  pin="${key%%-*}"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    flags="$(PYTHONPATH="$root/src" "$python" -m cecai_converter.runtime_build cmake-args "${3:-}")"
    echo "==> building llama-cpp-python $pin once for this runner ($flags); later runs reuse $wheels"
    # Minutes of compiling: cmake's output goes to a log beside the wheel, and a line every 30 s says how far it got
    # (scripts/lib/dev_install.py heartbeat, stdlib only); on failure the log's tail is printed.
    CMAKE_ARGS="${CMAKE_ARGS:-$flags}" "$python" "$root/scripts/lib/dev_install.py" heartbeat \
      --what "llama-cpp-python $pin build" --log "$wheels/build.log" -- \
      "$venv/bin/python" -m pip wheel -v --disable-pip-version-check --no-deps -w "$wheels" "llama-cpp-python==$pin"
  fi
  find_links=(--find-links "$wheels")
fi
spec="$root"
if [[ -n "$extras" ]]; then
  spec="${root}[$extras]"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${find_links[@]}" "$spec"
echo "$venv/bin" >> "$GITHUB_PATH"
"$venv/bin/cecai-convert" --version
