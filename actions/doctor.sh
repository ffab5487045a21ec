#!/usr/bin/env bash
# Check the runner for what this job needs (`cecai-convert doctor`, docs/runners.md) before anything is installed.
# Usage: doctor.sh ROLE PACKAGE_ROOT        ROLE: builder (the convert action) or check (the check action)
# Inputs arrive as environment variables, never expanded by YAML: INPUT_PYTHON, INPUT_INSTALL, INPUT_BACKEND,
# INPUT_PAIR, INPUT_IMAGE, ACTION_REPOSITORY; the job's env may set CECAI_MODEL_SIZE (the disk check) and CECAI_DOCTOR=off (skip).
# Findings print as workflow commands: ::error per missing piece (with its fix), ::warning per unchecked one.
set -euo pipefail
role="$1"
root="$2"
if [[ "${CECAI_DOCTOR:-on}" == off ]]; then
  echo "cecai-convert doctor: skipped (CECAI_DOCTOR=off)"
  exit 0
fi
# Whose pair images the docker backend pulls by default: this action's repository's, unless the caller set
# CECAI_IMAGE_REPO (the same rule as the step that runs the image).
if [[ -z "${CECAI_IMAGE_REPO:-}" && -n "${ACTION_REPOSITORY:-}" ]]; then
  export CECAI_IMAGE_REPO="ghcr.io/${ACTION_REPOSITORY,,}"
fi
args=(--role "$role" --github)
[[ -n "${INPUT_BACKEND:-}" ]] && args+=(--backend "$INPUT_BACKEND")
[[ -n "${INPUT_PAIR:-}" ]] && args+=(--pair "$INPUT_PAIR")
[[ -n "${INPUT_IMAGE:-}" ]] && args+=(--image "$INPUT_IMAGE")
[[ -n "${CECAI_MODEL_SIZE:-}" ]] && args+=(--model-size "$CECAI_MODEL_SIZE")
if [[ "${INPUT_INSTALL:-true}" == true ]]; then
  python="${INPUT_PYTHON:-python3}"
  if ! command -v "$python" >/dev/null; then
    echo "::error title=cecai-converter doctor%3A python::$python is not on PATH. Fix: install Python >= 3.10 (or actions/setup-python) and give it as the action's python input"
    exit 1
  fi
  # The Python the install step will make the venv with runs the doctor from this action's source (stdlib only).
  PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" "$python" -m cecai_converter.doctor "${args[@]}"
else
  # Nothing will be installed: the cecai-convert on PATH checks the rest.
  cecai-convert doctor --skip "python venv" "${args[@]}"
fi
