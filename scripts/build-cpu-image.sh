#!/usr/bin/env bash
# Build the CPU_LLM_LLAMA image: scripts/build-image.sh CPU_LLM_LLAMA [TAG]. Kept for the callers that name it (the
# engine tests, the docker backend's hint, CI); see build-image.sh for the environment it reads.
#
# usage: scripts/build-cpu-image.sh [TAG]     (prints the tag on the last line of stdout)
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/build-image.sh" CPU_LLM_LLAMA "$@"
